"""Runs one model's work on its own thread, one request at a time, and streams tokens to asyncio.

This is the part the continuous-batching scheduler replaces: it keeps the same surface
(`stream`, `call`, `close`, `active`), so nothing above it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from sovereign.engine.backend import LlamaBackend, Step
from sovereign.engine.requests import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class _End:
    error: BaseException | None = None


class TokenStream:
    """Steps of one generation, delivered to the event loop; `cancel()` stops it at the next token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Step | _End] = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the runner to stop generating (takes effect before the next token)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _push(self, item: Step | _End) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): stop generating
            self._cancelled.set()

    async def __aiter__(self) -> AsyncIterator[Step]:
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item


class SerialRunner:
    """A worker thread that owns a backend and runs its jobs in order."""

    def __init__(self, backend: LlamaBackend) -> None:
        self.backend = backend
        self.active = 0  # requests queued or running (the pool does not evict a busy model)
        self.last_used = time.monotonic()
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"runner:{backend.path.name}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def stream(self, prompt: list[int], params: SamplingParams) -> TokenStream:
        """Queue a generation; its tokens arrive on the returned stream."""
        stream = TokenStream(asyncio.get_running_loop())
        self.active += 1

        def job() -> None:
            try:
                if not stream.cancelled:
                    for step in self.backend.generate(prompt, params, lambda: stream.cancelled):
                        stream._push(step)
                stream._push(_End())
            except Exception as exc:  # delivered to the awaiting request, never kills the thread
                stream._push(_End(exc))
            finally:
                stream._loop.call_soon_threadsafe(self._release)

        self._submit(job)
        return stream

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run function(*args) on the runner thread (it owns the llama.cpp context) and await it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self.active += 1

        def job() -> None:
            try:
                result = function(*args)
            except Exception as exc:
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)
            finally:
                loop.call_soon_threadsafe(self._release)

        self._submit(job)
        return await future

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Count the caller as active (so the pool won't unload the model) while it prepares a request."""
        self.active += 1
        try:
            yield
        finally:
            self._release()

    def _submit(self, job: Callable[[], None]) -> None:
        if self._closed:
            self.active -= 1
            raise RuntimeError("this model was unloaded; ask again to reload it")
        self._jobs.put(job)

    def _release(self) -> None:
        self.active -= 1
        self.last_used = time.monotonic()

    def close(self) -> None:
        """Finish queued work, stop the thread, free the model."""
        self._closed = True
        self._jobs.put(None)
        self._thread.join()
        self.backend.close()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
