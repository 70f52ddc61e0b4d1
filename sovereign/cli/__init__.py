"""The `sovereign` command: the Typer app, each command taken from the module that does its job, and `main`."""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from sovereign.cli import adopt, bench_commands, bundle, env, serve, store_commands, worker

# The command modules import only sovereign.cli.common (and, when a command runs, what it needs), never this module.
# In the order `sovereign --help` lists them.
COMMANDS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("pull", store_commands.pull),
    ("list", store_commands.list_models),
    ("show", store_commands.show),
    ("rm", store_commands.rm),
    ("prune", store_commands.prune),
    ("catalog", store_commands.catalog),
    ("serve", serve.serve),
    ("run", serve.run),
    ("worker", worker.worker),
    ("bench", bench_commands.bench),
    ("fit", bench_commands.fit),
    ("adopt", adopt.adopt),
    ("export", bundle.export),
    ("import", bundle.import_),
    ("env", env.env),
)


def build_app() -> typer.Typer:
    """The `sovereign` Typer app with every command registered."""
    app = typer.Typer(
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        help="Run open-weight LLMs on your own machine.",
    )
    for name, command in COMMANDS:
        app.command(name)(command)
    return app


app = build_app()


def main() -> None:
    """Console-script entry point."""
    level = os.environ.get("SOVEREIGN_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=level, stream=sys.stderr)
    if logging.getLevelName(level) not in (logging.DEBUG, logging.INFO):
        # llama.cpp's own chatter (tensor loading, cache sizes) only when asked for.
        logging.getLogger("sovereign.llama_cpp").setLevel(logging.CRITICAL)
    try:
        app()
    finally:
        # Exit without a last garbage collection over every imported module's objects: ~100 ms per command.
        gc.freeze()
