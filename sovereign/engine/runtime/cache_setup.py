"""How big a model's prompt cache may be, and under which key its files live (runtime/prompt_cache.py)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from sovereign.engine.runtime.disk_cache import DiskTier
from sovereign.engine.runtime.prompt_cache import PromptCache
from sovereign.engine.wire import LoadOptions
from sovereign.machine import available_memory, build_identity

if TYPE_CHECKING:
    from sovereign.engine.runtime.backend import LlamaBackend

log = logging.getLogger(__name__)

GIB = 1 << 30
# Memory: llama-server's --cache-ram default, or a quarter of what is free when the model loads, if less.
RAM_DEFAULT_CAP, RAM_SHARE = 8 * GIB, 0.25
# Disk: 16 GiB, or a quarter of the free space under the cache's folder, if less.
DISK_DEFAULT_CAP, DISK_SHARE = 16 * GIB, 0.25
FORMAT = 1  # bump when what a file holds changes: old files then belong to no key and are never read


def default_ram_budget() -> int:
    """The memory the prompt cache may take when --cache-ram is not given."""
    free = available_memory()
    return min(RAM_DEFAULT_CAP, int(free * RAM_SHARE)) if free else RAM_DEFAULT_CAP


def default_disk_budget(folder: Path) -> int:
    """The disk space the prompt cache may take when --cache-disk is not given."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return 0
    return min(DISK_DEFAULT_CAP, int(free * DISK_SHARE))


def cache_key(backend: LlamaBackend, options: LoadOptions) -> str:
    """Sixteen hex digits naming all that decides a saved state's bytes: model file, build, cache layout."""
    model = options.model_id or _file_identity(backend.path)
    layout = f"swa={backend.n_swa} swa_full=1 unified=1 kv=f16 seq_max={backend.n_parallel + 1}"
    text = f"format={FORMAT}|{model}|{build_identity()}|{layout}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_prompt_cache(backend: LlamaBackend, options: LoadOptions) -> PromptCache | None:
    """The model's prompt cache, as the options size it; None when it is off or the model cannot have one."""
    if backend.states is None:
        return None
    ram = options.cache_ram if options.cache_ram is not None else default_ram_budget()
    disk = None
    if options.cache_dir and options.cache_disk != 0:
        root = Path(options.cache_dir)
        budget = options.cache_disk if options.cache_disk is not None else default_disk_budget(root)
        if budget > 0:
            disk = DiskTier(root, cache_key(backend, options), budget)
            disk.open()
    if ram <= 0 and disk is None:
        return None
    log.info(
        "prompt cache: %d MiB in memory, %s on disk",
        max(ram, 0) // (1 << 20),
        f"{disk.budget // (1 << 20)} MiB" if disk else "nothing",
    )
    return PromptCache(max(ram, 0), windowed=backend.states.windowed, disk=disk)


def _file_identity(path: Path) -> str:
    """A model file named by where it is, its size and its time (when the server did not pass its sha256)."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
