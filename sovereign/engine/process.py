"""The server's side of a model's process: start it, submit and cancel generations, call it, see it die.

The socket to the process is read and written by the event loop itself (an asyncio protocol), so
a decode step costs the server one wake-up: on a machine whose cores all run llama.cpp's threads,
every extra thread that wakes per step preempts one of them and stalls the step at its next
barrier (a reader thread cost 1.5 ms per token at one stream, measured). Each `steps` message
carries every stream's new tokens; answers to submits and calls settle their futures. When the
socket closes while the server did not ask it to, the process has crashed: its streams and calls
fail with ModelCrashed, and `on_exit` tells the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovereign.engine import rpc_workers, wire
from sovereign.engine.requests import SamplingParams
from sovereign.engine.stats import RequestStats
from sovereign.engine.stream import TokenStream
from sovereign.engine.wire import LoadOptions, with_bos
from sovereign.errors import EngineError, ModelCrashed, ModelLoadError, WorkerUnavailable

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
    control_tokens: list[str] = field(default_factory=list)  # the vocabulary's, as text
    # `serve --rpc`: each worker device, its memory and the layers it holds (runtime/rpc.py's report)
    workers: list[dict[str, Any]] = field(default_factory=list)

    def with_bos(self, tokens: list[int]) -> list[int]:
        """Prepend BOS when the model wants one and the prompt lacks it."""
        return with_bos(tokens, self.bos, self.add_bos)


def signal_name(returncode: int | None) -> str:
    """'SIGSEGV' for a process killed by signal 11, else 'exit status N'."""
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-returncode).name
        return f"signal {-returncode}"
    return f"exit status {returncode}"


class ModelProcess:
    """One loaded model, living in a child process of its own; used from the event loop that started it."""

    def __init__(
        self, name: str, path: Path, options: LoadOptions, child: subprocess.Popen[bytes], facts: ModelFacts
    ) -> None:
        self.name = name
        self.path = path
        self.options = options  # how it was loaded (the kernels among them)
        self.facts = facts
        self.on_exit: Callable[[ModelProcess, str | None], None] | None = (
            None  # the pool's hook: (process, crash signal or None)
        )
        self.last_used = time.monotonic()
        self._holds = 0
        self._child = child
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._ids = itertools.count(1)
        self._streams: dict[int, TokenStream] = {}
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._closing = False
        self._dead: EngineError | None = None
        self._exited = self._loop.create_future()  # set once the process has ended and everything is failed
        self._busy = 0
        self._queued = 0
        self._rate = 0.0
        self._rate_at = 0.0
        self.cache_figures: dict[str, int] = {}  # the prompt cache's counts and sizes, as the process last said

    # --- starting -------------------------------------------------------------------

    @classmethod
    async def start(
        cls, name: str, path: Path, options: LoadOptions, *, max_queue: int, timeout: float | None
    ) -> ModelProcess:
        """Start a process that loads the model; returns once it is ready, raises ModelLoadError if it cannot load.

        Cancelled (the server shutting down mid-load), it kills the half-loaded process. With RPC workers, each
        is probed first: ggml aborts a process whose worker is missing or of another build.
        """
        if options.rpc_servers:
            await asyncio.to_thread(rpc_workers.check_workers, list(options.rpc_servers))
        ours, theirs = socket.socketpair()
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "sovereign.engine.runtime.worker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                # ggml aborts when a worker goes away, an expected end here: its message, not a debugger's backtrace.
                env={**os.environ, "GGML_NO_BACKTRACE": "1"} if options.rpc_servers else None,
            )
        except OSError as exc:
            ours.close()
            raise ModelLoadError(f"could not start a process for {name}: {exc.strerror}", None) from None
        finally:
            theirs.close()
        load = {
            "op": "load",
            "path": str(path),
            "options": wire.load_options_to_wire(options),
            "max_queue": max_queue,
            "timeout": timeout,
        }
        try:
            answer = await asyncio.to_thread(_handshake, ours, load)
        except BaseException:
            child.kill()  # its end of the socket closes, so the handshake thread returns too
            child.wait()
            ours.close()
            raise
        if answer is None or answer.get("op") != "ready":
            ours.close()
            await asyncio.to_thread(child.wait)
            if answer is not None and answer.get("op") == "failed":
                raise wire.error_from_wire(answer["error"])
            if lost := await asyncio.to_thread(rpc_workers.first_unreachable, list(options.rpc_servers)):
                raise lost
            raise ModelLoadError(
                f"llama.cpp crashed ({signal_name(child.returncode)}) while loading {path.name}",
                (
                    "the file may be corrupt (pull it again with --force), or this llama.cpp build cannot run "
                    "it on this machine"
                ),
            )
        log.info("%s: process %d ready in %.2fs", name, answer["facts"]["pid"], answer.get("load_seconds", 0.0))
        process = cls(name, path, options, child, ModelFacts(**answer["facts"]))
        ours.setblocking(False)
        try:
            transport, _protocol = await process._loop.connect_accepted_socket(lambda: _Connection(process), ours)
        except BaseException:
            child.kill()
            ours.close()
            raise
        process._transport = transport
        return process

    # --- requests -------------------------------------------------------------------

    async def submit(
        self, prompt: list[int], params: SamplingParams, stats: RequestStats, checkpoints: tuple[int, ...] = ()
    ) -> TokenStream:
        """Queue a generation; its tokens arrive on the returned stream.

        The process's refusal (busy, bad grammar) raises here.
        """
        request_id = next(self._ids)
        stream = TokenStream(
            stats,
            on_cancel=lambda: self._send_quietly({"op": "cancel", "id": request_id}),
            on_force=lambda text: self._send_quietly({"op": "force", "id": request_id, "text": text}),
        )
        future = self._expect(request_id)
        self._streams[request_id] = stream
        try:
            message = {"op": "submit", "id": request_id, "prompt": prompt, "params": wire.params_to_wire(params)}
            if checkpoints:
                message["checkpoints"] = list(checkpoints)
            self._send(message)
            await future
        except BaseException:
            self._streams.pop(request_id, None)
            self._pending.pop(request_id, None)
            stream.cancel()
            raise
        return stream

    async def call(self, method: str, *args: Any) -> Any:
        """Run one of the worker's calls (tokenize, pieces, embed) and return its result."""
        call_id = next(self._ids)
        with self.hold():
            future = self._expect(call_id)
            try:
                self._send({"op": "call", "id": call_id, "method": method, "args": list(args)})
                return await future
            except asyncio.CancelledError:
                # The caller left (an embeddings client hung up): the worker drops what it has not done yet.
                self._send_quietly({"op": "cancel", "id": call_id})
                raise
            finally:
                self._pending.pop(call_id, None)

    @property
    def active(self) -> int:
        """Generations in flight plus callers preparing one or waiting on a call.

        The pool does not evict a busy model.
        """
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

    def _expect(self, message_id: int) -> asyncio.Future[Any]:
        if self._dead is not None:
            raise self._dead
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[message_id] = future
        return future

    def _send(self, message: dict[str, Any]) -> None:
        """Write a message (buffered by the transport: the event loop never waits on the socket)."""
        if self._dead is not None or self._transport is None:
            raise self._dead or EngineError(f"{self.name}'s process is not running", "ask again to reload it")
        self._transport.write(wire.encode_frame(message))

    def _send_quietly(self, message: dict[str, Any]) -> None:
        """Send from any thread, ignoring a process that is gone (a cancel after the end)."""

        def send() -> None:
            with contextlib.suppress(EngineError):
                self._send(message)

        if _running_loop() is self._loop:
            send()
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing left to cancel
                self._loop.call_soon_threadsafe(send)

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

    def worker_states(self) -> dict[str, str] | None:
        """Each RPC worker's connection from this process (connected, lost, absent); None where that cannot be read."""
        return rpc_workers.connection_states(self.facts.pid, list(self.options.rpc_servers))

    def workers_lost(self) -> bool:
        """Whether a worker has closed its connection: the process would abort at its next step, so reload first."""
        if not self.options.rpc_servers or not self.alive:
            return False
        states = self.worker_states()
        return states is not None and any(state != "connected" for state in states.values())

    def decode_rate(self) -> float:
        """Tokens generated per second of decoding, as the process last reported (0 once idle)."""
        return self._rate if time.monotonic() - self._rate_at < RATE_WINDOW_SECONDS else 0.0

    # --- what the process says (on the event loop) --------------------------------------

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "steps":
            self._deliver(message["items"])
            self._busy, self._queued = message["busy"], message["queued"]
            if message["rate"]:
                self._rate, self._rate_at = message["rate"], time.monotonic()
            if "cache" in message:
                self.cache_figures = message["cache"]
        elif op in ("accepted", "refused", "reply"):
            future = self._pending.pop(message["id"], None)
            if future is not None and not future.done():
                if "error" in message:
                    future.set_exception(wire.error_from_wire(message["error"]))
                else:
                    future.set_result(message.get("result"))

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
                stream.stats.cache_source = item[4]
            elif kind == "e":
                del self._streams[request_id]
                self.last_used = time.monotonic()
                stream.stats.cached_tokens = item[3]
                stream.stats.cache_source = item[5]
                stream.stats.drafted_tokens, stream.stats.accepted_tokens = item[6], item[7]
                if stream.stats.started is None:
                    stream.stats.started = stream.stats.submitted + item[4]
                stream.end(None if item[2] is None else wire.error_from_wire(item[2]))

    def _lost(self, unreadable: bool) -> None:
        """The socket closed (or said something unreadable): reap the process, then fail what it had."""
        if unreadable:
            self._child.kill()
        self._loop.create_task(self._reap())

    async def _reap(self) -> None:
        await asyncio.to_thread(self._child.wait)
        crash = None if self._closing else signal_name(self._child.returncode)
        error: EngineError = (
            ModelCrashed(self.name, crash)
            if crash
            else EngineError("the model was unloaded while this request ran", "ask again to reload it")
        )
        if crash and self.options.rpc_servers:  # ggml aborts the process when a worker goes: name the worker
            lost: WorkerUnavailable | None = await asyncio.to_thread(
                rpc_workers.first_unreachable, list(self.options.rpc_servers)
            )
            error = lost or error
        self._dead = error
        streams, self._streams = self._streams, {}
        pending, self._pending = self._pending, {}
        for stream in streams.values():
            stream.end(error)
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        if isinstance(error, WorkerUnavailable):
            log.error(
                "%s: %s: %d requests failed; the next request reloads it once the worker answers",
                self.name,
                error.message,
                len(streams) + len(pending),
            )
        elif crash:
            log.error(
                "%s's process died (%s): %d requests failed; the next request reloads it. %s",
                self.name,
                crash,
                len(streams) + len(pending),
                ModelCrashed.advice(crash),
            )
        if not self._exited.done():
            self._exited.set_result(None)
        if self.on_exit is not None:
            self.on_exit(self, crash)

    # --- stopping ---------------------------------------------------------------------

    async def close(self) -> None:
        """End the process (failing what it still runs) and wait until it has exited and been reaped."""
        self._closing = self._closing or self._dead is None
        if self._transport is not None:
            self._transport.close()  # after what is buffered: the worker sees the end of its socket and exits
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), CLOSE_GRACE_SECONDS)
        except TimeoutError:
            log.warning("%s's process did not exit in %.0fs: killing it", self.name, CLOSE_GRACE_SECONDS)
            self._child.kill()
            await self._exited


class _Connection(asyncio.Protocol):
    """The socket to one model's process, read on the event loop."""

    def __init__(self, process: ModelProcess) -> None:
        self._process = process
        self._decoder = wire.FrameDecoder()
        self._broken = False

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            for message in self._decoder.feed(data):
                self._process._dispatch(message)
        except Exception:  # a frame that makes no sense: the process cannot be trusted any more
            log.exception("%s's process sent something unreadable: stopping it", self._process.name)
            self._broken = True
            self._process._lost(unreadable=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._broken:
            self._process._lost(unreadable=False)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _handshake(sock: socket.socket, load: dict[str, Any]) -> dict[str, Any] | None:
    """Send the load message and wait for the worker's answer (None if it died first); blocking."""
    try:
        wire.FrameWriter(sock).send(load)
        return wire.read_frame(_SocketReader(sock))
    except (OSError, ValueError):
        return None


class _SocketReader:
    """Exactly n bytes per read from a blocking socket, and nothing beyond them (the event loop reads the rest)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, n: int) -> bytes:
        chunks = []
        while n > 0 and (chunk := self._sock.recv(min(n, 1 << 20))):
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)
