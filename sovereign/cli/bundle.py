"""`sovereign export` and `sovereign import`: carry models (and the runtime) to a machine without a network."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from sovereign.cli.common import Core, err, friendly_errors


@friendly_errors
def export(
    models: Annotated[list[str], typer.Argument(help="Pulled models to export, e.g. gemma3:270m qwen3:8b.")],
    to: Annotated[str, typer.Option("--to", help="A new folder, a FILE.tar, or - for a tar on stdout.")],
    split: Annotated[
        str | None,
        typer.Option("--split", help="Cut model files into pieces of this size (4G for FAT32 sticks; 4GiB, 500M)."),
    ] = None,
    with_runtime: Annotated[
        bool,
        typer.Option(
            "--with-runtime",
            help="Also add wheels of sovereign and every dependency for this platform, for `pip install --no-index`.",
        ),
    ] = False,
) -> None:
    """Write models to a folder or tar for a machine without a network (verified on import)."""
    from sovereign.cli.render import RichPullReporter
    from sovereign.store.bundle import export_bundle, parse_split
    from sovereign.store.files import human_bytes

    core = Core()
    piece = parse_split(split) if split else None
    names = [core.resolve_name(m) for m in models]
    if to == "-" and sys.stdout.isatty():
        from sovereign.store.bundle import BundleError

        raise BundleError(
            "refusing to write a tar to the terminal",
            "redirect it: sovereign export NAME --to - > bundle.tar, or pipe it to ssh",
        )
    started = time.monotonic()
    with RichPullReporter(err) as reporter:
        result = export_bundle(
            core.store, core.catalog, names, to, split=piece, with_runtime=with_runtime, reporter=reporter
        )
    where = "stdout" if to == "-" else to
    err.print(
        (
            f"[green]✓[/] exported {', '.join(result.models)} to {where} ({result.files} files, "
            f"{human_bytes(result.size)}, {time.monotonic() - started:.1f}s)"
        ),
        highlight=False,
    )
    if result.runtime:
        runtime = result.runtime
        err.print(
            (
                f"  runtime: {len(runtime['wheels'])} wheels for Python {runtime['python']} "
                f"({runtime['abi']}, {runtime['platform_tag']})"
            ),
            highlight=False,
        )
    shown = "." if to != "-" and not to.endswith(".tar") else "BUNDLE.tar"
    err.print(
        (
            "  on the other machine: "
            f"{'pip install --no-index --find-links wheels sovereign, then ' if result.runtime else ''}"
            f"sovereign import {shown}"
        ),
        highlight=False,
    )


@friendly_errors
def import_(
    bundle: Annotated[str, typer.Argument(help="A bundle folder, a .tar, or - for a tar on stdin.")],
) -> None:
    """Register the models of a bundle written by `sovereign export`, after checking every file."""
    from sovereign.cli.render import RichPullReporter
    from sovereign.store.bundle import import_bundle

    core = Core()
    with RichPullReporter(err) as reporter:
        result = import_bundle(core.store, bundle, reporter=reporter, min_free_bytes=core.settings.min_free_bytes)
    if result.runtime_note:
        err.print(f"[yellow]warning:[/] {result.runtime_note}", highlight=False, soft_wrap=True)
    elif result.runtime_ok:
        err.print(
            "  the bundle's runtime wheels fit this machine (pip install --no-index --find-links wheels sovereign)",
            highlight=False,
        )
    if result.imported:
        err.print(f"[green]✓[/] imported {', '.join(result.imported)} (every checksum verified)", highlight=False)
    if result.already:
        if not result.imported:
            err.print(f"[green]✓[/] nothing to do: {', '.join(result.already)} already imported", highlight=False)
        else:
            err.print(f"  already here: {', '.join(result.already)}", highlight=False)
