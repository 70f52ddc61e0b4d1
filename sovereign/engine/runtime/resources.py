"""What a model may take when it loads: the GPUs ggml sees, and the context, slots and GPU layers that memory allows."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any

from sovereign.config import AGENT_CONTEXT
from sovereign.engine.wire import GpuSplit, SplitMode
from sovereign.errors import ModelLoadError
from sovereign.machine import available_memory

log = logging.getLogger(__name__)

# KV cache may take at most this share of the memory that is free when a model loads.
KV_MEMORY_SHARE = 0.25
# llama-server's automatic slot count: past it, a CPU's decode throughput barely grows while each slot costs a KV cache.
DEFAULT_MAX_PARALLEL = 4
# Never default below this many tokens of context, whatever memory says (the load then fails clearly).
MIN_DEFAULT_CTX = 2048
# Headroom kept free on a GPU for compute buffers and other processes.
GPU_HEADROOM_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class GpuMemory:
    """Free and total bytes over every GPU llama.cpp can use."""

    free: int
    total: int


@dataclass(frozen=True)
class Device:
    """A compute device as ggml's registry lists it."""

    name: str  # e.g. "CUDA0", "CPU"
    description: str  # e.g. "NVIDIA H100 80GB HBM3"
    kind: str  # "cpu", "gpu", "igpu" or "accel"
    free: int
    total: int

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("gpu", "igpu")


_DEVICE_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}  # enum ggml_backend_dev_type


def devices() -> list[Device]:
    """Every device ggml's registry knows in this llama.cpp build (the CPU included); [] if it cannot say."""
    try:
        from llama_cpp._ggml import (
            libggml,  # the ggml library llama-cpp-python already loaded
        )

        pointer, size = ctypes.c_void_p, ctypes.c_size_t
        signatures = {
            "ggml_backend_dev_count": (size, []),
            "ggml_backend_dev_get": (pointer, [size]),
            "ggml_backend_dev_name": (ctypes.c_char_p, [pointer]),
            "ggml_backend_dev_description": (ctypes.c_char_p, [pointer]),
            "ggml_backend_dev_type": (ctypes.c_int, [pointer]),
            "ggml_backend_dev_memory": (None, [pointer, ctypes.POINTER(size), ctypes.POINTER(size)]),
        }
        for name, (restype, argtypes) in signatures.items():  # libggml ships without ctypes signatures
            function = getattr(libggml, name)
            function.restype, function.argtypes = restype, argtypes
        found = []
        for index in range(libggml.ggml_backend_dev_count()):
            device = libggml.ggml_backend_dev_get(index)
            free, total = size(), size()
            libggml.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
            found.append(
                Device(
                    (libggml.ggml_backend_dev_name(device) or b"").decode(errors="replace"),
                    (libggml.ggml_backend_dev_description(device) or b"").decode(errors="replace").strip(),
                    _DEVICE_KINDS.get(libggml.ggml_backend_dev_type(device), "other"),
                    free.value,
                    total.value,
                )
            )
        return found
    except (ImportError, AttributeError, OSError) as exc:
        log.debug("no device list from ggml: %s", exc)
        return []


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build sees a GPU to put layers on.

    Not llama_supports_gpu_offload(): that also says yes for any build with RPC, which lends no local GPU.
    """
    return any(device.is_gpu for device in devices())


def gpu_memory() -> GpuMemory | None:
    """Free and total memory over the GPUs llama.cpp can use; None when this build has no GPU backend."""
    if not gpu_offload_supported():
        return None
    gpus = [device for device in devices() if device.kind == "gpu"]
    total = sum(device.total for device in gpus)
    return GpuMemory(sum(device.free for device in gpus), total) if total else None


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
    """The catalog's preferred context (at least AGENT_CONTEXT), or the trained one, capped by what memory can hold."""
    ctx = min(trained, max(preferred, AGENT_CONTEXT)) if preferred else trained
    free = available_memory()
    if free and kv_bytes_per_token > 0:
        fits = int(free * KV_MEMORY_SHARE // kv_bytes_per_token)
        if fits < ctx:
            log.warning("capping context at %d tokens to fit in memory (the model supports %d)", fits, trained)
            ctx = max(min(MIN_DEFAULT_CTX, trained), fits)
    return max(256, ctx // 256 * 256) if ctx >= 256 else ctx


def default_parallel(ctx: int, kv_bytes_per_token: int, ceiling: int = DEFAULT_MAX_PARALLEL) -> int:
    """How many requests to serve at once.

    As many ctx-sized KV caches as fit in the KV share of memory, 1 to ceiling.
    """
    free = available_memory()
    if not free or kv_bytes_per_token <= 0:
        return 1
    return max(1, min(ceiling, int(free * KV_MEMORY_SHARE // (ctx * kv_bytes_per_token))))


# enum llama_split_mode
_SPLIT_MODES = {SplitMode.none: 0, SplitMode.layer: 1, SplitMode.row: 2}


def apply_gpu_split(llama_cpp: Any, params: Any, split: GpuSplit) -> ctypes.Array[ctypes.c_float] | None:
    """Set llama_model_params' split_mode, main_gpu and tensor_split; returns the array the caller must keep alive.

    Without GPUs the params keep llama.cpp's defaults: there --split-mode none would name a GPU that is not
    there and fail the load, and the options are meant to be harmless on a CPU-only build.
    """
    if not gpu_offload_supported():
        return None
    gpus = sum(1 for device in devices() if device.is_gpu)
    if gpus == 0:
        return None
    if split.mode is SplitMode.none and split.main_gpu >= gpus:
        raise ModelLoadError(
            f"--main-gpu {split.main_gpu} names no GPU: llama.cpp sees {gpus}",
            f"pick one from 0 to {gpus - 1}",
        )
    params.split_mode = _SPLIT_MODES[split.mode]
    params.main_gpu = split.main_gpu
    if not split.tensor_split:
        return None  # a NULL tensor_split: llama.cpp splits by each GPU's free memory
    if len(split.tensor_split) > llama_cpp.LLAMA_MAX_DEVICES:
        raise ModelLoadError(
            f"--tensor-split lists {len(split.tensor_split)} GPUs; this llama.cpp build takes at most "
            f"{llama_cpp.LLAMA_MAX_DEVICES}",
            None,
        )
    # llama.cpp reads llama_max_devices() floats from this pointer during the load: pad with zeros.
    proportions = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*split.tensor_split)
    params.tensor_split = proportions
    return proportions
