"""The bridge from a model process's reader thread to asyncio: a generation's tokens as an async iterator."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sovereign.engine.backend import Step
from sovereign.engine.stats import RequestStats


@dataclass(frozen=True)
class _End:
    error: BaseException | None = None


class _Mailbox:
    """Items for the streams of one event loop, handed over with one wake-up of the loop per batch.

    A decode step yields a token for every running stream at once. Waking the event loop once per
    token would, on a machine whose cores all run llama.cpp's threads, preempt one of them per
    token and stall the step at its next barrier; one wake-up per step costs an eighth of that at
    eight streams. Items stay in posting order, so a stream's end never overtakes its last token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: list[tuple[asyncio.Queue[Step | _End], Step | _End]] = []
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue[Step | _End], item: Step | _End) -> None:
        """Called on the scheduler's thread; raises RuntimeError when the loop is closed."""
        if self._loop.is_closed():  # a drain scheduled before it closed will never run
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:
                return  # a drain is already on its way
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                self._items.clear()
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    """The loop's shared mailbox (a stream's own, for a loop type that cannot be weakly referenced)."""
    with _mailboxes_lock:
        try:
            box = _mailboxes.get(loop)
            if box is None:
                box = _mailboxes[loop] = _Mailbox(loop)
        except TypeError:
            box = _Mailbox(loop)
        return box


class TokenStream:
    """Steps of one generation, delivered to the event loop; `cancel()` stops it before the next decode step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: RequestStats, on_cancel: Callable[[], None] | None = None) -> None:
        self.stats = stats
        self._mailbox = _mailbox(loop)
        self._queue: asyncio.Queue[Step | _End] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel
        self._last_token_at = 0.0

    def cancel(self) -> None:
        """Ask the model to stop generating and free the slot (safe from any thread, any number of times)."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self.stats.finished is None:  # the reader stopped here (a stop string, an end token, a hang-up)
            self.stats.finished = time.monotonic()
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- called from the thread that receives the tokens ------------------------------

    def push(self, step: Step) -> None:
        """Deliver one token, noting when it came for the request's timings (not once the reader has stopped)."""
        if self._cancelled.is_set():  # a step already under way when the cancel landed: not part of the answer
            self._put(step)
            return
        now = time.monotonic()
        stats = self.stats
        if stats.first_token is None:
            stats.first_token = now
        else:
            stats.token_gaps.append(now - self._last_token_at)
        self._last_token_at = now
        if step.end_of_generation:
            stats.finished = now
        else:
            stats.generated_tokens += 1
        self._put(step)

    def end(self, error: BaseException | None = None) -> None:
        """Deliver the end of the stream, or the error that ended it."""
        if self.stats.finished is None:
            self.stats.finished = time.monotonic()
        self._put(_End(error))

    def _put(self, item: Step | _End) -> None:
        try:
            self._mailbox.post(self._queue, item)
        except RuntimeError:  # the event loop is gone (server shutting down): stop generating
            self._cancelled.set()

    # --- read on the event loop ---------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[Step]:
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
