"""Which models are loaded: load on demand, keep at most N (least recently used goes), unload when idle.

Each loaded model lives in a process of its own (engine/process.py): unloading ends that process,
and a crashed one is dropped from the pool so that the next request loads it afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from sovereign.catalog import Catalog, ModelSpec
from sovereign.config import AGENT_CONTEXT, DEFAULT_MAX_QUEUE
from sovereign.engine.chat_template import (
    FALLBACK_STOPS,
    FALLBACK_TEMPLATE,
    ChatTemplate,
)
from sovereign.engine.formats import ChatFormat, detect
from sovereign.engine.kernels import kernel_choice, record_crash
from sovereign.engine.process import ModelFacts, ModelProcess
from sovereign.engine.wire import LoadOptions
from sovereign.errors import InvalidReference, ModelNotFound
from sovereign.model_routes import ModelRoutes, is_closed_api_name
from sovereign.refs import parse_name
from sovereign.store import Store, spec_from_manifest
from sovereign.store.manifest import Manifest

log = logging.getLogger(__name__)
serving_log = logging.getLogger("sovereign.serving")  # what `serve` tells its user as models load (shown at INFO)
# A loaded model turning idle is not signalled to the pool: a load queued behind busy models looks again this often.
ROOM_RECHECK_SECONDS = 0.5


@dataclass
class LoadedModel:
    """A model ready to serve: its process (scheduler + llama.cpp state), chat template and stop strings."""

    name: str
    manifest: Manifest
    process: ModelProcess
    template: ChatTemplate
    stops: tuple[str, ...]
    format: ChatFormat = field(default_factory=lambda: detect(None))  # how its answers write reasoning and tool calls
    pinned: bool = False  # named on the command line: never unloaded for idleness

    @property
    def facts(self) -> ModelFacts:
        return self.process.facts


@dataclass
class PoolOptions:
    """Limits for the pool and how each model is loaded."""

    load: LoadOptions = field(default_factory=LoadOptions)
    max_models: int = 1
    keep_alive: float | None = 300.0  # seconds idle before unloading; None keeps models forever
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting for a slot before new ones get ServerBusy
    request_timeout: float | None = None  # seconds from submission before a request is stopped
    kernel_home: Path | None = None  # where the CPU-kernel verdict is kept; None: load without probing (tests)
    extra_buffers: str = "auto"  # SOVEREIGN_EXTRA_BUFFERS: auto (probe once), on, off
    routes: ModelRoutes = field(default_factory=ModelRoutes)  # --alias rules and the closed-API fallback


def _context_note(facts: ModelFacts, chosen: bool) -> str:
    """The context each request gets, and whether an agent's prompt fits in it."""
    note = f"{facts.n_ctx:,} tokens of context per request, {facts.n_parallel} at once"
    if chosen or facts.n_ctx >= AGENT_CONTEXT:
        return note + (
            " (room for an agent's prompt, such as Claude Code's ~20k tokens)" if facts.n_ctx >= AGENT_CONTEXT else ""
        )
    if facts.n_ctx_train < AGENT_CONTEXT:
        return note + f" (the model was trained for {facts.n_ctx_train:,}: too few for an agent such as Claude Code)"
    return (
        note + f" (memory holds no more: agents such as Claude Code need ~{AGENT_CONTEXT // 1024}k; try --parallel 1)"
    )


def _gpu_note(facts: ModelFacts) -> str:
    """Where the layers are: the line a GPU user checks to see that the GPU build took (README, "GPUs")."""
    if facts.n_gpu_layers <= 0:
        return "all layers on the CPU"
    where = "the RPC workers" if facts.workers else "the GPU"
    return f"{facts.n_gpu_layers}/{facts.n_layers + 1} layers on {where}"  # llama.cpp counts the output layer too


def _worker_notes(facts: ModelFacts) -> list[str]:
    """One line per RPC worker device: where it is, its memory, and the layers it holds."""
    notes = []
    gib = 1024**3
    for worker in facts.workers:
        layers = worker["layers"]
        held = f"layers {layers[0]}-{layers[-1]} of {facts.n_layers + 1}" if layers else "no layers"
        if layers and layers[-1] == facts.n_layers:  # llama.cpp counts the output layer as the last
            held += " (the output layer included)"
        notes.append(
            f"worker {worker['worker']} ({worker['device']}, {worker['free'] / gib:.1f} GiB free of "
            f"{worker['total'] / gib:.1f} GiB) holds {held}"
        )
    return notes


class StartProcess(Protocol):
    """Starts a model's process and returns once it has loaded: `ModelProcess.start`, or a test's stand-in."""

    async def __call__(
        self, name: str, path: Path, options: LoadOptions, *, max_queue: int, timeout: float | None
    ) -> ModelProcess: ...


class ModelPool:
    """Loaded models by store name, guarded so that one name is loaded once."""

    def __init__(
        self, store: Store, catalog: Catalog, options: PoolOptions, start_process: StartProcess | None = None
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.options = options
        # Injected (as Ollama's scheduler takes newServerFn) so eviction, keep-alive and crashes test in milliseconds.
        self._start_process = start_process or ModelProcess.start
        self._loaded: dict[str, LoadedModel] = {}
        self._pinned_crashed: set[str] = set()  # pinned models that crashed: pinned again when reloaded
        self._closing: set[asyncio.Future[None]] = set()  # crashed processes' sockets being closed
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._reaper: asyncio.Task[None] | None = None
        # Loads queue here, one at a time making room and taking a place, so that loaded + starting stays
        # within --max-models (a burst naming N models must not start N processes at once).
        self._room = asyncio.Lock()
        self._room_changed = asyncio.Event()  # replaced each time it is set: wakes every load waiting for room
        self._starting = 0  # places taken by loads under way: they count against --max-models as loaded models do
        self._queued: set[str] = set()  # names whose load still waits for a place (nothing started yet)
        self._awaiting: dict[str, int] = {}  # requests waiting on each name's load: its model is theirs, not a victim
        # Told the loaded models' names whenever they change (`serve` records them so that `rm` can warn).
        self.on_change: Callable[[list[str]], None] | None = None

    # --- names ----------------------------------------------------------------------

    def resolve(self, text: str) -> Manifest:
        """The pulled model a request names, or ModelNotFound.

        Looked up by --alias rules, then catalog aliases, then closed-API fallbacks.
        """
        routes = self.options.routes
        mapped = routes.mapped(text)
        manifest = self.pulled(mapped if mapped is not None else text)
        if manifest is None and mapped is None and (fallback := routes.fallback_for(text)) is not None:
            manifest = self.pulled(fallback)
        if manifest is not None:
            return manifest
        if mapped is not None:
            raise ModelNotFound(
                f"the model {text!r} maps to {mapped!r}, which is not pulled", f"pull it first: sovereign pull {mapped}"
            )
        if is_closed_api_name(text):
            raise ModelNotFound(
                f"the model {text!r} is a closed API's",
                f"map it to a local model: sovereign serve --alias '{text.split('-')[0]}-*=MODEL'",
            )
        raise ModelNotFound(
            f"the model {text!r} does not exist or is not pulled", f"pull it first: sovereign pull {text}"
        )

    def pulled(self, text: str) -> Manifest | None:
        """The pulled model a name (or catalog alias) stands for, if any."""
        try:
            name = parse_name(text)
        except InvalidReference:
            return None
        return self.store.get_first(name, self.catalog.canonical(name))

    def spec_for(self, manifest: Manifest) -> ModelSpec | None:
        """The catalog entry the model was pulled as, if any."""
        # A model imported from a bundle carries the settings its catalog entry had on the machine it came from.
        return self.catalog.get(parse_name(manifest.name)) or spec_from_manifest(manifest)

    @property
    def loaded(self) -> dict[str, LoadedModel]:
        return dict(self._loaded)

    @property
    def loading(self) -> list[str]:
        return list(self._loading)

    # --- loading ----------------------------------------------------------------------

    async def get(self, text: str, *, pin: bool = False) -> LoadedModel:
        """The loaded model for a name, loading it (once, however many requests ask) if needed."""
        # A loaded model asked for by its own name needs no trip to the store.
        model = await self._usable(text)
        if model is None:
            manifest = self.resolve(text)
            model = await self._usable(manifest.name)
            if model is None:
                return await self._load_once(manifest, pin)
        model.process.last_used = time.monotonic()
        model.pinned = model.pinned or pin
        return model

    async def _usable(self, name: str) -> LoadedModel | None:
        """A loaded, living model; one whose RPC worker has dropped its connection is unloaded first.

        Its process would abort at its next step: the request that finds it so reloads it instead
        (and fails fast, naming the worker, while the worker is still away).
        """
        model = self._alive(name)
        if model is not None and model.process.active == 0 and model.process.workers_lost():
            serving_log.warning("%s: an RPC worker closed its connection: reloading the model", model.name)
            await self.unload(model.name)
            return None
        return model

    def _alive(self, name: str) -> LoadedModel | None:
        """A loaded model whose process still runs (one that just died is about to leave the pool)."""
        model = self._loaded.get(name)
        return model if model is not None and model.process.alive else None

    async def _load_once(self, manifest: Manifest, pin: bool) -> LoadedModel:
        """Load a model, joining a load of the same name already under way."""
        name = manifest.name
        task = self._loading.get(name)
        if task is None:
            task = asyncio.create_task(self._load(manifest, pin))
            self._loading[name] = task

            def forget(_task: asyncio.Task[LoadedModel], key: str = name) -> None:
                self._loading.pop(key, None)

            task.add_done_callback(forget)
        self._awaiting[name] = self._awaiting.get(name, 0) + 1
        try:
            # Shielded: a load that has started goes on for the next request even if this one's client leaves.
            return await asyncio.shield(task)
        finally:
            # This runs as the request resumes, before its caller takes hold of the model (no await in between),
            # so a load waiting for room never evicts a model on its way to the requests that loaded it.
            self._awaiting[name] -= 1
            if not self._awaiting[name]:
                del self._awaiting[name]
                if name in self._queued:  # every client left while the load waited for room: nobody wants it
                    task.cancel()
            self._signal_room()

    async def _load(self, manifest: Manifest, pin: bool) -> LoadedModel:
        self._queued.add(manifest.name)
        try:
            await self._take_place(manifest.name)
        finally:
            self._queued.discard(manifest.name)
        try:
            return await self._start(manifest, pin)
        finally:
            self._starting -= 1  # loaded (and counted in _loaded now) or failed: either way its place is free
            self._signal_room()

    async def _start(self, manifest: Manifest, pin: bool) -> LoadedModel:
        """Start the model's process in the place taken for it, and add it to the pool."""
        spec = self.spec_for(manifest)
        options = self.options.load
        if options.n_ctx is None and spec and spec.context_length:
            options = replace(options, preferred_ctx=spec.context_length)
        path = self.store.model_path(manifest)
        # The prompt cache's files are keyed to the model file's sha256: never read by another model.
        # (An in-place file without a sha256 is named by its path, size and time instead.)
        identity = [f.digest or f"{f.path}:{f.size}:{f.mtime_ns}" for f in manifest.files]
        options = replace(options, model_id=",".join(identity))
        if spec and spec.chat_template:  # a catalog template that cannot compile fails before anything loads
            ChatTemplate(spec.chat_template, origin="catalog")
        if self.options.kernel_home is not None:  # fast kernels only once a child process has survived them
            choice = await asyncio.to_thread(kernel_choice, self.options.kernel_home, path, self.options.extra_buffers)
            options = replace(options, use_extra_bufts=choice.use_extra_bufts)
        process = await self._start_process(
            manifest.name, path, options, max_queue=self.options.max_queue, timeout=self.options.request_timeout
        )
        for line in _worker_notes(process.facts):
            serving_log.info("%s: %s", manifest.name, line)
        try:
            template, stops = self._template_for(process.facts, path, spec)
        except BaseException:
            await process.close()  # a template that cannot compile must not leave the model loaded
            raise
        crashed = self._loaded.get(manifest.name)  # a dead predecessor not yet dropped
        pinned = pin or manifest.name in self._pinned_crashed or (crashed is not None and crashed.pinned)
        family = detect(template.source if template.origin != "fallback" else None)
        model = LoadedModel(manifest.name, manifest, process, template, stops, family, pinned=pinned)
        self._pinned_crashed.discard(manifest.name)
        process.on_exit = self._forget_crashed
        self._loaded[manifest.name] = model
        self._changed()
        self._start_reaper()
        facts = process.facts
        serving_log.info(
            "%s loaded: %s; %s", manifest.name, _context_note(facts, options.n_ctx is not None), _gpu_note(facts)
        )
        return model

    def _forget_crashed(self, process: ModelProcess, crash: str | None) -> None:
        """A crashed model leaves the pool at once, so the next request loads it afresh."""
        if crash is None:
            return
        closing = asyncio.ensure_future(process.close())  # closes its socket (the child is reaped already)
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        model = self._loaded.get(process.name)
        if model is not None and model.process is process:
            self._loaded.pop(process.name, None)
            if model.pinned:
                self._pinned_crashed.add(model.name)
            self._signal_room()
            self._changed()
        if self.options.kernel_home is not None and process.options.use_extra_bufts:
            record_crash(self.options.kernel_home, crash, process.path, self.options.extra_buffers)

    def _template_for(
        self, facts: ModelFacts, path: Path, spec: ModelSpec | None
    ) -> tuple[ChatTemplate, tuple[str, ...]]:
        """The catalog's template override, else the GGUF's own, else a plain transcript."""
        bos, eos = facts.bos_text, facts.eos_text
        control = facts.control_tokens or None  # the vocabulary's own: client text never becomes one of them
        stops = tuple(spec.stop) if spec else ()
        if spec and spec.chat_template:
            return ChatTemplate(
                spec.chat_template, bos_token=bos, eos_token=eos, origin="catalog", control_tokens=control
            ), stops
        own = facts.metadata.get("tokenizer.chat_template")
        if own:
            return ChatTemplate(own, bos_token=bos, eos_token=eos, origin="gguf", control_tokens=control), stops
        log.warning("%s has no chat template: using a plain transcript format", path.name)
        return ChatTemplate(FALLBACK_TEMPLATE, bos_token=bos, eos_token=eos, origin="fallback"), stops + FALLBACK_STOPS

    async def _take_place(self, name: str) -> None:
        """Wait until one more model fits under max_models, unloading idle ones (least recently used first)."""
        limit = max(1, self.options.max_models)
        told = False
        async with self._room:
            while (held := len(self._loaded) + self._starting) >= limit:
                changed = self._room_changed  # taken before looking, so that no change goes unheard
                idle = [m for m in self._loaded.values() if self._evictable(m)]
                if idle:
                    victim = min(idle, key=lambda m: m.process.last_used)
                    await asyncio.shield(self.unload(victim.name))  # a cancelled wait must not half-close a victim
                    continue
                if held == limit and not self._starting and not self._awaiting.keys() & self._loaded.keys():
                    # Every loaded model is generating: one more may load rather than fail, but only one more.
                    log.warning("all %d loaded models are busy: loading %s, one more than --max-models", held, name)
                    break
                if not told:
                    log.info("%s waits for room: %d models loaded or loading (--max-models %d)", name, held, limit)
                    told = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), ROOM_RECHECK_SECONDS)
            self._starting += 1

    def _evictable(self, model: LoadedModel) -> bool:
        """Dead, or idle and not on its way to the requests that loaded it."""
        if not model.process.alive:  # a dead predecessor of a model being loaded again holds no requests
            return True
        return model.process.active == 0 and model.name not in self._awaiting

    def _changed(self) -> None:
        """Tell on_change which models are loaded now."""
        if self.on_change is not None:
            self.on_change(sorted(self._loaded))

    def _signal_room(self) -> None:
        """Wake the loads waiting for room: a place was freed, or a model reached its requests."""
        self._room_changed.set()
        self._room_changed = asyncio.Event()

    async def unload(self, name: str) -> None:
        """Free a loaded model: its process ends (failing what it still runs), and with it all its memory."""
        model = self._loaded.pop(name, None)
        if model is not None:
            log.info("unloading %s", name)
            self._changed()
            try:
                await model.process.close()
            finally:
                self._signal_room()  # after the process has ended: its memory is free for the next load

    # --- keep-alive -------------------------------------------------------------------

    def _start_reaper(self) -> None:
        if self.options.keep_alive is not None and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.create_task(self._reap())

    async def _reap(self) -> None:
        """Unload models idle for longer than keep_alive."""
        keep_alive = self.options.keep_alive or 0.0
        while self._loaded:
            await asyncio.sleep(min(5.0, max(0.2, keep_alive / 4)))
            now = time.monotonic()
            for model in list(self._loaded.values()):
                if not model.pinned and model.process.active == 0 and now - model.process.last_used >= keep_alive:
                    await self.unload(model.name)

    async def close(self) -> None:
        """Unload everything, stopping loads under way and those waiting for room."""
        if self._reaper is not None:
            self._reaper.cancel()
        loads = list(self._loading.values())
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        for name in list(self._loaded):
            await self.unload(name)
