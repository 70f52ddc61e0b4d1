"""What the server and a model's process say to each other: the values they share, as length-prefixed JSON frames.

Both sides import this module, and only the model's process imports the llama.cpp driver
(engine/runtime/): the types that cross the socket (LoadOptions, Step) live here, not there.
JSON, not pickle: a frame is data, never code, whichever side wrote it. Token pieces are bytes
that may split a UTF-8 character, so they travel as latin-1 text (one char per byte).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Protocol

from sovereign.engine.requests import GrammarTrigger, SamplingParams, TokenLogprob
from sovereign.errors import (
    ContextLengthExceeded,
    EngineError,
    InvalidRequest,
    ModelLoadError,
    RequestTimedOut,
    ServerBusy,
    SovereignError,
    WorkerUnavailable,
)

_LENGTH = struct.Struct("!I")
MAX_FRAME_BYTES = 1 << 30


# --- shared values ------------------------------------------------------------------------


class Speculate(StrEnum):
    """When a model's process drafts tokens to verify in one batch (runtime/speculation.py)."""

    auto = "auto"  # n-gram drafts while the batch is small (at high concurrency verifying drafts costs throughput)
    ngram = "ngram"  # n-gram drafts whatever the load
    draft = "draft"  # a draft model's guesses (--draft), whatever the load
    off = "off"


class SplitMode(StrEnum):
    """How llama.cpp spreads a model over several GPUs (enum llama_split_mode)."""

    layer = "layer"  # whole layers (and their KV) per GPU: llama.cpp's default
    row = "row"  # each weight matrix's rows across the GPUs (tensor parallelism where the backend has it)
    none = "none"  # one GPU only: --main-gpu


# llama.cpp's llama_max_devices(): the length of the tensor_split array it reads.
MAX_DEVICES = 16


@dataclass(frozen=True)
class GpuSplit:
    """Where a model's offloaded layers go when there are several GPUs (llama_model_params' three fields)."""

    mode: SplitMode = SplitMode.layer
    main_gpu: int = 0  # the GPU for the whole model with mode none (and for intermediate results with row)
    tensor_split: tuple[float, ...] = ()  # each GPU's proportion, e.g. (3.0, 1.0); (): by free memory


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model; None means choose automatically."""

    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    n_threads: int | None = None
    n_batch: int = 512
    preferred_ctx: int | None = None  # the catalog's suggestion, used when n_ctx is None
    n_parallel: int | None = None  # sequences decoded together (slots); None: as many as memory allows, up to 4
    # llama.cpp's extra buffer types (weights repacked for AMX/AVX-512/NEON kernels); False is llama-bench's
    # --repack 0, for a CPU whose fast kernels crash (see engine/kernels.py).
    use_extra_bufts: bool = True
    # Keep the sliding-window layers' whole cache, so a slot's prompt can be cut anywhere and reused
    # (scripts/bench_swa.py measures what it costs; off only for that measurement).
    swa_full: bool = True
    # The prompt cache beyond the slots (runtime/prompt_cache.py): bytes in memory and on disk (None: the
    # defaults, 0: off), the folder its files go in (None: no disk tier), and the model file's identity
    # (its sha256), which keys those files.
    cache_ram: int | None = None
    cache_disk: int | None = None
    cache_dir: str | None = None
    model_id: str = ""
    speculate: Speculate = Speculate.auto
    draft_path: str | None = None  # a small model of the same vocabulary that guesses tokens (--draft)
    rpc_servers: tuple[str, ...] = ()  # `serve --rpc`: the workers (host:port) that lend their devices
    rpc_timeout: float = 120.0  # seconds a worker may stay silent (SOVEREIGN_RPC_TIMEOUT) before the model fails
    gpu_split: GpuSplit = GpuSplit()  # --split-mode, --main-gpu, --tensor-split (a CPU-only build ignores them)


@dataclass(frozen=True)
class Step:
    """One generated token."""

    token: int
    piece: bytes
    logprob: TokenLogprob | None
    end_of_generation: bool  # an end-of-turn / end-of-sequence token (its piece is not shown)


def with_bos(tokens: list[int], bos: int, add_bos: bool) -> list[int]:
    """Prepend BOS when the model wants one and the prompt lacks it (the model's process and the server both ask)."""
    if add_bos and bos >= 0 and (not tokens or tokens[0] != bos):
        return [bos, *tokens]
    return tokens


# --- frames -------------------------------------------------------------------------------


def encode_frame(message: dict[str, Any]) -> bytes:
    """One message as a frame: its length, then its JSON."""
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    return _LENGTH.pack(len(data)) + data


def _decode(data: bytes) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(data.decode("utf-8", "surrogatepass"))
    return message


class FrameWriter:
    """Sends frames on a blocking socket; safe from any thread (one frame at a time)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        """Send one message; raises OSError when the other side is gone."""
        frame = encode_frame(message)
        with self._lock:
            self._sock.sendall(frame)


class FrameDecoder:
    """Cuts a byte stream (as a non-blocking socket delivers it) into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The messages completed by these bytes; raises ValueError or EngineError for a stream that makes no sense."""
        self._buffer += data
        messages = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES:
                raise EngineError(f"a {length}-byte frame from a model's process is too large")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            messages.append(_decode(bytes(self._buffer[_LENGTH.size : end])))
            del self._buffer[:end]
        return messages


class _Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


def read_frame(stream: _Readable) -> dict[str, Any] | None:
    """The next message, or None when the other side has closed the connection."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise EngineError(f"a {length}-byte frame from a model's process is too large")
    data = stream.read(length)
    if len(data) < length:
        return None
    return _decode(data)


# --- values -------------------------------------------------------------------------------


def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    """Sampling parameters as JSON (logit_bias keys become strings)."""
    data = asdict(params)
    data["stop"] = list(params.stop)
    data["logit_bias"] = {str(token): bias for token, bias in params.logit_bias.items()}
    return data


def params_from_wire(data: dict[str, Any]) -> SamplingParams:
    """The inverse of params_to_wire."""
    trigger = data.get("grammar_trigger")
    if trigger is not None:
        reasoning = trigger["reasoning"]
        trigger = GrammarTrigger(
            tuple(trigger["markers"]),
            tuple(trigger["start_patterns"]),
            tuple(reasoning) if reasoning else None,
            trigger["in_reasoning"],
        )
    return SamplingParams(
        **{
            **data,
            "stop": tuple(data["stop"]),
            "logit_bias": {int(t): float(b) for t, b in data["logit_bias"].items()},
            "grammar_trigger": trigger,
        }
    )


def load_options_to_wire(options: LoadOptions) -> dict[str, Any]:
    """How to load a model, as JSON."""
    return asdict(options)


def load_options_from_wire(data: dict[str, Any]) -> LoadOptions:
    """The inverse of load_options_to_wire."""
    split = data.get("gpu_split") or {}
    # JSON turns the nested dataclass into an object and its tuple into a list: give them their types back.
    gpu_split = GpuSplit(
        mode=SplitMode(split.get("mode", SplitMode.layer)),
        main_gpu=int(split.get("main_gpu", 0)),
        tensor_split=tuple(float(value) for value in split.get("tensor_split", ())),
    )
    return LoadOptions(**{**data, "gpu_split": gpu_split, "rpc_servers": tuple(data.get("rpc_servers", ()))})


def _bytes_to_wire(raw: bytes) -> str:
    return raw.decode("latin-1")


def _bytes_from_wire(text: str) -> bytes:
    return text.encode("latin-1")


def step_to_wire(step: Step) -> list[Any]:
    """One generated token: [token, piece, end_of_generation, logprob or null]."""
    logprob = None
    if step.logprob is not None:
        lp = step.logprob
        logprob = [lp.token, lp.bytes, lp.logprob, [list(alt) for alt in lp.top]]
    return [step.token, _bytes_to_wire(step.piece), step.end_of_generation, logprob]


def step_from_wire(data: list[Any]) -> Step:
    """The inverse of step_to_wire."""
    token, piece, end, logprob = data
    decoded = None
    if logprob is not None:
        text, raw, value, top = logprob
        decoded = TokenLogprob(text, raw, value, [(t, r, v) for t, r, v in top])
    return Step(token, _bytes_from_wire(piece), decoded, end)


def pieces_to_wire(pieces: list[bytes]) -> list[str]:
    """Token pieces (raw bytes) as JSON strings."""
    return [_bytes_to_wire(p) for p in pieces]


def pieces_from_wire(pieces: list[str]) -> list[bytes]:
    """The inverse of pieces_to_wire."""
    return [_bytes_from_wire(p) for p in pieces]


# --- errors -------------------------------------------------------------------------------


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """An exception as JSON: our own errors keep their class and fields, anything else becomes an EngineError."""
    data: dict[str, Any] = {
        "kind": type(exc).__name__,
        "message": getattr(exc, "message", str(exc) or type(exc).__name__),
        "hint": getattr(exc, "hint", None),
    }
    for name in ("param", "prompt_tokens", "n_ctx", "queued", "retry_after", "limit", "worker", "reason"):
        if hasattr(exc, name):
            data[name] = getattr(exc, name)
    if not isinstance(exc, SovereignError):
        data["kind"] = "EngineError"
    return data


def error_from_wire(data: dict[str, Any]) -> SovereignError:
    """The inverse of error_to_wire."""
    kind = data.get("kind")
    if kind == "InvalidRequest":
        return InvalidRequest(data["message"], data.get("param"), data.get("hint"))
    if kind == "ContextLengthExceeded":
        return ContextLengthExceeded(data["prompt_tokens"], data["n_ctx"])
    if kind == "ServerBusy":
        return ServerBusy(data["queued"], data["retry_after"])
    if kind == "RequestTimedOut":
        return RequestTimedOut(data["limit"])
    if kind == "ModelLoadError":
        return ModelLoadError(data["message"], data.get("hint"))
    if kind == "WorkerUnavailable":
        return WorkerUnavailable(data["worker"], data["reason"], data.get("hint"))
    return EngineError(data["message"], data.get("hint"))
