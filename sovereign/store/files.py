"""File helpers every source shares: hashing with progress, free-space checks, GGUF sniffing."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from pathlib import Path

from sovereign.errors import InsufficientDisk, IntegrityError, NotGGUF
from sovereign.store.gguf_header import has_gguf_magic
from sovereign.store.progress import PullReporter

CHUNK = 1024 * 1024
SIDECAR_SUFFIX = ".http.json"  # what the downloader remembers next to a partial file (its ETag), to resume safely


def sidecar_path(path: Path) -> Path:
    """The file next to a partial download that records its HTTP validator."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def discard(path: Path) -> None:
    """Delete a refused download with its sidecar, and its staging folder once that is empty."""
    path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: other files of the same model are still resumable
        path.parent.rmdir()


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def sha256_of(path: Path, reporter: PullReporter, label: str = "verifying") -> hashlib._Hash:
    """A sha256 object fed with the whole file (a resumed download keeps updating it), reporting bytes hashed."""
    digest = hashlib.sha256()
    reporter.begin(f"{label} {path.name}", path.stat().st_size)
    try:
        with path.open("rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
                reporter.advance(len(block))
    finally:
        reporter.end()
    return digest


def sha256_file(path: Path, reporter: PullReporter, label: str = "verifying") -> str:
    """The sha256 hex digest of a file, reporting bytes hashed."""
    return sha256_of(path, reporter, label).hexdigest()


def verify_file(
    path: Path,
    expected_sha256: str | None,
    expected_size: int | None,
    reporter: PullReporter,
    origin: str,
    actual_sha256: str | None = None,
) -> str:
    """Check size, GGUF magic and sha256 of a downloaded file; delete it and raise if any is wrong.

    actual_sha256, when the caller hashed the bytes as they arrived, saves a second read.
    """
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        discard(path)
        raise IntegrityError(
            f"{origin} gave {size} bytes, expected {expected_size}; the file was discarded",
            "pull again, or try another source with --mirror",
        )
    # A promised hash is checked first: when it fails, that is the truer message than "not GGUF".
    actual = actual_sha256 or sha256_file(path, reporter)
    if expected_sha256 and actual != expected_sha256:
        discard(path)
        raise IntegrityError(
            (
                f"sha256 mismatch for {origin}: expected {expected_sha256[:12]}…, got {actual[:12]}…; the "
                "file was discarded and nothing was registered"
            ),
            "the source served corrupt or different bytes; pull again or use another source",
        )
    if not has_gguf_magic(path):
        discard(path)
        raise NotGGUF(f"{origin} is not a GGUF file; it was discarded", "point at a .gguf model file")
    return actual


def partial_size(path: Path) -> int:
    """Bytes of a download already on disk (0 if none), which a resume will not fetch again."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def ensure_free_space(folder: Path, needed: int, reserve: int) -> None:
    """Refuse a download that would not fit on folder's disk (keeping `reserve` bytes free)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed + reserve > free:
        raise InsufficientDisk(
            (
                f"not enough disk space: the download needs {human_bytes(needed)} but {folder} has "
                f"{human_bytes(free)} free"
            ),
            "free some space, or set SOVEREIGN_HOME to a bigger disk",
        )
