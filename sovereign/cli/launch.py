"""Glue shared by `serve` and `run`: make sure models are pulled, parse durations, build the pool."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from rich.console import Console

from sovereign.catalog import Catalog
from sovereign.config import DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT, Settings
from sovereign.engine import ModelPool, PoolOptions
from sovereign.engine.wire import GpuSplit, LoadOptions, Speculate
from sovereign.errors import ModelNotFound, SovereignError
from sovereign.model_routes import ModelRoutes
from sovereign.refs import parse_name
from sovereign.store import Store

DEFAULT_PORT = 11800  # clear of Ollama (11434), llama-server (8080), LM Studio (1234), vLLM (8000)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ


def parse_keep_alive(text: str) -> float | None:
    """Seconds a model may sit idle: '5m', '30s', '1h', '0' (unload at once); '-1' or 'forever' keeps it."""
    text = text.strip().lower()
    if text in ("-1", "forever", "inf", "never"):
        return None
    match = _DURATION.match(text)
    if not match:
        raise SovereignError(
            f"--keep-alive {text!r} is not a duration", "use e.g. 30s, 5m, 1h, 0, or -1 to keep models loaded"
        )
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


def parse_cache_size(text: str | None, option: str) -> int | None:
    """A prompt cache budget: a size such as 4GiB, 0 for off, or None (not given) for the default."""
    from sovereign.server.guards import parse_size

    if text is None:
        return None
    return 0 if text.strip() in ("0", "off") else parse_size(text, option)


def ensure_pulled(name: str, settings: Settings, store: Store, catalog: Catalog, console: Console) -> str:
    """The store name for `name`, pulling it first (with progress) when the catalog knows it but the store lacks it."""
    model = parse_name(name)
    if (manifest := store.get_first(model, catalog.canonical(model))) is not None:
        store.check_files(manifest)  # an adopted file deleted or changed since: refused now, in one line
        return manifest.name
    if catalog.get(catalog.canonical(model)) is None:
        raise ModelNotFound(
            f"{name} is not pulled and not in the catalog",
            f"pull it first (sovereign pull {name}) or see `sovereign catalog`",
        )
    from sovereign.cli.render import RichPullReporter
    from sovereign.store import pull as pull_model

    console.print(f"[dim]{name} is not pulled yet: pulling it first[/]", highlight=False)
    with RichPullReporter(console) as reporter:
        result = pull_model(name, settings=settings, catalog=catalog, store=store, reporter=reporter)
    return result.manifest.name


def draft_model_path(
    draft: str | None,
    speculate: Speculate,
    served: list[str],
    settings: Settings,
    store: Store,
    catalog: Catalog,
    console: Console,
) -> str | None:
    """The file of the --draft model (pulled first if needed), refused in one line if it cannot guess for `served`."""
    if draft is None:
        if speculate is Speculate.draft:
            raise SovereignError("--speculate draft needs a draft model", "add --draft MODEL")
        return None
    from sovereign.store.gguf_header import vocabulary_mismatch

    name = ensure_pulled(draft, settings, store, catalog, console)
    path = store.model_path(store.require(parse_name(name)))
    for model in served:
        reason = vocabulary_mismatch(store.model_path(store.require(parse_name(model))), path)
        if reason is not None:
            raise SovereignError(
                f"--draft {name} cannot guess tokens for {model}: {reason}",
                "pick a draft model of the same family (the same tokenizer), e.g. a smaller size of it",
            )
    return str(path)


def check_port_free(host: str, port: int) -> None:
    """Fail with one clear line, before loading anything, if the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SovereignError(
                f"cannot listen on {host}:{port}: {exc.strerror}",
                "another server is using that port: pick another with --port",
            ) from None


@dataclass(frozen=True)
class EngineOptions:
    """The engine knobs `serve` and `run` share."""

    ctx: int | None = None
    gpu_layers: int | None = None
    threads: int | None = None
    max_models: int = 1
    keep_alive: float | None = 300.0
    parallel: int | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    timeout: float | None = DEFAULT_TIMEOUT
    cache_ram: int | None = None  # bytes for the prompt cache in memory; None: the default, 0: off
    cache_disk: int | None = None  # and on disk
    speculate: Speculate = Speculate.auto
    draft_path: str | None = None  # a draft model's file (--draft), checked against the served models' vocabularies
    gpu_split: GpuSplit = GpuSplit()  # --split-mode, --main-gpu, --tensor-split
    rpc_servers: tuple[str, ...] = ()  # --rpc: workers (host:port) that hold the model's layers

    def validate(self) -> None:
        checks = (
            ("--ctx", self.ctx, 16),
            ("--threads", self.threads, 1),
            ("--max-models", self.max_models, 1),
            ("--parallel", self.parallel, 1),
            ("--max-queue", self.max_queue, 0),
        )
        for flag, value, low in checks:
            if value is not None and value < low:
                raise SovereignError(f"{flag} must be at least {low}, got {value}", None)
        if self.parallel is not None and self.parallel > MAX_PARALLEL:
            raise SovereignError(f"--parallel must be at most {MAX_PARALLEL}, got {self.parallel}", None)
        if self.rpc_servers and self.max_models > 1:
            raise SovereignError(
                "--rpc serves one model at a time (a worker serves one head's model at a time)",
                "name one model and leave --max-models at 1",
            )
        if self.timeout is not None and self.timeout <= 0:
            raise SovereignError(f"--timeout must be positive (or 0 for none), got {self.timeout:g}", None)


def build_pool(
    store: Store, catalog: Catalog, options: EngineOptions, settings: Settings, routes: ModelRoutes | None = None
) -> ModelPool:
    """A model pool configured from the command line."""
    options.validate()
    load = LoadOptions(
        n_ctx=options.ctx,
        n_gpu_layers=options.gpu_layers,
        n_threads=options.threads,
        n_parallel=options.parallel,
        cache_ram=options.cache_ram,
        cache_disk=options.cache_disk,
        cache_dir=str(settings.prompt_cache_dir),
        speculate=options.speculate,
        draft_path=options.draft_path,
        gpu_split=options.gpu_split,
        rpc_servers=options.rpc_servers,
        rpc_timeout=settings.rpc_timeout,
    )
    pool_options = PoolOptions(
        load=load,
        max_models=options.max_models,
        keep_alive=options.keep_alive,
        max_queue=options.max_queue,
        request_timeout=options.timeout,
        kernel_home=settings.home,
        extra_buffers=settings.extra_buffers,
        routes=routes or ModelRoutes(),
    )
    return ModelPool(store, catalog, pool_options)
