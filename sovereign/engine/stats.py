"""What one request cost: token counts and timings, filled in by the scheduler as it runs.

The server's request log and Prometheus metrics read these; the engine never imports either.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class RequestStats:
    """Counts and monotonic timestamps of one generation (None until the moment happens)."""

    model: str
    prompt_tokens: int
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # given a slot
    first_token: float | None = None
    finished: float | None = None
    cached_tokens: int = 0  # prompt tokens reused from the KV cache instead of recomputed
    cache_source: str | None = None  # where they came from: slot, ram or disk (the prompt cache's tiers)
    generated_tokens: int = 0
    drafted_tokens: int = 0  # speculative decoding: tokens guessed by n-gram lookup, and how many the model kept
    accepted_tokens: int = 0
    token_gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens
    finish_reason: str | None = None  # stop, length, tool_calls; None if cancelled or failed

    @property
    def queued_seconds(self) -> float | None:
        return None if self.started is None else self.started - self.submitted

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Generation speed after the first token (what a reader of the stream sees)."""
        if self.finished is None or self.first_token is None or self.generated_tokens < 2:
            return None
        span = self.finished - self.first_token
        return (self.generated_tokens - 1) / span if span > 0 else None

    def describe(self) -> str:
        """The timings as one log-friendly phrase."""
        parts = [
            f"model={self.model}",
            f"prompt={self.prompt_tokens}",
            f"cached={self.cached_tokens}" + (f" ({self.cache_source})" if self.cache_source else ""),
            f"generated={self.generated_tokens}",
        ]
        if self.queued_seconds is not None:
            parts.append(f"queued={self.queued_seconds:.3f}s")
        if self.ttft_seconds is not None:
            parts.append(f"ttft={self.ttft_seconds:.3f}s")
        if (speed := self.decode_tokens_per_second) is not None:
            parts.append(f"decode={speed:.1f}tok/s")
        if self.drafted_tokens:
            rate = self.accepted_tokens / self.drafted_tokens
            parts.append(f"drafted={self.drafted_tokens} accepted={self.accepted_tokens} ({rate:.0%})")
        parts.append(f"finish={self.finish_reason or 'cancelled'}")
        return " ".join(parts)


# The HTTP layer sets a list here per request; Engine.submit appends each generation's stats to it,
# so the request log and metrics see them without every route passing them along.
request_stats: ContextVar[list[RequestStats] | None] = ContextVar("request_stats", default=None)
