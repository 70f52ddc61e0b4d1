"""How the CLI draws things with Rich: progress bars, model tables, model details."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from sovereign.catalog import Catalog
from sovereign.store.files import human_bytes
from sovereign.store.manifest import Manifest


class RichPullReporter:
    """A PullReporter that draws one Rich progress bar per phase (bytes, speed, ETA)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> RichPullReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def _started(self) -> Progress:
        # Started on first use: an idle live display still prints a blank line when stopped.
        if not self.progress.live.is_started:
            self.progress.start()
        return self.progress

    def status(self, message: str) -> None:
        """Print a line above the bars."""
        self._started().console.print(f"[dim]•[/] {escape(message)}", highlight=False)

    def begin(self, label: str, total: int | None, completed: int = 0) -> None:
        """Start a new bar."""
        # The label names a file: its '[' is text, not markup for the description column.
        self.task = self._started().add_task(escape(label), total=total, completed=completed)

    def advance(self, nbytes: int) -> None:
        """Move the current bar."""
        if self.task is not None:
            self.progress.advance(self.task, nbytes)

    def end(self) -> None:
        """Finish the current bar (filled when its total was unknown)."""
        if self.task is not None:
            task = self.progress.tasks[self.task]
            if task.total is None:
                self.progress.update(self.task, total=task.completed)
            self.task = None


def format_params(count: int | None) -> str:
    """268098176 -> '268.1M'."""
    if not count:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def _when(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def models_table(manifests: list[Manifest], statuses: Mapping[str, str] | None = None) -> Table:
    """The `sovereign list` table.

    A model whose file is missing or changed (Store.file_status) says so after its name.
    """
    table = Table(show_edge=False, header_style="bold")
    for column in ("NAME", "SIZE", "QUANT", "PARAMS", "CONTEXT", "PULLED"):
        table.add_column(column, justify="right" if column in {"SIZE", "PARAMS", "CONTEXT"} else "left")
    for manifest in manifests:
        gguf = manifest.gguf
        status = (statuses or {}).get(manifest.name, "ok")
        table.add_row(
            manifest.name + (f" [bold red]({status})[/]" if status != "ok" else ""),
            human_bytes(manifest.size),
            gguf.get("quantization") or "-",
            format_params(gguf.get("parameters")),
            f"{gguf['context_length']:,}" if gguf.get("context_length") else "-",
            _when(manifest.pulled_at),
        )
    return table


def manifest_summary(manifest: Manifest, paths: list[str], catalog_template: bool) -> dict[str, Any]:
    """The facts `sovereign show` prints, also its --json output."""
    gguf = manifest.gguf
    return {
        "name": manifest.name,
        "architecture": gguf.get("architecture"),
        "parameters": gguf.get("parameters"),
        "size_label": gguf.get("size_label"),
        "quantization": gguf.get("quantization"),
        "context_length": gguf.get("context_length"),
        "chat_template": "in GGUF"
        if gguf.get("has_chat_template")
        else ("from catalog" if catalog_template else "none"),
        "license": manifest.license,
        "size": manifest.size,
        "source": {
            "kind": manifest.source.kind,
            "reference": manifest.source.reference,
            "detail": manifest.source.detail,
        },
        "sha256_verified": manifest.sha256_verified,
        "pulled_at": manifest.pulled_at,
        "files": [
            {"filename": f.filename, "digest": f.digest, "path": p, "in_place": f.in_place}
            for f, p in zip(manifest.files, paths, strict=False)
        ],
    }


def summary_table(summary: dict[str, Any]) -> Table:
    """`sovereign show` as a two-column table."""
    table = Table(show_header=False, show_edge=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    source = summary["source"]
    rows = [
        ("name", summary["name"]),
        ("architecture", summary["architecture"] or "-"),
        (
            "parameters",
            f"{format_params(summary['parameters'])} ({summary['parameters']:,})" if summary["parameters"] else "-",
        ),
        ("quantization", summary["quantization"] or "-"),
        ("context length", f"{summary['context_length']:,}" if summary["context_length"] else "-"),
        ("chat template", summary["chat_template"]),
        ("license", summary["license"] or "-"),
        ("size", human_bytes(summary["size"])),
        ("source", source["reference"] + (f" ({source['detail']})" if source["detail"] else "")),
        ("sha256", "verified" if summary["sha256_verified"] else "not checked against a published hash"),
        ("pulled", _when(summary["pulled_at"])),
    ]
    rows += [("file", f["path"]) for f in summary["files"]]
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def catalog_table(catalog: Catalog) -> Table:
    """The `sovereign catalog` table."""
    table = Table(show_edge=False, header_style="bold")
    for column in ("NAME", "SIZE", "LICENSE", "SOURCES", "DESCRIPTION"):
        table.add_column(column)
    for name, spec in sorted(catalog.specs.items()):
        marker = " (default)" if name == catalog.default else ""
        table.add_row(
            f"{name}{marker}",
            human_bytes(spec.size) if spec.size else "-",
            spec.license or "-",
            ", ".join(type(s).__name__.removesuffix("Ref").lower() for s in spec.sources),
            spec.description,
        )
    return table


def dump_json(data: Any) -> str:
    """Stable JSON for --json output."""
    return json.dumps(data, indent=2, sort_keys=True)
