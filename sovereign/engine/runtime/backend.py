"""The module that serves through llama.cpp: load a model, tokenize, decode batches, sample, embed.

(llama_bench.py also drives llama.cpp, for benchmarks only; resources.py asks it about devices.)

Everything here is synchronous: one scheduler thread owns a LlamaBackend's context and calls
it (tokenizing touches only the vocabulary and is safe from other threads). The context holds
`n_parallel` sequences in one unified KV cache, so a single llama_decode advances them all.
llama-cpp-python's low-level bindings are used directly (its high-level `Llama` class keeps
whole-vocabulary score arrays per position, which costs gigabytes for a 262k-token vocabulary
when logprobs are wanted, and it has no multi-sequence API).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import numpy as np

from sovereign.engine.requests import SamplingParams, TokenLogprob
from sovereign.engine.runtime import resources, rpc
from sovereign.engine.runtime.grammar_sampler import GrammarSampler
from sovereign.engine.runtime.grammar_trigger import TriggerWatch
from sovereign.engine.runtime.kv_state import SequenceStates
from sovereign.engine.runtime.tokenizer_cuts import PIECE_BYTES, TokenizerCuts
from sovereign.engine.wire import LoadOptions, Step, with_bos
from sovereign.errors import (
    ContextLengthExceeded,
    EngineError,
    InvalidRequest,
    ModelLoadError,
    NotGGUF,
)
from sovereign.machine import physical_cores
from sovereign.store.gguf_header import kv_bytes_per_token, read_gguf_metadata

log = logging.getLogger(__name__)
llama_log = logging.getLogger("sovereign.llama_cpp")

# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_log_callback = None
EMBEDDING_CTX = 2048  # tokens of one embedding input, at most
EMBEDDING_CHUNK = 128  # tokens per embedding decode call: its output buffer is this many x the vocabulary

if TYPE_CHECKING:
    from llama_cpp._internals import LlamaContext, LlamaSampler


def route_llama_logs() -> None:
    """Send llama.cpp's log lines to Python logging instead of raw stderr, so a server's output stays readable."""
    global _log_callback
    import llama_cpp

    if _log_callback is not None:
        return
    last = [logging.INFO]

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        last[0] = _GGML_LEVELS.get(level, last[0])
        if llama_log.isEnabledFor(last[0]):
            llama_log.log(last[0], text.decode("utf-8", "replace").rstrip("\n"))

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


class GreedySampler:
    """Temperature 0 with at most a logit bias: the argmax, taken in numpy on llama.cpp's logits.

    Same token as llama.cpp's chain (bias added in float32, first maximum wins), at a seventh of the
    cost: the chain copies the whole vocabulary into a candidate array for every token it draws,
    which is 3 MB per token for a 262k-token vocabulary and, at 8 slots, 5% of each decode step.
    """

    def __init__(self, bias: dict[int, float]) -> None:
        self._ids = np.fromiter(bias, dtype=np.intp, count=len(bias))
        self._values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def pick(self, logits: np.ndarray) -> int:
        """The most likely token once the bias is added."""
        if self._ids.size:
            logits = logits.copy()
            logits[self._ids] += self._values
        return int(np.argmax(logits))

    def close(self) -> None:
        """Nothing to free (llama.cpp samplers need closing; this keeps the same surface)."""


# What draws a request's tokens: llama.cpp's sampler chain, the argmax for plain greedy decoding, or the
# grammar-checking sampler for an output format.
Sampler: TypeAlias = "LlamaSampler | GreedySampler | GrammarSampler"


def _add_draw(sampler: LlamaSampler, params: SamplingParams) -> None:
    """Truncation, temperature and the random draw, in llama-server's order."""
    if params.top_k > 0:
        sampler.add_top_k(params.top_k)
    if params.top_p < 1.0:
        sampler.add_top_p(params.top_p, 1)
    if params.min_p > 0:
        sampler.add_min_p(params.min_p, 1)
    sampler.add_temp(params.temperature)
    sampler.add_dist(params.seed if params.seed is not None else random.getrandbits(32))


class BatchEntry(NamedTuple):
    """One token of a multi-sequence batch."""

    token: int
    position: int
    sequence: int
    wants_logits: bool


class LlamaBackend:
    """A loaded model and its context, driven by one thread.

    `n_ctx` is the context of one sequence (one request); the KV cache holds n_ctx x n_parallel tokens.
    """

    def __init__(self, path: Path, options: LoadOptions) -> None:
        import llama_cpp
        from llama_cpp import _internals

        route_llama_logs()
        self._llama = llama_cpp
        self.path = path
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_mmap = True
        model_params.use_extra_bufts = options.use_extra_bufts
        # The header's shape (read without loading anything) decides the context and GPU split.
        n_gpu_layers = options.n_gpu_layers
        try:
            metadata = read_gguf_metadata(path)
        except (NotGGUF, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not read {path.name}: {exc}", "the file may be corrupt: pull it again with --force"
            ) from None
        arch = metadata.get("general.architecture", "")
        self.n_ctx_train = int(metadata.get(f"{arch}.context_length", 0) or 4096)
        n_layers = int(metadata.get(f"{arch}.block_count", 0) or 0)
        kv_per_token = kv_bytes_per_token(metadata)
        self.n_ctx = options.n_ctx or resources.default_context(self.n_ctx_train, options.preferred_ctx, kv_per_token)
        self.n_parallel = options.n_parallel or resources.default_parallel(self.n_ctx, kv_per_token)
        model_bytes = sum(p.stat().st_size for p in _model_files(path))
        # `serve --rpc`: the workers' devices take the offloaded layers, every layer unless --gpu-layers says.
        self.workers = rpc.WorkerDevices(list(options.rpc_servers)) if options.rpc_servers else None
        if self.workers is not None and n_gpu_layers is None:
            n_gpu_layers = n_layers + 1
        if n_gpu_layers is None:
            n_gpu_layers = resources.auto_gpu_layers(model_bytes, n_layers, kv_per_token * self.n_ctx * self.n_parallel)
        model_params.n_gpu_layers = n_gpu_layers
        # Kept on self: llama_model_params points at it, and it must outlive the load.
        self._tensor_split = resources.apply_gpu_split(llama_cpp, model_params, options.gpu_split)
        if self.workers is not None:
            model_params.devices = self.workers.address
            self._tensor_split = self.workers.apply_tensor_split(model_params, options.gpu_split.tensor_split)
        # What llama.cpp will really offload: nothing without a GPU or workers; -1 means every layer.
        if not resources.gpu_offload_supported() and self.workers is None:
            self.n_gpu_layers = 0
        else:
            self.n_gpu_layers = n_layers + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layers + 1)
        self.n_layers = n_layers
        self.worker_report = (
            self.workers.report(n_layers, self.n_gpu_layers, options.gpu_split.tensor_split) if self.workers else []
        )
        try:
            self.model = _internals.LlamaModel(path_model=str(path), params=model_params, verbose=True)
        except (ValueError, OSError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load {path.name}: {exc}",
                "the file may be corrupt (pull it again with --force) or too big for this machine's memory",
            ) from None
        self.metadata = self.model.metadata()
        self.vocab = self.model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_threads = options.n_threads or physical_cores()
        self.n_batch = options.n_batch
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = self.n_ctx * self.n_parallel
        ctx_params.n_batch = self.n_batch
        ctx_params.n_ubatch = self.n_batch
        ctx_params.n_seq_max = self.n_parallel
        # One KV buffer for all sequences: a mixed batch (new prompts + one token per running stream) is
        # decoded in a single pass, and a shared prefix can be copied between sequences without a copy of
        # the data. Per-sequence streams would split such a batch into one pass per sequence run.
        ctx_params.kv_unified = True
        # Keep the sliding-window layers' cache whole, so a cached prefix can be cut anywhere and reused.
        ctx_params.swa_full = options.swa_full
        ctx_params.n_threads = self.n_threads
        ctx_params.n_threads_batch = self.n_threads
        ctx_params.no_perf = True
        try:
            self.ctx = _internals.LlamaContext(model=self.model, params=ctx_params, verbose=True)
        except ValueError:
            self.model.close()
            raise ModelLoadError(
                f"llama.cpp could not allocate a {self.n_ctx}-token context x {self.n_parallel} slots for {path.name}",
                "not enough memory: start the server with a smaller --ctx or --parallel",
            ) from None
        self.n_ctx = self.ctx.n_ctx() // self.n_parallel
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        if self.workers is not None:
            self.workers.set_timeouts(options.rpc_timeout)
        self.n_swa = int(llama_cpp.llama_model_n_swa(self.model.model))
        # Saved states of a recurrent or hybrid model cannot be cut at all: such models get no prompt cache.
        recurrent = llama_cpp.llama_model_is_recurrent(self.model.model) or llama_cpp.llama_model_is_hybrid(
            self.model.model
        )
        self.states = None if recurrent else SequenceStates(llama_cpp, self.ctx.ctx, self.memory, window=self.n_swa)
        self.can_drop_tail = not recurrent  # speculation removes a rejected draft's cells (llama.cpp #20039)
        self._batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self._embedding_ctx: LlamaContext | None = None
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        log.info(
            "loaded %s: ctx %d x %d slots (trained %d), %d threads, %d/%d layers on %s",
            path.name,
            self.n_ctx,
            self.n_parallel,
            self.n_ctx_train,
            self.n_threads,
            self.n_gpu_layers,
            n_layers + 1,
            "RPC workers" if self.workers else "GPU",
        )

    # --- vocabulary -----------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids for text; `special` lets control-token text (e.g. <end_of_turn>) become control tokens.

        ContextLengthExceeded, before any work, for text too long to fit in a context whatever its tokens.
        """
        data = text.encode("utf-8")
        if len(data) <= PIECE_BYTES:
            return self._tokenize_bytes(data, special)
        cuts = self._tokenizer_cuts
        if len(data) > self.n_ctx * cuts.longest_token:  # not even in its longest tokens would it fit
            raise ContextLengthExceeded(-(-len(data) // cuts.longest_token), self.n_ctx)
        # In pieces, cut where llama.cpp's own splitting would: its splitting is quadratic (tokenizer_cuts.py).
        cutter = cuts.special if special else cuts.plain
        tokens: list[int] = []
        for piece in cutter.pieces(data) if cutter else [data]:
            tokens += self._tokenize_bytes(piece, special)
        return tokens

    @functools.cached_property
    def _tokenizer_cuts(self) -> TokenizerCuts:
        """Where long texts may be cut (one scan of the vocabulary, on the first long text)."""
        return TokenizerCuts.of(self._llama, self.vocab, self.n_vocab)

    def _tokenize_bytes(self, data: bytes, special: bool) -> list[int]:
        """One llama_tokenize call (no BOS: with_bos adds it)."""
        capacity = len(data) + 8
        buffer = (self._llama.llama_token * capacity)()
        count = self._llama.llama_tokenize(self.vocab, data, len(data), buffer, capacity, False, special)
        if count < 0:
            capacity = -count
            buffer = (self._llama.llama_token * capacity)()
            count = self._llama.llama_tokenize(self.vocab, data, len(data), buffer, capacity, False, special)
        return list(buffer[:count])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for (control tokens are empty unless `special`)."""
        # A buffer per call: several threads ask for pieces, and ctypes lets go of the GIL while llama.cpp writes.
        buffer = ctypes.create_string_buffer(64)
        size = self._llama.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, special)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = self._llama.llama_token_to_piece(self.vocab, token, buffer, -size, 0, special)
        return buffer.raw[:size]

    def token_text(self, token: int) -> str:
        """A token as text, control tokens spelled out (for logprobs)."""
        return self.piece(token, special=True).decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        """End-of-turn or end-of-sequence: the model says it is done."""
        return bool(self._llama.llama_vocab_is_eog(self.vocab, token))

    @functools.cached_property
    def end_of_generation_tokens(self) -> list[int]:
        """Every end-of-generation token in the vocabulary (to ban them for ignore_eos); one scan per model."""
        return [t for t in range(self.n_vocab) if self._llama.llama_vocab_is_eog(self.vocab, t)]

    @functools.cached_property
    def control_tokens(self) -> list[str]:
        """The text of every control token in the vocabulary; one scan per model.

        That is what client text must never become.
        """
        control, attributes = self._llama.LLAMA_TOKEN_ATTR_CONTROL, self._llama.llama_vocab_get_attr
        return [self.token_text(t) for t in range(self.n_vocab) if attributes(self.vocab, t) & control]

    def with_bos(self, tokens: list[int]) -> list[int]:
        """Prepend BOS when the model wants one and the prompt lacks it."""
        return with_bos(tokens, self.bos, self.add_bos)

    # --- generation -----------------------------------------------------------------

    def check_fits(self, prompt_tokens: int) -> None:
        """Refuse a prompt that leaves no room to generate a single token."""
        if prompt_tokens >= self.n_ctx:
            raise ContextLengthExceeded(prompt_tokens, self.n_ctx)

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        """Run one batch of tokens (any mix of sequences) through the model."""
        batch = self._batch.batch
        for index, (token, position, sequence, wants_logits) in enumerate(entries):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = wants_logits
        batch.n_tokens = len(entries)
        status = self._llama.llama_decode(self.ctx.ctx, batch)
        if status != 0:
            raise EngineError(
                f"llama.cpp failed to decode a batch (status {status})",
                "the KV cache may be full: try a smaller --parallel or --ctx",
            )

    def sample(self, sampler: Sampler, index: int) -> int:
        """Draw the next token from the logits at batch index `index` (the chain also records it).

        With a grammar, InvalidRequest when nothing may follow (see GrammarSampler): it ends that request only.
        """
        if isinstance(sampler, (GreedySampler, GrammarSampler)):
            return sampler.pick(self._logits(index))
        return self._llama.llama_sampler_sample(sampler.sampler, self.ctx.ctx, index)

    def accept(self, sampler: Sampler, token: int) -> None:
        """Tell a sampler about a token it did not draw (a forced one), as a drawn one would be recorded."""
        if isinstance(sampler, GrammarSampler):
            sampler.accept(token)
        elif not isinstance(sampler, GreedySampler):
            self._llama.llama_sampler_accept(sampler.sampler, token)

    @staticmethod
    def admits(sampler: Sampler, token: int) -> bool:
        """Whether a forced token may be written next (a grammar may refuse it; nothing else does)."""
        return sampler.admits(token) if isinstance(sampler, GrammarSampler) else True

    def argmax(self, index: int) -> int:
        """The most likely token at batch index `index` (a draft model's greedy guess)."""
        return int(np.argmax(self._logits(index)))

    def _logits(self, index: int) -> np.ndarray:
        """The logits at batch index `index`, as a view of llama.cpp's buffer (valid until the next decode)."""
        pointer = self._llama.llama_get_logits_ith(self.ctx.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def forget(self, sequence: int, start: int = -1) -> bool:
        """Drop a sequence's cached tokens from position `start` on (all of them by default)."""
        return bool(self._llama.llama_memory_seq_rm(self.memory, sequence, start, -1))

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Make `target` hold the first `length` cached tokens of `source` (shared cells, no data copied)."""
        self._llama.llama_memory_seq_rm(self.memory, target, -1, -1)
        self._llama.llama_memory_seq_cp(self.memory, source, target, 0, length)

    def first_position(self, sequence: int) -> int:
        """The lowest position a sequence still holds (-1 when empty); > 0 means its start was evicted."""
        return int(self._llama.llama_memory_seq_pos_min(self.memory, sequence))

    def clear_memory(self) -> None:
        """Forget every sequence."""
        self._llama.llama_memory_clear(self.memory, True)

    def step(self, token: int, logprob_row: np.ndarray | None, top_n: int | None, *, special: bool = False) -> Step:
        """The Step for a sampled token (`special`: control tokens spelled out, for a format parser to read)."""
        end = self.is_end_of_generation(token)
        return Step(
            token, b"" if end else self.piece(token, special=special), self._logprob(logprob_row, token, top_n), end
        )

    def sampler(self, params: SamplingParams, prompt: list[int]) -> Sampler:
        """A request's own sampler chain, in llama-server's order.

        The order: bias, penalties, grammar, truncation, temperature, draw.
        The caller owns it and must close() it.
        """
        from llama_cpp import _internals

        bias = dict(params.logit_bias)
        # With an output format the grammar decides where the output ends: banning the end would leave a
        # finished document with nothing it may add (llama.cpp aborted there).
        if params.ignore_eos and not params.grammar:
            bias.update({t: float("-inf") for t in self.end_of_generation_tokens})
        for token in bias:
            if not 0 <= token < self.n_vocab:
                raise InvalidRequest(
                    f"logit_bias names token {token}, outside this model's vocabulary of {self.n_vocab}", "logit_bias"
                )
        penalised = params.repeat_penalty != 1.0 or bool(params.frequency_penalty) or bool(params.presence_penalty)
        if params.grammar:
            try:
                return self._grammar_sampler(params, bias, prompt if penalised else None)
            except InvalidRequest:
                if params.grammar_trigger is None:
                    raise
                log.warning("the tool-call grammar did not compile; this request's calls are left unconstrained")
                return self.sampler(replace(params, grammar=None, grammar_trigger=None), prompt)
        if params.temperature <= 0 and not penalised:
            return GreedySampler(bias)
        sampler = _internals.LlamaSampler()
        if bias:
            sampler.add_logit_bias(self.n_vocab, bias)
        if penalised:
            self._llama.llama_sampler_chain_add(sampler.sampler, self._penalties(params, prompt))
        if params.temperature <= 0:
            sampler.add_greedy()
            return sampler
        _add_draw(sampler, params)
        return sampler

    def _penalties(self, params: SamplingParams, prompt: list[int]) -> ctypes.c_void_p:
        """llama.cpp's repetition penalties, having seen the prompt's last tokens.

        As llama-server does; a grammar must not.
        """
        penalties = self._llama.llama_sampler_init_penalties(
            self.n_vocab, params.repeat_last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
        )
        for token in prompt[-params.repeat_last_n :]:
            self._llama.llama_sampler_accept(penalties, token)
        return penalties

    def _grammar_sampler(
        self, params: SamplingParams, bias: dict[int, float], prompt: list[int] | None
    ) -> GrammarSampler:
        """A GrammarSampler for params.grammar.

        InvalidRequest when it does not compile or the bias bans all it allows.
        """
        from llama_cpp import _internals

        assert params.grammar is not None
        grammar = self._llama.llama_sampler_init_grammar(self.vocab, params.grammar.encode(), b"root")
        if not grammar:
            raise InvalidRequest("the output constraint could not be compiled to a grammar", "response_format")
        tail = None
        if params.temperature > 0:
            tail = _internals.LlamaSampler()
            _add_draw(tail, params)
        ends = sorted(self.end_of_generation_tokens, key=lambda t: t != self.eos)  # the model's own EOS first
        penalties = self._penalties(params, prompt) if prompt is not None else None
        trigger: TriggerWatch | None = None
        spell: Callable[[int], bytes] | None = None
        replay: Callable[[str], list[int] | None] | None = None
        if params.grammar_trigger is not None:  # free until a tool call opens
            trigger = TriggerWatch(params.grammar_trigger)
            spell = functools.partial(self.piece, special=True)
            replay = self._spelling
        sampler = GrammarSampler(
            self._llama,
            grammar,
            n_vocab=self.n_vocab,
            bias=bias,
            end_of_generation=ends,
            penalties=penalties,
            tail=tail,
            top_k=params.top_k,
            min_p=params.min_p,
            trigger=trigger,
            spell=spell,
            replay=replay,
        )
        # A bias that bans everything the grammar allows at the start: a 400 now, not an error mid-stream.
        if any(value == float("-inf") for value in bias.values()) and not sampler.allows_anything(
            np.zeros(self.n_vocab, dtype=np.float32)
        ):
            sampler.close()
            raise InvalidRequest("logit_bias bans every token the output format allows at the start", "logit_bias")
        return sampler

    def _spelling(self, text: str) -> list[int] | None:
        """Tokens whose pieces spell exactly this text (control-token text as control tokens), or None when none do."""
        tokens = self.tokenize(text, special=True)
        return tokens if b"".join(self.piece(t, special=True) for t in tokens) == text.encode("utf-8") else None

    def logprob_row(self, index: int) -> np.ndarray:
        """Log-softmax of the logits at batch index `index` (the model's own distribution, before sampling)."""
        logits = self._logits(index).astype(np.float64)
        shifted = logits - logits.max()
        return shifted - np.log(np.exp(shifted).sum())

    def _logprob(self, row: np.ndarray | None, token: int, top_n: int | None) -> TokenLogprob | None:
        if row is None:
            return None
        top: list[tuple[str, list[int], float]] = []
        if top_n:
            best = np.argpartition(row, -top_n)[-top_n:]
            for alt in sorted(best, key=lambda t: -row[t]):
                raw = self.piece(int(alt), special=True)
                top.append((raw.decode("utf-8", "replace"), list(raw), float(row[alt])))
        raw = self.piece(token, special=True)
        return TokenLogprob(raw.decode("utf-8", "replace"), list(raw), float(row[token]), top)

    # --- embeddings -----------------------------------------------------------------
    # A chat model's context computes logits for every token it outputs: one 1,500-token input, decoded whole
    # with llama.cpp's mean pooling, held the scheduler's thread for 4.7 s and grew the process by 2 GB (an output
    # buffer of 2,048 tokens x a 262k vocabulary). So an input is decoded EMBEDDING_CHUNK tokens at a time, each
    # token's hidden state read out (no pooling) and the mean taken here: the scheduler runs one chunk between
    # decode steps, and the context, bounded to chunks, is freed once embeddings stop (free_embedding_context).
    # A dedicated embedding model (whose GGUF names its pooling) may attend both ways: it gets one whole chunk.

    def embedding_tokens(self, text: str) -> list[int]:
        """The tokens an embedding of text reads; ContextLengthExceeded or InvalidRequest when it cannot."""
        tokens = self.with_bos(self.tokenize(text, special=False))
        limit = min(self.n_ctx, EMBEDDING_CTX)
        if len(tokens) > limit:
            raise ContextLengthExceeded(len(tokens), limit)
        if not tokens:
            raise InvalidRequest("cannot embed an empty string", "input")
        return tokens

    @property
    def embedding_chunk(self) -> int:
        """Tokens one embedding decode call may take (a whole input for a model that attends both ways)."""
        return min(self.n_ctx, EMBEDDING_CTX) if self.embeds_whole else EMBEDDING_CHUNK

    def embed_chunk(self, tokens: list[int], position: int, count: int) -> np.ndarray:
        """Decode tokens[position:position + count] (count <= embedding_chunk); their hidden states' sum.

        For a model that pools itself, its pooled vector of the whole input, scaled by its length, instead.
        """
        context = self._embedding_context()
        if position == 0:
            context.kv_cache_clear()
        chunk = tokens[position : position + min(count, self.embedding_chunk)]
        from llama_cpp import _internals

        batch = _internals.LlamaBatch(n_tokens=len(chunk), embd=0, n_seq_max=1, verbose=False)
        try:
            batch.set_batch(chunk, position, logits_all=True)
            if self._llama.llama_decode(context.ctx, batch.batch) != 0:
                raise ModelLoadError("llama.cpp failed to compute the embedding", None)
            width = self._llama.llama_model_n_embd(self.model.model)
            if self.embeds_whole:
                pooled = self._llama.llama_get_embeddings_seq(context.ctx, 0)
                return np.ctypeslib.as_array(pooled, shape=(width,)).astype(np.float64) * len(tokens)
            rows = np.ctypeslib.as_array(self._llama.llama_get_embeddings(context.ctx), shape=(len(chunk), width))
            return rows.sum(axis=0, dtype=np.float64)
        finally:
            batch.close()

    @property
    def embeds_whole(self) -> bool:
        """Whether inputs are decoded whole: a dedicated embedding model (its GGUF names its pooling)."""
        return any(key.endswith(".pooling_type") for key in self.metadata)

    @property
    def has_embedding_context(self) -> bool:
        """Whether the embedding context is allocated (the scheduler frees it when embeddings stop)."""
        return self._embedding_ctx is not None

    def free_embedding_context(self) -> None:
        """Give back the embedding context's memory; the next embedding makes it again."""
        if self._embedding_ctx is not None:
            self._embedding_ctx.close()
            self._embedding_ctx = None

    def _embedding_context(self) -> LlamaContext:
        """A second context for embeddings, made on first use, sized to one chunk's outputs."""
        if self._embedding_ctx is None:
            from llama_cpp import _internals

            params = self._llama.llama_context_default_params()
            params.n_ctx = min(self.n_ctx, EMBEDDING_CTX)
            params.n_batch = params.n_ubatch = self.embedding_chunk
            params.n_seq_max = 1
            params.n_threads = params.n_threads_batch = self.n_threads
            params.embeddings = True
            pooled = self._llama.LLAMA_POOLING_TYPE_MEAN if self.embeds_whole else self._llama.LLAMA_POOLING_TYPE_NONE
            params.pooling_type = pooled
            params.no_perf = True
            self._embedding_ctx = _internals.LlamaContext(model=self.model, params=params, verbose=True)
        return self._embedding_ctx

    def close(self) -> None:
        """Free the contexts and the model (in that order)."""
        for resource in (self._embedding_ctx, self._batch, self.ctx, self.model):
            if resource is not None:
                resource.close()
        self._embedding_ctx = None


def _model_files(path: Path) -> list[Path]:
    """The file and, for a split GGUF, its sibling shards."""
    if "-00001-of-" in path.name:
        stem = path.name.split("-00001-of-")[0]
        return sorted(path.parent.glob(f"{stem}-*-of-*.gguf"))
    return [path]
