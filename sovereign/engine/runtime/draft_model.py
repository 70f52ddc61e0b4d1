"""Speculative decoding with a draft model: a small model of the same vocabulary guesses the next tokens.

It runs in the model's process beside the target, with a context of its own holding one sequence per
slot. Before each guess, its sequence is brought level with the slot's context: the common prefix is
kept, the rest is read (at most CATCH_UP_TOKENS per step, so that a new long prompt never stalls the
batch; no guess until it has caught up). Then it decodes greedily, one token at a time, as many tokens
as the scheduler asked for. A greedy draft proposes each token with certainty, so the scheduler's rule
(keep a guessed token while the target's own draw equals it) keeps the target's output unchanged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sovereign.engine.runtime.backend import BatchEntry, LlamaBackend
from sovereign.engine.runtime.slots import common_prefix_length
from sovereign.engine.wire import LoadOptions
from sovereign.errors import ModelLoadError
from sovereign.store.gguf_header import vocabulary_mismatch

log = logging.getLogger(__name__)

CATCH_UP_TOKENS = 512  # context the draft model reads per step at most before it guesses again


class DraftModel:
    """A small model that guesses a slot's next tokens; sequences mirror the target's slots."""

    def __init__(self, target: LlamaBackend, path: Path, options: LoadOptions) -> None:
        reason = vocabulary_mismatch(target.path, path)
        if reason is not None:
            raise ModelLoadError(
                f"the draft model {path.name} cannot guess for {target.path.name}: {reason}",
                "pick a draft model of the same family (the same tokenizer), e.g. a smaller size of it",
            )
        self.backend = LlamaBackend(
            path,
            LoadOptions(
                n_ctx=target.n_ctx,
                n_parallel=target.n_parallel,
                n_threads=options.n_threads,
                n_gpu_layers=options.n_gpu_layers,
                gpu_split=options.gpu_split,  # on the same GPUs as the model it guesses for
                use_extra_bufts=options.use_extra_bufts,
            ),
        )
        self._held: dict[int, list[int]] = {}  # tokens each sequence holds in the draft's KV cache
        self.seconds_per_token = 0.0  # a greedy draft step's time, learnt as it runs (0 until then)

    def guess(self, sequence: int, context: list[int], length: int) -> list[int]:
        """Up to `length` tokens the draft model expects after `context`; [] while it is still catching up."""
        held = self._held.setdefault(sequence, [])
        # the last token is read again: its logits give the first guess
        common = min(common_prefix_length(held, context), len(context) - 1)
        self.backend.forget(sequence, common)
        del held[common:]
        missing = context[common:]
        if len(missing) > CATCH_UP_TOKENS:  # a long new prompt: read a part now, guess in a later step
            self._read(sequence, held, missing[:CATCH_UP_TOKENS], logits=False)
            return []
        row = self._read(sequence, held, missing, logits=True)
        guessed: list[int] = []
        started = time.monotonic()
        while len(guessed) < length:
            token = self.backend.argmax(row)
            guessed.append(token)
            if len(guessed) < length:
                row = self._read(sequence, held, [token], logits=True)
        if guessed:
            spent = (time.monotonic() - started) / len(guessed)
            self.seconds_per_token = spent if not self.seconds_per_token else 0.8 * self.seconds_per_token + 0.2 * spent
        return guessed

    def _read(self, sequence: int, held: list[int], tokens: list[int], *, logits: bool) -> int:
        """Decode `tokens` after what the sequence holds, logits for the last one only when asked.

        Returns the batch index of the last token (where its logits are).
        """
        row = 0
        for start in range(0, len(tokens), self.backend.n_batch):
            chunk = tokens[start : start + self.backend.n_batch]
            last = start + len(chunk) == len(tokens)
            base = len(held)
            self.backend.decode(
                [
                    BatchEntry(token, base + i, sequence, logits and last and i == len(chunk) - 1)
                    for i, token in enumerate(chunk)
                ]
            )
            held.extend(chunk)
            row = len(chunk) - 1
        return row

    def close(self) -> None:
        """Free the draft model."""
        self.backend.close()
