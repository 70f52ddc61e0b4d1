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
        def __init__(
            self, path: Path, n_gpu_layers: int, use_extra_bufts: bool, gpu_split: GpuSplit, rpc: tuple[str, ...]
        ) -> None:
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


# --- finding a GPU the build cannot use ------------------------------------------------------

CPU_BUILD = ("libggml-base.so", "libggml-cpu.so", "libggml.so", "libllama.so", "libmtmd.so.0")
LINUX = ("Linux", "x86_64")
PYTHON = "/venv/bin/python"
REBUILD_TAIL = "-m pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36"


def _lib(tmp_path: Path, *names: str) -> Path:
    lib = tmp_path / "llama_cpp" / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    for name in names:
        (lib / name).write_bytes(b"")
    return lib


def _nvidia_proc(root: Path, model: str = "NVIDIA GeForce RTX 3090") -> None:
    gpu = root / "proc/driver/nvidia/gpus/0000:01:00.0"
    gpu.mkdir(parents=True)
    (gpu / "information").write_text(f"Model: \t\t {model}\nIRQ:   \t\t 150\nBus Type: \t PCIe\n")


def _script(folder: Path, name: str, body: str) -> str:
    """An executable `name` in `folder`; returns folder as a PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(folder)


def test_the_build_backends_come_from_its_library_names(tmp_path: Path) -> None:
    from sovereign.gpu_detect import build_backends

    assert build_backends(_lib(tmp_path, *CPU_BUILD)) == frozenset({"base", "cpu"})
    assert (build_backends(_lib(tmp_path, "libggml-cuda.so", "libggml-vulkan.so.0.9")) or frozenset()) >= {
        "cpu",
        "cuda",
        "vulkan",
    }
    assert build_backends(_lib(tmp_path / "mac", "libggml-cpu.dylib", "libggml-metal.dylib")) == frozenset(
        {"cpu", "metal"}
    )
    # No per-backend libraries (one static library), or no package at all: unknown, so no hint.
    assert build_backends(_lib(tmp_path / "static", "libllama.so")) is None
    assert build_backends(tmp_path / "missing") is None and build_backends(None) is None


def test_nvidia_from_proc(tmp_path: Path) -> None:
    from sovereign.gpu_detect import Gpu, present_gpus

    _nvidia_proc(tmp_path)
    assert present_gpus(tmp_path, str(tmp_path / "empty"), LINUX) == [Gpu("nvidia", "NVIDIA GeForce RTX 3090")]
    assert present_gpus(tmp_path / "nothing", str(tmp_path / "empty"), LINUX) == []


def test_nvidia_smi_on_path_names_each_gpu_with_its_memory(tmp_path: Path) -> None:
    from sovereign.gpu_detect import Gpu, present_gpus

    args = tmp_path / "args"
    path = _script(
        tmp_path / "bin",
        "nvidia-smi",
        f'echo "$@" > {args}\necho "NVIDIA H100 80GB HBM3, 81559 MiB"\necho "NVIDIA H100 80GB HBM3, 81559 MiB"',
    )
    found = present_gpus(tmp_path, path, LINUX)  # no /proc entry under this root, as in WSL
    assert found == [Gpu("nvidia", "NVIDIA H100 80GB HBM3, 81559 MiB")] * 2
    assert args.read_text().split() == ["--query-gpu=name,memory.total", "--format=csv,noheader"]


def test_a_failing_or_hanging_nvidia_smi_falls_back_to_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sovereign import gpu_detect

    _nvidia_proc(tmp_path, "Tesla T4")
    failing = _script(tmp_path / "failing", "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    assert gpu_detect.present_gpus(tmp_path, failing, LINUX) == [gpu_detect.Gpu("nvidia", "Tesla T4")]
    monkeypatch.setattr(gpu_detect, "NVIDIA_SMI_TIMEOUT_SECONDS", 0.3)
    hanging = _script(tmp_path / "hanging", "nvidia-smi", "exec sleep 30")
    assert gpu_detect.present_gpus(tmp_path, hanging, LINUX) == [gpu_detect.Gpu("nvidia", "Tesla T4")]


def test_amd_from_dev_kfd_with_its_gfx_target(tmp_path: Path) -> None:
    from sovereign.gpu_detect import Gpu, amd_target, present_gpus

    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kfd").write_bytes(b"")
    assert present_gpus(tmp_path, str(tmp_path / "empty"), LINUX) == [Gpu("amd", "AMD GPU")]
    nodes = tmp_path / "sys/class/kfd/kfd/topology/nodes"
    for node, version in (("0", 0), ("1", 110000)):  # node 0 is the CPU
        (nodes / node).mkdir(parents=True)
        (nodes / node / "properties").write_text(f"cpu_cores_count 8\ngfx_target_version {version}\n")
    assert present_gpus(tmp_path, str(tmp_path / "empty"), LINUX) == [Gpu("amd", "AMD GPU (gfx1100)")]
    (nodes / "1" / "properties").write_text("gfx_target_version 90010\n")
    assert amd_target(tmp_path) == "gfx90a"


def test_apple_silicon_is_its_platform(tmp_path: Path) -> None:
    from sovereign.gpu_detect import Gpu, present_gpus

    assert present_gpus(tmp_path, str(tmp_path), ("Darwin", "arm64")) == [Gpu("apple", "Apple Silicon GPU")]
    assert present_gpus(tmp_path, str(tmp_path), ("Darwin", "x86_64")) == []


def test_the_hint_line_for_nvidia_on_a_cpu_build(tmp_path: Path) -> None:
    from sovereign.gpu_detect import gpu_hint

    path = _script(tmp_path / "bin", "nvidia-smi", 'echo "NVIDIA GeForce RTX 4090, 24564 MiB"')
    line = gpu_hint(tmp_path, path, _lib(tmp_path, *CPU_BUILD), LINUX, PYTHON)
    assert line == (
        "this llama.cpp build cannot use this machine's GPU (NVIDIA GeForce RTX 4090, 24564 MiB); rebuild it for"
        ' the GPU (5-30 minutes): CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on" /venv/bin/python ' + REBUILD_TAIL
    )
    # A CUDA or a Vulkan build uses it: nothing to say.
    assert gpu_hint(tmp_path, path, _lib(tmp_path / "cuda", *CPU_BUILD, "libggml-cuda.so"), LINUX) is None
    assert gpu_hint(tmp_path, path, _lib(tmp_path / "vk", *CPU_BUILD, "libggml-vulkan.so"), LINUX) is None


def test_the_hint_names_how_many_gpus_and_the_amd_and_apple_commands(tmp_path: Path) -> None:
    from sovereign.gpu_detect import gpu_hint

    cpu = _lib(tmp_path, *CPU_BUILD)
    path = _script(tmp_path / "bin", "nvidia-smi", 'echo "Tesla T4, 15360 MiB"; echo "Tesla T4, 15360 MiB"')
    assert "(Tesla T4, 15360 MiB, and 1 more)" in (gpu_hint(tmp_path, path, cpu, LINUX) or "")
    amd = tmp_path / "amd"
    (amd / "dev").mkdir(parents=True)
    (amd / "dev/kfd").write_bytes(b"")
    line = gpu_hint(amd, str(tmp_path / "empty"), cpu, LINUX, PYTHON) or ""
    assert line.startswith("this llama.cpp build cannot use this machine's GPU (AMD GPU);")
    assert 'HIPCXX="$(hipconfig -l)/clang"' in line and "-DGGML_HIP=on -DAMDGPU_TARGETS=gfx1100 -DGGML_RPC=on" in line
    mac = ("Darwin", "arm64")
    assert '"-DGGML_METAL=on -DGGML_RPC=on" /venv/bin/python ' + REBUILD_TAIL in (
        gpu_hint(tmp_path, "", _lib(tmp_path / "m", "libggml-cpu.dylib"), mac, PYTHON) or ""
    )
    assert gpu_hint(tmp_path, "", _lib(tmp_path / "m2", "libggml-cpu.dylib", "libggml-metal.dylib"), mac) is None


def test_no_gpu_or_an_unknown_build_says_nothing(tmp_path: Path) -> None:
    from sovereign.gpu_detect import gpu_hint

    assert gpu_hint(tmp_path, str(tmp_path), _lib(tmp_path, *CPU_BUILD), LINUX) is None
    _nvidia_proc(tmp_path)
    assert gpu_hint(tmp_path, str(tmp_path), _lib(tmp_path / "static", "libllama.so"), LINUX) is None


def test_this_machine_is_checked_without_loading_llama_cpp() -> None:
    import subprocess
    import sys

    code = "import sys; from sovereign.gpu_detect import gpu_hint; gpu_hint(); print('llama_cpp' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_the_hint_is_shown_on_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from sovereign.cli.gpu_hint import gpu_hint_in_background

    monkeypatch.setattr("sovereign.gpu_detect.gpu_hint", lambda: "a line")
    shown: list[str] = []
    gpu_hint_in_background(shown.append).join(5)
    assert shown == ["a line"]
    monkeypatch.setattr("sovereign.gpu_detect.gpu_hint", lambda: None)
    gpu_hint_in_background(shown.append).join(5)
    assert shown == ["a line"]


def test_bench_prints_the_hint_once_before_it_measures(monkeypatch: pytest.MonkeyPatch) -> None:
    from sovereign.cli import bench as cli_bench

    monkeypatch.setattr("sovereign.gpu_detect.gpu_hint", lambda: "this llama.cpp build cannot use [the GPU]")
    monkeypatch.setattr(cli_bench, "bench", lambda *args: None)
    result = CliRunner().invoke(app, ["bench", "m"])
    assert result.output.count("tip: this llama.cpp build cannot use [the GPU]") == 1, result.output
    assert "tip:" not in CliRunner().invoke(app, ["bench", "--url", "http://127.0.0.1:1"]).output


# --- scripts/gpu_check.sh -------------------------------------------------------------------

GPU_CHECK = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


@pytest.mark.parametrize("smi", ["missing", "failing"])
def test_gpu_check_is_harmless_without_a_gpu(tmp_path: Path, smi: str) -> None:
    import shutil
    import subprocess
    import time

    # A PATH of only what the script needs before its GPU check, so a real nvidia-smi on the machine is not seen;
    # or a broken nvidia-smi (a driver that does not answer) in front of everything.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("dirname",):
        (tools / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    path = str(tools)
    if smi == "failing":
        path = _script(tmp_path / "smi", "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9") + ":" + path
    bash = shutil.which("bash") or "/bin/bash"
    started = time.monotonic()
    done = subprocess.run(
        [bash, str(GPU_CHECK)], env={"PATH": path}, capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "gpu_check: no NVIDIA GPU here (no working nvidia-smi): nothing to check"
    ]
    assert time.monotonic() - started < 10


def test_the_load_line_says_where_the_layers_are() -> None:
    from sovereign.engine.pool import _gpu_note
    from sovereign.engine.process import ModelFacts

    def facts(n_gpu_layers: int) -> ModelFacts:
        return ModelFacts(0, 4096, 8192, 100, 1, 30, n_gpu_layers, 2, 1, 2, True, "<s>", "</s>")

    assert _gpu_note(facts(0)) == "all layers on the CPU"
    assert _gpu_note(facts(31)) == "31/31 layers on the GPU"


def test_bench_load_runs_both_servers_with_the_same_gpu_layers() -> None:
    from scripts._servers import llama_server_command, sovereign_command

    ours = sovereign_command("m", 2, 2048, 32, gpu_layers=99)
    theirs = llama_server_command("llama-server", Path("m.gguf"), "m", 2, 2048, 32, gpu_layers=99)
    assert ours[ours.index("--gpu-layers") + 1] == "99" and theirs[theirs.index("-ngl") + 1] == "99"
    assert sovereign_command("m", 2, 2048)[-1] == "0"  # the CPU, as before
