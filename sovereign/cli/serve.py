"""`sovereign serve` and `sovereign run`: load models into a pool, then serve them over HTTP or chat in the terminal."""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sovereign.cli.common import Core, err, friendly_errors
from sovereign.cli.device_options import (
    MainGpuOption,
    RpcOption,
    SplitModeOption,
    TensorSplitOption,
    gpu_split,
    rpc_servers,
)
from sovereign.config import DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT
from sovereign.engine.wire import Speculate, SplitMode

if TYPE_CHECKING:
    from types import FrameType

    from sovereign.engine.pool import ModelPool


class ReasoningFormat(StrEnum):
    """What `serve` does with a model's reasoning."""

    auto = "auto"
    none = "none"


def _engine_options(
    ctx: int | None,
    gpu_layers: int | None,
    threads: int | None,
    max_models: int,
    keep_alive: str,
    cache: tuple[str | None, str | None],
    **serving: Any,
) -> Any:
    from sovereign.cli.launch import EngineOptions, parse_cache_size, parse_keep_alive

    return EngineOptions(
        ctx=ctx,
        gpu_layers=gpu_layers,
        threads=threads,
        max_models=max_models,
        keep_alive=parse_keep_alive(keep_alive),
        cache_ram=parse_cache_size(cache[0], "--cache-ram"),
        cache_disk=parse_cache_size(cache[1], "--cache-disk"),
        **serving,
    )


CtxOption = Annotated[
    int | None,
    typer.Option(
        "--ctx", help="Context length of each request in tokens (default: the model's, capped by free memory)."
    ),
]
GpuLayersOption = Annotated[
    int | None,
    typer.Option("--gpu-layers", help="Layers to offload to the GPU (default: as many as fit; 0 for CPU only)."),
]
ThreadsOption = Annotated[
    int | None, typer.Option("--threads", help="CPU threads (default: the number of physical cores).")
]
CacheRamOption = Annotated[
    str | None,
    typer.Option(
        "--cache-ram",
        help="Memory for the prompt cache beyond the slots: saved conversations a new prompt starts from"
        " (e.g. 4GiB; default: the smaller of 8GiB and a quarter of free memory; 0: off).",
    ),
]
CacheDiskOption = Annotated[
    str | None,
    typer.Option(
        "--cache-disk",
        help="Disk for the prompt cache, under $SOVEREIGN_HOME/cache/prompts: prompts of 1k+ tokens, kept across"
        " restarts (default: the smaller of 16GiB and a quarter of free space; 0: off).",
    ),
]
SpeculateOption = Annotated[
    Speculate,
    typer.Option(
        "--speculate",
        help="Speculative decoding: guess tokens by n-gram lookup in the context and check them in one batch"
        " (same output, faster when an answer repeats its prompt). auto: while few requests run at once;"
        " ngram: always; off: never.",
    ),
]
DraftOption = Annotated[
    str | None,
    typer.Option(
        "--draft",
        help="A small model of the same family (the same vocabulary) that guesses tokens for speculative decoding"
        " (pulled first if missing); --speculate auto then uses it instead of n-gram lookup.",
    ),
]


@friendly_errors
def serve(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Models to load at start (default: the catalog's default). Others load on demand."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the server to your network.")
    ] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 11800).")] = None,
    api_key: Annotated[
        list[str],
        typer.Option(
            "--api-key",
            envvar="SOVEREIGN_API_KEY",
            help="Require this key (Authorization: Bearer or x-api-key); repeatable.",
        ),
    ] = [],  # noqa: B006
    cors_origin: Annotated[
        list[str],
        typer.Option("--cors-origin", help="Allow browser requests from this origin (repeatable; '*' for any)."),
    ] = [],  # noqa: B006
    ctx: CtxOption = None,
    gpu_layers: GpuLayersOption = None,
    tensor_split: TensorSplitOption = None,
    main_gpu: MainGpuOption = 0,
    split_mode: SplitModeOption = SplitMode.layer,
    rpc: RpcOption = None,
    threads: ThreadsOption = None,
    cache_ram: CacheRamOption = None,
    cache_disk: CacheDiskOption = None,
    speculate: SpeculateOption = Speculate.auto,
    draft: DraftOption = None,
    keep_alive: Annotated[
        str,
        typer.Option(
            "--keep-alive", help="Unload a model idle this long (30s, 5m, 1h; -1 never). Models named here stay loaded."
        ),
    ] = "5m",
    max_models: Annotated[
        int, typer.Option("--max-models", help="Models kept loaded at once; the least recently used is unloaded.")
    ] = 1,
    parallel: Annotated[
        int | None,
        typer.Option(
            "--parallel",
            help=(
                "Requests each model serves at once, batched together (default: up to 4, as memory for --ctx "
                "per request allows)."
            ),
        ),
    ] = None,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue",
            help="Requests that may wait for a free slot; beyond them the server answers 503 with Retry-After.",
        ),
    ] = DEFAULT_MAX_QUEUE,
    timeout: Annotated[
        float,
        typer.Option("--timeout", help="Stop a request after this many seconds, queueing included (0: no limit)."),
    ] = DEFAULT_TIMEOUT,
    allowed_hosts: Annotated[
        str | None,
        typer.Option(
            "--allowed-hosts",
            help=(
                "Host names to answer besides this machine's, comma-separated ('*.example.com' for "
                "subdomains, '*' for any; default: any when --host is not loopback)."
            ),
        ),
    ] = None,
    max_body: Annotated[
        str, typer.Option("--max-body", help="Largest request body accepted (e.g. 32MiB, 100MB); larger ones get 413.")
    ] = "32MiB",
    reasoning_format: Annotated[
        ReasoningFormat,
        typer.Option(
            "--reasoning-format",
            help="auto: reasoning goes to reasoning_content / thinking blocks; none: leave the model's text as it is.",
        ),
    ] = ReasoningFormat.auto,
    alias: Annotated[
        list[str],
        typer.Option(
            "--alias",
            "--route",
            help=(
                "Answer requests for model names matching GLOB with MODEL, e.g. 'claude-*=qwen3:8b' "
                "(repeatable; first match wins); with --upstream, the local model for them when the upstream "
                "is blocked. Unmapped claude-*/gpt-* names go to the first served model."
            ),
        ),
    ] = [],  # noqa: B006
    upstream: Annotated[
        list[str],
        typer.Option(
            "--upstream",
            help=(
                "Send API requests to this closed API while it answers, e.g. "
                "anthropic=https://api.anthropic.com or openai=https://api.openai.com/v1 (repeatable); fall "
                "back to the local model when it is blocked."
            ),
        ),
    ] = [],  # noqa: B006
    fallback: Annotated[
        str | None,
        typer.Option(
            "--fallback",
            help="With --upstream: the local model for requests no --route maps (default: the first served model).",
        ),
    ] = None,
    upstream_timeout: Annotated[
        float,
        typer.Option(
            "--upstream-timeout",
            min=0.1,
            help="With --upstream: seconds to connect, and to a streamed answer's first byte, before falling back.",
        ),
    ] = 5.0,
    upstream_answer_timeout: Annotated[
        float,
        typer.Option(
            "--upstream-answer-timeout",
            min=0.1,
            help="With --upstream: seconds to wait for a non-streamed answer (it arrives whole) before falling back.",
        ),
    ] = 300.0,
    upstream_retries: Annotated[
        int,
        typer.Option(
            "--upstream-retries",
            min=0,
            help="With --upstream: retry a 5xx/429 this many times, then fall back (0: pass such answers through).",
        ),
    ] = 0,
    no_fallback_on: Annotated[
        list[str],
        typer.Option(
            "--no-fallback-on",
            help="With --upstream: a cause that does not fall back (connect, dns, tls, timeout, 451, 403; repeatable).",
        ),
    ] = [],  # noqa: B006
) -> None:
    """Serve models over an OpenAI-compatible HTTP API."""
    import uvicorn
    from rich.markup import escape

    from sovereign.cli.gpu_hint import gpu_hint_in_background
    from sovereign.cli.launch import (
        DEFAULT_PORT,
        build_pool,
        check_port_free,
        draft_model_path,
        ensure_pulled,
    )
    from sovereign.cli.upgrade_hint import hint_in_background
    from sovereign.engine import Engine
    from sovereign.gateway import parse_upstream
    from sovereign.model_routes import ModelRoutes, parse_route
    from sovereign.server.app import ServerOptions, create_app
    from sovereign.server.connections import server_protocol
    from sovereign.server.guards import allowed_hosts_for, parse_size

    core = Core()
    port = DEFAULT_PORT if port is None else port
    hosts, body_limit = (
        allowed_hosts_for(host, allowed_hosts),
        parse_size(max_body),
    )  # bad values fail before any loading
    serving = {
        "parallel": parallel,
        "max_queue": max_queue,
        "timeout": timeout or None,
        "speculate": speculate,
        "gpu_split": gpu_split(tensor_split, main_gpu, split_mode),
        "rpc_servers": rpc_servers(rpc),
    }
    options = _engine_options(
        ctx, gpu_layers, threads, max(max_models, len(models or [])), keep_alive, (cache_ram, cache_disk), **serving
    )
    check_port_free(host, port)
    rules = tuple(parse_route(text) for text in alias)  # malformed values fail before any loading
    upstreams = {up.kind: up for up in (parse_upstream(text) for text in upstream)}
    causes = _fallback_causes(no_fallback_on)
    # Every model a request may fall back to is pulled now: a fallback that fails for want of its model
    # is the worst outcome.
    names = [
        ensure_pulled(m, core.settings, core.store, core.catalog, err) for m in models or [str(core.catalog.default)]
    ]
    rules = tuple(
        (pattern, ensure_pulled(target, core.settings, core.store, core.catalog, err)) for pattern, target in rules
    )
    default = ensure_pulled(fallback, core.settings, core.store, core.catalog, err) if fallback else names[0]
    draft_path = draft_model_path(draft, speculate, names, core.settings, core.store, core.catalog, err)
    options = replace(options, draft_path=draft_path)
    hint_in_background(names, str(core.catalog.default), _show_tip)
    gpu_hint_in_background(_show_tip)
    routes = ModelRoutes(rules, fallback=default)
    pool = build_pool(core.store, core.catalog, options, core.settings, routes)
    gateway = None
    if upstreams:
        # aiohttp is imported only by a server with --upstream
        from sovereign.gateway import Gateway

        gateway = Gateway(
            upstreams,
            routes,
            timeout=upstream_timeout,
            answer_timeout=upstream_answer_timeout,
            retries=upstream_retries,
            causes=causes,
            own_keys=bool(api_key),
        )
    server_options = ServerOptions(
        api_keys=tuple(api_key),
        cors_origins=tuple(cors_origin),
        preload=tuple(names),
        allowed_hosts=hosts,
        max_body=body_limit,
        gateway=gateway,
    )
    server_app = create_app(Engine(pool, reasoning_format=reasoning_format.value), server_options)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(
            f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach this machine can use it",
            highlight=False,
        )
    shown = f"[{host}]" if ":" in host else host
    err.print(
        f"[green]✓[/] serving {', '.join(names)} at [bold]http://{shown}:{port}/v1[/] (OpenAI base_url; Ctrl-C stops)",
        highlight=False,
    )
    # A wildcard bind is not an address a browser can open: this machine's own name for it is loopback.
    page_host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, shown)
    err.print(f"  chat in a browser: [bold]http://{page_host}:{port}/[/]", highlight=False)
    for pattern, target in rules:
        err.print(f"  requests for {escape(pattern)} are answered by {target}", highlight=False)
    for up in upstreams.values():
        whose = (
            "its key from SOVEREIGN_UPSTREAM_KEY_" + up.kind.upper()
            if up.key
            else ("no key: set SOVEREIGN_UPSTREAM_KEY_" + up.kind.upper() if api_key else "the client's own key")
        )
        err.print(
            (
                f"  upstream {up.kind}: {up.base_url} receives every {up.kind} request for a non-local model "
                f"(the whole request, with {whose}); {default} answers when it is blocked"
            ),
            highlight=False,
        )
    _log_requests()
    _record_serving(core.store.home, pool, names, f"http://{shown}:{port}")
    uvicorn.run(
        server_app,
        host=host,
        port=port,
        log_level=os.environ.get("SOVEREIGN_LOG_LEVEL", "warning").lower(),
        access_log=False,
        http=server_protocol(),  # deadlines for a request's head and body, and a cap on connections (issue 24)
    )


@friendly_errors
def run(
    model: Annotated[str, typer.Argument(help="A pulled model or a catalog name (pulled first if missing).")],
    prompt: Annotated[
        str | None,
        typer.Argument(help="Answer this and exit; without it, chat interactively (or read stdin when piped)."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    temperature: Annotated[float, typer.Option(min=0, max=2)] = 0.8,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="Stop each answer after this many tokens.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed, for repeatable answers.")] = None,
    ctx: CtxOption = None,
    gpu_layers: GpuLayersOption = None,
    tensor_split: TensorSplitOption = None,
    main_gpu: MainGpuOption = 0,
    split_mode: SplitModeOption = SplitMode.layer,
    rpc: RpcOption = None,
    threads: ThreadsOption = None,
    cache_ram: CacheRamOption = None,
    cache_disk: CacheDiskOption = None,
    speculate: SpeculateOption = Speculate.auto,
    draft: DraftOption = None,
) -> None:
    """Chat with a model in the terminal, or answer one prompt."""
    from sovereign.cli.gpu_hint import gpu_hint_in_background
    from sovereign.cli.launch import build_pool, draft_model_path, ensure_pulled
    from sovereign.cli.repl import run_interactive, run_once
    from sovereign.cli.upgrade_hint import hint_in_background
    from sovereign.engine import SamplingParams

    core = Core()
    split = gpu_split(tensor_split, main_gpu, split_mode)  # a bad value fails before any pulling or loading
    workers = rpc_servers(rpc)
    name = ensure_pulled(model, core.settings, core.store, core.catalog, err)
    draft_path = draft_model_path(draft, speculate, [name], core.settings, core.store, core.catalog, err)
    # what speculates, and where the layers go
    placement = {"speculate": speculate, "draft_path": draft_path, "gpu_split": split, "rpc_servers": workers}
    pool = build_pool(
        core.store,
        core.catalog,
        _engine_options(
            ctx, gpu_layers, threads, 1, "-1", (cache_ram, cache_disk), parallel=1, timeout=None, **placement
        ),
        core.settings,
    )
    sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
    tips: list[str] = []
    hinting = (
        hint_in_background([name], str(core.catalog.default), tips.append),
        gpu_hint_in_background(tips.append),
    )
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is not None:
        run_once(pool, name, prompt, sampling, system)
        _show_tips(hinting, tips)  # after the answer, not inside it
    else:
        _show_tips(hinting, tips)
        run_interactive(pool, name, sampling, system, err)


# `run` waits this long for the tip once its answer is out (measuring the memory bandwidth, once per machine).
TIP_WAIT_SECONDS = 5.0


def _show_tip(line: str) -> None:
    """One line on stderr, apart from the answers."""
    from rich.markup import escape

    # escaped: a GPU's or a model's name with '[' in it is text, not markup
    err.print(f"[yellow]tip:[/] {escape(line)}", highlight=False, soft_wrap=True)


def _show_tips(hinting: tuple[threading.Thread | None, ...], tips: list[str]) -> None:
    """Wait a little for the hints' threads (TIP_WAIT_SECONDS in all), then show what they found."""
    import time

    deadline = time.monotonic() + TIP_WAIT_SECONDS
    for thread in hinting:
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
    for tip in list(tips):
        _show_tip(tip)


def _fallback_causes(disabled: list[str]) -> frozenset[str]:
    """The blocked-upstream causes that fall back, less those --no-fallback-on names."""
    from sovereign.errors import BadUpstream
    from sovereign.gateway import CAUSES

    unknown = sorted(set(disabled) - set(CAUSES))
    if unknown:
        raise BadUpstream(
            f"--no-fallback-on {', '.join(unknown)} is not a cause of falling back", f"choose from {', '.join(CAUSES)}"
        )
    return frozenset(CAUSES) - set(disabled)


def _record_serving(home: Path, pool: ModelPool, names: list[str], url: str) -> None:
    """Let `sovereign rm` on this machine see which models this server serves, until it exits."""
    import atexit
    import signal

    from sovereign.store.serving import ServingRecord

    record = ServingRecord(home, url)
    pool.on_change = lambda loaded: record.write([*names, *loaded])
    record.write(names)
    atexit.register(record.close)  # Ctrl-C: uvicorn returns and KeyboardInterrupt unwinds to exit
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM) or signal.SIG_DFL  # None: a handler not set from Python

    def close_then_die(signum: int, frame: FrameType | None) -> None:
        # uvicorn shuts down on SIGTERM, restores this handler and raises SIGTERM again: the process ends by
        # the signal, before atexit. A harder death (SIGKILL) leaves the record, which `rm` finds stale.
        record.close()
        signal.signal(signum, previous)
        signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, close_then_die)


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
