"""GPUs: the multi-GPU options of serve, run and bench, and how they reach llama.cpp's model params (no real model)."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from sovereign.cli import app
from sovereign.cli.device_options import gpu_split, parse_tensor_split
from sovereign.engine.runtime import resources
from sovereign.engine.wire import (
    MAX_DEVICES,
    GpuSplit,
    LoadOptions,
    SplitMode,
    load_options_from_wire,
    load_options_to_wire,
)
from sovereign.errors import ModelLoadError, SovereignError
from tests.conftest import assert_clean_error, run_cli

# --- the options ----------------------------------------------------------------------------


def test_tensor_split_parses_proportions() -> None:
    assert parse_tensor_split("3,1") == (3.0, 1.0)
    assert parse_tensor_split(" 0.5, 0.25 ,0.25") == (0.5, 0.25, 0.25)
    assert parse_tensor_split(None) == () and parse_tensor_split("") == ()
    assert gpu_split("1,0", 1, SplitMode.row) == GpuSplit(SplitMode.row, 1, (1.0, 0.0))


@pytest.mark.parametrize("text", ["3,a", "-1,2", "0,0", "nan,1", "inf", "1,,2", ",".join(["1"] * (MAX_DEVICES + 1))])
def test_bad_tensor_split_is_refused(text: str) -> None:
    with pytest.raises(SovereignError, match="--tensor-split"):
        parse_tensor_split(text)


@pytest.mark.parametrize("main_gpu", [-1, MAX_DEVICES])
def test_bad_main_gpu_is_refused(main_gpu: int) -> None:
    with pytest.raises(SovereignError, match="--main-gpu"):
        gpu_split(None, main_gpu, SplitMode.layer)


def test_the_split_crosses_the_wire_with_its_types() -> None:
    options = LoadOptions(n_gpu_layers=99, gpu_split=GpuSplit(SplitMode.none, 1, (3.0, 1.0)))
    back = load_options_from_wire(json.loads(json.dumps(load_options_to_wire(options))))
    assert back == options and isinstance(back.gpu_split.tensor_split, tuple)
    assert back.gpu_split.mode is SplitMode.none
    assert load_options_from_wire(load_options_to_wire(LoadOptions())) == LoadOptions()


@pytest.mark.parametrize("command", ["serve", "run", "bench"])
def test_every_command_has_the_same_options_and_help(command: str) -> None:
    shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"}).output
    for option in ("--gpu-layers", "--tensor-split", "--main-gpu", "--split-mode"):
        assert option in shown, (command, option)
    assert "each GPU's share of the model" in shown and "layer|row|none" in shown.replace("[", "").replace("]", "")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "nosuch:model", "hi", "--tensor-split", "3,a"], "--tensor-split"),
        (["serve", "nosuch:model", "--tensor-split", "-1,2"], "--tensor-split"),
        (["bench", "nosuch:model", "--main-gpu", "99"], "--main-gpu"),
    ],
)
def test_bad_values_are_one_clean_line(args: list[str], fragment: str) -> None:
    # The options are checked before the model is looked for: the error names the option, not the model.
    assert_clean_error(run_cli(*args), fragment)


def test_an_unknown_split_mode_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["run", "x", "--split-mode", "columns"])
    assert result.exit_code == 2 and "--split-mode" in result.output


class _Stop(SovereignError):
    """Raised by a fake pool: the options got as far as the engine."""


def _capture_pool(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Stop serve/run where they build the pool, keeping the PoolOptions they built."""
    from sovereign.cli import launch

    seen: list[Any] = []

    def fake_pool(store: Any, catalog: Any, options: Any) -> Any:
        seen.append(options)
        raise _Stop("stopped before loading", None)

    monkeypatch.setattr(launch, "ModelPool", fake_pool)
    monkeypatch.setattr(launch, "ensure_pulled", lambda name, *rest: name)
    monkeypatch.setattr(launch, "check_port_free", lambda host, port: None)
    monkeypatch.setattr("sovereign.cli.upgrade_hint.hint_in_background", lambda *args: None)
    return seen


@pytest.mark.parametrize("command", [["serve", "some:model"], ["run", "some:model", "hi"]])
def test_serve_and_run_pass_the_split_to_the_load_options(monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    seen = _capture_pool(monkeypatch)
    args = [*command, "--gpu-layers", "99", "--tensor-split", "3,1", "--main-gpu", "1"]
    result = CliRunner().invoke(app, [*args, "--split-mode", "row"])
    assert "stopped before loading" in result.output, result.output
    load = seen[0].load
    assert load.n_gpu_layers == 99 and load.gpu_split == GpuSplit(SplitMode.row, 1, (3.0, 1.0))


def test_the_defaults_leave_llama_cpp_to_split(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_pool(monkeypatch)
    CliRunner().invoke(app, ["run", "some:model", "hi"])
    assert seen[0].load.gpu_split == GpuSplit()


def test_bench_passes_the_split_to_every_model_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sovereign.bench import model_bench
    from sovereign.cli import bench as cli_bench

    got: list[Any] = []
    monkeypatch.setattr(cli_bench, "bench", lambda options, *rest: got.append(options))
    result = CliRunner().invoke(app, ["bench", "m", "-ngl", "0,99", "--tensor-split", "1,1", "--split-mode", "none"])
    assert result.exit_code == 0, result.output
    split = got[0].gpu_split
    assert split == GpuSplit(SplitMode.none, 0, (1.0, 1.0))

    loads: list[tuple[int, GpuSplit]] = []

    class FakeBenchModel:
        def __init__(self, path: Path, n_gpu_layers: int, use_extra_bufts: bool, gpu_split: GpuSplit) -> None:
            loads.append((n_gpu_layers, gpu_split))
            raise _Stop("loaded", None)

    monkeypatch.setattr(model_bench, "BenchModel", FakeBenchModel)
    sweep = model_bench.Sweep(threads=(1,), n_gpu_layers=(0, 99), gpu_split=split)
    with pytest.raises(_Stop):
        list(model_bench.run_sweep(tmp_path / "m.gguf", "m", sweep, bandwidth=None, gpu_offload=True))
    assert loads == [(0, split)]


# --- llama_model_params ---------------------------------------------------------------------


def _fake_llama() -> Any:
    return SimpleNamespace(LLAMA_MAX_DEVICES=MAX_DEVICES)


def _params() -> Any:
    return SimpleNamespace(split_mode=1, main_gpu=0, tensor_split=None)


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int, offload: bool = True) -> None:
    found = [resources.Device(f"CUDA{i}", "GPU", "gpu", 1 << 30, 1 << 30) for i in range(count)]
    monkeypatch.setattr(resources, "devices", lambda: [resources.Device("CPU", "cpu", "cpu", 0, 0), *found])
    monkeypatch.setattr(resources, "gpu_offload_supported", lambda: offload)


def test_a_cpu_build_keeps_llama_cpp_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 0, offload=False)
    params = _params()
    assert resources.apply_gpu_split(_fake_llama(), params, GpuSplit(SplitMode.none, 3, (1.0, 2.0))) is None
    assert params == _params()


def test_the_split_is_set_on_the_model_params(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 2)
    params = _params()
    kept = resources.apply_gpu_split(_fake_llama(), params, GpuSplit(SplitMode.row, 1, (3.0, 1.0)))
    assert params.split_mode == 2 and params.main_gpu == 1
    assert kept is params.tensor_split and len(kept) == MAX_DEVICES
    assert list(kept)[:3] == [3.0, 1.0, 0.0] and isinstance(kept, ctypes.Array)
    params = _params()
    assert resources.apply_gpu_split(_fake_llama(), params, GpuSplit(SplitMode.none, 1)) is None
    assert params.split_mode == 0 and params.tensor_split is None  # NULL: llama.cpp splits by free memory


def test_a_main_gpu_that_is_not_there_fails_the_load_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 2)
    with pytest.raises(ModelLoadError, match="--main-gpu 2"):
        resources.apply_gpu_split(_fake_llama(), _params(), GpuSplit(SplitMode.none, 2))
