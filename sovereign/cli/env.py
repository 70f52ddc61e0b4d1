"""`sovereign env`: every environment variable sovereign reads, its value on this machine, and what it means."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from sovereign.cli.common import friendly_errors, out


@friendly_errors
def env(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """Show the environment variables sovereign reads, their values here (secrets hidden) and what they mean."""
    from rich.markup import escape
    from rich.table import Table

    from sovereign.cli.render import dump_json
    from sovereign.config import Settings

    settings = Settings.from_env()  # a malformed value fails here, in one line, as it would for any command
    rows = [(v.name, v.shown(os.environ), v.meaning) for v in Settings.describe()]
    if as_json:
        out.print_json(
            dump_json(
                {
                    "store": str(settings.home),
                    "variables": [{"name": name, "value": value, "meaning": meaning} for name, value, meaning in rows],
                }
            )
        )
        return
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in ("variable", "value", "meaning"):
        table.add_column(column, overflow="fold")
    for name, value, meaning in rows:
        table.add_row(name, escape(value) if value is not None else "[dim]unset[/]", escape(meaning))
    out.print(f"store: {escape(str(settings.home))}", highlight=False)
    out.print(table)
