"""What this machine is: CPU, instruction sets, memory, GPUs, and its measured memory bandwidth.

Decoding one token reads every weight once, so memory bandwidth over model size is the ceiling
on generation speed; the bandwidth is measured rather than looked up, since the same CPU gives
very different figures with one memory channel or eight.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sovereign import machine
from sovereign.engine import kernels
from sovereign.engine.runtime import resources

# /proc/cpuinfo flag -> the name llama.cpp's build options and system info use.
_X86_FEATURES = {
    "pni": "SSE3",
    "ssse3": "SSSE3",
    "avx": "AVX",
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "bmi2": "BMI2",
    "avx512f": "AVX512",
    "avx512bw": "AVX512_BW",
    "avx512vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
    "avx_vnni": "AVX_VNNI",
    "amx_tile": "AMX_TILE",
    "amx_int8": "AMX_INT8",
    "amx_bf16": "AMX_BF16",
}
_ARM_FEATURES = {
    "asimd": "NEON",
    "asimdhp": "ARM_FP16",
    "asimddp": "DOTPROD",
    "i8mm": "MATMUL_INT8",
    "sve": "SVE",
    "sve2": "SVE2",
    "sme": "SME",
}
# Big enough to defeat any CPU cache many times over; small enough to be quick and leave memory free.
BANDWIDTH_BUFFER_BYTES = 1 << 30
BANDWIDTH_PASSES = 5


@dataclass(frozen=True)
class Gpu:
    """A GPU that ggml's registry lists."""

    name: str
    description: str
    memory_total: int
    memory_free: int


@dataclass(frozen=True)
class Hardware:
    """A machine, as far as running LLMs goes."""

    system: str  # e.g. "Linux x86_64"
    cpu: str
    physical_cores: int
    logical_cores: int
    cpu_features: tuple[str, ...]  # what the CPU has
    build_features: tuple[str, ...]  # what this llama.cpp build uses
    memory_total: int
    memory_available: int | None
    gpus: tuple[Gpu, ...] = ()
    gpu_offload: bool = False  # whether this llama.cpp build can offload to a GPU
    bandwidth: float | None = None  # measured bytes per second of memory reads
    kernels: str | None = None  # whether llama.cpp's fast CPU kernels run here, e.g. "fast (verified)"
    measured_at: float = field(default_factory=time.time)

    @property
    def fingerprint(self) -> str:
        """Twelve hex digits naming this machine's hardware (not its load or free memory)."""
        parts = [
            self.system,
            self.cpu,
            str(self.physical_cores),
            str(self.logical_cores),
            str(round(self.memory_total / 2**30)),
        ]
        parts += [f"{gpu.description}:{round(gpu.memory_total / 2**30)}" for gpu in self.gpus]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]

    def decode_ceiling(self, model_bytes: int) -> float | None:
        """Tokens/s that the memory bandwidth allows when every token reads `model_bytes` of weights."""
        return self.bandwidth / model_bytes if self.bandwidth and model_bytes > 0 else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["fingerprint"] = self.fingerprint
        data["bandwidth_gb_s"] = round(self.bandwidth / 1e9, 2) if self.bandwidth else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Hardware:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["gpus"] = tuple(Gpu(**gpu) for gpu in data.get("gpus", ()))
        known["cpu_features"] = tuple(known.get("cpu_features", ()))
        known["build_features"] = tuple(known.get("build_features", ()))
        return cls(**known)


def detect(*, measure: bool = True, home: Path | None = None, extra_buffers: str = "auto") -> Hardware:
    """Describe this machine.

    With `measure`, also time its memory bandwidth (about a second); with `home`, its kernels verdict.
    """
    devices = resources.devices()
    gpus = tuple(Gpu(d.name, d.description, d.total, d.free) for d in devices if d.is_gpu)
    cpu_device = next((d.description for d in devices if d.kind == "cpu"), "")
    return Hardware(
        system=f"{platform.system()} {platform.machine()}",
        cpu=cpu_model() or cpu_device or platform.processor() or "unknown CPU",
        physical_cores=machine.physical_cores(),
        logical_cores=os.cpu_count() or 1,
        cpu_features=cpu_features(),
        build_features=build_features(),
        memory_total=total_memory(),
        memory_available=machine.available_memory(),
        gpus=gpus,
        gpu_offload=resources.gpu_offload_supported(),
        bandwidth=measure_bandwidth() if measure else None,
        kernels=kernels.kernel_status(home, extra_buffers) if home else None,
    )


def _sysctl(name: str) -> str:
    """A macOS/BSD sysctl value ("" where there is none)."""
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    """The CPU's marketing name."""
    for key, value in machine.cpuinfo():
        if key in ("model name", "Model", "Hardware", "cpu model") and value:
            return value
    if platform.system() == "Darwin":
        return _sysctl("machdep.cpu.brand_string")
    return ""


def cpu_features() -> tuple[str, ...]:
    """The instruction-set extensions llama.cpp has kernels for, that this CPU reports."""
    flags: set[str] = set()
    for key, value in machine.cpuinfo():
        if key in ("flags", "Features"):
            flags.update(value.split())
    if platform.system() == "Darwin":
        if platform.machine() == "arm64":
            flags.update({"asimd", "asimdhp"})  # every Apple silicon core has NEON and FP16
            flags.update(
                flag
                for flag, key in (("asimddp", "FEAT_DotProd"), ("i8mm", "FEAT_I8MM"))
                if _sysctl(f"hw.optional.arm.{key}") == "1"
            )
        else:
            flags.update(
                _sysctl("machdep.cpu.features").lower().split() + _sysctl("machdep.cpu.leaf7_features").lower().split()
            )
            if "sse3" in flags:
                flags.add("pni")  # Linux's name for SSE3, which the table uses
    names = {**_X86_FEATURES, **_ARM_FEATURES}
    return tuple(dict.fromkeys(names[flag] for flag in names if flag in flags))


def build_features() -> tuple[str, ...]:
    """What this llama.cpp build was compiled to use, from its system info ("AVX2 = 1 | ...")."""
    try:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode(errors="replace")
    except (ImportError, AttributeError, OSError):
        return ()
    found = []
    for part in info.replace(":", "|").split("|"):
        name, _, value = part.partition("=")
        if value.strip() == "1":
            found.append(name.strip())
    return tuple(dict.fromkeys(found))


def total_memory() -> int:
    """Bytes of physical memory."""
    if (total := machine.proc_kib("/proc/meminfo", "MemTotal")) is not None:
        return total
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return int(_sysctl("hw.memsize") or 0)


def measure_bandwidth(
    size: int = BANDWIDTH_BUFFER_BYTES, threads: int | None = None, passes: int = BANDWIDTH_PASSES
) -> float:
    """Bytes/s of memory reads: every core sums its share of a buffer far larger than the caches; best pass wins.

    Reads, because that is what decoding does to the weights; one thread per physical core, because
    one core alone cannot saturate the memory controller (as llama.cpp's own threads don't).
    """
    threads = threads or machine.physical_cores()
    available = machine.available_memory()
    if available:
        size = min(size, available // 4)
    words = max(threads, size // 8 // threads * threads)
    buffer = np.ones(words, dtype=np.int64)  # writing it maps every page before the timing starts
    chunks = np.split(buffer, threads)
    best = 0.0
    for _ in range(passes):
        barrier = threading.Barrier(threads + 1)

        workers = [threading.Thread(target=_read_after, args=(barrier, chunk)) for chunk in chunks]
        for worker in workers:
            worker.start()
        barrier.wait()
        started = time.perf_counter()
        for worker in workers:
            worker.join()
        best = max(best, buffer.nbytes / (time.perf_counter() - started))
    del chunks, buffer
    return best


def _read_after(barrier: threading.Barrier, chunk: np.ndarray) -> None:
    barrier.wait()
    chunk.sum()  # numpy releases the GIL in the reduction loop: the threads really run at once
