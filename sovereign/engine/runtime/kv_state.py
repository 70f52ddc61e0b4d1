"""One sequence's KV cache as bytes: saved out of llama.cpp's context and put back, whole or as a checkpoint.

A saved state holds the sequence's tokens' keys and values, so putting it back replaces reading
those tokens again. Two kinds:

- **whole**: every layer. Of a sliding-window model (Gemma 3) llama.cpp keeps only the last window
  of the sliding-window layers in a saved state, so a whole state can be continued but not cut
  short: the window before the cut is not in it.
- **checkpoint**: only the sliding-window layers, as they were after the first `position` tokens.
  Put back over a whole state cut to `position`, it makes that prefix usable (as llama-server's
  context checkpoints do). It is taken from a scratch sequence that shares the live one's cells
  (`llama_memory_seq_cp` copies no data), which works because the slots keep their sliding-window
  layers whole (`swa_full`).
"""

from __future__ import annotations

import ctypes
from types import ModuleType
from typing import Any

# llama_state_seq_flags: only the partial part of a model's memory (the sliding-window layers).
PARTIAL_ONLY = 1

State = ctypes.Array[ctypes.c_uint8]


class SequenceStates:
    """Save and restore sequences of one llama.cpp context; called on the scheduler's thread only."""

    def __init__(self, llama: ModuleType, context: Any, memory: Any, *, scratch: int, windowed: bool) -> None:
        self._llama = llama
        self._context = context
        self._memory = memory
        self.scratch = scratch  # a sequence id no slot uses, for taking checkpoints
        self.windowed = windowed  # a whole state can only be continued: cutting it needs a checkpoint

    def save(self, sequence: int, *, partial: bool = False) -> State | None:
        """The sequence's state (None if llama.cpp could not write it)."""
        flags = PARTIAL_ONLY if partial else 0
        size = self._llama.llama_state_seq_get_size_ext(self._context, sequence, flags)
        if size <= 0:
            return None
        buffer = (ctypes.c_uint8 * size)()
        written = self._llama.llama_state_seq_get_data_ext(self._context, buffer, size, sequence, flags)
        return buffer if written == size else None

    def restore(self, sequence: int, state: State, *, partial: bool = False) -> bool:
        """Replace what the sequence holds with a saved state (a checkpoint: only its sliding-window layers).

        False when llama.cpp refuses it (no free cells, or a state of another shape); the sequence is then empty.
        """
        flags = PARTIAL_ONLY if partial else 0
        read = self._llama.llama_state_seq_set_data_ext(self._context, state, len(state), sequence, flags)
        if read != len(state):
            self._llama.llama_memory_seq_rm(self._memory, sequence, -1, -1)
            return False
        return True

    def checkpoint(self, sequence: int, position: int) -> State | None:
        """The sliding-window layers as they were after the sequence's first `position` tokens."""
        scratch = self.scratch
        self._llama.llama_memory_seq_rm(self._memory, scratch, -1, -1)
        self._llama.llama_memory_seq_cp(self._memory, sequence, scratch, 0, position)
        try:
            return self.save(scratch, partial=True)
        finally:
            self._llama.llama_memory_seq_rm(self._memory, scratch, -1, -1)

    def cut(self, sequence: int, position: int) -> bool:
        """Keep the sequence's first `position` tokens (False where this memory cannot cut, e.g. recurrent)."""
        return bool(self._llama.llama_memory_seq_rm(self._memory, sequence, position, -1))


def state_bytes(state: State) -> memoryview:
    """A state's bytes, without a copy (to write to a file)."""
    return memoryview(state).cast("B")


def state_from(buffer: bytearray, start: int, size: int) -> State:
    """A state over `size` bytes of `buffer` at `start`, without a copy (read from a file)."""
    return (ctypes.c_uint8 * size).from_buffer(buffer, start)
