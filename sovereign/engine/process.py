"""The server's side of a model's process: start it, submit and cancel generations, call it, see it die.

One reader thread per process receives the worker's messages: a `steps` message per decode
step, whose tokens go to their streams with one event-loop wake-up (see stream._Mailbox), and
the answers to submits and calls. When the socket closes without a goodbye the process has
crashed: its streams and calls fail with ModelCrashed, and `on_exit` tells the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sovereign.engine import wire
from sovereign.engine.backend import LoadOptions
from sovereign.engine.requests import SamplingParams
from sovereign.engine.stats import RequestStats
from sovereign.engine.stream import TokenStream
from sovereign.errors import EngineError, ModelCrashed, ModelLoadError

log = logging.getLogger(__name__)
RATE_WINDOW_SECONDS = 10.0  # a decode rate older than this is stale: the model is idle
CLOSE_GRACE_SECONDS = 10.0  # an unloaded process that has not exited by then is killed


@dataclass(frozen=True)
class ModelFacts:
    """What the server knows about a loaded model, as its process reported at load."""

    pid: int
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    n_parallel: int
    n_layers: int
    n_gpu_layers: int
    n_threads: int
    bos: int
    eos: int
    add_bos: bool
    bos_text: str
    eos_text: str
    metadata: dict[str, str] = field(default_factory=dict)

    def with_bos(self, tokens: list[int]) -> list[int]:
        """Prepend BOS when the model wants one and the prompt lacks it."""
        if self.add_bos and self.bos >= 0 and (not tokens or tokens[0] != self.bos):
            return [self.bos, *tokens]
        return tokens


@dataclass
class _Pending:
    """A submit or call waiting for its answer."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def signal_name(returncode: int | None) -> str:
    """'SIGSEGV' for a process killed by signal 11, else 'exit status N'."""
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-returncode).name
        return f"signal {-returncode}"
    return f"exit status {returncode}"


class ModelProcess:
    """One loaded model, living in a child process of its own."""

    def __init__(self, name: str, path: Path, options: LoadOptions, child: subprocess.Popen[bytes], sock: socket.socket, reader: BinaryIO, facts: ModelFacts) -> None:
        self.name = name
        self.path = path
        self.options = options  # how it was loaded (the kernels among them)
        self.facts = facts
        self.on_exit: Callable[[ModelProcess, str | None], None] | None = None  # the pool's hook: (process, crash signal or None)
        self.last_used = time.monotonic()
        self._holds = 0
        self._child = child
        self._sock = sock
        self._writer = wire.FrameWriter(sock)
        self._reader = reader
        self._outgoing: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()  # None: no more to send
        self._ids = itertools.count(1)
        self._streams: dict[int, TokenStream] = {}
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._closing = False
        self._dead: EngineError | None = None
        self._busy = 0
        self._queued = 0
        self._rate = 0.0
        self._rate_at = 0.0
        self._reading = threading.Thread(target=self._read, name=f"model:{name}:read", daemon=True)
        self._writing = threading.Thread(target=self._write, name=f"model:{name}:write", daemon=True)
        self._reading.start()
        self._writing.start()

    # --- starting -------------------------------------------------------------------

    @classmethod
    async def start(cls, name: str, path: Path, options: LoadOptions, *, max_queue: int, timeout: float | None) -> ModelProcess:
        """Start a process that loads the model; returns once it is ready, raises ModelLoadError if it cannot load.

        Cancelled (the server shutting down mid-load), it kills the half-loaded process.
        """
        ours, theirs = socket.socketpair()
        try:
            child = subprocess.Popen([sys.executable, "-m", "sovereign.engine.worker", str(theirs.fileno())], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise ModelLoadError(f"could not start a process for {name}: {exc.strerror}", None) from None
        finally:
            theirs.close()
        reader = ours.makefile("rb")
        load = {"op": "load", "path": str(path), "options": wire.load_options_to_wire(options), "max_queue": max_queue, "timeout": timeout}
        try:
            answer = await asyncio.to_thread(_handshake, ours, reader, load)
        except BaseException:
            child.kill()  # its end of the socket closes, so the handshake thread returns too
            child.wait()
            reader.close()
            ours.close()
            raise
        if answer is None or answer.get("op") != "ready":
            reader.close()
            ours.close()
            await asyncio.to_thread(child.wait)
            if answer is not None and answer.get("op") == "failed":
                raise wire.error_from_wire(answer["error"])
            raise ModelLoadError(f"llama.cpp crashed ({signal_name(child.returncode)}) while loading {path.name}", "the file may be corrupt (pull it again with --force), or this llama.cpp build cannot run it on this machine")
        log.info("%s: process %d ready in %.2fs", name, answer["facts"]["pid"], answer.get("load_seconds", 0.0))
        return cls(name, path, options, child, ours, reader, ModelFacts(**answer["facts"]))

    # --- requests -------------------------------------------------------------------

    async def submit(self, prompt: list[int], params: SamplingParams, stats: RequestStats) -> TokenStream:
        """Queue a generation; its tokens arrive on the returned stream. The process's refusal (busy, bad grammar) raises here."""
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        stream = TokenStream(loop, stats, on_cancel=lambda: self._send_quietly({"op": "cancel", "id": request_id}))
        future = self._expect(request_id, loop)
        with self._lock:
            self._streams[request_id] = stream
        try:
            self._send({"op": "submit", "id": request_id, "prompt": prompt, "params": wire.params_to_wire(params)})
            await future
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            stream.cancel()
            raise
        return stream

    async def call(self, method: str, *args: Any) -> Any:
        """Run one of the worker's calls (tokenize, pieces, embed) and return its result."""
        call_id = next(self._ids)
        with self.hold():
            future = self._expect(call_id, asyncio.get_running_loop())
            try:
                self._send({"op": "call", "id": call_id, "method": method, "args": list(args)})
            except BaseException:
                with self._lock:
                    self._pending.pop(call_id, None)
                raise
            return await future

    @property
    def active(self) -> int:
        """Generations in flight plus callers preparing one or waiting on a call (the pool does not evict a busy model)."""
        return self._holds + len(self._streams)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Count the caller as active while it works with the model."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            self.last_used = time.monotonic()

    def _expect(self, message_id: int, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._dead is not None:
                raise self._dead
            self._pending[message_id] = _Pending(loop, future)
        return future

    def _send(self, message: dict[str, Any]) -> None:
        """Queue a message for the writer thread (the event loop never waits on the socket)."""
        if self._dead is not None:
            raise self._dead
        self._outgoing.put(message)

    def _send_quietly(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(EngineError):
            self._send(message)

    def _write(self) -> None:
        """The writer thread: frames go out in the order they were queued, so a cancel never overtakes its submit."""
        while (message := self._outgoing.get()) is not None:
            try:
                self._writer.send(message)
            except OSError:
                return  # the process is gone: the reader sees it and fails what is pending
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)  # the worker ends when its socket says no more

    # --- figures for metrics ----------------------------------------------------------

    @property
    def n_slots(self) -> int:
        return self.facts.n_parallel

    @property
    def busy_slots(self) -> int:
        return self._busy

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def alive(self) -> bool:
        return self._dead is None

    def decode_rate(self) -> float:
        """Tokens generated per second of decoding, as the process last reported (0 once idle)."""
        return self._rate if time.monotonic() - self._rate_at < RATE_WINDOW_SECONDS else 0.0

    # --- the reader thread ------------------------------------------------------------

    def _read(self) -> None:
        try:
            while (message := wire.read_frame(self._reader)) is not None:
                self._dispatch(message)
        except Exception:  # a frame that makes no sense: the process cannot be trusted any more
            log.exception("%s's process sent something unreadable: stopping it", self.name)
            self._child.kill()
        self._child.wait()
        crash = None if self._closing else signal_name(self._child.returncode)
        error: EngineError = ModelCrashed(self.name, crash) if crash else EngineError("the model was unloaded while this request ran", "ask again to reload it")
        with self._lock:
            self._dead = error
            streams, self._streams = self._streams, {}
            pending, self._pending = self._pending, {}
        self._outgoing.put(None)  # ends the writer thread
        for stream in streams.values():
            stream.end(error)
        for waiting in pending.values():
            _settle_threadsafe(waiting, None, error)
        if crash:
            log.error("%s's process died (%s): %d requests failed; the next request reloads it. %s", self.name, crash, len(streams) + len(pending), ModelCrashed.advice(crash))
        if self.on_exit is not None:
            self.on_exit(self, crash)

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "steps":
            self._deliver(message["items"])
            self._busy, self._queued = message["busy"], message["queued"]
            if message["rate"]:
                self._rate, self._rate_at = message["rate"], time.monotonic()
        elif op in ("accepted", "refused", "reply"):
            with self._lock:
                waiting = self._pending.pop(message["id"], None)
            if waiting is not None:
                error = wire.error_from_wire(message["error"]) if "error" in message else None
                _settle_threadsafe(waiting, message.get("result"), error)

    def _deliver(self, items: list[list[Any]]) -> None:
        for item in items:
            kind, request_id = item[0], item[1]
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if kind == "t":
                stream.push(wire.step_from_wire(item[2]))
            elif kind == "a":
                stream.stats.cached_tokens = item[2]
                stream.stats.started = stream.stats.submitted + item[3]
            elif kind == "e":
                with self._lock:
                    self._streams.pop(request_id, None)
                self.last_used = time.monotonic()
                stream.stats.cached_tokens = item[3]
                if stream.stats.started is None:
                    stream.stats.started = stream.stats.submitted + item[4]
                stream.end(None if item[2] is None else wire.error_from_wire(item[2]))

    # --- stopping ---------------------------------------------------------------------

    def close(self) -> None:
        """End the process (failing what it still runs) and wait for it to exit; blocking."""
        self._closing = True
        self._outgoing.put(None)  # after what is already queued, the writer closes our side: the worker sees EOF and exits
        try:
            self._child.wait(CLOSE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("%s's process did not exit in %.0fs: killing it", self.name, CLOSE_GRACE_SECONDS)
            self._child.kill()
            self._child.wait()
        self._reading.join(CLOSE_GRACE_SECONDS)
        self._writing.join(CLOSE_GRACE_SECONDS)
        self._reader.close()
        self._sock.close()


def _handshake(sock: socket.socket, reader: BinaryIO, load: dict[str, Any]) -> dict[str, Any] | None:
    """Send the load message and wait for the worker's answer (None if it died first)."""
    try:
        wire.FrameWriter(sock).send(load)
        return wire.read_frame(reader)
    except (OSError, ValueError):
        return None


def _settle_threadsafe(waiting: _Pending, result: Any, error: BaseException | None) -> None:
    """Resolve a future from the reader thread (nothing to do once its loop has closed)."""

    def settle() -> None:
        if waiting.future.done():
            return
        if error is not None:
            waiting.future.set_exception(error)
        else:
            waiting.future.set_result(result)

    with contextlib.suppress(RuntimeError):
        waiting.loop.call_soon_threadsafe(settle)
