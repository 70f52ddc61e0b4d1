"""`sovereign bench MODEL`: llama-bench's sweep (threads x batch x GPU layers x -p/-n) and what it means.

Rows come in llama-bench's order: per GPU-layer count (one model load each), per batch size, per
thread count, the prompt tests and then the generation tests. Each generation result is set
against the ceiling that measured memory bandwidth puts on it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sovereign.engine.runtime.llama_bench import BenchModel, TestSpec, mean_and_stddev
from sovereign.engine.wire import GpuSplit
from sovereign.machine import proc_kib

DEFAULT_REPETITIONS = 3
DEFAULT_N_PROMPT = (512,)
DEFAULT_N_GEN = (128,)
DEFAULT_N_BATCH = (2048,)  # llama-bench's defaults
DEFAULT_N_UBATCH = 512


@dataclass(frozen=True)
class Sweep:
    """The lists to combine, as llama-bench's comma-separated options."""

    threads: tuple[int, ...]
    n_prompt: tuple[int, ...] = DEFAULT_N_PROMPT
    n_gen: tuple[int, ...] = DEFAULT_N_GEN
    n_batch: tuple[int, ...] = DEFAULT_N_BATCH
    n_gpu_layers: tuple[int, ...] = (0,)
    repetitions: int = DEFAULT_REPETITIONS
    gpu_split: GpuSplit = GpuSplit()  # --split-mode, --main-gpu, --tensor-split: the same for every load
    rpc_servers: tuple[str, ...] = ()  # --rpc: the workers that take the offloaded layers

    def specs(self) -> list[TestSpec]:
        """The tests for one model load, in llama-bench's order."""
        specs = []
        for n_batch in self.n_batch:
            for threads in self.threads:
                specs += [
                    TestSpec(p, 0, threads, n_batch, min(DEFAULT_N_UBATCH, n_batch)) for p in self.n_prompt if p > 0
                ]
                specs += [TestSpec(0, n, threads, n_batch, min(DEFAULT_N_UBATCH, n_batch)) for n in self.n_gen if n > 0]
        return specs

    @property
    def count(self) -> int:
        return len(self.n_gpu_layers) * len(self.specs())


@dataclass(frozen=True)
class ModelBenchResult:
    """One test's figures."""

    model: str
    description: str  # llama.cpp's own, e.g. "gemma3 270M Q4_K - Medium"
    test: str  # pp512, tg128, ...
    n_prompt: int
    n_gen: int
    threads: int
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int
    tokens_per_second: float  # the mean over repetitions
    stddev: float
    samples: list[float]
    model_bytes: int
    model_params: int
    load_seconds: float
    peak_memory: int | None  # the process's peak resident bytes while this model was loaded
    bandwidth_ceiling: float | None = None  # tok/s that memory bandwidth allows (generation tests on the CPU)
    backend: str = "CPU"
    use_extra_bufts: bool = True  # llama-bench's --repack: False where this CPU's fast kernels crash

    @property
    def share_of_ceiling(self) -> float | None:
        return self.tokens_per_second / self.bandwidth_ceiling if self.bandwidth_ceiling else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["share_of_bandwidth_ceiling"] = round(self.share_of_ceiling, 4) if self.share_of_ceiling else None
        return data


def run_sweep(
    path: Path,
    label: str,
    sweep: Sweep,
    *,
    bandwidth: float | None,
    gpu_offload: bool,
    use_extra_bufts: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> Iterator[ModelBenchResult]:
    """Run every test of the sweep on the model at `path`, yielding results as they come."""
    for n_gpu_layers in sweep.n_gpu_layers:
        reset_peak_memory()
        if on_start:
            on_start(f"loading {label} (-ngl {n_gpu_layers})")
        model = BenchModel(path, n_gpu_layers, use_extra_bufts, sweep.gpu_split, sweep.rpc_servers)
        on_gpu = (gpu_offload or bool(sweep.rpc_servers)) and n_gpu_layers != 0  # not the CPU's bandwidth, then
        try:
            for spec in sweep.specs():
                if on_start:
                    on_start(f"{spec.name} -t {spec.threads} -b {spec.n_batch} -ngl {n_gpu_layers}")
                rates = model.run(spec, sweep.repetitions)
                mean, stddev = mean_and_stddev(rates)
                # The ceiling is the CPU's: weights on a GPU are read at the GPU's bandwidth, which is not measured.
                ceiling = (
                    bandwidth / model.size if bandwidth and spec.n_gen and not spec.n_prompt and not on_gpu else None
                )
                result = ModelBenchResult(
                    model=label,
                    description=model.description,
                    test=spec.name,
                    n_prompt=spec.n_prompt,
                    n_gen=spec.n_gen,
                    threads=spec.threads,
                    n_batch=spec.n_batch,
                    n_ubatch=spec.n_ubatch,
                    n_gpu_layers=n_gpu_layers,
                    tokens_per_second=mean,
                    stddev=stddev,
                    samples=rates,
                    model_bytes=model.size,
                    model_params=model.parameters,
                    load_seconds=model.load_seconds,
                    peak_memory=peak_memory(),
                    bandwidth_ceiling=ceiling,
                    backend="GPU" if on_gpu else "CPU",
                    use_extra_bufts=use_extra_bufts,
                )
                yield result
        finally:
            model.close()


def reset_peak_memory() -> None:
    """Start the peak-resident-memory count afresh (Linux; elsewhere the peak covers the whole process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory() -> int | None:
    """The process's peak resident bytes since the last reset."""
    if (peak := proc_kib("/proc/self/status", "VmHWM")) is not None:
        return peak
    try:
        import resource  # Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
