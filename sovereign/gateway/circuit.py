"""A circuit breaker per upstream.

After N blocked failures in a row, stop trying it until a background probe gets an answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("sovereign.serving")
KEY_STATUSES = ("403", "451")  # blocks that may be about one client's key rather than the route (5xx/429 are not)


class Circuit:
    """Closed: requests try the upstream.

    Open: they go local at once, while a probe waits for the upstream to answer.
    """

    def __init__(
        self, name: str, probe: Callable[[], Awaitable[bool]], *, threshold: int = 3, probe_every: float = 30.0
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.probe_every = probe_every
        self.failures = 0  # blocked failures in a row
        self.opened_at: float | None = None
        self.last_cause: str | None = None
        self._probe = probe
        self._prober: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def state(self) -> dict[str, object]:
        """What /health shows."""
        return {
            "circuit": "open" if self.is_open else "closed",
            "failures": self.failures,
            "last_cause": self.last_cause,
        }

    def record_success(self) -> None:
        """The upstream answered: forget earlier failures."""
        self.failures = 0

    def record_block(self, cause: str, *, at_once: bool = False) -> None:
        """A blocked failure; the circuit opens at the threshold (or at once: a stream that broke mid-way)."""
        self.failures += 1
        self.last_cause = cause
        if not self.is_open and (at_once or self.failures >= self.threshold):
            self.opened_at = time.monotonic()
            log.warning(
                "upstream %s is blocked (%s, %d in a row): answering locally until it responds again",
                self.name,
                cause,
                self.failures,
            )
            # A 403 or 451 answered a client's own key: it may say no to that key rather than to this route, so
            # probe (keyless, or with the configured key) at once; a route that answers closes the circuit again.
            self._prober = asyncio.get_running_loop().create_task(
                self._wait_for_answer(probe_first=cause in KEY_STATUSES)
            )

    def close(self) -> None:
        """The upstream answers again."""
        if self.is_open:
            log.warning("upstream %s answers again: requests go to it", self.name)
        self.opened_at, self.failures = None, 0

    async def _wait_for_answer(self, *, probe_first: bool) -> None:
        while self.is_open:
            if not probe_first:
                await asyncio.sleep(self.probe_every)
            probe_first = False
            try:
                answered = await self._probe()
            except Exception:  # noqa: BLE001 - a probe that fails in any way is a "not yet"
                answered = False
            if answered:
                self.close()

    def stop(self) -> None:
        """Stop probing (server shutdown)."""
        if self._prober is not None:
            self._prober.cancel()
