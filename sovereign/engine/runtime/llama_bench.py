"""llama-bench's prompt (ppN) and generation (tgN) tests, run through llama-cpp-python.

The method is llama-bench's own (tools/llama-bench/llama-bench.cpp), so the figures compare:
a fresh context per test sized n_prompt + n_gen, random tokens (BOS first), one warm-up run,
the cache cleared before each repetition, the prompt decoded in n_batch chunks with one
synchronize at the end, generation one token per decode with a synchronize after each and no
sampling, and t/s as the mean of the repetitions' rates with their sample standard deviation.
"""

from __future__ import annotations

import ctypes
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from sovereign.engine.runtime import resources, rpc
from sovereign.engine.runtime.backend import route_llama_logs
from sovereign.engine.wire import GpuSplit
from sovereign.errors import EngineError, ModelLoadError

RANDOM_SEED = 1  # llama-bench never seeds rand(): the token ids do not change the speed anyway


@dataclass(frozen=True)
class TestSpec:
    """One row of a llama-bench table before it runs."""

    n_prompt: int
    n_gen: int
    threads: int
    n_batch: int
    n_ubatch: int

    @property
    def name(self) -> str:
        """llama-bench's test label: pp512, tg128 or pp512+tg128."""
        parts = ([f"pp{self.n_prompt}"] if self.n_prompt else []) + ([f"tg{self.n_gen}"] if self.n_gen else [])
        return "+".join(parts)


class BenchModel:
    """A model loaded for benchmarking with a given number of GPU layers; runs tests on fresh contexts.

    `use_extra_bufts` is llama-bench's --repack: the caller passes what engine.kernels.kernel_choice decided.
    """

    def __init__(
        self,
        path: Path,
        n_gpu_layers: int,
        use_extra_bufts: bool = True,
        gpu_split: GpuSplit | None = None,
        rpc_servers: tuple[str, ...] = (),
    ) -> None:
        import llama_cpp

        route_llama_logs()
        self._llama = llama_cpp
        self.path = path
        self.n_gpu_layers = n_gpu_layers
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self._tensor_split = resources.apply_gpu_split(
            llama_cpp, params, gpu_split or GpuSplit()
        )  # alive through the load
        # --rpc: the workers' devices take the offloaded layers (kept on self: the params point at their array).
        self._workers = rpc.WorkerDevices(list(rpc_servers)) if rpc_servers else None
        if self._workers is not None:
            params.devices = self._workers.address
            self._tensor_split = self._workers.apply_tensor_split(params, (gpu_split or GpuSplit()).tensor_split)
        params.use_mmap = True
        params.use_extra_bufts = use_extra_bufts
        self.use_extra_bufts = use_extra_bufts
        started = time.perf_counter()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        self.load_seconds = time.perf_counter() - started
        if not self.model:
            raise ModelLoadError(
                f"llama.cpp could not load {path.name}",
                "the file may be corrupt (pull it again with --force) or too big for this machine's memory",
            )
        self.size = int(llama_cpp.llama_model_size(self.model))
        self.parameters = int(llama_cpp.llama_model_n_params(self.model))
        description = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, description, len(description))
        self.description = description.value.decode(errors="replace")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
        self._random = random.Random(RANDOM_SEED)

    def run(self, spec: TestSpec, repetitions: int, warmup: bool = True) -> list[float]:
        """Tokens/s of each repetition of one test."""
        llama = self._llama
        params = llama.llama_context_default_params()
        params.n_ctx = spec.n_prompt + spec.n_gen
        params.n_batch = spec.n_batch
        params.n_ubatch = spec.n_ubatch
        params.n_threads = params.n_threads_batch = spec.threads
        params.swa_full = False  # llama-bench's setting (the library default keeps the sliding-window cache whole)
        params.no_perf = True
        context = llama.llama_init_from_model(self.model, params)
        if not context:
            raise ModelLoadError(
                f"llama.cpp could not create a {params.n_ctx}-token context",
                "not enough memory: try smaller -p/-n or -b",
            )
        try:
            memory = llama.llama_get_memory(context)
            if warmup:
                if spec.n_prompt:
                    self._prompt(context, spec.n_prompt, spec.n_batch)
                if spec.n_gen:
                    self._generate(context, 1)
            rates = []
            for _ in range(repetitions):
                llama.llama_memory_clear(memory, False)
                started = time.perf_counter_ns()
                if spec.n_prompt:
                    self._prompt(context, spec.n_prompt, spec.n_batch)
                if spec.n_gen:
                    self._generate(context, spec.n_gen)
                rates.append(1e9 * (spec.n_prompt + spec.n_gen) / (time.perf_counter_ns() - started))
            return rates
        finally:
            llama.llama_free(context)

    def _tokens(self, count: int, first: bool) -> ctypes.Array[ctypes.c_int32]:
        ids = [self._random.randrange(self._n_vocab) for _ in range(count)]
        if first and self._bos is not None:
            ids[0] = self._bos
        return (self._llama.llama_token * count)(*ids)

    def _decode(self, context: ctypes.c_void_p, tokens: ctypes.Array[ctypes.c_int32]) -> None:
        # llama_batch_get_one: positions follow on from the cache, only the last token gets logits.
        status = self._llama.llama_decode(context, self._llama.llama_batch_get_one(tokens, len(tokens)))
        if status != 0:
            raise EngineError(
                f"llama.cpp failed to decode a benchmark batch (status {status})", "try smaller -p/-n or -b"
            )

    def _prompt(self, context: ctypes.c_void_p, n_prompt: int, n_batch: int) -> None:
        done = 0
        while done < n_prompt:
            count = min(n_prompt - done, n_batch)
            self._decode(context, self._tokens(count, first=done == 0))
            done += count
        self._llama.llama_synchronize(context)

    def _generate(self, context: ctypes.c_void_p, n_gen: int) -> None:
        token = self._tokens(1, first=True)
        for _ in range(n_gen):
            self._decode(context, token)
            self._llama.llama_synchronize(context)
            token[0] = self._random.randrange(self._n_vocab)

    def close(self) -> None:
        if self.model:
            self._llama.llama_model_free(self.model)
            self.model = None


def mean_and_stddev(rates: list[float]) -> tuple[float, float]:
    """llama-bench's summary: the mean of the per-repetition rates and their sample standard deviation."""
    return statistics.mean(rates), statistics.stdev(rates) if len(rates) > 1 else 0.0
