"""When a parallel download adds connections: doubling while each doubling pays, measured, never near the end."""

from __future__ import annotations

import time

RAMP_INTERVAL = 0.25  # seconds of measurement before deciding whether to double the connections
RAMP_GAIN = 1.3  # a doubling must raise the rate at least this much for the next one to happen
RAMP_SETTLE_MAX = 2.0  # seconds to wait for new connections' first bytes before measuring anyway
RAMP_PAYBACK = 2 * RAMP_INTERVAL  # no doubling when the rest would arrive sooner than this: it could not pay off


class Ramp:
    """Adds connections while they pay: 1, then 2, 4, 8... as long as each doubling raised the rate.

    On a fast link one stream already fills the line (or the CPUs), and more threads only cost; a
    server that caps each connection rewards every doubling. Each step is measured once the newly
    started connections all carry bytes, so slow connection set-ups do not look like no gain.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rate: float | None = None  # bytes/s measured with the previous number of connections
        self.window: tuple[float, int] | None = None  # (start time, bytes done) of the current measurement
        self.waited_since = time.monotonic()
        self.stopped = limit <= 1

    def more(self, started: int, flowing: int, done: int, left: int) -> int:
        """How many connections to start now (`left`: bytes still to fetch)."""
        if self.stopped or started >= self.limit:
            return 0
        now = time.monotonic()
        if self.window is None:
            if flowing < started and now - self.waited_since < RAMP_SETTLE_MAX:
                return 0
            self.window = (now, done)
            return 0
        began, done_then = self.window
        if now - began < RAMP_INTERVAL:
            return 0
        rate = (done - done_then) / (now - began)
        # New connections need a set-up and a measurement of their own before they pay: near the end they only cost.
        if (self.rate is not None and rate < self.rate * RAMP_GAIN) or left < rate * RAMP_PAYBACK:
            self.stopped = True
            return 0
        self.rate, self.window, self.waited_since = rate, None, now
        return min(started, self.limit - started)
