"""Speculative decoding without a draft model: drafts found by n-gram lookup in the slot's own context.

An answer that quotes its prompt (a file being edited, a function being fixed, a document being
summarised with its own words) repeats runs of tokens the context already holds. When the last few
tokens generated appeared earlier, the tokens that followed them then are a good guess for what
follows now ("prompt lookup decoding"; llama.cpp's `ngram-*` speculation types). The scheduler
decodes the guess together with the slot's next token, in one batch, and keeps the longest run the
model itself would have drawn (scheduler.py); the rest is removed from the KV cache.

Why the output does not change: each position's token is still drawn by the request's own sampler
from the model's logits there, in order, and a draft token counts only when the draw equals it. For
a greedy request that is exactly the token plain decoding would give. For a sampled one it is the
standard speculative-sampling rule for a draft that proposes one token with certainty: the draft
token is kept with probability p(token), and otherwise the draw itself, which then follows p with
that token excluded, is the correction.

When a draft pays: verifying k guessed tokens widens the step from 1 token to 1 + k, and on a CPU a
wider step is not free (two tokens cost about twice one on a 2-core EPYC with a 135M model). So a
draft is made only when the tokens it is expected to save are worth the time it adds: StepCosts learns
what a step of each width takes from the steps the scheduler runs, and each slot's drafter learns how
often its guesses come true, from its drafts and, while it drafts nothing, from the guesses it would
have made (free to check against the tokens drawn anyway).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# The lookup tries the longest n-gram first: a longer match is a better predictor, a shorter one finds more.
NGRAM_SIZES = (4, 3)
DRAFT_MAX = 16  # tokens per draft at most
# How often a slot's guesses come true is counted with this decay per draft, so that it follows what the
# answer is doing now (copying a file, then writing new text); it starts from PRIOR_HITS in PRIOR_TRIALS.
ACCEPTANCE_DECAY = 0.7
PRIOR_HITS, PRIOR_TRIALS = 1.0, 2.0
# Until a step of some width has run, it is assumed to cost a single token's step plus this share of one
# per extra token: hopeful, so that a draft is tried and the real cost learnt.
UNSEEN_TOKEN_SHARE = 0.3
COST_DECAY = 0.8  # weight of what a width cost before, against its latest step
# Under `auto`, drafts are made only while this many slots or fewer generate in one step: at high
# concurrency the batch is already wide and verifying drafts costs throughput (llama.cpp measured 1.10x
# at one slot and 0.77x at eight with lookup decoding).
AUTO_MAX_GENERATING = 2


@dataclass
class NgramDrafter:
    """One slot's n-gram index over its context, and how often its guesses have come true lately."""

    indexed: int = 0  # how many context tokens have their n-grams indexed
    hits: float = PRIOR_HITS  # decayed counts of guessed tokens drawn as guessed, and of guesses tried
    trials: float = PRIOR_TRIALS
    _shadow: list[int] = field(default_factory=list)  # a guess not drafted, checked against the tokens drawn
    _shadow_kept: int = 0  # how many of its tokens were drawn so far
    _follower: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)

    def reset(self) -> None:
        """Start afresh for a new request (the slot's context was replaced)."""
        self.indexed = 0
        self.hits, self.trials = PRIOR_HITS, PRIOR_TRIALS
        self.drop_shadow()
        self._follower = {n: {} for n in NGRAM_SIZES}

    @property
    def acceptance(self) -> float:
        """The chance that a guessed token is drawn, given the one before it was."""
        return self.hits / self.trials

    def guess(self, context: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens guessed to follow `context`: what followed its tail's latest earlier occurrence."""
        if limit <= 0:
            return []
        self._index(context)
        for n in NGRAM_SIZES:
            if len(context) <= n:
                continue
            start = self._follower[n].get(tuple(context[-n:]))
            if start is not None:
                return context[start : start + limit]
        return []

    def record(self, guessed: int, kept: int) -> None:
        """Count how a guess of `guessed` tokens fared: the first `kept` of them were drawn."""
        if guessed == 0:
            return
        # a geometric model: each kept token is a success, the token that broke the run a failure
        failed = 1 if kept < guessed else 0
        self.hits = self.hits * ACCEPTANCE_DECAY + kept
        self.trials = self.trials * ACCEPTANCE_DECAY + kept + failed

    def shadow(self, guess: list[int]) -> None:
        """Keep a guess that was not drafted, to check it against the tokens drawn (unless one is being checked)."""
        if not self._shadow:
            self._shadow, self._shadow_kept = list(guess), 0

    def drop_shadow(self) -> None:
        """Stop checking the shadow guess (a real draft is made instead)."""
        self._shadow, self._shadow_kept = [], 0

    def observe(self, token: int) -> None:
        """A token drawn in a step without a draft: check the shadow guess against it (free to learn from)."""
        if not self._shadow:
            return
        if token == self._shadow[self._shadow_kept]:
            self._shadow_kept += 1
            if self._shadow_kept < len(self._shadow):
                return
        self.record(len(self._shadow), self._shadow_kept)
        self.drop_shadow()

    def _index(self, context: list[int]) -> None:
        """Index every n-gram whose follower is known, up to the context's last token (its tail has none yet)."""
        if not self._follower or self.indexed > len(context):
            self.reset()
        for n, table in self._follower.items():
            # the n-gram ending just before position `end` maps to `end`, the position of the token after it
            for end in range(max(self.indexed, n), len(context)):
                table[tuple(context[end - n : end])] = end
        self.indexed = len(context)


def expected_kept(acceptance: float, length: int) -> float:
    """Tokens of a `length`-token draft expected to be kept: a run that ends at the first miss."""
    return sum(acceptance**i for i in range(1, length + 1))


class StepCosts:
    """What a decode step of each width (tokens in the batch) takes, learnt from the steps run."""

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}
        self._widths: list[int] = []  # sorted keys of _seconds

    def record(self, width: int, seconds: float) -> None:
        """Learn from one step."""
        if width in self._seconds:
            self._seconds[width] = COST_DECAY * self._seconds[width] + (1 - COST_DECAY) * seconds
        else:
            self._seconds[width] = seconds
            bisect.insort(self._widths, width)

    def estimate(self, width: int) -> float | None:
        """Seconds a step of `width` tokens should take; None before any step of a width at or below it ran."""
        if width in self._seconds:
            return self._seconds[width]
        at = bisect.bisect(self._widths, width)
        if at == 0:
            return None
        low = self._widths[at - 1]
        if at < len(self._widths):  # between two widths seen: on the line between them
            high = self._widths[at]
            share = (width - low) / (high - low)
            return self._seconds[low] + share * (self._seconds[high] - self._seconds[low])
        single = self._seconds.get(1, self._seconds[low] / low)
        return self._seconds[low] + UNSEEN_TOKEN_SHARE * single * (width - low)

    def best_draft(self, width: int, tokens: float, acceptance: float, longest: int, guess_seconds: float = 0.0) -> int:
        """How many guessed tokens to add to a step of `width` tokens that yields `tokens`: 0 when none pays.

        The best length maximises the step's expected tokens per second; a draft must beat the step without it.
        `guess_seconds` is what guessing each token costs beforehand (a draft model's step; n-gram lookup: 0).
        """
        base = self.estimate(width)
        if base is None or longest <= 0:
            return 0
        best, best_rate = 0, tokens / base
        for length in range(1, longest + 1):
            cost = self.estimate(width + length)
            if cost is None:
                break
            cost += guess_seconds * length
            rate = (tokens + expected_kept(acceptance, length)) / cost
            if rate > best_rate:
                best, best_rate = length, rate
        return best
