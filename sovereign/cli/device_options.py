"""Where a model's layers go: the device options `serve`, `run` and `bench` share, defined and parsed once.

Each option is one Annotated type (same name, same help in every command) and `gpu_split` turns
their values into the engine's GpuSplit, so a bad value gives the same one line wherever it is typed.
`--rpc` adds other machines' devices (`sovereign worker`) to the GPUs these options split over.
"""

from __future__ import annotations

import math
from typing import Annotated

import typer

from sovereign.engine.wire import MAX_DEVICES, GpuSplit, SplitMode
from sovereign.errors import SovereignError

TensorSplitOption = Annotated[
    str | None,
    typer.Option(
        "--tensor-split",
        help=(
            "With several GPUs: each GPU's share of the model, comma-separated proportions (e.g. 3,1 puts three"
            " quarters on GPU 0; default: by free memory)."
        ),
    ),
]
MainGpuOption = Annotated[
    int,
    typer.Option(
        "--main-gpu",
        help="With several GPUs: the GPU that holds the whole model with --split-mode none (counted from 0).",
    ),
]
SplitModeOption = Annotated[
    SplitMode,
    typer.Option(
        "--split-mode",
        help=(
            "With several GPUs: layer: whole layers per GPU; row: each layer's rows across the GPUs; none: one GPU"
            " (--main-gpu)."
        ),
    ),
]


RpcOption = Annotated[
    str | None,
    typer.Option(
        "--rpc",
        help=(
            "Spread the model over other machines running `sovereign worker`: HOST:PORT, comma-separated. Every"
            " layer goes to the workers, split by their free memory (--tensor-split to choose; --gpu-layers N sends"
            " only the last N and keeps the rest here)."
        ),
    ),
]


def rpc_servers(text: str | None) -> tuple[str, ...]:
    """The --rpc workers as host:port strings; one line when the value or this llama.cpp build cannot serve them."""
    from sovereign.engine.rpc_workers import build_supports_rpc, no_rpc_error, parse_endpoints

    if text is None:
        return ()
    endpoints = parse_endpoints(text)
    if not build_supports_rpc():
        raise no_rpc_error()
    return tuple(str(endpoint) for endpoint in endpoints)


def parse_tensor_split(text: str | None) -> tuple[float, ...]:
    """'3,1' -> (3.0, 1.0); None or '' -> () (llama.cpp splits by free memory)."""
    if text is None or not text.strip():
        return ()
    example = "for example --tensor-split 3,1 (three quarters on GPU 0, a quarter on GPU 1)"
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise SovereignError(f"--tensor-split takes numbers separated by commas, not '{text}'", example) from None
    if any(not math.isfinite(value) or value < 0 for value in values) or not any(values):
        raise SovereignError(
            f"--tensor-split needs proportions of 0 or more, one above 0 at least, not '{text}'", example
        )
    if len(values) > MAX_DEVICES:
        raise SovereignError(f"--tensor-split lists {len(values)} GPUs; llama.cpp takes at most {MAX_DEVICES}", example)
    return values


def gpu_split(tensor_split: str | None, main_gpu: int, split_mode: SplitMode) -> GpuSplit:
    """The engine's GpuSplit for the three options as typed, refused in one line when a value makes no sense."""
    if not 0 <= main_gpu < MAX_DEVICES:
        raise SovereignError(
            f"--main-gpu must be a GPU's index from 0 to {MAX_DEVICES - 1}, got {main_gpu}",
            "0 is the first GPU in llama.cpp's start-up log",
        )
    return GpuSplit(mode=split_mode, main_gpu=main_gpu, tensor_split=parse_tensor_split(tensor_split))
