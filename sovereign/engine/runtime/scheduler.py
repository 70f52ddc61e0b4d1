"""Continuous batching: N slots share one llama.cpp context, and one thread decodes them together.

Every decode step carries one token for each slot that is generating, plus a chunk of the
prompt of slots still reading theirs; waiting requests take a free slot between steps. A slot
keeps its KV cache after its request ends, and a new prompt that starts with the same tokens
reuses them (slots.py: from the slot, another slot, or the prompt cache beyond the slots), so a
chat's next turn reads only its new tokens. While nothing runs, long conversations still in the
slots are saved to the prompt cache's disk tier.

While few slots generate, each one's next token travels with a draft: the tokens that followed the
same few tokens earlier in its context (speculation.py), or a draft model's guess (draft_model.py),
as long as it pays for the time it adds. The step's logits check the whole draft at once, the slot
keeps as much of it as its own draws agree with, and the rest leaves the KV cache.

It runs inside a model's own process (worker.py) and knows nothing of asyncio: each generation's
tokens go to a TokenSink, and the worker sends what a step produced as one message.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sovereign.config import DEFAULT_MAX_QUEUE
from sovereign.engine.requests import SamplingParams
from sovereign.engine.runtime.backend import BatchEntry, LlamaBackend
from sovereign.engine.runtime.embedding_queue import EmbeddingQueue, EmbeddingTask, Reply
from sovereign.engine.runtime.prompt_cache import PromptCache
from sovereign.engine.runtime.slots import Slot, SlotReuse
from sovereign.engine.runtime.speculation import AUTO_MAX_GENERATING, DRAFT_MAX, StepCosts, expected_kept
from sovereign.engine.stats import RequestStats
from sovereign.engine.wire import Speculate, Step
from sovereign.errors import EngineError, InvalidRequest, RequestTimedOut, ServerBusy

if TYPE_CHECKING:
    from sovereign.engine.runtime.backend import Sampler
    from sovereign.engine.runtime.draft_model import DraftModel

log = logging.getLogger(__name__)

# Until the draft model has run, a guessed token is assumed to cost this share of one of the target's steps.
DRAFT_MODEL_COST_SHARE = 0.1
# While other slots are generating, a new prompt is read this many tokens per step, so their
# streams keep flowing (a 512-token chunk costs a running stream about 1.3 s on two CPU cores).
PREFILL_CHUNK_WHILE_DECODING = 256
RATE_WINDOW_SECONDS = 10.0


class TokenSink(Protocol):
    """Where a generation's tokens go: called on the scheduler's thread."""

    stats: RequestStats
    forced: deque[int]  # tokens to emit next instead of sampling (a reasoning budget closing the block); others append

    @property
    def cancelled(self) -> bool: ...

    def push(self, step: Step) -> None: ...

    def end(self, error: BaseException | None = None) -> None: ...


@dataclass(eq=False)
class _Job:
    """A request from submission to its last token."""

    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    stream: TokenSink
    budget: int  # tokens it may generate: max_tokens, or what is left of the context
    deadline: float | None
    last_token_at: float = 0.0
    hints: tuple[int, ...] = ()  # prompt positions worth a checkpoint (where a shared system prompt ends)


class BatchScheduler:
    """Owns a backend; serves many generations at once through llama.cpp's multi-sequence batches."""

    def __init__(
        self,
        backend: LlamaBackend,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        timeout: float | None = None,
        after_step: Callable[[], None] | None = None,
        cache: PromptCache | None = None,
        speculate: Speculate = Speculate.off,
        costs: StepCosts | None = None,
        draft_model: DraftModel | None = None,
    ) -> None:
        self.backend = backend
        # drafts need a tail of the KV cache dropped when rejected, which recurrent models cannot do
        self.speculate = speculate if backend.can_drop_tail else Speculate.off
        self.draft_model = draft_model  # the scheduler owns it (closes it)
        if self.speculate is Speculate.draft and draft_model is None:
            self.speculate = Speculate.off
        # guesses come from the draft model when there is one (and n-gram lookup was not asked for)
        self._model_guesses = draft_model is not None and self.speculate in (Speculate.auto, Speculate.draft)
        self.costs = costs or StepCosts()  # what steps of each width take: whether a draft pays
        self.max_queue = max_queue
        self.timeout = timeout
        self._after_step = after_step or (lambda: None)  # the worker sends one message per step from here
        self._slots = [Slot(i) for i in range(backend.n_parallel)]
        self.cache = cache
        self._reuse = SlotReuse(backend, cache)
        if cache is not None and cache.disk is not None:
            cache.disk.on_written = self._refresh  # a write done in the background changes what /metrics shows
        self._waiting: deque[_Job] = deque()
        self._calls: list[Callable[[], None]] = []
        self.embeddings = EmbeddingQueue(backend)  # inputs decoded a chunk at a time between steps
        self._last_step_seconds = 0.0
        self._wake = threading.Condition()
        self._closing = False
        self._admissions = 0
        self._recent_steps: deque[tuple[float, float, int]] = deque()  # (end, seconds, tokens sampled)
        self._recent_seconds = 0.0  # running sums over _recent_steps: the rate is read after every step
        self._recent_tokens = 0
        self._recent_durations: deque[float] = deque(maxlen=32)
        self._thread = threading.Thread(target=self._run, name=f"scheduler:{backend.path.name}", daemon=True)
        self._thread.start()

    # --- other threads' side ------------------------------------------------------------

    def enqueue(self, prompt: list[int], params: SamplingParams, sink: TokenSink, hints: tuple[int, ...] = ()) -> None:
        """Queue a generation whose tokens go to `sink`.

        Raises ServerBusy when the queue is full, InvalidRequest for bad rules.
        """
        self.backend.check_fits(len(prompt))
        with self._wake:
            if self._closing:
                raise EngineError("this model was unloaded; ask again to reload it")
            if len(self._waiting) + self.busy_slots >= len(self._slots) + self.max_queue:
                raise ServerBusy(len(self._waiting), self._retry_after())
        sampler = self.backend.sampler(params, prompt)  # raises InvalidRequest for a bad grammar or bias
        budget = self.backend.n_ctx - len(prompt)
        if params.max_tokens is not None:
            budget = min(budget, params.max_tokens)
        deadline = sink.stats.submitted + self.timeout if self.timeout else None
        with self._wake:
            self._waiting.append(_Job(prompt, params, sampler, sink, budget, deadline, hints=hints))
            self._wake.notify()

    def run_between_steps(self, job: Callable[[], None]) -> None:
        """Run job() on the scheduler's thread (which owns llama.cpp) before its next decode step."""
        with self._wake:
            if self._closing:
                raise EngineError("this model was unloaded; ask again to reload it")
            self._calls.append(job)
            self._wake.notify()

    def embed(self, key: int, text: str, reply: Reply) -> None:
        """Queue one embedding input; reply(result, error) is called on the scheduler's thread."""
        with self._wake:
            if self._closing:
                raise EngineError("this model was unloaded; ask again to reload it")
            self.embeddings.add(EmbeddingTask(key, text, reply))
            self._wake.notify()

    def cancel_embedding(self, key: int) -> bool:
        """Drop an input whose caller left (queued, or between two of its chunks)."""
        return self.embeddings.cancel(key)

    def _refresh(self) -> None:
        """Have the thread go round once, so the worker reports the figures again (from any thread)."""
        with contextlib.suppress(EngineError):
            self.run_between_steps(lambda: None)

    def stop(self) -> None:
        """Fail whatever is still queued or running and stop the thread (the model stays loaded).

        The prompt cache's disk writes under way are finished first.
        """
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        if self.cache is not None:
            self.cache.close()

    def close(self) -> None:
        """Stop, then free the model (and the draft model)."""
        self.stop()
        if self.draft_model is not None:
            self.draft_model.close()
        self.backend.close()

    # --- figures for metrics ----------------------------------------------------------

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    @property
    def busy_slots(self) -> int:
        return sum(1 for slot in self._slots if slot.job is not None)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def decode_rate(self) -> float:
        """Tokens generated per second of decoding, over the last few seconds (0 when idle).

        The scheduler's thread only.
        """
        self._forget_steps_before(time.monotonic() - RATE_WINDOW_SECONDS)
        return self._recent_tokens / self._recent_seconds if self._recent_seconds > 0 else 0.0

    def _forget_steps_before(self, horizon: float) -> None:
        while self._recent_steps and self._recent_steps[0][0] < horizon:
            _end, seconds, tokens = self._recent_steps.popleft()
            self._recent_seconds -= seconds
            self._recent_tokens -= tokens

    def _retry_after(self) -> int:
        """Seconds until a queue place is likely free: a request's usual duration shared over the slots."""
        durations = list(self._recent_durations)
        mean = sum(durations) / len(durations) if durations else 1.0
        return max(1, math.ceil(mean / len(self._slots)))

    # --- the scheduler's thread ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                idle: Slot | None = None
                while not (self._closing or self._calls or self._waiting or self.busy_slots or self.embeddings.pending):
                    if (idle := self._reuse.idle_slot(self._slots)) is not None:
                        break
                    self.embeddings.release_if_idle()
                    self._wake.wait(self.embeddings.seconds_until_idle())
                calls, self._calls = self._calls, []
                closing = self._closing
            for call in calls:
                call()
            if closing:
                break
            generating = bool(self.busy_slots or self._waiting)
            # A request waiting for a slot is admitted (by the step below) before another chunk runs.
            if self.embeddings.may_run(generating, admitting=bool(self._waiting) and self._has_free_slot()):
                self.embeddings.run_chunk(generating, self._last_step_seconds)
                if not generating:
                    continue
            if idle is not None and not calls:  # nothing to decode: save a long conversation for the disk tier
                self._persist(idle)
                self._after_step()  # the cache's new figures
                continue
            try:
                self._step()
            except Exception as exc:  # never lose the thread: fail the requests in flight and carry on
                log.exception("a decode step failed; failing the requests in it")
                self._fail_everything(exc)
            self._after_step()
        self._fail_everything(EngineError("the model was unloaded while this request waited"))
        self.embeddings.fail_all(EngineError("the model was unloaded while this embedding waited"))
        self._after_step()

    def _has_free_slot(self) -> bool:
        return any(slot.job is None for slot in self._slots)

    def _step(self) -> None:
        now = time.monotonic()
        self._retire(now)
        self._admit(now)
        entries = self._gather()
        if not entries:
            return
        started = time.monotonic()
        self.backend.decode(entries)
        self._last_step_seconds = time.monotonic() - started
        self.costs.record(len(entries), self._last_step_seconds)
        self.embeddings.after_step(self._last_step_seconds)
        self._reuse.take_checkpoints(self._slots)
        ended = time.monotonic()
        sampled = self._sample(ended)
        if sampled:
            self._recent_steps.append((ended, ended - started, sampled))
            self._recent_seconds += ended - started
            self._recent_tokens += sampled
            self._forget_steps_before(ended - RATE_WINDOW_SECONDS)

    def _retire(self, now: float) -> None:
        """Free the slots of cancelled and timed-out requests; drop such requests from the queue."""
        for slot in self._slots:
            if slot.job is None:
                continue
            if (error := self._overdue(slot.job, now)) is not None or slot.job.stream.cancelled:
                self._finish(slot, now, error)
        with self._wake:
            kept: deque[_Job] = deque()
            for job in self._waiting:
                if (error := self._overdue(job, now)) is not None or job.stream.cancelled:
                    self._end_job(job, now, error)
                else:
                    kept.append(job)
            self._waiting = kept

    def _overdue(self, job: _Job, now: float) -> RequestTimedOut | None:
        """The error for a request past its deadline; None if it has time left or its client is gone anyway."""
        if job.stream.cancelled or job.deadline is None or now <= job.deadline:
            return None
        return RequestTimedOut(self.timeout or 0.0)

    def _admit(self, now: float) -> None:
        """Give waiting requests the free slots, in arrival order.

        A request whose prompt starts with much of what another slot is still reading waits for that
        slot to have read it, then shares it: agents start sessions together with the same long prompt.
        """
        deferred: list[_Job] = []
        while True:
            free = [slot for slot in self._slots if slot.job is None]
            if not free:
                break
            with self._wake:
                if not self._waiting:
                    break
                job = self._waiting.popleft()
            if not job.stream.cancelled and self._reuse.worth_waiting(job.prompt, self._slots):
                deferred.append(job)
                continue
            self._start(job, free, now)
        if deferred:
            with self._wake:
                self._waiting.extendleft(reversed(deferred))

    def _start(self, job: _Job, free: list[Slot], now: float) -> None:
        """Put a job in the free slot that holds most of its prompt already, and note what it must still read."""
        slot, keep, source = self._reuse.take(job.prompt, job.hints, free, self._slots)
        slot.pending = job.prompt[keep:]
        slot.job = job
        slot.drafter.reset()
        self._admissions += 1
        slot.admitted = self._admissions
        job.stream.stats.started = max(now, job.stream.stats.submitted)  # (a request may arrive mid-step)
        job.stream.stats.cached_tokens = keep
        job.stream.stats.cache_source = source

    def _persist(self, slot: Slot) -> None:
        """Save an idle slot's conversation to the prompt cache (and so to disk), never failing the thread."""
        try:
            self._reuse.persist(slot)
        except Exception:
            log.exception("prompt cache: saving an idle conversation failed")
            slot.saved = len(slot.cached)

    def _gather(self) -> list[BatchEntry]:
        """This step's batch: each generating slot's next token, then prompt chunks.

        Prompts with little left to read go first (a next turn whose prefix was cached is a few
        steps from its first token, and must not wait behind a long prompt read from scratch); then
        the others, oldest request first.
        """
        entries: list[BatchEntry] = []
        generating = [slot for slot in self._slots if slot.job is not None and slot.next_token is not None]
        for slot in generating:
            assert slot.next_token is not None
            slot.logits_index = len(entries)
            entries.append(BatchEntry(slot.next_token, len(slot.cached), slot.sequence, True))
            slot.cached.append(slot.next_token)
            slot.next_token = None
        room = self.backend.n_batch - len(entries)
        if entries:
            room = min(room, PREFILL_CHUNK_WHILE_DECODING)
        reading = [s for s in self._slots if s.job is not None and s.pending]
        for slot in sorted(reading, key=lambda s: (len(s.pending) > PREFILL_CHUNK_WHILE_DECODING, s.admitted)):
            if room <= 0:
                break
            size = room if not slot.due else min(room, slot.due[0] - len(slot.cached))  # stop at a checkpoint
            chunk = slot.pending[: max(1, size)]
            last = len(chunk) == len(slot.pending)
            base = len(slot.cached)
            # Only the prompt's very last token needs logits: they give the first generated token.
            entries.extend(
                BatchEntry(token, base + offset, slot.sequence, last and offset == len(chunk) - 1)
                for offset, token in enumerate(chunk)
            )
            if last:
                slot.logits_index = len(entries) - 1
            slot.cached.extend(chunk)
            del slot.pending[: len(chunk)]
            room -= len(chunk)
        if self._drafting(len(generating)):
            self._add_drafts(generating, entries)
        return entries

    def _drafting(self, generating: int) -> bool:
        """Whether this step carries drafts."""
        if self.speculate is Speculate.off:
            return False
        return self.speculate is not Speculate.auto or generating <= AUTO_MAX_GENERATING

    def _add_drafts(self, generating: list[Slot], entries: list[BatchEntry]) -> None:
        """Append each generating slot's guess at what follows its next token, with logits to check it by.

        A guess goes in as far as the tokens it is expected to save outweigh the time it adds to the step
        (StepCosts); one left out is kept as the drafter's shadow, to learn how good its guesses are.
        A draft never runs past the request's budget, so its positions stay within the slot's context:
        the KV cache has room for them as it has for the tokens they guess.
        """
        tokens = float(len(generating))  # the step's expected yield so far
        for slot in generating:
            job, drafter = slot.job, slot.drafter
            if job is None or job.stream.forced:
                continue
            # every accepted draft token is also a generated one: stay within the request's budget
            limit = min(
                DRAFT_MAX, self.backend.n_batch - len(entries), job.budget - job.stream.stats.generated_tokens - 1
            )
            if self._model_guesses:
                guess = self._model_guess(slot, len(entries), tokens, limit)
                length = len(guess)
            else:
                guess = drafter.guess(slot.cached, limit)
                length = self.costs.best_draft(len(entries), tokens, drafter.acceptance, len(guess)) if guess else 0
            if length == 0:
                drafter.shadow(guess)
                continue
            drafter.drop_shadow()
            slot.draft = guess[:length]
            slot.draft_index = len(entries)
            base = len(slot.cached)
            entries.extend(BatchEntry(token, base + i, slot.sequence, True) for i, token in enumerate(slot.draft))
            slot.cached.extend(slot.draft)
            tokens += expected_kept(drafter.acceptance, length)

    def _model_guess(self, slot: Slot, width: int, tokens: float, limit: int) -> list[int]:
        """The draft model's guess for a slot, as long as the step's costs say it pays (the guessing included)."""
        assert self.draft_model is not None
        per_token = self.draft_model.seconds_per_token or (self.costs.estimate(1) or 0.0) * DRAFT_MODEL_COST_SHARE
        length = self.costs.best_draft(width, tokens, slot.drafter.acceptance, limit, per_token)
        return self.draft_model.guess(slot.sequence, slot.cached, length) if length else []

    def _sample(self, now: float) -> int:
        """Draw each ready slot's next tokens and hand them to its stream; returns how many were drawn."""
        drawn = 0
        for slot in self._slots:
            index, slot.logits_index = slot.logits_index, None
            draft, slot.draft = slot.draft, []
            if index is None or slot.job is None:
                continue
            job = slot.job
            # the token after next_token, then one after each draft token while the draws agree with the draft
            rows = [index, *range(slot.draft_index, slot.draft_index + len(draft))]
            accepted = 0
            for offset, row in enumerate(rows):
                token = self._draw(slot, job, row, now)
                drawn += token is not None
                if token is None or token < 0:
                    break
                if offset < len(draft) and token == draft[offset]:
                    accepted += 1  # already in the KV cache at its position: draw the one after it
                    continue
                slot.next_token = token
                break
            if draft:
                self._settle_draft(slot, job, len(draft), accepted)
            elif token is not None and token >= 0:
                slot.drafter.observe(token)
        return drawn

    def _settle_draft(self, slot: Slot, job: _Job, drafted: int, accepted: int) -> None:
        """Drop a draft's rejected tail from the slot and the KV cache, and count how it fared."""
        keep = len(slot.cached) - drafted + accepted
        if keep < len(slot.cached):
            del slot.cached[keep:]
            self.backend.forget(slot.sequence, keep)
        slot.drafter.record(drafted, accepted)
        job.stream.stats.drafted_tokens += drafted
        job.stream.stats.accepted_tokens += accepted

    def _draw(self, slot: Slot, job: _Job, index: int, now: float) -> int | None:
        """Draw one token from the logits at `index` and push it.

        Returns it while the request goes on, -1 once the request ended with it, None if none was drawn.
        """
        if job.stream.cancelled:
            self._finish(slot, now)
            return None
        params = job.params
        row = self.backend.logprob_row(index) if params.logprobs is not None else None
        try:
            if job.stream.forced and not self.backend.admits(job.sampler, job.stream.forced[0]):
                # the output format allows no such marker here (it closed the block itself)
                job.stream.forced.clear()
            token = self._forced(job) if job.stream.forced else self.backend.sample(job.sampler, index)
        except InvalidRequest as exc:  # its output format can go no further (bias against grammar, time budget)
            self._finish(slot, now, exc)
            return None
        step = self.backend.step(token, row, params.logprobs, special=params.special_pieces)
        stats = job.stream.stats
        if stats.first_token is None:
            stats.first_token = now
        else:
            stats.token_gaps.append(now - job.last_token_at)
        job.last_token_at = now
        job.stream.push(step)
        if step.end_of_generation:
            self._finish(slot, now)
            return -1
        stats.generated_tokens += 1
        if stats.generated_tokens >= job.budget:
            self._finish(slot, now)
            return -1
        return token

    def _forced(self, job: _Job) -> int:
        """The next forced token, recorded by the sampler as if drawn (penalties see it)."""
        token = job.stream.forced.popleft()
        self.backend.accept(job.sampler, token)
        return token

    def _finish(self, slot: Slot, now: float, error: BaseException | None = None) -> None:
        """End a slot's request; the slot keeps its KV cache for the next prompt that shares it."""
        job = slot.job
        slot.job = None
        slot.pending = []
        slot.next_token = None
        slot.logits_index = None
        slot.draft = []
        slot.last_used = now
        if job is not None:
            self._recent_durations.append(now - job.stream.stats.submitted)
            self._end_job(job, now, error)

    def _end_job(self, job: _Job, now: float, error: BaseException | None = None) -> None:
        job.sampler.close()
        job.stream.stats.finished = now
        job.stream.end(error)

    def _fail_everything(self, error: BaseException) -> None:
        """End every running and waiting request with `error`, and start the cache afresh."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.job is not None:
                self._finish(slot, now, error)
            slot.cut(0)
        with self._wake:
            waiting, self._waiting = self._waiting, deque()
        for job in waiting:
            self._end_job(job, now, error)
        with contextlib.suppress(Exception):
            self.backend.clear_memory()
