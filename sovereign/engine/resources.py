"""What this machine has: physical cores, free memory, GPU memory; and the defaults they imply."""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# KV cache may take at most this share of the memory that is free when a model loads.
KV_MEMORY_SHARE = 0.25
# llama-server's automatic slot count: past it, a CPU's decode throughput barely grows while each slot costs a KV cache.
DEFAULT_MAX_PARALLEL = 4
# Never default below this many tokens of context, whatever memory says (the load then fails clearly).
MIN_DEFAULT_CTX = 2048
# Headroom kept free on a GPU for compute buffers and other processes.
GPU_HEADROOM_BYTES = 512 * 1024 * 1024


def physical_cores() -> int:
    """Physical cores (hyper-threads share one core's arithmetic units, so they don't speed up decoding)."""
    cpuinfo = Path("/proc/cpuinfo")
    try:
        cores: set[tuple[str, str]] = set()
        physical = core = ""
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "physical id":
                physical = value
            elif key == "core id":
                core = value
            elif not key and core:
                cores.add((physical, core))
                physical = core = ""
        if core:
            cores.add((physical, core))
        if cores:
            usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else len(cores)
            return max(1, min(len(cores), usable))
    except OSError:
        pass
    return max(1, os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping, if the OS says."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class GpuMemory:
    """Free and total bytes over every GPU llama.cpp can use."""

    free: int
    total: int


def gpu_memory() -> GpuMemory | None:
    """Ask ggml's device registry for GPU memory; None when this build has no GPU backend."""
    try:
        import llama_cpp
        from llama_cpp._ggml import libggml  # the ggml library llama-cpp-python already loaded

        if not llama_cpp.llama_supports_gpu_offload():
            return None
        libggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        libggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        libggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        libggml.ggml_backend_dev_type.restype = ctypes.c_int
        libggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        libggml.ggml_backend_dev_memory.restype = None
        libggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        free = total = 0
        for index in range(libggml.ggml_backend_dev_count()):
            device = libggml.ggml_backend_dev_get(index)
            if libggml.ggml_backend_dev_type(device) != 1:  # GGML_BACKEND_DEVICE_TYPE_GPU
                continue
            dev_free, dev_total = ctypes.c_size_t(), ctypes.c_size_t()
            libggml.ggml_backend_dev_memory(device, ctypes.byref(dev_free), ctypes.byref(dev_total))
            free += dev_free.value
            total += dev_total.value
        return GpuMemory(free, total) if total else None
    except (ImportError, AttributeError, OSError) as exc:
        log.debug("no GPU memory figures: %s", exc)
        return None


def auto_gpu_layers(model_bytes: int, n_layers: int, kv_bytes: int) -> int:
    """All layers when the model and its KV cache fit in free GPU memory, else as many as fit; 0 without a GPU."""
    gpu = gpu_memory()
    if gpu is None:
        return 0
    budget = gpu.free - GPU_HEADROOM_BYTES
    if model_bytes + kv_bytes <= budget:
        return n_layers + 1  # the output layer too
    per_layer = (model_bytes + kv_bytes) / max(1, n_layers)
    return max(0, int(budget // per_layer))


def default_context(trained: int, preferred: int | None, kv_bytes_per_token: int) -> int:
    """The catalog's preferred context (or the trained one), capped by what memory can hold."""
    ctx = min(trained, preferred) if preferred else trained
    free = available_memory()
    if free and kv_bytes_per_token > 0:
        fits = int(free * KV_MEMORY_SHARE // kv_bytes_per_token)
        if fits < ctx:
            log.warning("capping context at %d tokens to fit in memory (the model supports %d)", fits, trained)
            ctx = max(min(MIN_DEFAULT_CTX, trained), fits)
    return max(256, ctx // 256 * 256) if ctx >= 256 else ctx


def default_parallel(ctx: int, kv_bytes_per_token: int, ceiling: int = DEFAULT_MAX_PARALLEL) -> int:
    """How many requests to serve at once: as many ctx-sized KV caches as fit in the KV share of memory, 1 to ceiling."""
    free = available_memory()
    if not free or kv_bytes_per_token <= 0:
        return 1
    return max(1, min(ceiling, int(free * KV_MEMORY_SHARE // (ctx * kv_bytes_per_token))))
