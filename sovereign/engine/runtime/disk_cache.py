"""The prompt cache's disk tier: saved states of long prompts as files, so they outlive the process.

Files live in `$SOVEREIGN_HOME/cache/prompts/<key>/`, where the key names everything that decides
the bytes of a state: the model file's sha256, the llama.cpp build, and the cache's layout. A state
is only ever read back by the same model under the same build. Each file is written whole under a
temporary name, then renamed, so two servers sharing a home never see half a file; a file that is
short, damaged or of another key is deleted with one log line when it is found. Writing happens on
a thread of its own, never on the decode path. A full disk or a home that cannot be written turns
the tier off for the process, with one warning.

File layout: MAGIC, a 4-byte header length, a JSON header, the tokens (int32, little-endian), the
whole state, then each checkpoint's state. The header holds the CRC-32 of everything after it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sovereign.engine.runtime.kv_state import state_bytes, state_from
from sovereign.engine.runtime.prompt_cache import CacheEntry, Checkpoint

log = logging.getLogger(__name__)

MAGIC = b"SOVKV\x00\x00\x01"
SUFFIX = ".kv"
MIN_TOKENS = 1024  # shorter prompts are read again quickly enough: not worth a file
PENDING_WRITES = 2  # entries waiting for the writer; more are not written (their memory is the RAM tier's)
STALE_TEMPORARY_SECONDS = 3600.0  # a temporary file this old was left by a process that died mid-write
WRITER_NICENESS = 10  # the writer's checksums and copies yield the CPU to llama.cpp's threads
_LENGTH = struct.Struct("<I")
# The OS errors that mean "this home cannot take cache files": the tier is turned off rather than retried.
_UNWRITABLE = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


class DiskTier:
    """One model's cache files, and a writer thread; its index is used from the scheduler's thread."""

    def __init__(self, root: Path, key: str, budget: int) -> None:
        self.root = root
        self.key = key
        self.folder = root / key
        self.budget = budget
        self.enabled = True
        self._index: dict[str, CacheEntry] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[CacheEntry | None] = queue.Queue(maxsize=PENDING_WRITES)
        self._writer: threading.Thread | None = None
        self.written_bytes = 0
        self.on_written: Callable[[], None] | None = None  # told after each write (the figures /metrics shows)

    # --- the scheduler's side ---------------------------------------------------------

    def open(self) -> None:
        """Make the folder, index the files in it (deleting bad ones), and start the writer."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".probe.{os.getpid()}.tmp"  # a read-only home says so now, not at the first write
            probe.write_bytes(b"")
            probe.unlink()
            paths = sorted(self.folder.iterdir())
        except OSError as exc:
            self._turn_off(exc)
            return
        for path in paths:
            if path.suffix == SUFFIX:
                entry = self._read_index(path)
                if entry is not None:
                    self._index[path.name] = entry
            elif ".tmp" in path.name:
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                        path.unlink()
        self._writer = threading.Thread(target=self._write_forever, name=f"prompt-cache:{self.key}", daemon=True)
        self._writer.start()
        if self._index:
            log.info("prompt cache: %d entries on disk in %s", len(self._index), self.folder)

    def entries(self) -> list[CacheEntry]:
        """The entries on disk (tokens only; `load` reads a state)."""
        with self._lock:
            return list(self._index.values())

    @property
    def bytes(self) -> int:
        """Bytes of this model's files."""
        with self._lock:
            return sum(entry.size for entry in self._index.values())

    def submit(self, entry: CacheEntry) -> None:
        """Write an entry in the background (long prompts only; skipped when the writer is behind)."""
        if not self.enabled or len(entry) < MIN_TOKENS or entry.state is None:
            return
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            log.debug("prompt cache: the disk writer is busy; an entry of %d tokens stays in memory only", len(entry))

    def load(self, entry: CacheEntry) -> CacheEntry | None:
        """An entry with its states read from disk; None (and the file deleted) when it is damaged."""
        name = entry.disk_name or ""
        path = self.folder / name
        try:
            with path.open("rb") as file:
                data = bytearray(path.stat().st_size)
                if file.readinto(data) != len(data):
                    raise ValueError("the file is shorter than its header says")
            loaded = _parse(data, self.key)
        except FileNotFoundError:  # another server sharing this home evicted it
            self._forget(name)
            return None
        except (OSError, ValueError) as exc:
            log.warning("prompt cache: %s is damaged (%s); deleting it", path.name, exc)
            self._delete(name)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # its age is when it was last used: the least recently used goes first
        loaded.disk_name, loaded.tier = name, "disk"
        return loaded

    def discard(self, entry: CacheEntry) -> None:
        """Delete an entry that would not restore (a state of another shape under the right key)."""
        if entry.disk_name:
            log.warning("prompt cache: %s did not restore; deleting it", entry.disk_name)
            self._delete(entry.disk_name)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the writes under way (within `timeout`), then stop the writer."""
        if self._writer is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._writer.join(timeout)

    # --- the writer's side ------------------------------------------------------------

    def _write_forever(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # (Linux: a thread's own priority) decoding comes first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        while (entry := self._queue.get()) is not None:
            if not self.enabled:
                continue
            try:
                self._write(entry)
            except OSError as exc:
                if exc.errno in _UNWRITABLE:
                    self._turn_off(exc)
                else:
                    log.warning("prompt cache: could not write an entry of %d tokens: %s", len(entry), exc)
            except Exception:
                log.exception("prompt cache: writing an entry failed")

    def _write(self, entry: CacheEntry) -> None:
        tokens = np.ascontiguousarray(entry.tokens, dtype="<i4")
        name = hashlib.sha256(self.key.encode() + tokens.tobytes()).hexdigest()[:32] + SUFFIX
        path = self.folder / name
        if path.exists():
            os.utime(path)
            return
        assert entry.state is not None
        checkpoints = [c for c in entry.checkpoints if c.state is not None]
        parts = [memoryview(tokens.tobytes()), state_bytes(entry.state)]
        parts += [state_bytes(c.state) for c in checkpoints if c.state is not None]
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        header = json.dumps(
            {
                "key": self.key,
                "tokens": len(tokens),
                "state": len(entry.state),
                "checkpoints": [[c.position, len(c.state)] for c in checkpoints if c.state is not None],
                "crc32": crc,
            }
        ).encode()
        temporary = path.with_name(f"{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with temporary.open("wb") as file:
                file.write(MAGIC + _LENGTH.pack(len(header)) + header)
                for part in parts:
                    file.write(part)
            _commit(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        size = path.stat().st_size
        self.written_bytes += size
        marks = tuple(Checkpoint(c.position, None) for c in checkpoints)
        indexed = CacheEntry(tokens.astype(np.int32), None, marks, size, tier="disk", disk_name=name)
        with self._lock:
            self._index[name] = indexed
        log.debug("prompt cache: wrote %s (%d tokens, %d bytes)", name, len(tokens), size)
        self._evict_over_budget()
        if self.on_written is not None:
            self.on_written()

    def _evict_over_budget(self) -> None:
        """Delete the least recently used files of every model under the root until the budget holds."""
        files = []
        for path in _cache_files(self.root):
            with contextlib.suppress(OSError):
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda f: f[0]):
            if total <= self.budget:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                if path.parent == self.folder:
                    self._forget(path.name)

    # --- helpers ------------------------------------------------------------------------

    def _read_index(self, path: Path) -> CacheEntry | None:
        """An entry's tokens and sizes from its file's head; None (the file deleted) for a bad file."""
        try:
            with path.open("rb") as file:
                head = file.read(len(MAGIC) + _LENGTH.size)
                if len(head) < len(MAGIC) + _LENGTH.size or head[: len(MAGIC)] != MAGIC:
                    raise ValueError("not a prompt cache file")
                (length,) = _LENGTH.unpack_from(head, len(MAGIC))
                header = _header(file.read(length), self.key)
                tokens = np.frombuffer(file.read(4 * header.tokens), dtype="<i4")
            size = path.stat().st_size
            if len(tokens) != header.tokens or size != header.file_size:
                raise ValueError(f"{size} bytes where its header promises {header.file_size}")
        except (OSError, ValueError) as exc:
            log.warning("prompt cache: %s is damaged (%s); deleting it", path.name, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        checkpoints = tuple(Checkpoint(position, None) for position, _ in header.checkpoints)
        return CacheEntry(tokens.astype(np.int32), None, checkpoints, size, tier="disk", disk_name=path.name)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._index.pop(name, None)

    def _delete(self, name: str) -> None:
        self._forget(name)
        with contextlib.suppress(OSError):
            (self.folder / name).unlink()

    def _turn_off(self, exc: OSError) -> None:
        if self.enabled:
            self.enabled = False
            log.warning("prompt cache: %s cannot take cache files (%s); the disk tier is off", self.folder, exc)


@dataclass(frozen=True)
class _Header:
    """What a file's JSON header says of the rest of it."""

    length: int  # of the header itself, in bytes
    tokens: int
    state: int
    checkpoints: tuple[tuple[int, int], ...]  # (position, bytes)
    crc32: int

    @property
    def file_size(self) -> int:
        """What the whole file must measure."""
        return (
            len(MAGIC) + _LENGTH.size + self.length + 4 * self.tokens + self.state + sum(s for _, s in self.checkpoints)
        )


def _header(raw: bytes, key: str) -> _Header:
    """The parsed header, checked for this key and a sane shape."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("its header is not JSON") from None
    if not isinstance(data, dict) or data.get("key") != key:
        raise ValueError("it belongs to another model or llama.cpp build")
    tokens, state, crc, marks = data.get("tokens"), data.get("state"), data.get("crc32"), data.get("checkpoints")
    if not all(isinstance(v, int) and v >= 0 for v in (tokens, state, crc)) or not isinstance(marks, list):
        raise ValueError("its header lacks sizes")
    if not all(isinstance(m, list) and len(m) == 2 and all(isinstance(v, int) and v >= 0 for v in m) for m in marks):
        raise ValueError("its checkpoints are malformed")
    return _Header(len(raw), int(tokens), int(state), tuple((m[0], m[1]) for m in marks), int(crc))  # type: ignore[arg-type]


def _parse(data: bytearray, key: str) -> CacheEntry:
    """A whole file's entry: checked against its header and CRC, its states viewing `data` without a copy."""
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError("not a prompt cache file")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    header = _header(bytes(data[start : start + length]), key)
    if len(data) != header.file_size:
        raise ValueError(f"{len(data)} bytes where its header promises {header.file_size}")
    body = start + length
    if zlib.crc32(memoryview(data)[body:]) != header.crc32:
        raise ValueError("its checksum does not match")
    tokens = np.frombuffer(data, dtype="<i4", count=header.tokens, offset=body).astype(np.int32)
    offset = body + 4 * header.tokens
    state = state_from(data, offset, header.state)
    offset += header.state
    checkpoints = []
    for position, size in header.checkpoints:
        checkpoints.append(Checkpoint(position, state_from(data, offset, size)))
        offset += size
    return CacheEntry(tokens, state, tuple(checkpoints), len(data))


def _commit(temporary: Path, path: Path) -> None:
    """Give a whole file its name (atomic: a reader sees all of it or nothing)."""
    os.replace(temporary, path)


def _cache_files(root: Path) -> Iterable[Path]:
    """Every cache file under the root, of every model."""
    try:
        folders = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return []
    return [f for folder in folders for f in folder.glob(f"*{SUFFIX}")]


def clear(root: Path) -> tuple[int, int]:
    """Delete every cache file under the root (`sovereign prune --cache`): (files, bytes) freed."""
    files = freed = 0
    for path in _cache_files(root):
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            path.unlink()
            files += 1
            freed += size
    return files, freed
