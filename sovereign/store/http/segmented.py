"""A download over several HTTP range requests at once, each resumable, hashed in order as it lands.

A large file from a server that takes byte ranges is fetched over several connections at once (as
hf_transfer and `aria2c -x` do): the partial file is preallocated, fixed-size segments are handed
out in order to worker threads that write at their offsets (starting with one connection and
doubling while that raises the rate, up to CONNECTIONS), the sidecar records each segment's
progress so an interrupted pull resumes every segment, and the main thread hashes the completed
prefix in order as it grows (through a mapping, starting its writeback so the final fsync is
short). The first answer is the whole file: it carries on into the next segment while no other
worker has taken it, so one fast connection needs one request.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import httpx

from sovereign.errors import InsufficientDisk, NotGGUF
from sovereign.store.files import discard, human_bytes
from sovereign.store.gguf_header import MAGIC_BYTES
from sovereign.store.http.partial import DISK_FULL, SegmentRecord, Sidecar, discard_partial, disk_filled
from sovereign.store.http.ramp import Ramp
from sovereign.store.http.transport import (
    MIB,
    RETRIES,
    TRANSIENT,
    backoff,
    content_range_start,
    content_range_total,
    raise_for_status,
    validator_of,
)
from sovereign.store.progress import PullReporter

# Parallel download: files at least this big, from servers that take byte ranges and send a validator.
PARALLEL_MIN_SIZE = 64 * MIB
CONNECTIONS = 8  # concurrent range requests (measured with scripts/bench_pull.py)
CONNECTIONS_ENV = "SOVEREIGN_DOWNLOAD_CONNECTIONS"  # overrides CONNECTIONS; 1 means a single stream
SEGMENT_MIN, SEGMENT_MAX = 8 * MIB, 128 * MIB  # a file is cut into about 4 segments per connection
HASH_READ = 4 * MIB  # the in-order hasher reads the completed prefix back in blocks this big
STATE_SAVE_INTERVAL = 1.0  # seconds between saves of per-segment progress to the sidecar


def parallel_eligible(response: httpx.Response, total: int | None, connections: int) -> bool:
    """Whether a whole-file answer may be fetched over several range requests instead."""
    return (
        response.status_code == 200
        and connections > 1
        and total is not None
        and total >= PARALLEL_MIN_SIZE
        and response.headers.get("accept-ranges", "").strip().lower() == "bytes"
        and validator_of(response) is not None
    )


def segment_size(total: int, connections: int) -> int:
    """About four segments per connection, so the in-order hash follows closely behind the writes."""
    return max(SEGMENT_MIN, min(SEGMENT_MAX, -(-total // (4 * connections)) // MIB * MIB or MIB))


def first_record(response: httpx.Response, total: int, connections: int) -> SegmentRecord:
    """The resume record of a download taken over from a whole-file answer: no segment has a byte yet."""
    validator = validator_of(response)
    assert validator is not None  # parallel_eligible demands one
    return SegmentRecord.fresh(validator, total, segment_size(total, connections))


_worker_flags = threading.local()  # per worker thread: whether it has counted itself as flowing


class RangesIgnored(Exception):
    """A range request came back as the whole file although the validator still matches.

    It reaches the retry loop as the __cause__ of the RemoteProtocolError that restarts the download,
    so the next attempt uses one stream.
    """


class _Changed(Exception):
    """A range request came back as the whole file with another validator: the remote file changed."""


class _Task(NamedTuple):
    """A segment for a worker, and the whole-file answer that already carries its bytes (if any)."""

    segment: int  # its number (not `index`, which would shadow tuple.index)
    response: httpx.Response | None = None
    stream: Iterator[bytes] | None = None
    head: bytes | memoryview = b""  # what the stream's last read held past the previous segment's end


class SegmentedDownload:
    """One download over several range requests: segments in order to workers, writes at offsets."""

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        dest: Path,
        reporter: PullReporter,
        headers: dict[str, str],
        check_space: Callable[[int], None] | None,
        connections: int,
        record: SegmentRecord,
    ) -> None:
        self.client, self.url, self.dest, self.reporter, self.headers = client, url, dest, reporter, headers
        self.check_space, self.connections = check_space, connections
        self.validator = record.validator
        self.total = record.size
        self.segment = record.segment
        count = record.count
        self.done: list[int] = list(record.done) if len(record.done) == count else [0] * count
        self.done = [max(0, min(d, self._end(i) - self._start(i))) for i, d in enumerate(self.done)]
        self.pending = [i for i in range(count) if self._start(i) + self.done[i] < self._end(i)]
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.errors: list[BaseException] = []
        self.flowing = 0  # workers that have written their first bytes
        self.sidecar = Sidecar(dest)

    def _start(self, index: int) -> int:
        return index * self.segment

    def _end(self, index: int) -> int:
        return min(self.total, (index + 1) * self.segment)

    def _save(self) -> None:
        self.sidecar.save_segments(SegmentRecord(self.validator, self.total, self.segment, tuple(self.done)))

    def run(self, first: httpx.Response | None) -> str:
        """Fetch every pending segment (the first from `first`, a whole-file answer, when given)."""
        resumed = first is None
        if resumed:
            held = sum(self.done)
            self.reporter.status(
                f"resuming {len(self.pending)} of {len(self.done)} segments, {held:,} of {self.total:,} bytes held"
            )
        else:
            if self.check_space:
                self.check_space(self.total)
            self._preallocate()
            self._save()
        try:
            fd = os.open(self.dest, os.O_RDONLY)
        except FileNotFoundError:
            raise httpx.RemoteProtocolError("the partial file vanished; starting over") from None
        # The hash reads the page cache through a mapping: no copy into a buffer (a fifth of the hashing's CPU).
        try:
            mapping = mmap.mmap(fd, self.total, access=mmap.ACCESS_READ)
        except OSError:
            os.close(fd)
            raise
        view = memoryview(mapping)
        digest = hashlib.sha256()
        hashed = 0
        reported = sum(self.done)
        self.reporter.begin(f"downloading {self.dest.name}", self.total, reported)
        workers: list[threading.Thread] = []
        try:
            stream = None
            if first is not None:
                stream = first.iter_raw()
                self._check_magic(first, stream)
            with self.lock:
                initial = self.pending.pop(0) if stream is not None else None
            limit = min(self.connections, len(self.pending) + (initial is not None))

            def start_worker() -> None:
                task = _Task(initial, first, stream) if not workers and initial is not None else None
                worker = threading.Thread(target=self._work, args=(task,), name=f"range-{len(workers)}", daemon=True)
                worker.start()
                workers.append(worker)

            start_worker()
            ramp = Ramp(limit)
            saved_at = time.monotonic()
            while any(w.is_alive() for w in workers):
                self.wake.wait(0.05)
                self.wake.clear()
                hashed = self._hash_prefix(fd, view, digest, hashed)
                now_done = sum(self.done)
                if now_done > reported:
                    self.reporter.advance(now_done - reported)
                    reported = now_done
                for _ in range(ramp.more(len(workers), self.flowing, now_done, self.total - now_done)):
                    start_worker()
                if time.monotonic() - saved_at >= STATE_SAVE_INTERVAL:
                    self._save()
                    saved_at = time.monotonic()
            hashed = self._hash_prefix(fd, view, digest, hashed)
            if sum(self.done) > reported:
                self.reporter.advance(sum(self.done) - reported)
        finally:
            self.stop.set()
            deadline = time.monotonic() + 5  # a worker stuck in a read must not hold up Ctrl-C for long
            for worker in workers:
                worker.join(timeout=max(0.0, deadline - time.monotonic()))
            view.release()
            mapping.close()
            os.close(fd)
            if self.dest.exists():
                self._save()
            self.reporter.end()
        if self.errors:
            self._raise(self.errors[0])
        if hashed != self.total:
            raise httpx.RemoteProtocolError(f"got {hashed} of {self.total} bytes")
        return digest.hexdigest()

    def _raise(self, error: BaseException) -> None:
        if isinstance(error, _Changed):  # not retried per segment: the whole download starts over
            discard_partial(self.dest)
            raise httpx.RemoteProtocolError("the remote file changed; starting over")
        if isinstance(error, RangesIgnored):
            discard_partial(self.dest)
            # Chained, so the retry loop (which retries this type) knows the next attempt uses one stream.
            raise httpx.RemoteProtocolError(
                "the server ignored a range request; falling back to one connection"
            ) from error
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            raise disk_filled(self.dest, sum(self.done)) from None
        raise error

    def _preallocate(self) -> None:
        """Reserve the whole file up front, so ranges land at their offsets and the disk cannot fill midway."""
        with self.dest.open("wb") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, self.total)
            except OSError as exc:
                if exc.errno in DISK_FULL:
                    handle.close()
                    discard_partial(self.dest)
                    raise InsufficientDisk(
                        f"no room for {self.dest.name} ({human_bytes(self.total)})",
                        "free some space, or set SOVEREIGN_HOME to a bigger disk",
                    ) from None
                handle.truncate(self.total)  # a file system without fallocate: a sparse file will do

    def _check_magic(self, response: httpx.Response, stream: Iterator[bytes]) -> None:
        """Read the first bytes of a fresh download before anything else: they must be GGUF's magic."""
        head = b""
        fd = os.open(self.dest, os.O_WRONLY)
        try:
            while len(head) < len(MAGIC_BYTES):
                block = next(stream, b"")
                if not block:
                    raise httpx.RemoteProtocolError("the body ended before the GGUF header")
                head += block
                os.pwrite(fd, block[: self._end(0) - self.done[0]], self.done[0])
                self.done[0] = min(self._end(0), self.done[0] + len(block))
        finally:
            os.close(fd)
        if not head.startswith(MAGIC_BYTES):
            response.close()
            discard(self.dest)
            raise NotGGUF(f"{self.url} does not serve a GGUF file", "point at a .gguf model file")

    def _hash_prefix(self, fd: int, view: memoryview, digest: hashlib._Hash, hashed: int) -> int:
        """Hash the bytes from `hashed` up to the end of the completed prefix; return the new position."""
        index = hashed // self.segment if self.segment else 0
        frontier = hashed
        while index < len(self.done):
            frontier = self._start(index) + self.done[index]
            if frontier < self._end(index):
                break
            index += 1
        if frontier <= hashed:
            return hashed
        if os.fstat(fd).st_size < frontier:  # reading a mapping past the end of its file would kill the process
            raise httpx.RemoteProtocolError("the partial file shrank while downloading")
        start = hashed
        while hashed < frontier:
            block = min(HASH_READ, frontier - hashed)
            digest.update(view[hashed : hashed + block])  # hashlib lets go of the GIL while it hashes
            hashed += block
        # Hashed bytes are final: start writing them to disk now, so the fsync before the commit
        # only waits for the tail (DONTNEED starts writeback of dirty pages without waiting for it).
        if hasattr(os, "posix_fadvise"):  # not on macOS, whose fsync then does all the writing
            os.posix_fadvise(fd, start, hashed - start, os.POSIX_FADV_DONTNEED)
        return hashed

    def _work(self, initial: _Task | None) -> None:
        """Fetch segments until none is left, each with retries of its own."""
        _worker_flags.flowing = False
        try:
            fd = os.open(self.dest, os.O_WRONLY)
        except OSError as exc:
            self.errors.append(exc)
            self.stop.set()
            return
        try:
            task = initial
            while not self.stop.is_set():
                if task is None:
                    with self.lock:
                        if not self.pending:
                            return
                        task = _Task(self.pending.pop(0))
                task = self._fetch_with_retries(fd, *task)
                self.wake.set()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self.errors.append(exc)
            self.stop.set()
        finally:
            os.close(fd)
            self.wake.set()

    def _fetch_with_retries(
        self,
        fd: int,
        index: int,
        response: httpx.Response | None,
        stream: Iterator[bytes] | None,
        head: bytes | memoryview,
    ) -> _Task | None:
        """Fetch one segment; return the task that goes on reading the whole-file stream, if any."""
        for attempt in range(RETRIES + 1):
            try:
                if response is not None:
                    assert stream is not None  # a task that carries a response carries its stream
                    follow = None
                    try:
                        rest = self._copy(fd, index, itertools.chain((head,), stream) if head else stream)
                        follow = self._claim_next(index) if rest is not None else None
                        if follow is None or rest is None:
                            return None
                        return _Task(follow, response, stream, rest)
                    finally:
                        if follow is None:
                            response.close()
                self._fetch(fd, index)
                return None
            except TRANSIENT:
                response = None
                if attempt == RETRIES or self.stop.is_set():
                    raise
                self.stop.wait(backoff(attempt))
        raise AssertionError("unreachable")

    def _fetch(self, fd: int, index: int) -> None:
        start, end = self._start(index) + self.done[index], self._end(index)
        if start >= end:
            return
        headers = {**self.headers, "Range": f"bytes={start}-{end - 1}", "If-Range": self.validator}
        with self.client.stream("GET", self.url, headers=headers) as response:
            raise_for_status(response, self.url)
            if response.status_code == 200:
                if validator_of(response) == self.validator:
                    raise RangesIgnored()
                raise _Changed()
            if (
                response.status_code != 206
                or content_range_start(response) != start
                or content_range_total(response) != self.total
            ):
                raise httpx.RemoteProtocolError(
                    f"unexpected answer to a range request: HTTP {response.status_code} "
                    f"{response.headers.get('content-range')}"
                )
            self._copy(fd, index, response.iter_raw())

    def _claim_next(self, index: int) -> int | None:
        """The segment after `index` if no worker has taken it yet: a whole-file stream is already there."""
        with self.lock:
            if self.pending and self.pending[0] == index + 1 and self.done[index + 1] == 0:
                return self.pending.pop(0)
        return None

    def _copy(self, fd: int, index: int, stream: Iterable[bytes | memoryview]) -> memoryview | None:
        """Write a segment's bytes at their offsets as they arrive, recording progress after each write.

        Returns what the last block held past the segment's end (the next segment's start, for a
        whole-file stream), or None when stopped.
        """
        base, end = self._start(index), self._end(index)
        position = base + self.done[index]
        for block in stream:
            if self.stop.is_set():
                return None
            if not getattr(_worker_flags, "flowing", False):
                _worker_flags.flowing = True
                with self.lock:
                    self.flowing += 1
            whole = memoryview(block)
            cut = end - position
            view = whole[:cut]
            while view:
                written = os.pwrite(fd, view, position)
                view = view[written:]
                position += written
                self.done[index] = position - base  # recorded only once the bytes are written
            if position >= end:
                return whole[cut:]
        if position < end:
            raise httpx.RemoteProtocolError(f"segment {index} ended at {position} of {end}")
        return memoryview(b"")
