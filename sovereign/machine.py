"""What this machine has, as the OS tells it: CPU, physical cores, free memory; and which llama.cpp build is installed.

Nothing here loads llama.cpp: both the server's process and a model's process ask.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores (hyper-threads share one core's arithmetic units, so they don't speed up decoding)."""
    cores: set[tuple[str, str]] = set()
    physical = core = ""
    for key, value in cpuinfo():  # one record per logical CPU, records separated by blank lines
        if key == "physical id":
            physical = value
        elif key == "core id":
            core = value
        elif not key and core:
            cores.add((physical, core))
            physical = core = ""
    if core:
        cores.add((physical, core))
    if cores:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else len(cores)
        return max(1, min(len(cores), usable))
    return max(1, os.cpu_count() or 1)


def cpuinfo() -> list[tuple[str, str]]:
    """(key, value) of every line of Linux's /proc/cpuinfo, stripped; [] where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [(key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in text.splitlines())]


def proc_kib(path: str, key: str) -> int | None:
    """A "Key:   123 kB" figure of a Linux /proc file, in bytes; None where there is none."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping, if the OS says."""
    if (available := proc_kib("/proc/meminfo", "MemAvailable")) is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def build_identity() -> str:
    """llama-cpp-python's version and a hash of its shared libraries' names, sizes and times (a rebuild changes it)."""
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    spec = importlib.util.find_spec("llama_cpp")  # finds the package without loading its libraries
    digest = hashlib.sha256()
    if spec and spec.origin:
        lib = Path(spec.origin).parent / "lib"
        for library in sorted(lib.glob("*")) if lib.is_dir() else ():
            if library.suffix in (".so", ".dylib", ".dll") or ".so." in library.name:
                stat = library.stat()
                digest.update(f"{library.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return f"llama-cpp-python {version}, libraries {digest.hexdigest()[:12]}"
