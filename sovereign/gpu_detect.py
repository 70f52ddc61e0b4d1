"""A GPU this llama.cpp build cannot use: find it, and say in one line how to rebuild for it.

The default install builds llama.cpp for the CPU only, and nothing else says so: `serve` just reports
0 GPU layers. Both checks here read files and run `nvidia-smi` at most, never a GPU's own libraries
or llama.cpp, so the server's process may ask: the GPU from /proc/driver/nvidia, nvidia-smi, /dev/kfd
(AMD ROCm) or the Apple Silicon platform; the build's backends from the libggml-<backend> libraries
in llama_cpp/lib, found without importing llama_cpp. The roots are parameters, for tests.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NVIDIA_SMI_TIMEOUT_SECONDS = 10.0  # a wedged driver can hang nvidia-smi: no hint is better than a stuck thread
DEFAULT_LLAMA_CPP_VERSION = "0.3.36"  # pyproject's pin, for when the installed metadata cannot say

# The build's backends that drive each vendor's GPUs (Vulkan drives NVIDIA's and AMD's too).
USABLE_BY = {"nvidia": {"cuda", "vulkan"}, "amd": {"hip", "vulkan"}, "apple": {"metal"}}
# What to rebuild with: the README's "GPUs" section explains each (RPC stays on, as the README's install has it).
CMAKE_ARGS = {
    "nvidia": "-DGGML_CUDA=on -DGGML_RPC=on",
    "amd": "-DGGML_HIP=on -DAMDGPU_TARGETS={target} -DGGML_RPC=on",
    "apple": "-DGGML_METAL=on -DGGML_RPC=on",
}
_LIBRARY = re.compile(r"^(?:lib)?ggml-([a-z0-9]+)\.(?:so|dylib|dll)")


@dataclass(frozen=True)
class Gpu:
    """A GPU the operating system shows: its vendor ("nvidia", "amd", "apple") and what it is called."""

    vendor: str
    name: str


def nvidia_gpus(root: Path, path: str | None) -> list[Gpu]:
    """NVIDIA GPUs: nvidia-smi's names and memory where it is on PATH (WSL has no /proc entry), else /proc's."""
    smi = shutil.which("nvidia-smi", path=path)
    if smi is not None:
        try:
            done = subprocess.run(
                [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=NVIDIA_SMI_TIMEOUT_SECONDS,
            )
        except (OSError, subprocess.SubprocessError):
            done = None
        if done is not None and done.returncode == 0:
            found = [Gpu("nvidia", line.strip()) for line in done.stdout.splitlines() if line.strip()]
            if found:
                return found
    found = []
    for information in sorted((root / "proc/driver/nvidia/gpus").glob("*/information")):
        model = next((line.partition(":")[2].strip() for line in _lines(information) if line.startswith("Model:")), "")
        found.append(Gpu("nvidia", model or "an NVIDIA GPU"))
    return found


def amd_target(root: Path) -> str | None:
    """The first AMD GPU's gfx target (e.g. gfx1100) from the ROCm driver's topology, for -DAMDGPU_TARGETS."""
    for properties in sorted((root / "sys/class/kfd/kfd/topology/nodes").glob("*/properties")):
        for line in _lines(properties):
            key, _, value = line.partition(" ")
            if key == "gfx_target_version" and value.strip().isdigit() and int(value) > 0:
                version = int(value)  # e.g. 110000 -> gfx1100, 90010 -> gfx90a
                return f"gfx{version // 10000}{version // 100 % 100}{version % 100:x}"
    return None


def present_gpus(root: Path = Path("/"), path: str | None = None, machine: tuple[str, str] | None = None) -> list[Gpu]:
    """The GPUs this machine shows; `machine` is (platform.system(), platform.machine()), given in tests."""
    system, arch = machine or (platform.system(), platform.machine())
    if system == "Darwin" and arch == "arm64":
        return [Gpu("apple", "Apple Silicon GPU")]
    found = nvidia_gpus(root, path)
    if (root / "dev/kfd").exists():
        target = amd_target(root)
        found.append(Gpu("amd", f"AMD GPU ({target})" if target else "AMD GPU"))
    return found


def llama_cpp_lib_dir() -> Path | None:
    """llama_cpp/lib of the installed package, found without importing it (importing loads its libraries)."""
    spec = importlib.util.find_spec("llama_cpp")
    return Path(spec.origin).parent / "lib" if spec and spec.origin else None


def build_backends(lib_dir: Path | None) -> frozenset[str] | None:
    """The ggml backends this build ships (e.g. {"cpu", "cuda"}); None where its libraries cannot be told apart."""
    if lib_dir is None or not lib_dir.is_dir():
        return None
    found = frozenset(match.group(1) for entry in lib_dir.iterdir() if (match := _LIBRARY.match(entry.name)))
    # A build that links its backends into one library shows no libggml-cpu: there its GPU support is unknown.
    return found if "cpu" in found else None


def pinned_version() -> str:
    """The llama-cpp-python version sovereign pins (its own requirement), to rebuild exactly that one."""
    try:
        for requirement in importlib.metadata.requires("sovereign") or []:
            name, _, version = requirement.partition("==")
            if name.strip().lower().replace("_", "-") == "llama-cpp-python" and version:
                return version.split(";")[0].strip()
    except importlib.metadata.PackageNotFoundError:
        pass
    return DEFAULT_LLAMA_CPP_VERSION


def rebuild_command(vendor: str, target: str | None = None, python: str = sys.executable) -> str:
    """The pip command that rebuilds llama-cpp-python for this vendor's GPUs, past pip's cached CPU wheel.

    pip is this interpreter's (`python -m pip`): the rebuild must land where sovereign runs, whatever is on PATH.
    """
    args = CMAKE_ARGS[vendor].format(target=target or "gfx1100")
    prefix = 'HIPCXX="$(hipconfig -l)/clang" HIP_PATH="$(hipconfig -R)" ' if vendor == "amd" else ""
    return (
        f'{prefix}CMAKE_ARGS="{args}" {python} -m pip install --no-cache-dir --force-reinstall --no-deps '
        f"llama-cpp-python=={pinned_version()}"
    )


def gpu_hint(
    root: Path = Path("/"),
    path: str | None = None,
    lib_dir: Path | None = None,
    machine: tuple[str, str] | None = None,
    python: str = sys.executable,
) -> str | None:
    """The one line for a GPU this build cannot use, or None (no GPU, a build that uses it, or a build not known)."""
    backends = build_backends(lib_dir if lib_dir is not None else llama_cpp_lib_dir())
    if backends is None:
        return None
    gpus = present_gpus(root, path, machine)
    unused = [gpu for gpu in gpus if not USABLE_BY[gpu.vendor] & backends]
    if not unused:
        return None
    first = unused[0]
    more = sum(1 for gpu in unused if gpu.vendor == first.vendor) - 1
    named = first.name + (f", and {more} more" if more else "")
    target = amd_target(root) if first.vendor == "amd" else None
    return (
        f"this llama.cpp build cannot use this machine's GPU ({named}); rebuild it for the GPU (5-30 minutes): "
        f"{rebuild_command(first.vendor, target, python)}"
    )


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []
