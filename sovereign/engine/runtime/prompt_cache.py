"""The prompt cache beyond the slots: saved KV states of earlier conversations, found by longest shared prefix.

A slot's cache serves only the conversation in it. Before a slot is given to another conversation,
what it held is saved here (in memory, within a budget); a later prompt that starts the same way
has it put back instead of reading those tokens again. Entries of long prompts are also written to
disk (disk_cache.py), so they outlive the process. Least recently used entries go first.

An entry of a sliding-window model can be cut short only at one of its checkpoints (kv_state.py):
`usable` says how much of an entry a prompt can take.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sovereign.engine.runtime.kv_state import State

log = logging.getLogger(__name__)
_serials = itertools.count()


@dataclass(frozen=True)
class Checkpoint:
    """The sliding-window layers' state after the first `position` tokens of an entry (None until read)."""

    position: int
    state: State | None


@dataclass(eq=False)
class CacheEntry:
    """A saved conversation: its tokens, its whole state, and its checkpoints (sliding-window models)."""

    tokens: np.ndarray  # int32, one per cached position
    state: State | None  # None while only on disk
    checkpoints: tuple[Checkpoint, ...] = ()
    size: int = 0  # bytes of its states (of its file, on disk)
    last_used: float = field(default_factory=time.monotonic)
    tier: str = "ram"  # where it was found: ram or disk
    disk_name: str | None = None  # its file in the disk tier, once written
    serial: int = field(default_factory=lambda: next(_serials))

    def __len__(self) -> int:
        return len(self.tokens)


def common_prefix(tokens: np.ndarray, prompt: np.ndarray) -> int:
    """How many leading tokens two int32 arrays share."""
    n = min(len(tokens), len(prompt))
    if n == 0:
        return 0
    differ = np.flatnonzero(tokens[:n] != prompt[:n])
    return int(differ[0]) if differ.size else n


def usable(entry: CacheEntry, match: int, prompt_length: int, windowed: bool) -> int:
    """How many of a prompt's tokens an entry can serve, having `match` of them in common.

    At least the prompt's last token is read again (its logits give the first new token). A
    windowed entry serves its whole length (or one token less), or else only up to a checkpoint.
    """
    keep = min(match, prompt_length - 1)
    if not windowed or keep >= len(entry) - 1:
        return max(keep, 0)
    return max((c.position for c in entry.checkpoints if c.position <= keep), default=0)


class DiskTierLike(Protocol):
    """What the cache asks of its disk tier (disk_cache.DiskTier)."""

    @property
    def bytes(self) -> int: ...

    written_bytes: int
    enabled: bool
    on_written: Callable[[], None] | None

    def entries(self) -> list[CacheEntry]: ...

    def load(self, entry: CacheEntry) -> CacheEntry | None: ...

    def submit(self, entry: CacheEntry) -> None: ...

    def discard(self, entry: CacheEntry) -> None: ...

    def close(self, timeout: float = 30.0) -> None: ...


@dataclass
class TierCounts:
    """What one tier has served and taken, for /metrics."""

    hits: int = 0
    restored_bytes: int = 0
    saved_bytes: int = 0


class PromptCache:
    """Entries in memory within `budget` bytes, with an optional disk tier behind them."""

    def __init__(self, budget: int, *, windowed: bool, disk: DiskTierLike | None = None) -> None:
        self.budget = budget
        self.windowed = windowed
        self.disk = disk
        self._entries: list[CacheEntry] = []
        self.bytes = 0
        self.counts = {"slot": TierCounts(), "ram": TierCounts(), "disk": TierCounts()}
        self.misses = 0

    @property
    def entries(self) -> list[CacheEntry]:
        """The entries held in memory, oldest use first."""
        return sorted(self._entries, key=lambda e: e.last_used)

    def best(self, prompt: Sequence[int]) -> tuple[CacheEntry | None, int]:
        """The entry (in memory or on disk) that serves most of the prompt, and how many tokens it serves."""
        wanted = np.asarray(prompt, dtype=np.int32)
        best: tuple[CacheEntry | None, int] = (None, 0)
        in_memory = {e.disk_name for e in self._entries if e.disk_name}
        on_disk = [e for e in self.disk.entries() if e.disk_name not in in_memory] if self.disk else []
        for entry in self._entries + on_disk:  # in memory first: of two equal ones, that one wins
            served = usable(entry, common_prefix(entry.tokens, wanted), len(wanted), self.windowed)
            if served > best[1]:
                best = (entry, served)
        return best

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether an entry in memory starts with these very tokens (saving them again would add nothing)."""
        wanted = np.asarray(tokens, dtype=np.int32)
        return any(len(e) >= len(wanted) and common_prefix(e.tokens, wanted) == len(wanted) for e in self._entries)

    def load(self, entry: CacheEntry) -> CacheEntry | None:
        """The entry with its states in memory: as it is, or read from disk (and then kept in memory too)."""
        entry.last_used = time.monotonic()
        if entry.state is not None or self.disk is None:
            return entry
        loaded = self.disk.load(entry)
        if loaded is not None:
            self._keep(loaded)
        return loaded

    def save(self, entry: CacheEntry) -> None:
        """Keep a new entry in memory, and write it to disk if it is long enough."""
        if self._keep(entry):
            self.counts["ram"].saved_bytes += entry.size
        if self.disk is not None:
            self.disk.submit(entry)

    def discard(self, entry: CacheEntry) -> None:
        """Drop an entry that would not restore."""
        if entry in self._entries:
            self._remove(entry)
        if self.disk is not None and entry.disk_name:
            self.disk.discard(entry)

    def figures(self) -> dict[str, int]:
        """Counts and sizes per tier, for /metrics."""
        figures = {"misses": self.misses, "ram_bytes": self.bytes, "ram_entries": len(self._entries)}
        figures["disk_bytes"] = self.disk.bytes if self.disk is not None else 0
        for tier, counts in self.counts.items():
            figures[f"{tier}_hits"] = counts.hits
            figures[f"{tier}_restored_bytes"] = counts.restored_bytes
            figures[f"{tier}_saved_bytes"] = counts.saved_bytes
        figures["disk_saved_bytes"] = self.disk.written_bytes if self.disk is not None else 0
        return figures

    def close(self) -> None:
        """Let the disk tier finish its writes."""
        if self.disk is not None:
            self.disk.close()

    def _keep(self, entry: CacheEntry) -> bool:
        """Hold an entry in memory (entries it extends are dropped); False when it alone is over the budget."""
        if entry.size > self.budget:
            log.debug("a %d-byte prompt state is over the cache's %d-byte budget", entry.size, self.budget)
            return False
        superseded = [
            e for e in self._entries if len(e) <= len(entry) and common_prefix(e.tokens, entry.tokens) == len(e)
        ]
        for old in superseded:
            self._remove(old)
        self._entries.append(entry)
        self.bytes += entry.size
        while self.bytes > self.budget:
            self._remove(min(self._entries, key=lambda e: e.last_used))
        return True

    def _remove(self, entry: CacheEntry) -> None:
        self._entries.remove(entry)
        self.bytes -= entry.size
