"""`sovereign fit`: which catalog models this machine can hold, and how fast they would generate.

A model needs its weights, a KV cache for the default context, and room for llama.cpp's compute
buffers and the runtime. Generation speed is bounded by memory bandwidth over the bytes read per
token (every weight, once); real runs reach a share of that ceiling, taken from this machine's own
earlier `sovereign bench` runs when there are any.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from sovereign.bench import history
from sovereign.bench.hardware import detect
from sovereign.catalog import Catalog, ModelSpec
from sovereign.config import Settings
from sovereign.errors import SovereignError
from sovereign.store import Store
from sovereign.store.gguf_header import kv_bytes_per_token, read_gguf_info, read_gguf_metadata
from sovereign.store.remote_header import read_remote

# Average bits per weight of llama.cpp's quantizations (llama-quantize's own table), for sizes not yet known.
BITS_PER_WEIGHT = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.56,
    "Q5_K_M": 5.69,
    "Q5_K_S": 5.54,
    "Q5_1": 6.0,
    "Q5_0": 5.5,
    "Q4_K_M": 4.89,
    "Q4_K_S": 4.58,
    "Q4_1": 5.0,
    "Q4_0": 4.55,
    "MXFP4": 4.25,
    "IQ4_XS": 4.25,
    "Q3_K_M": 3.91,
    "Q3_K_S": 3.5,
    "Q2_K": 3.35,
}
RUNTIME_OVERHEAD_BYTES = 512 * 2**20  # compute buffers, the Python runtime and the server around the model
DEFAULT_EFFICIENCY = 0.7  # share of the bandwidth ceiling llama.cpp's CPU decoding typically reaches
INTERACTIVE_TOK_S = 10.0  # faster than people read: a chat feels live
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class Candidate:
    """A model to place: its size and attention shape, and where those figures came from."""

    name: str
    quantization: str | None
    params: int | None
    size: int  # bytes of weights
    size_exact: bool  # False: estimated from parameters x bits per weight
    kv_bytes_per_token: int
    context: int
    source: str  # "file" (the pulled GGUF's header), "catalog" or "remote header"


@dataclass(frozen=True)
class Budget:
    """What the machine offers."""

    memory: int  # bytes of RAM available
    gpu_memory: int = 0  # bytes free over the GPUs llama.cpp can use
    bandwidth: float | None = None  # bytes/s of memory reads
    efficiency: float = DEFAULT_EFFICIENCY


@dataclass(frozen=True)
class Verdict:
    """Whether and where a candidate runs, and its expected generation speed."""

    candidate: Candidate
    needed: int  # bytes: weights + KV cache + overhead
    where: str | None  # "GPU", "CPU", or None when it fits nowhere
    ceiling_tok_s: float | None  # what bandwidth allows (CPU only: GPU bandwidth is not measured)
    expected_tok_s: float | None

    @property
    def fits(self) -> bool:
        return self.where is not None

    @property
    def interactive(self) -> bool:
        """Fast enough to chat with: on a GPU, or expected at reading speed or better on the CPU."""
        return self.where == "GPU" or (self.expected_tok_s or 0.0) >= INTERACTIVE_TOK_S


def machine_budget(
    home: Path,
    *,
    memory: int | None = None,
    gpu_memory: int | None = None,
    bandwidth: float | None = None,
    measuring: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> tuple[Budget, bool]:
    """What this machine offers (each figure overridable), and whether its efficiency was measured here.

    Memory bandwidth comes from this machine's earlier measurement, else it is measured now (about two
    seconds, inside `measuring()`) and kept for next time.
    """
    hardware = detect(measure=False)
    runs = history.load(home)
    measured = history.latest_hardware(runs, hardware.fingerprint)
    if bandwidth is None and measured is None:
        with measuring():
            hardware = detect()
        history.save(home, "hardware", hardware, [])
    speed = bandwidth or (measured.bandwidth if measured else hardware.bandwidth)
    efficiency = history.measured_efficiency(runs, hardware.fingerprint)
    budget = Budget(
        memory=memory or hardware.memory_available or hardware.memory_total,
        gpu_memory=gpu_memory if gpu_memory is not None else sum(g.memory_free for g in hardware.gpus),
        bandwidth=speed,
        efficiency=efficiency or DEFAULT_EFFICIENCY,
    )
    return budget, efficiency is not None


def assess(candidate: Candidate, budget: Budget) -> Verdict:
    """Place one candidate: wholly on the GPU if it fits there, else in RAM, else nowhere."""
    needed = candidate.size + candidate.kv_bytes_per_token * candidate.context + RUNTIME_OVERHEAD_BYTES
    if budget.gpu_memory and needed <= budget.gpu_memory:
        return Verdict(candidate, needed, "GPU", None, None)
    ceiling = budget.bandwidth / candidate.size if budget.bandwidth else None
    expected = ceiling * budget.efficiency if ceiling else None
    return Verdict(candidate, needed, "CPU" if needed <= budget.memory else None, ceiling, expected)


def recommend(verdicts: list[Verdict]) -> Verdict | None:
    """The biggest model (by parameters, then size) that runs at an interactive speed; None if none does."""
    usable = [v for v in verdicts if v.fits and v.interactive]
    return max(usable, key=lambda v: (v.candidate.params or 0, v.candidate.size), default=None)


def candidates(
    catalog: Catalog,
    store: Store,
    context: int | None = None,
    *,
    settings: Settings | None = None,
    remote: bool = False,
) -> tuple[list[Candidate], list[str]]:
    """Every catalog entry with known figures, and the names without.

    Figures come from the pulled file's header; else the catalog's shape; else (or first, with
    `remote`) the header of the file at the entry's sources, read over HTTP Range requests.
    """
    found, unknown = [], []
    for spec in catalog.specs.values():
        candidate = _from_file(spec, store, context)
        if candidate is None and remote and settings is not None:
            candidate = _from_source(spec, settings, context)
        candidate = candidate or _from_catalog(spec, context)
        if candidate is None and not remote and settings is not None:
            candidate = _from_source(spec, settings, context)
        if candidate is None:
            unknown.append(str(spec.name))
        else:
            found.append(candidate)
    return found, unknown


def _from_source(spec: ModelSpec, settings: Settings, context: int | None) -> Candidate | None:
    """The first of the entry's sources whose GGUF header can be read over the network."""
    for source in spec.sources:
        try:
            model = read_remote(source, settings)
        except SovereignError:
            continue
        if model is not None:
            params = model.parameters or (spec.shape.params if spec.shape else None)
            quantization = model.quantization or (spec.shape.quantization if spec.shape else None)
            return Candidate(
                str(spec.name),
                quantization,
                params,
                model.size,
                True,
                model.kv_bytes_per_token,
                _context(spec, context),
                "remote header",
            )
    return None


def _context(spec: ModelSpec, context: int | None) -> int:
    return context or spec.context_length or DEFAULT_CONTEXT


def _from_file(spec: ModelSpec, store: Store, context: int | None) -> Candidate | None:
    manifest = store.get(spec.name)
    if manifest is None:
        return None
    paths = store.file_paths(manifest)
    try:
        info = read_gguf_info(paths)
        kv = kv_bytes_per_token(read_gguf_metadata(paths[0]))
    except (SovereignError, OSError):
        return None  # a damaged file: the catalog's figures still say what the model needs
    size = sum(Path(p).stat().st_size for p in paths)
    return Candidate(
        str(spec.name), info.quantization, info.parameters, size, True, kv, _context(spec, context), "file"
    )


def _from_catalog(spec: ModelSpec, context: int | None) -> Candidate | None:
    shape = spec.shape
    if shape is None:
        return None
    if spec.size:
        size, exact = spec.size, True
    elif shape.quantization.upper() in BITS_PER_WEIGHT:
        size, exact = int(shape.params * BITS_PER_WEIGHT[shape.quantization.upper()] / 8), False
    else:
        return None
    return Candidate(
        str(spec.name),
        shape.quantization,
        shape.params,
        size,
        exact,
        shape.kv_bytes_per_token,
        _context(spec, context),
        "catalog",
    )
