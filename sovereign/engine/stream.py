"""The bridge from the scheduler's thread to asyncio: a generation's tokens as an async iterator."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sovereign.engine.backend import Step
from sovereign.engine.stats import RequestStats


@dataclass(frozen=True)
class _End:
    error: BaseException | None = None


class TokenStream:
    """Steps of one generation, delivered to the event loop; `cancel()` stops it before the next decode step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: RequestStats) -> None:
        self.stats = stats
        self._loop = loop
        self._queue: asyncio.Queue[Step | _End] = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the scheduler to stop generating and free the slot (safe from any thread, any number of times)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- called from the scheduler's thread -------------------------------------------

    def push(self, step: Step) -> None:
        """Deliver one token."""
        self._put(step)

    def end(self, error: BaseException | None = None) -> None:
        """Deliver the end of the stream, or the error that ended it."""
        self._put(_End(error))

    def _put(self, item: Step | _End) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
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
