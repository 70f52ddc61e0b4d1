"""Read the facts sovereign shows about a model from GGUF headers, without touching the weights.

Why not gguf.GGUFReader: it parses every key/value array eagerly; on Gemma 3 (262k-token
vocabulary) that costs ~13 s of CPU just to learn the architecture. This reader streams the
header, skips arrays it does not need, and reads tensor infos only to count parameters.
Enums and key names come from the `gguf` package so they track llama.cpp; only its constants
module is loaded (see _gguf_constants), so that every pull does not pay for numpy.
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sovereign.errors import NotGGUF


def _gguf_constants() -> ModuleType:
    """gguf.constants without running gguf/__init__.py, which imports numpy and the writers (~130 ms a pull).

    constants.py imports only enum and typing. A process that already imported gguf reuses its module,
    and a gguf release whose constants.py cannot load alone gets the normal import.
    """
    if (loaded := sys.modules.get("gguf.constants")) is not None:
        return loaded
    package = importlib.util.find_spec("gguf")  # locating a package does not execute it
    try:
        path = Path(next(iter(package.submodule_search_locations or ()))) / "constants.py"  # type: ignore[union-attr]
        spec = importlib.util.spec_from_file_location("sovereign.store._gguf_constants", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    except Exception:  # noqa: BLE001 - any failure of the shortcut: the ordinary import is always right
        import gguf.constants

        return gguf.constants


_constants = _gguf_constants()
GGML_QUANT_SIZES, GGMLQuantizationType = _constants.GGML_QUANT_SIZES, _constants.GGMLQuantizationType
if TYPE_CHECKING:  # the enum as a type; at run time it comes from the module loaded above
    from gguf.constants import GGUFValueType
else:
    GGUFValueType = _constants.GGUFValueType
Keys, LlamaFileType = _constants.Keys, _constants.LlamaFileType
MAGIC_BYTES = struct.pack("<I", _constants.GGUF_MAGIC)  # b"GGUF"

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
# Arrays we keep (small); every other array is skipped without decoding.
_KEEP_ARRAYS = {Keys.Tokenizer.CHAT_TEMPLATE, "general.tags", "general.languages"}


@dataclass(frozen=True)
class GGUFInfo:
    """Facts from a model's GGUF header(s)."""

    architecture: str | None
    name: str | None
    parameters: int
    size_label: str | None
    quantization: str | None
    context_length: int | None
    chat_template: str | None
    license: str | None
    split_count: int

    @property
    def has_chat_template(self) -> bool:
        """Whether the GGUF carries its own chat template."""
        return bool(self.chat_template)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the template itself is left out; it can be long)."""
        data = asdict(self)
        data.pop("chat_template")
        data["has_chat_template"] = self.has_chat_template
        return data


class _Stream:
    """Little- or big-endian primitive reads over a memory-mapped file or bytes (no seeks, no copies)."""

    def __init__(self, buffer: Any, endian: str, position: int) -> None:
        self.buffer, self.endian, self.position = buffer, endian, position

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(self.endian + fmt, self.buffer, self.position)[0]
        self.position += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        end = self.position + length
        if end > len(self.buffer):
            raise EOFError
        text = self.buffer[self.position : end].decode("utf-8", errors="replace")
        self.position = end
        return text

    def skip_string(self) -> None:
        length = self.unpack("Q")  # advances position first; `position += unpack()` would lose that
        self.position += length

    def value(self, vtype: GGUFValueType, keep: bool) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = GGUFValueType(self.unpack("I")), self.unpack("Q")
            if keep:
                return [self.value(item_type, True) for _ in range(count)]
            if item_type in _SCALARS:
                self.position += struct.calcsize(_SCALARS[item_type]) * count
            elif item_type == GGUFValueType.STRING:
                for _ in range(count):  # a 262k-token vocabulary: only the length prefixes are read
                    self.skip_string()
            else:
                for _ in range(count):
                    self.value(item_type, False)
            return None
        return self.unpack(_SCALARS[vtype])


def _header_stream(buffer: Any, name: str) -> _Stream:
    """A stream just past a GGUF's magic and version, in the file's byte order (at least 8 bytes given)."""
    if bytes(buffer[:4]) != MAGIC_BYTES:
        raise NotGGUF(f"{name} is not a GGUF file (bad magic bytes)", "pull a .gguf model file")
    endian = "<" if struct.unpack_from("<I", buffer, 4)[0] < 0x10000 else ">"
    return _Stream(buffer, endian, 8)


class NeedMoreBytes(Exception):
    """The buffer ends inside the header: read further into the file and parse again."""


def parse_header(buffer: Any, name: str) -> tuple[dict[str, Any], list[tuple[int, int]], int]:
    """(metadata, [(n_elements, ggml_type)], bytes the tensors need from the header's start) of a GGUF.

    `buffer` is the whole file (memory-mapped) or a prefix of it; a prefix that ends inside the
    header raises NeedMoreBytes.
    """
    if len(buffer) < 8:
        raise NeedMoreBytes
    stream = _header_stream(buffer, name)
    try:
        tensor_count, kv_count = stream.unpack("Q"), stream.unpack("Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = stream.string()
            value = stream.value(GGUFValueType(stream.unpack("I")), key in _KEEP_ARRAYS)
            if value is not None:
                metadata[key] = value
        tensors, data_end = [], 0
        for _ in range(tensor_count):
            stream.skip_string()
            dims = [stream.unpack("Q") for _ in range(stream.unpack("I"))]
            ggml_type = stream.unpack("I")
            offset = stream.unpack("Q")
            elements = 1
            for dim in dims:
                elements *= dim
            tensors.append((elements, ggml_type))
            data_end = max(data_end, offset + _tensor_bytes(elements, ggml_type))
        if stream.position > len(buffer):  # skipped arrays can step past the end without reading it
            raise EOFError
        alignment = int(metadata.get(Keys.General.ALIGNMENT, 32)) or 32
        data_start = -(-stream.position // alignment) * alignment
    except (EOFError, struct.error):
        raise NeedMoreBytes from None
    except ValueError as exc:  # an unknown value type: corrupt, however many bytes follow
        raise NotGGUF(f"{name} has a corrupt GGUF header ({exc})", "pull the model again") from None
    # With no tensors there is no data section to pad to: the header is the whole file.
    return metadata, tensors, data_start + data_end if tensors else stream.position


def _read_one(path: Path) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """(metadata, [(n_elements, ggml_type)]) of one GGUF file."""
    with path.open("rb") as handle:
        if handle.read(4) != MAGIC_BYTES:
            raise NotGGUF(f"{path.name} is not a GGUF file (bad magic bytes)", "pull a .gguf model file")
        handle.seek(0)
        try:
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                metadata, tensors, needed = parse_header(buffer, path.name)
        except NeedMoreBytes:
            raise NotGGUF(
                f"{path.name} has a truncated or corrupt GGUF header (EOFError)", "pull the model again"
            ) from None
    if needed > path.stat().st_size:
        raise NotGGUF(
            f"{path.name} is truncated: its tensors need {needed:,} bytes, the file has {path.stat().st_size:,}",
            "pull the model again",
        )
    return metadata, tensors


def _tensor_bytes(elements: int, ggml_type: int) -> int:
    """Bytes a tensor occupies (0 for types this gguf version does not know)."""
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return 0
    return elements // block_size * type_size


def quantization_of(metadata: dict[str, Any], tensors: list[tuple[int, int]]) -> str | None:
    file_type = metadata.get(Keys.General.FILE_TYPE)
    if file_type is not None:
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    # No file type: name the quantization that holds the most weights.
    by_type: Counter[int] = Counter()
    for elements, ggml_type in tensors:
        by_type[ggml_type] += elements
    if not by_type:
        return None
    ggml_type = by_type.most_common(1)[0][0]
    try:
        return GGMLQuantizationType(ggml_type).name if ggml_type in GGML_QUANT_SIZES else None
    except ValueError:
        return None


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """A GGUF file's scalar key/values (large arrays such as the vocabulary are skipped)."""
    return _read_one(path)[0]


def read_gguf_info(paths: list[Path]) -> GGUFInfo:
    """Facts about a model stored in one GGUF file or a list of split files (first split first)."""
    metadata, tensors = _read_one(paths[0])
    for extra in paths[1:]:
        tensors += _read_one(extra)[1]
    # A first split may hold no tensors (gguf-split --no-tensor-first-split); the model as a whole may not.
    if not any(elements for elements, _ in tensors):
        raise NotGGUF(
            f"{paths[0].name} holds no weights: it is a GGUF header without a model",
            "point at the model's full .gguf file",
        )
    arch = metadata.get(Keys.General.ARCHITECTURE)
    return GGUFInfo(
        architecture=arch,
        name=metadata.get(Keys.General.NAME),
        parameters=sum(elements for elements, _ in tensors),
        size_label=metadata.get(Keys.General.SIZE_LABEL),
        quantization=quantization_of(metadata, tensors),
        context_length=metadata.get(f"{arch}.context_length") if arch else None,
        chat_template=metadata.get(Keys.Tokenizer.CHAT_TEMPLATE),
        license=metadata.get(Keys.General.LICENSE),
        split_count=int(metadata.get(Keys.Split.LLM_KV_SPLIT_COUNT, 1)),
    )


def has_gguf_magic(path: Path) -> bool:
    """Whether a file starts with the GGUF magic bytes."""
    with path.open("rb") as handle:
        return handle.read(4) == MAGIC_BYTES


def kv_bytes_per_token(metadata: dict[str, Any]) -> int:
    """f16 K and V bytes per token of context, from a GGUF's attention shape."""
    arch = metadata.get(Keys.General.ARCHITECTURE, "")

    def number(key: str, default: int = 0) -> int:
        try:
            return int(metadata.get(f"{arch}.{key}", default))
        except (TypeError, ValueError):
            return default  # per-layer arrays: fall back to the first figure we know

    n_layers = number("block_count", 0)
    heads = number("attention.head_count", 1) or 1
    kv_heads = number("attention.head_count_kv", heads) or heads
    embd = number("embedding_length", 0)
    key_length = number("attention.key_length", embd // heads if embd else 128)
    value_length = number("attention.value_length", key_length)
    return n_layers * kv_heads * (key_length + value_length) * 2


def read_vocabulary(path: Path) -> list[bytes]:
    """A GGUF's token texts, in id order ([] when it has none): what a draft model must share with its target."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        try:
            stream = _header_stream(buffer, path.name)
            _tensors, kv_count = stream.unpack("Q"), stream.unpack("Q")
            for _ in range(kv_count):
                key = stream.string()
                vtype = GGUFValueType(stream.unpack("I"))
                if key != Keys.Tokenizer.LIST or vtype != GGUFValueType.ARRAY:
                    stream.value(vtype, False)
                    continue
                stream.unpack("I")  # the item type: strings
                tokens = []
                for _ in range(stream.unpack("Q")):
                    length = stream.unpack("Q")
                    tokens.append(bytes(buffer[stream.position : stream.position + length]))
                    stream.position += length
                return tokens
        except (EOFError, struct.error, ValueError):
            raise NotGGUF(f"{path.name} has a corrupt GGUF header", "pull the model again") from None
    return []


# As llama.cpp's speculative decoding allows: vocabularies may differ in size by padding tokens at the end.
VOCABULARY_SIZE_SLACK = 128
FIRST_COMPARED_TOKEN = 5  # the first few (special) ids may be laid out differently


def vocabulary_mismatch(target: Path, draft: Path) -> str | None:
    """Why `draft` cannot propose tokens for `target` (their vocabularies differ), or None when it can."""
    ours, theirs = read_vocabulary(target), read_vocabulary(draft)
    if not ours or not theirs:
        return "one of them has no vocabulary in its GGUF"
    if abs(len(ours) - len(theirs)) > VOCABULARY_SIZE_SLACK:
        return f"their vocabularies have {len(ours):,} and {len(theirs):,} tokens"
    for token in range(FIRST_COMPARED_TOKEN, min(len(ours), len(theirs))):
        if ours[token] != theirs[token]:
            return f"token {token} is {ours[token]!r} in one and {theirs[token]!r} in the other"
    return None
