"""Which slot takes a prompt, and how much of the prompt it already holds: from itself, another slot, or the cache.

Three places may hold a prompt's beginning, tried in this order of cost:
- **the slot itself** (a conversation's next turn lands where its last one ran);
- **another slot**: its cells are shared into this one (`llama_memory_seq_cp`, no data copied);
- **the prompt cache** (prompt_cache.py): a saved state put back, from memory or from disk.

Before a slot's content is dropped for another conversation, it is saved to the cache; a slot idle
with a long conversation the disk tier lacks is saved too, should the process end.

Sliding-window models (Gemma 3): llama.cpp gives the cells of tokens outside a sequence's window to
new tokens, so a sequence can be cut short only where it still holds the window before the cut, or
at a checkpoint (kv_state.py). Checkpoints are taken as a prompt is read, at the positions the
engine names (where a conversation may part from this one) and at the prompt's last token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from sovereign.engine.runtime.disk_cache import MIN_TOKENS as DISK_MIN_TOKENS
from sovereign.engine.runtime.kv_state import SequenceStates, State
from sovereign.engine.runtime.prompt_cache import CacheEntry, Checkpoint, PromptCache
from sovereign.engine.runtime.speculation import NgramDrafter

if TYPE_CHECKING:
    from sovereign.engine.runtime.backend import LlamaBackend

log = logging.getLogger(__name__)

# Sharing another slot's prefix costs a cache walk: only worth it for a real head start.
MIN_PREFIX_TO_SHARE = 16
# Putting a saved state back costs a copy of all of it (tens of milliseconds for 20k tokens), less than
# reading a few tokens again at such a depth: it must beat the slots' own reuse by this much.
MIN_CACHE_GAIN = 16
# A slot's content is saved when at least this much of it would be lost (and it has at least SAVE_MIN_TOKENS):
# a conversation's next turn then starts from its own answer instead of reading it again.
SAVE_MIN_LOSS = 16
SAVE_MIN_TOKENS = 256
# An idle slot already saved is saved again once its conversation has grown by this share.
PERSIST_GROWTH = 0.25
# A request waits for another slot still reading the same prompt when that would spare it this many tokens.
WAIT_MIN_GAIN = 1024
# Checkpoints kept per slot (and so per saved conversation): the earliest (a shared system prompt) and the
# latest (this turn) matter most. Each is one window of the sliding-window layers.
MAX_CHECKPOINTS = 6


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
    checkpoints: dict[int, State] = field(default_factory=dict)  # sliding-window states by position
    due: list[int] = field(default_factory=list)  # positions to take a checkpoint at as the prompt is read
    saved: int = 0  # how many of its tokens the cache holds as an entry already
    drafter: NgramDrafter = field(default_factory=NgramDrafter)  # speculation's n-gram index over `cached`
    draft: list[int] = field(default_factory=list)  # tokens guessed after next_token, in this step's batch
    draft_index: int = 0  # where the draft's first token sits in that batch

    def cut(self, keep: int) -> None:
        """Forget what lies past `keep` tokens (the caller cuts the KV cache)."""
        del self.cached[keep:]
        self.checkpoints = {p: s for p, s in self.checkpoints.items() if p <= keep}
        self.saved = min(self.saved, keep)  # the cache's entry still starts with what is left


class Plan(NamedTuple):
    """How a slot can serve a prompt: keep this many tokens, through the checkpoint at `checkpoint` if not None."""

    keep: int
    checkpoint: int | None = None


class SlotReuse:
    """Places prompts in slots with the most of them already decoded, and saves what slots drop."""

    def __init__(self, backend: LlamaBackend, cache: PromptCache | None) -> None:
        self.backend = backend
        self.states: SequenceStates | None = backend.states
        self.cache = cache if self.states is not None else None

    # --- placing a prompt ---------------------------------------------------------------

    def take(
        self, prompt: list[int], hints: Sequence[int], free: list[Slot], slots: list[Slot]
    ) -> tuple[Slot, int, str | None]:
        """The slot for a prompt, how many of its tokens that slot now holds, and where they came from."""
        plans = {s.sequence: self._plan(s, prompt) for s in slots}
        # Longest reusable prefix first. Among equals, the slot that served it last: a repeated request then
        # lands on the very KV cells it used before, so seeded sampling repeats (cell order changes rounding).
        # With nothing to reuse, the least recently used slot, which keeps the warm caches warm.
        slot = max(
            free, key=lambda s: (plans[s.sequence].keep, s.last_used if plans[s.sequence].keep else -s.last_used)
        )
        donor = max((s for s in slots if s is not slot), key=lambda s: plans[s.sequence].keep, default=None)
        if donor is not None and plans[donor.sequence].keep < plans[slot.sequence].keep + MIN_PREFIX_TO_SHARE:
            donor = None
        best = plans[donor.sequence if donor is not None else slot.sequence].keep
        placed = self._from_cache(prompt, free, best)
        source: str | None
        if placed is not None:
            slot, keep, source = placed
        else:
            keep = self._from_slots(slot, donor, prompt)
            source = "slot" if keep else None
        slot.due = self._due(prompt, hints, keep)
        if self.cache is not None:
            if source == "slot":
                self.cache.counts["slot"].hits += 1
            elif source is None:
                self.cache.misses += 1
        return slot, keep, source

    def worth_waiting(self, prompt: list[int], slots: list[Slot]) -> bool:
        """Whether a slot still reading a prompt will soon hold much more of this one than any place does now."""
        reading = [s for s in slots if s.job is not None and s.pending]
        if not reading or len(prompt) < WAIT_MIN_GAIN:
            return False
        coming = max(common_prefix_length(s.cached + s.pending, prompt) for s in reading)
        now = max(self._plan(s, prompt).keep for s in slots)
        if coming - now < WAIT_MIN_GAIN:
            return False
        if self.cache is not None:
            now = max(now, self.cache.best(prompt)[1])
        return coming - now >= WAIT_MIN_GAIN

    def _plan(self, slot: Slot, prompt: list[int]) -> Plan:
        """How much of the prompt a slot can serve (at least its last token is read again: it gives the logits)."""
        keep = min(common_prefix_length(slot.cached, prompt), len(prompt) - 1)
        if keep <= 0:
            return Plan(0)
        if self.states is None or self.states.window_kept(slot.sequence, keep):
            return Plan(keep)
        below = [p for p in slot.checkpoints if p <= keep]
        return Plan(max(below), max(below)) if below else Plan(0)

    def _from_cache(self, prompt: list[int], free: list[Slot], in_slots: int) -> tuple[Slot, int, str] | None:
        """A free slot given the cache's best entry for the prompt, if it beats what the slots hold, and its tier."""
        if self.cache is None:
            return None
        entry, served = self.cache.best(prompt)
        if entry is None or served < in_slots + MIN_CACHE_GAIN:
            return None
        target = min(free, key=lambda s: s.last_used)
        self.save(target)  # what it held goes to the cache, not away
        kept = self._restore(target, entry, served)
        return (target, kept, entry.tier) if kept else None

    def _from_slots(self, slot: Slot, donor: Slot | None, prompt: list[int]) -> int:
        """Cut a slot to what it can serve of the prompt (first sharing a longer prefix another slot holds)."""
        plan = self._plan(slot, prompt)  # (again: a failed restore from the cache may have emptied it)
        if donor is not None and (shared := self._plan(donor, prompt)).keep >= plan.keep + MIN_PREFIX_TO_SHARE:
            self.save(slot)
            length = shared.checkpoint if shared.checkpoint is not None else shared.keep
            self.backend.copy_prefix(donor.sequence, slot.sequence, length)
            slot.cached = donor.cached[:length]
            slot.checkpoints = {p: s for p, s in donor.checkpoints.items() if p <= length}
            slot.saved = 0
            plan = shared
        elif len(slot.cached) - plan.keep >= SAVE_MIN_LOSS:
            self.save(slot)
        keep = self._cut(slot, plan)
        slot.cut(keep)
        return keep

    def _cut(self, slot: Slot, plan: Plan) -> int:
        """Cut a slot's sequence as planned; how many tokens it then holds (0 when it could not)."""
        keep, checkpoint = plan
        if keep > 0 and checkpoint is not None and self.states is not None:
            state = slot.checkpoints.get(checkpoint)
            if state is not None and self.states.cut(slot.sequence, keep):
                if self.states.restore(slot.sequence, state, partial=True):
                    return keep
        elif keep > 0 and self.backend.forget(slot.sequence, keep) and not self._start_lost(slot, keep):
            return keep
        self.backend.forget(slot.sequence)
        return 0

    def _start_lost(self, slot: Slot, keep: int) -> bool:
        """Whether the sequence's start (or, with a sliding window, the window before `keep`) is gone."""
        if self.states is not None:
            return not self.states.window_kept(slot.sequence, keep)
        return self.backend.first_position(slot.sequence) > 0

    def _due(self, prompt: list[int], hints: Sequence[int], keep: int) -> list[int]:
        """Where to take checkpoints as the prompt is read: the positions the engine named, and its last token."""
        if self.states is None or not self.states.windowed or len(prompt) < SAVE_MIN_TOKENS:
            return []
        return sorted({h for h in hints if keep < h < len(prompt)} | {len(prompt) - 1} - {keep})

    # --- checkpoints as prompts are read ---------------------------------------------------

    def take_checkpoints(self, slots: list[Slot]) -> None:
        """After a decode step: the sliding-window state of each slot that has just read up to a due position."""
        if self.states is None:
            return
        for slot in slots:
            while slot.due and slot.due[0] < len(slot.cached):
                slot.due.pop(0)  # passed without a stop there (the chunk was cut short for another reason)
            if slot.due and slot.due[0] == len(slot.cached):
                position = slot.due.pop(0)
                state = self.states.save(slot.sequence, partial=True)
                if state is not None:
                    slot.checkpoints[position] = state
                    if len(slot.checkpoints) > MAX_CHECKPOINTS:
                        positions = sorted(slot.checkpoints)
                        del slot.checkpoints[positions[len(positions) // 2]]  # keep the first and the latest

    # --- saving -------------------------------------------------------------------------

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
        checkpoints = tuple(Checkpoint(p, s) for p, s in sorted(slot.checkpoints.items()) if p < len(tokens))
        size = len(state) + sum(len(c.state) for c in checkpoints if c.state is not None)
        self.cache.save(CacheEntry(np.asarray(tokens, dtype=np.int32), state, checkpoints, size))
        slot.saved = len(tokens)
        log.debug("prompt cache: saved %d tokens of slot %d (%d bytes)", len(tokens), slot.sequence, size)

    def idle_slot(self, slots: list[Slot]) -> Slot | None:
        """A slot whose long conversation the disk tier lacks, to save while nothing else runs."""
        cache = self.cache
        if cache is None or cache.disk is None or not cache.disk.enabled:
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

    def _restore(self, slot: Slot, entry: CacheEntry, served: int) -> int:
        """Put an entry's state into a slot, cut to `served` tokens; how many it holds then (0: it failed)."""
        assert self.cache is not None and self.states is not None
        loaded = self.cache.load(entry)
        if loaded is None or loaded.state is None or not self.states.restore(slot.sequence, loaded.state):
            if loaded is not None and loaded.state is not None:
                log.warning("prompt cache: a saved state of %d tokens did not restore; dropping it", len(loaded))
                self.cache.discard(loaded)
            self.backend.forget(slot.sequence)
            slot.cut(0)
            return 0
        slot.cached = [int(t) for t in loaded.tokens]
        slot.checkpoints = {c.position: c.state for c in loaded.checkpoints if c.state is not None}
        slot.saved = len(loaded)
        checkpoint = served if self.states.windowed and served < len(loaded) - 1 else None
        kept = self._cut(slot, Plan(served, checkpoint)) if served < len(loaded) else served
        slot.cut(kept)
        log.debug(
            "prompt cache: put back %d of %d tokens from %s into slot %d", kept, len(loaded), loaded.tier, slot.sequence
        )
        if kept:
            counts = self.cache.counts[loaded.tier]
            counts.hits += 1
            counts.restored_bytes += loaded.size
        return kept


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two lists share."""
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i : i + 64] == b[i : i + 64]:  # slices compare in C: whole chunks first
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i
