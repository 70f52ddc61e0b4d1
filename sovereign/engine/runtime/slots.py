"""Which slot takes a prompt, and how much of the prompt it already holds: from itself, another slot, or the cache.

Three places may hold a prompt's beginning, tried in this order of cost:
- **the slot itself** (a conversation's next turn lands where its last one ran);
- **another slot**: its cells are shared into this one (`llama_memory_seq_cp`, no data copied);
- **the prompt cache** (prompt_cache.py): a saved state put back, from memory or from disk.

Before a slot's content is dropped for another conversation, it is saved to the cache; a slot idle
with a long unsaved conversation is saved too, so that the disk tier has it should the process end.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sovereign.engine.runtime.disk_cache import MIN_TOKENS as DISK_MIN_TOKENS
from sovereign.engine.runtime.kv_state import SequenceStates, State
from sovereign.engine.runtime.prompt_cache import CacheEntry, Checkpoint, PromptCache

if TYPE_CHECKING:
    from sovereign.engine.runtime.backend import LlamaBackend

log = logging.getLogger(__name__)

# Sharing another slot's prefix costs a cache walk: only worth it for a real head start.
MIN_PREFIX_TO_SHARE = 16
# Putting a saved state back costs a copy of all of it: it must beat the slot's own reuse by this much.
MIN_CACHE_GAIN = 64
# A slot's content is saved when at least this much of it would be lost (and it has at least SAVE_MIN_TOKENS).
SAVE_MIN_LOSS = 64
SAVE_MIN_TOKENS = 256
# An idle slot already saved is saved again once its conversation has grown by this share.
PERSIST_GROWTH = 0.25
# Checkpoints kept per saved conversation: the earliest (a shared system prompt) and the latest matter most.
MAX_CHECKPOINTS = 8
# Besides the positions a request names, a checkpoint this many tokens before a conversation's end: a
# next turn whose template writes the last answer a little differently still finds one close by.
TAIL_CHECKPOINT = 64


@dataclass(eq=False)
class Slot:
    """One sequence of the shared KV cache and the request using it, if any."""

    sequence: int
    cached: list[int] = field(default_factory=list)  # tokens this sequence holds in the KV cache, by position
    job: Any = None  # the scheduler's request (scheduler._Job) while one runs here
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    next_token: int | None = None  # sampled, to be decoded in the next step
    logits_index: int | None = None  # where this slot's logits sit in the batch just decoded
    admitted: int = 0  # admission order: prompts are read first come, first served
    last_used: float = 0.0
    # Put back from a sliding-window state: the sequence cannot be cut below this position.
    floor: int = 0
    checkpoints: dict[int, State] = field(default_factory=dict)  # inherited from the entry it was put back from
    hints: set[int] = field(default_factory=set)  # positions worth a checkpoint when it is saved
    saved: int = 0  # how many of its tokens the cache holds as an entry already

    def cut(self, keep: int) -> None:
        """Forget what lies past `keep` tokens (the caller cuts the KV cache)."""
        del self.cached[keep:]
        self.hints = {h for h in self.hints if h <= keep}
        self.checkpoints = {p: s for p, s in self.checkpoints.items() if p <= keep}
        self.saved = min(self.saved, keep)  # the cache's entry still starts with what is left
        if keep == 0:
            self.floor = 0


class SlotReuse:
    """Places prompts in slots with the most of them already decoded, and saves what slots drop."""

    def __init__(self, backend: LlamaBackend, states: SequenceStates | None, cache: PromptCache | None) -> None:
        self.backend = backend
        self.states = states
        self.cache = cache if states is not None else None
        self._last_tier = "ram"

    def take(
        self, prompt: list[int], hints: Sequence[int], free: list[Slot], slots: list[Slot]
    ) -> tuple[Slot, int, str | None]:
        """The slot for a prompt, how many of its tokens that slot now holds, and where they came from."""
        shared_by = {s.sequence: self._reusable(s, prompt) for s in slots}
        # Longest shared prefix first. Among equals, the slot that served it last: a repeated request then
        # lands on the very KV cells it used before, so seeded sampling repeats (cell order changes rounding).
        # With nothing to reuse, the least recently used slot, which keeps the warm caches warm.
        slot = max(free, key=lambda s: (shared_by[s.sequence], s.last_used if shared_by[s.sequence] else -s.last_used))
        donor = max((s for s in slots if s is not slot), key=lambda s: shared_by[s.sequence], default=None)
        if donor is not None and shared_by[donor.sequence] < shared_by[slot.sequence] + MIN_PREFIX_TO_SHARE:
            donor = None
        best = shared_by[donor.sequence] if donor is not None else shared_by[slot.sequence]
        placed = self._from_cache(prompt, free, min(best, len(prompt) - 1))
        if placed is not None:
            slot, keep = placed
            source: str | None = self._last_tier
        else:
            keep = self._from_slots(slot, donor, prompt)
            source = "slot" if keep else None
        slot.hints.update(h for h in hints if keep < h < len(prompt))
        slot.hints.add(len(prompt) - 1)
        if self.cache is not None:
            if source == "slot":
                self.cache.counts["slot"].hits += 1
            elif source is None:
                self.cache.misses += 1
        return slot, keep, source

    def _from_cache(self, prompt: list[int], free: list[Slot], in_slots: int) -> tuple[Slot, int] | None:
        """A free slot given the cache's best entry for the prompt, if it beats what the slots hold."""
        if self.cache is None:
            return None
        entry, served = self.cache.best(prompt)
        if entry is None or served < in_slots + MIN_CACHE_GAIN:
            return None
        target = min(free, key=lambda s: s.last_used)
        self.save(target)  # what it held goes to the cache, not away
        kept = self._restore(target, entry, served)
        self._last_tier = entry.tier
        return (target, kept) if kept else None

    def _from_slots(self, slot: Slot, donor: Slot | None, prompt: list[int]) -> int:
        """Cut a slot to what it shares with the prompt (first sharing a longer prefix another slot holds)."""
        shared = self._reusable(slot, prompt)  # (again: a failed restore from the cache may have emptied it)
        if donor is not None and self._reusable(donor, prompt) >= shared + MIN_PREFIX_TO_SHARE:
            shared = self._reusable(donor, prompt)
            self.save(slot)
            self.backend.copy_prefix(donor.sequence, slot.sequence, shared)
            slot.cached = donor.cached[:shared]
            slot.floor = donor.floor
            slot.hints = {h for h in donor.hints if h <= shared}
            slot.checkpoints = {p: s for p, s in donor.checkpoints.items() if p <= shared}
            slot.saved = 0
        # At least the prompt's last token is decoded again: its logits give the first new token.
        keep = min(shared, len(prompt) - 1)
        if len(slot.cached) - keep >= SAVE_MIN_LOSS:
            self.save(slot)
        if keep <= 0 or not self.backend.forget(slot.sequence, keep) or self._start_lost(slot):
            self.backend.forget(slot.sequence)
            keep = 0
        slot.cut(keep)
        return keep

    def save(self, slot: Slot) -> None:
        """Put what a slot holds into the cache (and so, if long, on disk), unless the cache has it already."""
        tokens = slot.cached
        if self.cache is None or self.states is None or len(tokens) < SAVE_MIN_TOKENS or slot.saved >= len(tokens):
            return
        if self.cache.holds(tokens):
            slot.saved = len(tokens)
            return
        state = self.states.save(slot.sequence)
        if state is None:
            return
        checkpoints = self._checkpoints(slot) if self.states.windowed else ()
        size = len(state) + sum(len(c.state) for c in checkpoints if c.state is not None)
        self.cache.save(CacheEntry(np.asarray(tokens, dtype=np.int32), state, checkpoints, size))
        slot.saved = len(tokens)
        log.debug("prompt cache: saved %d tokens of slot %d (%d bytes)", len(tokens), slot.sequence, size)

    def idle_slot(self, slots: list[Slot]) -> Slot | None:
        """A slot whose long conversation the disk tier lacks, to save while nothing else runs."""
        cache = self.cache
        if cache is None or cache.disk is None or not getattr(cache.disk, "enabled", True):
            return None
        for slot in slots:
            grown = len(slot.cached) >= slot.saved * (1 + PERSIST_GROWTH) + 1
            if slot.job is None and len(slot.cached) >= DISK_MIN_TOKENS and grown:
                return slot
        return None

    def persist(self, slot: Slot) -> None:
        """Save an idle slot's conversation (to memory and disk) while it stays in the slot."""
        slot.saved = 0
        self.save(slot)
        slot.saved = len(slot.cached)  # tried: not again until it grows

    def _reusable(self, slot: Slot, prompt: list[int]) -> int:
        """How many of the prompt's tokens a slot holds and can be cut to."""
        shared = _common_prefix(slot.cached, prompt)
        return shared if min(shared, len(prompt) - 1) >= slot.floor else 0

    def _start_lost(self, slot: Slot) -> bool:
        """Whether the sequence's start is gone when it should not be (so its cells cannot be reused)."""
        return slot.floor == 0 and self.backend.first_position(slot.sequence) > 0

    def _restore(self, slot: Slot, entry: CacheEntry, served: int) -> int:
        """Put an entry's state into a slot, cut to `served` tokens; how many it holds then (0: it failed)."""
        assert self.cache is not None and self.states is not None
        loaded = self.cache.load(entry)
        if loaded is None or loaded.state is None:
            self.backend.forget(slot.sequence)
            slot.cut(0)
            return 0
        if not self.states.restore(slot.sequence, loaded.state):
            log.warning("prompt cache: a saved state of %d tokens did not restore; dropping it", len(loaded))
            self.cache.discard(loaded)
            slot.cut(0)
            return 0
        length = len(loaded)
        windowed = self.states.windowed
        floor = length - 1 if windowed else 0
        if served < length:
            checkpoint = next((c for c in loaded.checkpoints if c.position == served), None)
            if windowed and served < length - 1:
                if checkpoint is None or checkpoint.state is None:
                    self.backend.forget(slot.sequence)
                    slot.cut(0)
                    return 0
                cut_ok = self.states.cut(slot.sequence, served)
                if not cut_ok or not self.states.restore(slot.sequence, checkpoint.state, partial=True):
                    self.backend.forget(slot.sequence)
                    slot.cut(0)
                    return 0
                floor = served
            elif not self.states.cut(slot.sequence, served):
                self.backend.forget(slot.sequence)
                slot.cut(0)
                return 0
        slot.cached = [int(t) for t in loaded.tokens[:served]]
        slot.floor = min(floor, served)
        slot.checkpoints = {
            c.position: c.state for c in loaded.checkpoints if c.state is not None and c.position <= served
        }
        slot.hints = set()
        slot.saved = served if served == length else 0
        log.debug(
            "prompt cache: put back %d of %d tokens from %s into slot %d (floor %d)",
            served,
            length,
            loaded.tier,
            slot.sequence,
            slot.floor,
        )
        counts = self.cache.counts[loaded.tier]
        counts.hits += 1
        counts.restored_bytes += loaded.size
        return served

    def _checkpoints(self, slot: Slot) -> tuple[Checkpoint, ...]:
        """Checkpoints of a slot's conversation: those it inherited, and new ones where its requests suggest."""
        assert self.states is not None
        length = len(slot.cached)
        wanted = {h for h in slot.hints if slot.floor < h < length}
        if length - TAIL_CHECKPOINT > slot.floor:
            wanted.add(length - TAIL_CHECKPOINT)
        positions = sorted(wanted | {p for p in slot.checkpoints if p < length})
        if len(positions) > MAX_CHECKPOINTS:
            positions = positions[:2] + positions[-(MAX_CHECKPOINTS - 2) :]
        checkpoints = []
        for position in positions:
            state = slot.checkpoints.get(position) or self.states.checkpoint(slot.sequence, position)
            if state is not None:
                checkpoints.append(Checkpoint(position, state))
        return tuple(checkpoints)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two lists share."""
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i : i + 64] == b[i : i + 64]:  # slices compare in C: whole chunks first
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i
