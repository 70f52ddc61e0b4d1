"""A model's own process: loads one model, runs its batching scheduler, answers the server over a socket.

Started by `ModelProcess` as `python -m sovereign.engine.runtime.worker FD`. A crash in llama.cpp here
(SIGILL, SIGSEGV, an abort) ends only this process; the server sees the socket close and fails
this model's requests alone. Unloading a model is this process exiting, so all its memory goes.

Messages in: load (first), submit, cancel, force, call; the end of the socket means "unload". Out: ready
or failed (once), accepted or refused (per submit), reply (per call), and one `steps` message per
decode step carrying every stream's new tokens and ends.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sovereign.engine import wire
from sovereign.engine.runtime.backend import LlamaBackend
from sovereign.engine.runtime.cache_setup import open_prompt_cache
from sovereign.engine.runtime.draft_model import DraftModel
from sovereign.engine.runtime.prompt_cache import PromptCache
from sovereign.engine.runtime.scheduler import BatchScheduler
from sovereign.engine.stats import RequestStats
from sovereign.engine.wire import Speculate, Step
from sovereign.errors import InvalidRequest, SovereignError

log = logging.getLogger(__name__)
# Vocabulary work and request preparation (grammar compilation) run here, off the socket reader.
HELPER_THREADS = 2


class _Sink:
    """One generation's tokens, queued for the next `steps` message."""

    def __init__(self, request_id: int, worker: Worker) -> None:
        self.id = request_id
        self.stats = RequestStats("", 0)
        self._worker = worker
        self._cancelled = threading.Event()
        self._announced = False
        self.forced: deque[int] = deque()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def push(self, step: Step) -> None:
        if not self._announced:  # the cache reuse and queue wait, known once a slot took the request
            self._announced = True
            stats = self.stats
            self._worker.post(["a", self.id, stats.cached_tokens, stats.queued_seconds or 0.0, stats.cache_source])
        self._worker.post(["t", self.id, wire.step_to_wire(step)])

    def end(self, error: BaseException | None = None) -> None:
        self._worker.forget(self.id)
        self._worker.post(
            [
                "e",
                self.id,
                None if error is None else wire.error_to_wire(error),
                self.stats.cached_tokens,
                self.stats.queued_seconds or 0.0,
                self.stats.cache_source,
                self.stats.drafted_tokens,
                self.stats.accepted_tokens,
            ]
        )


class Worker:
    """Serves one loaded model to the server at the other end of a socket."""

    def __init__(
        self,
        backend: LlamaBackend,
        writer: wire.FrameWriter,
        *,
        max_queue: int,
        timeout: float | None,
        cache: PromptCache | None = None,
        speculate: Speculate = Speculate.off,
        draft_model: DraftModel | None = None,
    ) -> None:
        self.backend = backend
        self._writer = writer
        self._outbox: list[list[Any]] = []
        self._outbox_lock = threading.Lock()
        self._reported: tuple[int, int, dict[str, int] | None] = (0, 0, None)  # (busy, queued, cache) as last sent
        self._sinks: dict[int, _Sink] = {}
        # Submits are prepared (grammar compiled) one at a time, so they join the queue in arrival order;
        # tokenizing and detokenizing run beside them.
        self._admission = ThreadPoolExecutor(1, thread_name_prefix="admit")
        self._helpers = ThreadPoolExecutor(HELPER_THREADS, thread_name_prefix="vocab")
        self.scheduler = BatchScheduler(
            backend,
            max_queue=max_queue,
            timeout=timeout,
            after_step=self.flush,
            cache=cache,
            speculate=speculate,
            draft_model=draft_model,
        )

    # --- the scheduler's side -------------------------------------------------------

    def post(self, item: list[Any]) -> None:
        """Queue an item for the next `steps` message."""
        with self._outbox_lock:
            self._outbox.append(item)

    def forget(self, request_id: int) -> None:
        self._sinks.pop(request_id, None)

    def flush(self) -> None:
        """Send what this step produced as one message, with the figures /metrics shows.

        Also when only they changed.
        """
        try:
            with self._outbox_lock:
                items, self._outbox = self._outbox, []
            scheduler = self.scheduler
            cache = scheduler.cache.figures() if scheduler.cache is not None else None
            figures = (scheduler.busy_slots, scheduler.queued, cache)
            if items or figures != self._reported:
                self._reported = figures
                message = {"op": "steps", "items": items, "busy": figures[0], "queued": figures[1]}
                message["rate"] = scheduler.decode_rate()
                if cache is not None:
                    message["cache"] = cache
                self._send(message)
        except Exception:  # the scheduler's thread must not die quietly: the server would wait forever
            log.exception("could not report a decode step")
            os._exit(70)

    # --- the socket's side --------------------------------------------------------

    def handle(self, message: dict[str, Any]) -> None:
        """Act on one message from the server."""
        op = message.get("op")
        if op == "cancel":
            sink = self._sinks.get(message["id"])
            if sink is not None:
                sink.cancel()
            else:  # an embedding call whose caller left (its future is gone: no reply is wanted)
                self.scheduler.cancel_embedding(message["id"])
        elif op == "submit":
            # Known at once, so that a cancel arriving while it is being prepared still finds it.
            self._sinks[message["id"]] = _Sink(message["id"], self)
            self._admission.submit(self._submit, message)
        elif op == "force":  # a short text (a reasoning end marker): tokenized here, emitted next instead of sampling
            sink = self._sinks.get(message["id"])
            if sink is not None:
                sink.forced.extend(self.backend.tokenize(message["text"], special=True))
        elif op == "call" and message.get("method") == "embed":
            self._embed(message)
        elif op == "call":
            self._helpers.submit(self._call, message)

    def _submit(self, message: dict[str, Any]) -> None:
        request_id = message["id"]
        sink = self._sinks.get(request_id) or _Sink(request_id, self)
        try:
            hints = tuple(int(h) for h in message.get("checkpoints") or ())
            self.scheduler.enqueue(message["prompt"], wire.params_from_wire(message["params"]), sink, hints)
        except Exception as exc:  # noqa: BLE001 - a refusal, sent back as the typed error it is
            self._sinks.pop(request_id, None)
            self._reply(message, error=exc, op="refused")
        else:
            self._send({"op": "accepted", "id": request_id})

    def _call(self, message: dict[str, Any]) -> None:
        try:
            result = self._vocabulary_call(message["method"], message.get("args", []))
        except Exception as exc:  # noqa: BLE001 - any failure is the call's answer; the worker serves on
            self._reply(message, error=exc)
        else:
            self._reply(message, result=result)

    def _vocabulary_call(self, method: str, args: list[Any]) -> Any:
        backend = self.backend
        if method == "tokenize":  # [[text, special], ...] -> one token list per text
            return [backend.tokenize(text, special=special) for text, special in args[0]]
        if method == "pieces":  # token ids, special -> each token's bytes
            return wire.pieces_to_wire([backend.piece(token, special=args[1]) for token in args[0]])
        raise InvalidRequest(f"unknown call {method!r}")

    def _embed(self, message: dict[str, Any]) -> None:
        """Embeddings need the scheduler's thread (it owns the contexts): queued there, a chunk per step."""

        def reply(result: Any, error: BaseException | None) -> None:
            self._reply(message, result=result, error=error)

        try:
            self.scheduler.embed(message["id"], message["args"][0], reply)
        except Exception as exc:  # noqa: BLE001 - closing: the scheduler's refusal is the call's answer
            self._reply(message, error=exc)

    def _reply(
        self, message: dict[str, Any], *, result: Any = None, error: BaseException | None = None, op: str = "reply"
    ) -> None:
        if error is None:
            self._send({"op": op, "id": message["id"], "result": result})
            return
        if not isinstance(error, SovereignError):
            log.exception("a %s failed", message.get("method") or message.get("op"), exc_info=error)
        self._send({"op": op, "id": message["id"], "error": wire.error_to_wire(error)})

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self._writer.send(message)
        except OSError:  # the server is gone; the socket reader will see it and end this process
            pass

    def close(self) -> None:
        """Stop decoding (failing what is left), let the helpers finish, then free the model."""
        self.scheduler.stop()
        self._admission.shutdown(wait=True, cancel_futures=True)
        self._helpers.shutdown(wait=True, cancel_futures=True)
        if self.scheduler.draft_model is not None:
            self.scheduler.draft_model.close()
        self.backend.close()


def open_draft_model(backend: LlamaBackend, options: wire.LoadOptions) -> DraftModel | None:
    """The draft model --draft names, when speculation may use it; None (one warning) when it cannot guess here."""
    if not options.draft_path or options.speculate not in (Speculate.auto, Speculate.draft):
        return None
    try:
        return DraftModel(backend, Path(options.draft_path), options)
    except SovereignError as exc:  # another family's vocabulary (a model loaded on demand), or no memory for it
        log.warning("%s; speculation goes on without it", exc)
        return None


def facts(backend: LlamaBackend) -> dict[str, Any]:
    """What the server needs to know about the loaded model (it never touches llama.cpp itself)."""
    return {
        "pid": os.getpid(),
        "n_ctx": backend.n_ctx,
        "n_ctx_train": backend.n_ctx_train,
        "n_vocab": backend.n_vocab,
        "n_parallel": backend.n_parallel,
        "n_layers": backend.n_layers,
        "n_gpu_layers": backend.n_gpu_layers,
        "n_threads": backend.n_threads,
        "bos": backend.bos,
        "eos": backend.eos,
        "add_bos": backend.add_bos,
        "bos_text": backend.token_text(backend.bos) if backend.bos >= 0 else "",
        "eos_text": backend.token_text(backend.eos) if backend.eos >= 0 else "",
        "metadata": {key: value for key, value in backend.metadata.items() if isinstance(value, str)},
        "control_tokens": backend.control_tokens,
        "workers": backend.worker_report,
    }


def _configure_logging() -> None:
    """The same log level as the server (inherited through SOVEREIGN_LOG_LEVEL), on the same stderr."""
    level = os.environ.get("SOVEREIGN_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s:%(name)s:%(message)s")
    if logging.getLevelName(level) not in (logging.DEBUG, logging.INFO):
        logging.getLogger("sovereign.llama_cpp").setLevel(logging.CRITICAL)


def serve(sock: socket.socket) -> int:
    """Load the model the first message names, then serve until the server closes the socket or says close."""
    reader = sock.makefile("rb")
    writer = wire.FrameWriter(sock)
    first = wire.read_frame(reader)
    if first is None or first.get("op") != "load":
        return 2
    started = time.monotonic()
    options = wire.load_options_from_wire(first["options"])
    try:
        backend = LlamaBackend(Path(first["path"]), options)
    except Exception as exc:  # noqa: BLE001 - whatever stops the load is reported to the server, then the process ends
        writer.send({"op": "failed", "error": wire.error_to_wire(exc)})
        return 1
    try:
        cache = open_prompt_cache(backend, options)
    except Exception:
        log.exception("prompt cache: could not open it; serving without one")
        cache = None
    worker = Worker(
        backend,
        writer,
        max_queue=first["max_queue"],
        timeout=first.get("timeout"),
        cache=cache,
        speculate=Speculate(options.speculate),
        draft_model=open_draft_model(backend, options),
    )
    writer.send({"op": "ready", "facts": facts(backend), "load_seconds": time.monotonic() - started})
    try:
        while (message := wire.read_frame(reader)) is not None:  # EOF: the server has unloaded this model, or died
            worker.handle(message)
    finally:
        worker.close()
    return 0


def main(argv: list[str]) -> int:
    """Entry point: the socket's file descriptor is the only argument."""
    # Ctrl-C reaches the whole process group: the server decides when this process ends (it says close,
    # or its socket closes when it dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _configure_logging()
    sock = socket.socket(fileno=int(argv[0]))
    try:
        return serve(sock)
    finally:
        sock.close()


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    os._exit(code)  # no waiting on helper threads still tokenizing for a server that has gone
