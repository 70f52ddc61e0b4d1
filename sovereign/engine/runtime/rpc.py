"""ggml's RPC backend through ctypes: a head's worker devices, and a worker's server.

llama-cpp-python dropped its `rpc_servers` argument, but llama_model_params.devices remains: this
follows llama.cpp's own common/arg.cpp (find the "RPC" backend registry, get its
ggml_backend_rpc_add_server by name, take each worker's devices) and hands llama.cpp a NULL-terminated
device array. The workers' devices are not registered globally, so nothing else in the process (the
draft model, the device list) sees them.
"""

from __future__ import annotations

import bisect
import ctypes
import socket
import struct
from dataclasses import dataclass
from typing import Any

from sovereign.engine.rpc_workers import no_rpc_error, worker_sockets
from sovereign.errors import ModelLoadError, SovereignError, WorkerUnavailable

_P = ctypes.c_void_p
_SIZE = ctypes.c_size_t
# ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint)
_ADD_SERVER = ctypes.CFUNCTYPE(_P, ctypes.c_char_p)
# void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir, size_t n_threads,
#                                    size_t n_devices, ggml_backend_dev_t * devices)
_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, _SIZE, _SIZE, ctypes.POINTER(_P))
_DEVICE_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}  # enum ggml_backend_dev_type
# A silent peer is probed after 10 s idle, every 5 s, and given up after 3 unanswered probes.
_KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}


def _ggml() -> Any:
    """libggml as llama-cpp-python loaded it, with the signatures used here (it ships without them)."""
    from llama_cpp._ggml import libggml

    signatures: dict[str, tuple[Any, list[Any]]] = {
        "ggml_backend_reg_by_name": (_P, [ctypes.c_char_p]),
        "ggml_backend_reg_get_proc_address": (_P, [_P, ctypes.c_char_p]),
        "ggml_backend_reg_dev_count": (_SIZE, [_P]),
        "ggml_backend_reg_dev_get": (_P, [_P, _SIZE]),
        "ggml_backend_dev_count": (_SIZE, []),
        "ggml_backend_dev_get": (_P, [_SIZE]),
        "ggml_backend_dev_by_name": (_P, [ctypes.c_char_p]),
        "ggml_backend_dev_name": (ctypes.c_char_p, [_P]),
        "ggml_backend_dev_description": (ctypes.c_char_p, [_P]),
        "ggml_backend_dev_type": (ctypes.c_int, [_P]),
        "ggml_backend_dev_memory": (None, [_P, ctypes.POINTER(_SIZE), ctypes.POINTER(_SIZE)]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(libggml, name)
        function.restype, function.argtypes = restype, argtypes
    return libggml


def supports_rpc() -> bool:
    """Whether this llama.cpp build has the RPC backend."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


def _rpc_function(name: str, prototype: Any) -> Any:
    """One of the RPC backend's functions, found as llama.cpp's arg.cpp finds it (by name through its registry)."""
    ggml = _ggml()
    reg = ggml.ggml_backend_reg_by_name(b"RPC") if supports_rpc() else None
    address = ggml.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not address:
        raise no_rpc_error()
    return prototype(address)


@dataclass(frozen=True)
class WorkerDevice:
    """One device a worker lends, as the head sees it."""

    endpoint: str
    name: str  # e.g. RPC0
    free: int
    total: int


class WorkerDevices:
    """The workers' devices for one model load; keep it as long as the model (llama.cpp keeps the array's pointer)."""

    def __init__(self, endpoints: list[str]) -> None:
        try:
            add_server = _rpc_function("ggml_backend_rpc_add_server", _ADD_SERVER)
        except SovereignError as exc:  # a build without RPC: the load fails with the rebuild command
            raise ModelLoadError(exc.message, exc.hint) from None
        ggml = _ggml()
        handles: list[int] = []
        self.devices: list[WorkerDevice] = []
        for endpoint in endpoints:
            reg = add_server(endpoint.encode())
            count = ggml.ggml_backend_reg_dev_count(reg) if reg else 0
            if not count:
                raise WorkerUnavailable(endpoint, "lends no device")
            for index in range(count):
                device = ggml.ggml_backend_reg_dev_get(reg, index)
                free, total = _SIZE(), _SIZE()
                ggml.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
                handles.append(device)
                name = (ggml.ggml_backend_dev_name(device) or b"").decode(errors="replace")
                self.devices.append(WorkerDevice(endpoint, name, free.value, total.value))
        # A GPU on the head itself still takes its share, after the workers (llama.cpp's own default order).
        self._head_gpus_free: list[float] = []
        for index in range(ggml.ggml_backend_dev_count()):
            device = ggml.ggml_backend_dev_get(index)
            if _DEVICE_KINDS.get(ggml.ggml_backend_dev_type(device)) in ("gpu", "igpu"):
                free, total = _SIZE(), _SIZE()
                ggml.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
                handles.append(device)
                self._head_gpus_free.append(float(free.value))
        self.array = (_P * (len(handles) + 1))(*handles, None)

    def set_timeouts(self, seconds: float) -> None:
        """Give the workers' connections a read and write timeout and TCP keepalive.

        ggml's sockets block forever; with these, a worker that hangs or vanishes without a reset (a pulled
        cable, a stopped VM) fails the socket call, ggml aborts this process, and the server names the worker.
        Call once the model and its context are loaded: their buffers hold the connections open.
        """
        timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
        for fd in worker_sockets(list(dict.fromkeys(d.endpoint for d in self.devices))):
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:  # a duplicate: the original stays
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for option, value in _KEEPALIVE.items():
                    if hasattr(socket, option):  # Linux names; macOS has some of them
                        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)

    @property
    def address(self) -> int:
        """The NULL-terminated array's address, for llama_model_params.devices."""
        return ctypes.addressof(self.array)

    def apply_tensor_split(self, params: Any, proportions: tuple[float, ...]) -> ctypes.Array[ctypes.c_float] | None:
        """--tensor-split over the workers' devices (then the head's GPUs); returns the array to keep alive."""
        import llama_cpp

        if not proportions:
            return None  # NULL: llama.cpp splits by each device's free memory
        array = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*proportions[: llama_cpp.LLAMA_MAX_DEVICES])
        params.tensor_split = array
        return array

    def report(self, n_layers: int, n_offloaded: int, tensor_split: tuple[float, ...] = ()) -> list[dict[str, Any]]:
        """Each worker device with the layers llama.cpp gives it, for the model's facts and the start-up log."""
        count = len(self.devices) + len(self._head_gpus_free)  # llama.cpp splits over both
        free = [float(device.free) for device in self.devices] + self._head_gpus_free
        weights = (list(tensor_split) + [0.0] * count)[:count] if any(tensor_split) else free
        layers = split_layers(n_layers, n_offloaded, weights)[: len(self.devices)]
        return [
            {"worker": d.endpoint, "device": d.name, "free": d.free, "total": d.total, "layers": held}
            for d, held in zip(self.devices, layers, strict=True)
        ]


def split_layers(n_layers: int, n_offloaded: int, weights: list[float]) -> list[list[int]]:
    """The layers each device holds, as llama-model.cpp assigns them (index n_layers is the output layer).

    The last n_offloaded of the n_layers + 1 layers go to the devices, cut by cumulative weight (free memory).
    """
    total = sum(weights) or 1.0
    cuts, running = [], 0.0
    for weight in weights:
        running += weight
        cuts.append(running / total)
    start = max(n_layers + 1 - n_offloaded, 0)
    active = min(n_offloaded, n_layers + 1)
    held: list[list[int]] = [[] for _ in weights]
    for layer in range(start, start + active):
        index = bisect.bisect_right(cuts, (layer - start) / active)  # std::upper_bound
        held[min(index, len(weights) - 1)].append(layer)
    return held


def start_server(endpoint: str, cache_dir: str | None, n_threads: int, device_names: list[str]) -> None:
    """Serve this machine's devices to a head until the process is stopped (ggml's own loop; returns on failure)."""
    start = _rpc_function("ggml_backend_rpc_start_server", _START_SERVER)
    devices = worker_devices(device_names)
    array = (_P * len(devices))(*devices)
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, len(devices), array)


def worker_devices(names: list[str]) -> list[int]:
    """The devices a worker lends: those named, else every accelerator, else the CPU (as llama.cpp's rpc-server)."""
    ggml = _ggml()
    if names:
        found = []
        for name in names:
            device = ggml.ggml_backend_dev_by_name(name.encode())
            if not device:
                known = ", ".join(_device_names(ggml))
                raise ModelLoadError(f"this machine has no device {name!r}", f"pick one of: {known}")
            found.append(device)
        return found
    all_devices = [ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())]
    accelerators = [d for d in all_devices if _DEVICE_KINDS.get(ggml.ggml_backend_dev_type(d)) in ("gpu", "igpu")]
    return accelerators or [d for d in all_devices if ggml.ggml_backend_dev_type(d) == 0][:1]


def _device_names(ggml: Any) -> list[str]:
    return [
        (ggml.ggml_backend_dev_name(ggml.ggml_backend_dev_get(i)) or b"").decode(errors="replace")
        for i in range(ggml.ggml_backend_dev_count())
    ]
