"""`sovereign adopt`: register the models Ollama, the Hugging Face cache, LM Studio and llama.cpp already downloaded."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.markup import escape

from sovereign.cli.common import Core, err, friendly_errors, out


class StoreKind(StrEnum):
    """The stores `adopt` can scan."""

    ollama = "ollama"
    hf = "hf"
    lmstudio = "lmstudio"
    llamacpp = "llamacpp"


@friendly_errors
def adopt(
    from_: Annotated[
        list[StoreKind] | None,
        typer.Option(
            "--from", help="Scan only this store: ollama, hf, lmstudio or llamacpp (repeatable; default: all)."
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="List what would be adopted (store, name, size, path) without registering anything."
        ),
    ] = False,
) -> None:
    """Register other tools' GGUF downloads (Ollama, Hugging Face cache, LM Studio, llama.cpp), without copying them."""
    _adopt([kind.value for kind in from_ or list(StoreKind)], dry_run)


def _adopt(layouts: list[str], dry_run: bool) -> None:
    """Scan the stores named, register (or with dry_run list) what they hold, and report each model."""
    from sovereign.cli.render import RichPullReporter
    from sovereign.store.adopt import LAYOUT_LABELS
    from sovereign.store.adopt import adopt as adopt_models
    from sovereign.store.files import human_bytes

    core = Core()
    with RichPullReporter(err) as reporter:
        report = adopt_models(core.store, layouts, dry_run=dry_run, reporter=reporter)
    if not report.outcomes:
        looked = "; ".join(
            f"{LAYOUT_LABELS[k]}: {', '.join(str(p) for p in paths)}" for k, paths in report.scanned.items()
        )
        err.print(f"found no GGUF models ({escape(looked)})", highlight=False, soft_wrap=True)
        return
    width = max(len(o.name) for o in report.outcomes)
    for outcome in report.outcomes:
        candidate = outcome.candidate
        layout, path, size = candidate.layout, escape(str(candidate.files[0])), human_bytes(candidate.size)
        if outcome.action == "would adopt":
            out.print(
                f"would adopt  {escape(outcome.name):<{width}}  {layout:<8}  {size:>9}  {outcome.how:<9}  {path}",
                highlight=False,
                soft_wrap=True,
            )
        elif outcome.action == "adopted":
            err.print(
                (
                    f"[green]✓[/] adopted [bold]{escape(outcome.name)}[/] from {LAYOUT_LABELS[layout]} "
                    f"({size}, {outcome.how}): {path}"
                ),
                highlight=False,
                soft_wrap=True,
            )
        elif outcome.action == "present":
            err.print(
                f"[dim]· {escape(outcome.name)} is {escape(outcome.reason)}: {path}[/]", highlight=False, soft_wrap=True
            )
        else:
            err.print(
                f"[yellow]skipped[/] {path} ({LAYOUT_LABELS[layout]}): {escape(outcome.reason)}",
                highlight=False,
                soft_wrap=True,
            )
        for note in outcome.notes:
            err.print(f"  [yellow]note:[/] {escape(outcome.name)}: {escape(note)}", highlight=False, soft_wrap=True)
    counts = {
        action: sum(o.action == action for o in report.outcomes)
        for action in ("adopted", "would adopt", "present", "skipped")
    }
    done = counts["would adopt"] if dry_run else counts["adopted"]
    links = sum(o.how == "hard link" for o in report.outcomes if o.action in ("adopted", "would adopt"))
    verb = "would adopt" if dry_run else "adopted"
    err.print(
        f"{verb} {done} model(s)"
        + (f" ({links} hard link(s), {done - links} in place)" if done else "")
        + f", {counts['present']} already in the store, {counts['skipped']} skipped"
        + (" — run without --dry-run to register them" if dry_run and done else ""),
        highlight=False,
        soft_wrap=True,
    )
