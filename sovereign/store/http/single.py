"""A download over one stream: resume with Range and If-Range, write each read as it arrives, hash on the side.

Small files, and servers without ranges or validators, come this way; so does the first answer of every
download, which the segmented downloader takes over when it is a large file from a server that takes ranges.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from sovereign.errors import NotGGUF
from sovereign.store.files import discard, sha256_of
from sovereign.store.gguf_header import MAGIC_BYTES
from sovereign.store.http.partial import DISK_FULL, Sidecar, disk_filled
from sovereign.store.http.transport import MIB
from sovereign.store.progress import NullReporter, PullReporter

# Free space is checked again every this many bytes written: other programs fill disks too, and a
# server that sends no Content-Length gives no size to check up front.
SPACE_CHECK_INTERVAL = 64 * MIB
PROGRESS_STEP = MIB  # the single stream reports progress (and feeds the hasher) in batches this big


def resume_offset(dest: Path, sidecar: Sidecar, headers: dict[str, str]) -> int:
    """Where a request for dest may resume (adding Range and If-Range to headers), or 0 to start over."""
    previous = sidecar.load()
    offset = dest.stat().st_size if dest.exists() else 0
    if offset and previous:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = previous
        return offset
    return 0  # nothing proves the remote file is unchanged: splicing could corrupt it


def already_held(response: httpx.Response, dest: Path, offset: int) -> str:
    """The sha256 of dest when a 416 answer says it already holds every byte; else start over."""
    match = re.match(r"^bytes \*/(\d+)$", response.headers.get("content-range", ""))
    if match and int(match[1]) == offset:
        return sha256_of(dest, NullReporter()).hexdigest()  # we already hold every byte
    dest.unlink()
    raise httpx.RemoteProtocolError("the remote file changed size; starting over")


def receive(
    response: httpx.Response,
    url: str,
    dest: Path,
    reporter: PullReporter,
    offset: int,
    total: int | None,
    check_space: Callable[[int], None] | None,
) -> str:
    """Write the response's body into dest from `offset`; return the sha256 of the whole file."""
    if check_space:
        check_space(total - offset if total is not None else SPACE_CHECK_INTERVAL)
    Sidecar(dest).save(response)
    if offset:
        reporter.status(f"resuming at {offset:,} of {total:,} bytes" if total else f"resuming at {offset:,} bytes")
    reporter.begin(f"downloading {dest.name}", total, offset)
    # The resumed part is the whole partial file: hash it once, then keep feeding new bytes, on
    # a thread of its own (hashlib lets go of the GIL), in batches, as progress is reported.
    hasher = _Hasher(sha256_of(dest, NullReporter()) if offset else hashlib.sha256())
    try:
        with dest.open("r+b" if offset else "wb") as handle:
            handle.seek(offset)
            handle.truncate()
            head = b"" if offset == 0 else MAGIC_BYTES  # a resumed file was checked when it began
            written, next_check = offset, offset + SPACE_CHECK_INTERVAL
            batch: list[bytes] = []
            batched = 0
            # Write each network read as it arrives (no re-chunking), so a cut loses nothing.
            for block in response.iter_raw():
                if len(head) < len(MAGIC_BYTES):
                    head += block[: len(MAGIC_BYTES) - len(head)]
                    if not MAGIC_BYTES.startswith(head):
                        raise NotGGUF(f"{url} does not serve a GGUF file", "point at a .gguf model file")
                handle.write(block)
                batch.append(block)
                batched += len(block)
                if batched >= PROGRESS_STEP:
                    hasher.feed(batch)
                    reporter.advance(batched)
                    batch, batched = [], 0
                written += len(block)
                if check_space and written >= next_check:
                    check_space(total - written if total is not None else SPACE_CHECK_INTERVAL)
                    next_check = written + SPACE_CHECK_INTERVAL
            hasher.feed(batch)
            reporter.advance(batched)
    except NotGGUF:
        discard(dest)
        raise
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise disk_filled(dest, dest.stat().st_size if dest.exists() else 0) from None
    finally:
        digest = hasher.finish()
        reporter.end()
    if total is not None and dest.stat().st_size != total:
        raise httpx.RemoteProtocolError(f"got {dest.stat().st_size} of {total} bytes")
    return digest.hexdigest()


class _Hasher:
    """sha256 on a thread of its own, fed lists of blocks in order."""

    BACKLOG = 32  # batches (of about PROGRESS_STEP bytes) waiting to be hashed, at most

    def __init__(self, digest: hashlib._Hash) -> None:
        self.digest = digest
        self.queue: list[list[bytes] | None] = []
        self.ready = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self.thread.start()

    def feed(self, blocks: list[bytes]) -> None:
        """Queue blocks for hashing, waiting while the backlog is full."""
        if blocks:
            with self.ready:
                while len(self.queue) >= self.BACKLOG:  # a slow CPU must not buffer the whole file
                    self.ready.wait()
                self.queue.append(blocks)
                self.ready.notify_all()

    def finish(self) -> hashlib._Hash:
        """Hash what is queued, stop the thread, and return the digest."""
        with self.ready:
            self.queue.append(None)
            self.ready.notify_all()
        self.thread.join()
        return self.digest

    def _run(self) -> None:
        while True:
            with self.ready:
                while not self.queue:
                    self.ready.wait()
                blocks = self.queue.pop(0)
                self.ready.notify_all()
            if blocks is None:
                return
            for block in blocks:
                self.digest.update(block)
