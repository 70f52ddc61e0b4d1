"""A resumable HTTP(S) download into a partial file: Range requests, If-Range, retries, progress.

A large file from a server that takes byte ranges is fetched over several connections at once (as
hf_transfer and `aria2c -x` do): the partial file is preallocated, fixed-size segments are handed
out in order to worker threads that write at their offsets (starting with one connection and
doubling while that raises the rate, up to CONNECTIONS), the sidecar records each segment's
progress so an interrupted pull resumes every segment, and the main thread hashes the completed
prefix in order as it grows (through a mapping, starting its writeback so the final fsync is
short). The first answer is the whole file: it carries on into the next segment while no other
worker has taken it, so one fast connection needs one request. Small files, and servers without
ranges or validators, use one stream.

Plain http is refused on every hop, redirects included, unless the host is loopback or the user
allowed it: a model fetched over plain http could be swapped in transit.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import ipaddress
import itertools
import json
import mmap
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpcore
import httpx

from sovereign.errors import AccessDenied, InsecureSource, InsufficientDisk, NotGGUF, SourceUnavailable
from sovereign.store.files import discard, human_bytes, sha256_of, sidecar_path
from sovereign.store.gguf_header import MAGIC_BYTES
from sovereign.store.progress import NullReporter, PullReporter

RETRIES = 5
TIMEOUT = httpx.Timeout(connect=15.0, read=60.0, write=60.0, pool=15.0)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
# Free space is checked again every this many bytes written: other programs fill disks too, and a
# server that sends no Content-Length gives no size to check up front.
SPACE_CHECK_INTERVAL = 64 * 1024 * 1024
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
MIB = 1024 * 1024
# Parallel download: files at least this big, from servers that take byte ranges and send a validator.
PARALLEL_MIN_SIZE = 64 * MIB
CONNECTIONS = 8  # concurrent range requests (measured with scripts/bench_pull.py)
CONNECTIONS_ENV = "SOVEREIGN_DOWNLOAD_CONNECTIONS"  # overrides CONNECTIONS; 1 means a single stream
SEGMENT_MIN, SEGMENT_MAX = 8 * MIB, 128 * MIB  # a file is cut into about 4 segments per connection
HASH_READ = 4 * MIB  # the in-order hasher reads the completed prefix back in blocks this big
PROGRESS_STEP = MIB  # the single stream reports progress (and feeds the hasher) in batches this big
RAMP_INTERVAL = 0.25  # seconds of measurement before deciding whether to double the connections
RAMP_GAIN = 1.3  # a doubling must raise the rate at least this much for the next one to happen
RAMP_SETTLE_MAX = 2.0  # seconds to wait for new connections' first bytes before measuring anyway
RAMP_PAYBACK = 2 * RAMP_INTERVAL  # no doubling when the rest would arrive sooner than this: it could not pay off
STATE_SAVE_INTERVAL = 1.0  # seconds between saves of per-segment progress to the sidecar
# httpcore reads an HTTP/1.1 body 64 KiB per recv, and each read costs a trip through h11 and httpx:
# at hundreds of MB/s that Python overhead, not the network, is the limit. A recv returns what has
# arrived without waiting for the whole size, so a larger ceiling only means fewer, fuller reads,
# for every client in the process (measured: about a fifth less CPU per downloaded byte).
READ_SIZE = MIB
if getattr(httpcore.HTTP11Connection, "READ_NUM_BYTES", READ_SIZE) < READ_SIZE:
    httpcore.HTTP11Connection.READ_NUM_BYTES = READ_SIZE
_TRANSIENT = (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout, httpx.WriteError, httpx.WriteTimeout)


def is_loopback(host: str) -> bool:
    """Whether host names this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_transport(url: httpx.URL | str, allow_http: bool) -> None:
    """Refuse schemes other than https, and http beyond loopback unless allowed."""
    url = httpx.URL(str(url))
    if url.scheme == "https" or (url.scheme == "http" and (allow_http or is_loopback(url.host))):
        return
    what = "plain http" if url.scheme == "http" else f"{url.scheme}://"
    raise InsecureSource(
        f"refusing {what} to {url.host}: the model could be tampered with in transit",
        "use https, or set SOVEREIGN_ALLOW_HTTP=1 if you trust this network",
    )


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The verifying TLS context every client shares: building one loads the CA bundle (~20 ms each)."""
    return httpx.create_ssl_context()


def make_client(allow_http: bool, limits: httpx.Limits | None = None) -> httpx.Client:
    """An httpx client that applies check_transport to every request, redirect hops included."""
    return httpx.Client(
        verify=_tls_context(),
        timeout=TIMEOUT,
        limits=limits or httpx.Limits(max_connections=100, max_keepalive_connections=20),
        follow_redirects=True,
        event_hooks={"request": [lambda request: check_transport(request.url, allow_http)]},
    )


class _Validator:
    """The ETag / Last-Modified of a partial file, so a changed remote file restarts the download."""

    def __init__(self, path: Path) -> None:
        self.path = sidecar_path(path)

    def load(self) -> str | None:
        try:
            return json.loads(self.path.read_text()).get("validator")
        except (OSError, ValueError, AttributeError):
            return None

    def save(self, response: httpx.Response) -> None:
        self.path.write_text(json.dumps({"validator": validator_of(response)}))

    def is_segmented(self) -> bool:
        """Whether the sidecar belongs to a parallel download (whose file size proves nothing)."""
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(state, dict) and ("segment" in state or "done" in state)

    def load_segments(self) -> dict | None:
        """A parallel download's state: validator, size, segment size and bytes done per segment."""
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or not all(k in state for k in ("validator", "size", "segment", "done")):
            return None
        size, segment, done = state["size"], state["segment"], state["done"]
        valid = (
            isinstance(state["validator"], str)
            and isinstance(size, int) and isinstance(segment, int) and segment > 0 and size >= 0
            and isinstance(done, list) and len(done) == -(-size // segment) and all(isinstance(d, int) and d >= 0 for d in done)
        )
        return state if valid else None

    def save_segments(self, validator: str, size: int, segment: int, done: list[int]) -> None:
        """Record per-segment progress atomically: a torn sidecar must never claim bytes not written."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps({"validator": validator, "size": size, "segment": segment, "done": done}))
        os.replace(temporary, self.path)


def validator_of(response: httpx.Response) -> str | None:
    """The response's ETag, else its Last-Modified: what If-Range needs to resume safely."""
    return response.headers.get("etag") or response.headers.get("last-modified")


def raise_for_status(response: httpx.Response, url: str) -> None:
    """Access refused and other HTTP errors as our typed errors."""
    if response.status_code in (401, 403):
        raise AccessDenied(f"{url} refused access (HTTP {response.status_code})", "check the URL or its credentials")
    if response.status_code >= 400:
        raise SourceUnavailable(f"{url} answered HTTP {response.status_code}", "check the URL, or try another source")


def content_range_total(response: httpx.Response) -> int | None:
    """The file's full size as a 206 answer's Content-Range states it (None for '*' or none)."""
    match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
    return int(match[3]) if match and match[3] != "*" else None


def total_size(response: httpx.Response, offset: int) -> int | None:
    """The full size of the file a response (starting at `offset`) belongs to, if the headers say."""
    if (total := content_range_total(response)) is not None:
        return total
    length = response.headers.get("content-length")
    return offset + int(length) if length and length.isdigit() else None


def download(
    url: str,
    dest: Path,
    reporter: PullReporter,
    *,
    allow_http: bool = False,
    headers: dict[str, str] | None = None,
    check_space: Callable[[int], None] | None = None,
    connections: int | None = None,
) -> str:
    """Download url into dest, resuming from dest's current size; retry broken transfers.

    A large file from a server that takes ranges comes over `connections` (default CONNECTIONS)
    range requests at once, each resumable. Returns the sha256 of the whole file, computed while
    the bytes arrive (in order, from the completed prefix).
    """
    check_transport(url, allow_http)
    host = httpx.URL(url).host
    options = {"connections": max(1, connections if connections is not None else _connections_from_env())}
    limits = httpx.Limits(max_connections=options["connections"] + 2, max_keepalive_connections=options["connections"] + 2)
    with make_client(allow_http, limits) as client:
        for attempt in range(RETRIES + 1):
            try:
                return _download_once(client, url, dest, reporter, dict(headers or {}), check_space, options)
            except _TRANSIENT as exc:
                if attempt == RETRIES:
                    raise SourceUnavailable(f"the transfer from {host} kept breaking ({type(exc).__name__})", "run the same pull again to resume") from None
                reporter.status(f"transfer interrupted ({type(exc).__name__}); resuming")
                time.sleep(min(2**attempt, 10) * 0.25)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError) as exc:
                raise SourceUnavailable(f"cannot reach {host} ({type(exc).__name__})", "check the network, or try another source") from None
            except httpx.HTTPError as exc:  # redirect loops, odd protocols, bad encodings: this source is unusable
                raise SourceUnavailable(f"{host} failed: {type(exc).__name__}", "try another source") from None
    raise AssertionError("unreachable")


def _connections_from_env() -> int:
    value = os.environ.get(CONNECTIONS_ENV, "")
    return int(value) if value.isdigit() else CONNECTIONS


def _download_once(
    client: httpx.Client,
    url: str,
    dest: Path,
    reporter: PullReporter,
    headers: dict[str, str],
    check_space: Callable[[int], None] | None,
    options: dict,
) -> str:
    validator = _Validator(dest)
    # Identity encoding: the byte offsets on disk must be the server's byte offsets.
    headers["Accept-Encoding"] = "identity"
    state = validator.load_segments()
    if state is not None:
        # A preallocated file from a parallel download: its size says nothing, only the state does.
        if dest.exists() and dest.stat().st_size == state["size"] and not options.get("no_ranges"):
            return _Parallel(client, url, dest, reporter, headers, check_space, options, state).run(None)
        discard_partial(dest)
    elif validator.is_segmented():
        discard_partial(dest)  # a damaged record of a parallel download: the bytes cannot be trusted
    previous = validator.load()
    offset = dest.stat().st_size if dest.exists() else 0
    if offset and previous:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = previous
    else:
        offset = 0  # nothing proves the remote file is unchanged: splicing could corrupt it
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 416 and offset:
            match = re.match(r"^bytes \*/(\d+)$", response.headers.get("content-range", ""))
            if match and int(match[1]) == offset:
                return sha256_of(dest, NullReporter()).hexdigest()  # we already hold every byte
            dest.unlink()
            raise httpx.RemoteProtocolError("the remote file changed size; starting over")
        raise_for_status(response, url)
        match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
        if response.status_code != 206 or not match or int(match[1]) != offset:
            offset = 0  # the server ignored the Range, or the file changed: start over
        total = total_size(response, offset)
        if offset == 0 and _parallel_eligible(response, total, options):
            assert total is not None
            state = {"validator": validator_of(response), "size": total, "segment": _segment_size(total, options["connections"]), "done": None}
            return _Parallel(client, url, dest, reporter, headers, check_space, options, state).run(response)
        if check_space:
            check_space(total - offset if total is not None else SPACE_CHECK_INTERVAL)
        validator.save(response)
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
            if exc.errno not in _DISK_FULL:
                raise
            held = dest.stat().st_size if dest.exists() else 0
            raise InsufficientDisk(f"the disk filled up while downloading {dest.name} ({human_bytes(held)} downloaded)", "free some space, or set SOVEREIGN_HOME to a bigger disk") from None
        finally:
            digest = hasher.finish()
            reporter.end()
    if total is not None and dest.stat().st_size != total:
        raise httpx.RemoteProtocolError(f"got {dest.stat().st_size} of {total} bytes")
    return digest.hexdigest()


def discard_partial(dest: Path) -> None:
    """Forget a partial file and its sidecar (not its folder: the download starts over in it)."""
    dest.unlink(missing_ok=True)
    sidecar_path(dest).unlink(missing_ok=True)


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
        if blocks:
            with self.ready:
                while len(self.queue) >= self.BACKLOG:  # a slow CPU must not buffer the whole file
                    self.ready.wait()
                self.queue.append(blocks)
                self.ready.notify_all()

    def finish(self) -> hashlib._Hash:
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


def _parallel_eligible(response: httpx.Response, total: int | None, options: dict) -> bool:
    """Whether a whole-file answer may be fetched over several range requests instead."""
    return (
        response.status_code == 200
        and options["connections"] > 1
        and not options.get("no_ranges")
        and total is not None
        and total >= PARALLEL_MIN_SIZE
        and response.headers.get("accept-ranges", "").strip().lower() == "bytes"
        and validator_of(response) is not None
    )


def _segment_size(total: int, connections: int) -> int:
    """About four segments per connection, so the in-order hash follows closely behind the writes."""
    return max(SEGMENT_MIN, min(SEGMENT_MAX, -(-total // (4 * connections)) // MIB * MIB or MIB))


_worker_flags = threading.local()  # per worker thread: whether it has counted itself as flowing


class _Ramp:
    """Adds connections while they pay: 1, then 2, 4, 8... as long as each doubling raised the rate.

    On a fast link one stream already fills the line (or the CPUs), and more threads only cost; a
    server that caps each connection rewards every doubling. Each step is measured once the newly
    started connections all carry bytes, so slow connection set-ups do not look like no gain.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rate: float | None = None  # bytes/s measured with the previous number of connections
        self.window: tuple[float, int] | None = None  # (start time, bytes done) of the current measurement
        self.waited_since = time.monotonic()
        self.stopped = limit <= 1

    def more(self, started: int, flowing: int, done: int, left: int) -> int:
        """How many connections to start now (`left`: bytes still to fetch)."""
        if self.stopped or started >= self.limit:
            return 0
        now = time.monotonic()
        if self.window is None:
            if flowing < started and now - self.waited_since < RAMP_SETTLE_MAX:
                return 0
            self.window = (now, done)
            return 0
        began, done_then = self.window
        if now - began < RAMP_INTERVAL:
            return 0
        rate = (done - done_then) / (now - began)
        # New connections need a set-up and a measurement of their own before they pay: near the end they only cost.
        if (self.rate is not None and rate < self.rate * RAMP_GAIN) or left < rate * RAMP_PAYBACK:
            self.stopped = True
            return 0
        self.rate, self.window, self.waited_since = rate, None, now
        return min(started, self.limit - started)


class _RangesIgnored(Exception):
    """A range request came back as the whole file although the validator still matches."""


class _Changed(Exception):
    """A range request came back as the whole file with another validator: the remote file changed."""


class _Parallel:
    """One download over several range requests: segments in order to workers, writes at offsets."""

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        dest: Path,
        reporter: PullReporter,
        headers: dict[str, str],
        check_space: Callable[[int], None] | None,
        options: dict,
        state: dict,
    ) -> None:
        self.client, self.url, self.dest, self.reporter, self.headers = client, url, dest, reporter, headers
        self.check_space, self.options = check_space, options
        self.validator: str = state["validator"]
        self.total: int = state["size"]
        self.segment: int = state["segment"]
        count = -(-self.total // self.segment)
        done = state["done"]
        self.done: list[int] = list(done) if done is not None and len(done) == count else [0] * count
        self.done = [max(0, min(d, self._end(i) - self._start(i))) for i, d in enumerate(self.done)]
        self.pending = [i for i in range(count) if self._start(i) + self.done[i] < self._end(i)]
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.errors: list[BaseException] = []
        self.flowing = 0  # workers that have written their first bytes
        self.sidecar = _Validator(dest)

    def _start(self, index: int) -> int:
        return index * self.segment

    def _end(self, index: int) -> int:
        return min(self.total, (index + 1) * self.segment)

    def _save(self) -> None:
        self.sidecar.save_segments(self.validator, self.total, self.segment, list(self.done))

    def run(self, first: httpx.Response | None) -> str:
        """Fetch every pending segment (the first from `first`, a whole-file answer, when given)."""
        resumed = first is None
        if resumed:
            held = sum(self.done)
            self.reporter.status(f"resuming {len(self.pending)} of {len(self.done)} segments, {held:,} of {self.total:,} bytes held")
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
            limit = min(self.options["connections"], len(self.pending) + (initial is not None))

            def start_worker() -> None:
                task = (initial, first, stream, b"") if not workers and initial is not None else None
                worker = threading.Thread(target=self._work, args=(task,), name=f"range-{len(workers)}", daemon=True)
                worker.start()
                workers.append(worker)

            start_worker()
            ramp = _Ramp(limit)
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
        if isinstance(error, _RangesIgnored):
            self.options["no_ranges"] = True  # the next attempt uses one stream
            discard_partial(self.dest)
            raise httpx.RemoteProtocolError("the server ignored a range request; falling back to one connection")
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            raise InsufficientDisk(
                f"the disk filled up while downloading {self.dest.name} ({human_bytes(sum(self.done))} downloaded)",
                "free some space, or set SOVEREIGN_HOME to a bigger disk",
            ) from None
        raise error

    def _preallocate(self) -> None:
        """Reserve the whole file up front, so ranges land at their offsets and the disk cannot fill midway."""
        with self.dest.open("wb") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, self.total)
            except OSError as exc:
                if exc.errno in _DISK_FULL:
                    handle.close()
                    discard_partial(self.dest)
                    raise InsufficientDisk(f"no room for {self.dest.name} ({human_bytes(self.total)})", "free some space, or set SOVEREIGN_HOME to a bigger disk") from None
                handle.truncate(self.total)  # a file system without fallocate: a sparse file will do

    def _check_magic(self, response: httpx.Response, stream) -> None:  # noqa: ANN001
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
            digest.update(view[hashed:hashed + block])  # hashlib lets go of the GIL while it hashes
            hashed += block
        # Hashed bytes are final: start writing them to disk now, so the fsync before the commit
        # only waits for the tail (DONTNEED starts writeback of dirty pages without waiting for it).
        if hasattr(os, "posix_fadvise"):  # not on macOS, whose fsync then does all the writing
            os.posix_fadvise(fd, start, hashed - start, os.POSIX_FADV_DONTNEED)
        return hashed

    def _work(self, initial: tuple | None) -> None:
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
                        task = (self.pending.pop(0), None, None, b"")
                task = self._fetch_with_retries(fd, *task)
                self.wake.set()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self.errors.append(exc)
            self.stop.set()
        finally:
            os.close(fd)
            self.wake.set()

    def _fetch_with_retries(self, fd: int, index: int, response: httpx.Response | None, stream, head: bytes | memoryview) -> tuple | None:  # noqa: ANN001
        """Fetch one segment; return the task that goes on reading the whole-file stream, if any."""
        for attempt in range(RETRIES + 1):
            try:
                if response is not None:
                    follow = None
                    try:
                        rest = self._copy(fd, index, itertools.chain((head,), stream) if head else stream)
                        follow = self._claim_next(index) if rest is not None else None
                        return (follow, response, stream, rest) if follow is not None else None
                    finally:
                        if follow is None:
                            response.close()
                self._fetch(fd, index)
                return None
            except _TRANSIENT:
                response = None
                if attempt == RETRIES or self.stop.is_set():
                    raise
                self.stop.wait(min(2**attempt, 10) * 0.25)

    def _fetch(self, fd: int, index: int) -> None:
        start, end = self._start(index) + self.done[index], self._end(index)
        if start >= end:
            return
        headers = {**self.headers, "Range": f"bytes={start}-{end - 1}", "If-Range": self.validator}
        with self.client.stream("GET", self.url, headers=headers) as response:
            raise_for_status(response, self.url)
            if response.status_code == 200:
                if validator_of(response) == self.validator:
                    raise _RangesIgnored()
                raise _Changed()
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if response.status_code != 206 or not match or int(match[1]) != start or content_range_total(response) != self.total:
                raise httpx.RemoteProtocolError(f"unexpected answer to a range request: HTTP {response.status_code} {response.headers.get('content-range')}")
            self._copy(fd, index, response.iter_raw())

    def _claim_next(self, index: int) -> int | None:
        """The segment after `index` if no worker has taken it yet: a whole-file stream is already there."""
        with self.lock:
            if self.pending and self.pending[0] == index + 1 and self.done[index + 1] == 0:
                return self.pending.pop(0)
        return None

    def _copy(self, fd: int, index: int, stream) -> memoryview | None:  # noqa: ANN001
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
