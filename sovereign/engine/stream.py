"""A generation's tokens as an async iterator, fed on the event loop as the model's process reports them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sovereign.engine.stats import RequestStats
from sovereign.engine.wire import Step


@dataclass(frozen=True)
class _End:
    error: BaseException | None = None


class TokenStream:
    """Steps of one generation, delivered to the event loop; `cancel()` stops it before the next decode step."""

    def __init__(
        self,
        stats: RequestStats,
        on_cancel: Callable[[], None] | None = None,
        on_force: Callable[[str], None] | None = None,
    ) -> None:
        self.stats = stats
        self._on_force = on_force
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

    def force(self, text: str) -> None:
        """Have the model write this text next, instead of sampling (e.g. closing a reasoning block on budget)."""
        if self._on_force is not None and not self._cancelled.is_set():
            self._on_force(text)

    # --- called on the event loop, as the model's process reports ----------------------

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
        self._queue.put_nowait(item)

    # --- read on the event loop ---------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[Step]:
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
