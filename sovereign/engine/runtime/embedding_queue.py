"""Embedding inputs waiting for the scheduler's thread, decoded a chunk at a time between generation steps.

While anything generates, chunks are sized to about one decode step and run only while embedding has
taken no more time than decoding: a chat's tokens keep coming at least about half as fast as alone,
however many inputs are queued (60 inputs of 450 tokens used to hold an 8-token chat for 13-16 s).
With nothing generating, inputs run back to back in chunks of about IDLE_CHUNK_SECONDS; a request waiting
for a slot is admitted before the next chunk. The embedding context is freed once
no input has come for IDLE_SECONDS. Each input is one call from the server, which may cancel it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sovereign.engine.runtime.backend import LlamaBackend

MIN_CHUNK = 8  # tokens: below this, a decode call's fixed cost outweighs its work
# With nothing generating, a chunk still takes only about this long: a chat that arrives meanwhile waits for
# the chunk under way before it is admitted. Whole 128-token chunks of Gemma 3 took 0.7-2 s each on a
# 2-core machine that was also running other work.
IDLE_CHUNK_SECONDS = 0.25
IDLE_SECONDS = 30.0  # without an embedding for this long, the embedding context's memory is given back

Reply = Callable[[Any, BaseException | None], None]


@dataclass
class EmbeddingTask:
    """One input on its way to a vector: the call it answers and how far its tokens are decoded."""

    key: int  # the server's call id, by which it may be cancelled
    text: str
    reply: Reply  # (result, None) or (None, error), called once, on the scheduler's thread
    tokens: list[int] = field(default_factory=list)
    position: int = 0
    total: np.ndarray | None = None


class EmbeddingQueue:
    """Inputs in arrival order; the scheduler's thread runs them a chunk at a time."""

    def __init__(self, backend: LlamaBackend) -> None:
        self.backend = backend
        self._tasks: deque[EmbeddingTask] = deque()
        self._lock = threading.Lock()  # add and cancel come from the worker's reader thread
        self._credit = 0.0  # seconds of decoding not yet matched by embedding, while generating
        self._seconds_per_token: float | None = None
        self._last_used = time.monotonic()

    # --- other threads' side ------------------------------------------------------------

    def add(self, task: EmbeddingTask) -> None:
        with self._lock:
            self._tasks.append(task)

    def cancel(self, key: int) -> bool:
        """Drop a queued or half-done input whose caller left; whether it was here."""
        with self._lock:
            for task in self._tasks:
                if task.key == key:
                    self._tasks.remove(task)
                    return True
        return False

    @property
    def pending(self) -> bool:
        return bool(self._tasks)

    def fail_all(self, error: BaseException) -> None:
        """Answer every queued input with error (the model is closing)."""
        with self._lock:
            tasks, self._tasks = list(self._tasks), deque()
        for task in tasks:
            task.reply(None, error)

    # --- the scheduler's thread -----------------------------------------------------------

    def may_run(self, generating: bool, admitting: bool = False) -> bool:
        """Whether a chunk may run now: not before a waiting request's admission; with nothing generating,
        always; else while embedding owes no time."""
        return self.pending and not admitting and (not generating or self._credit >= 0)

    def after_step(self, seconds: float) -> None:
        """A decode step took `seconds`: embedding may take as long (credit is kept to one step's worth)."""
        self._credit = min(self._credit + seconds, seconds)

    def run_chunk(self, generating: bool, step_seconds: float) -> None:
        """Decode the next chunk of the oldest input; reply when it is whole (or failed)."""
        with self._lock:
            if not self._tasks:
                return
            task = self._tasks[0]
        started = time.monotonic()
        try:
            finished = self._advance(task, self._chunk_size(generating, step_seconds))
        except Exception as exc:  # noqa: BLE001 - the input's answer; the queue serves on
            self._finish(task)
            task.reply(None, exc)
            return
        took = time.monotonic() - started
        if generating:
            self._credit -= took
        if finished:
            self._finish(task)
            assert task.total is not None
            task.reply((normalised(task.total), len(task.tokens)), None)

    def release_if_idle(self) -> None:
        """Free the embedding context once no input has come for IDLE_SECONDS."""
        if not self.pending and self.backend.has_embedding_context:
            if time.monotonic() - self._last_used >= IDLE_SECONDS:
                self.backend.free_embedding_context()

    def seconds_until_idle(self) -> float | None:
        """How long the scheduler may sleep before release_if_idle has work; None when there is none."""
        if self.pending or not self.backend.has_embedding_context:
            return None
        return max(0.0, IDLE_SECONDS - (time.monotonic() - self._last_used))

    def _advance(self, task: EmbeddingTask, size: int) -> bool:
        if not task.tokens:
            task.tokens = self.backend.embedding_tokens(task.text)
        if self.backend.embeds_whole:
            size = len(task.tokens)  # a model that attends both ways reads an input whole
        began = time.monotonic()
        total = self.backend.embed_chunk(task.tokens, task.position, size)
        count = min(size, len(task.tokens) - task.position)
        cost = (time.monotonic() - began) / max(1, count)
        self._seconds_per_token = (
            cost if self._seconds_per_token is None else 0.7 * self._seconds_per_token + 0.3 * cost
        )
        task.total = total if task.total is None else task.total + total
        task.position += count
        self._last_used = time.monotonic()
        return task.position >= len(task.tokens)

    def _chunk_size(self, generating: bool, step_seconds: float) -> int:
        """Tokens for the next chunk: about one decode step's time while generating, else IDLE_CHUNK_SECONDS'."""
        largest = self.backend.embedding_chunk
        budget = step_seconds if generating else IDLE_CHUNK_SECONDS
        if self._seconds_per_token is None or budget <= 0:
            return MIN_CHUNK if generating else largest  # the first chunk measures what a token costs
        return max(MIN_CHUNK, min(largest, int(budget / self._seconds_per_token)))

    def _finish(self, task: EmbeddingTask) -> None:
        with self._lock:
            if self._tasks and self._tasks[0] is task:
                self._tasks.popleft()


def normalised(total: np.ndarray) -> list[float]:
    """A summed (or mean) vector scaled to unit length: its direction is the embedding."""
    norm = float(np.linalg.norm(total)) or 1.0
    return (total / norm).tolist()
