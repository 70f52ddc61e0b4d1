"""One sequence's KV cache as bytes: saved out of llama.cpp's context and put back, whole or as a checkpoint.

A saved state holds the sequence's tokens' keys and values, so putting it back replaces reading
those tokens again. Two kinds:

- **whole**: every layer. Of a sliding-window model (Gemma 3) llama.cpp keeps only the last window
  of the sliding-window layers in a saved state, so a whole state can be continued but not cut
  short: the window before the cut is not in it.
- **checkpoint**: only the sliding-window layers, as they were after the first `position` tokens,
  taken right after those tokens were read (llama.cpp reuses the cells of tokens outside a
  sequence's window, so later they may be gone). Put back over a whole state cut to `position`, it
  makes that prefix usable, as llama-server's context checkpoints do.
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

    def __init__(self, llama: ModuleType, context: Any, memory: Any, *, window: int) -> None:
        self._llama = llama
        self._context = context
        self._memory = memory
        self.window = window  # the sliding window, in tokens (0: the model has none)

    @property
    def windowed(self) -> bool:
        """Whether cutting a sequence short needs its sliding window there (a checkpoint, or the cells)."""
        return self.window > 0

    def window_kept(self, sequence: int, position: int) -> bool:
        """Whether a sequence cut to `position` tokens still holds the sliding window before that position.

        llama.cpp hands the cells of tokens outside a sequence's window to new tokens, lowest position
        first, so the lowest position still held says it.
        """
        lowest = self._llama.llama_memory_seq_pos_min(self._memory, sequence)
        # The token at `position` attends to the window's other positions: position - window + 1 onward.
        return not self.windowed or 0 <= lowest <= max(0, position - self.window + 1)

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

    def cut(self, sequence: int, position: int) -> bool:
        """Keep the sequence's first `position` tokens (False where this memory cannot cut, e.g. recurrent)."""
        return bool(self._llama.llama_memory_seq_rm(self._memory, sequence, position, -1))


def state_bytes(state: State) -> memoryview:
    """A state's bytes, without a copy (to write to a file)."""
    return memoryview(state).cast("B")


def state_from(buffer: bytearray, start: int, size: int) -> State:
    """A state over `size` bytes of `buffer` at `start`, without a copy (read from a file)."""
    return (ctypes.c_uint8 * size).from_buffer(buffer, start)
