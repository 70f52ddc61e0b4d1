"""A resumable HTTP(S) download into a partial file: Range requests, If-Range, retries, progress.

Plain http is refused on every hop, redirects included, unless the host is loopback or the user
allowed it: a model fetched over plain http could be swapped in transit.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

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


def make_client(allow_http: bool) -> httpx.Client:
    """An httpx client that applies check_transport to every request, redirect hops included."""
    return httpx.Client(
        timeout=TIMEOUT,
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
        validator = response.headers.get("etag") or response.headers.get("last-modified")
        self.path.write_text(json.dumps({"validator": validator}))


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
) -> str:
    """Download url into dest, resuming from dest's current size; retry broken transfers.

    Returns the sha256 of the whole file, computed as the bytes arrive (no second read).
    """
    check_transport(url, allow_http)
    host = httpx.URL(url).host
    with make_client(allow_http) as client:
        for attempt in range(RETRIES + 1):
            try:
                return _download_once(client, url, dest, reporter, dict(headers or {}), check_space)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout, httpx.WriteError, httpx.WriteTimeout) as exc:
                if attempt == RETRIES:
                    raise SourceUnavailable(f"the transfer from {host} kept breaking ({type(exc).__name__})", "run the same pull again to resume") from None
                reporter.status(f"transfer interrupted ({type(exc).__name__}); resuming")
                time.sleep(min(2**attempt, 10) * 0.25)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError) as exc:
                raise SourceUnavailable(f"cannot reach {host} ({type(exc).__name__})", "check the network, or try another source") from None
            except httpx.HTTPError as exc:  # redirect loops, odd protocols, bad encodings: this source is unusable
                raise SourceUnavailable(f"{host} failed: {type(exc).__name__}", "try another source") from None
    raise AssertionError("unreachable")


def _download_once(
    client: httpx.Client, url: str, dest: Path, reporter: PullReporter, headers: dict[str, str], check_space: Callable[[int], None] | None
) -> str:
    validator = _Validator(dest)
    previous = validator.load()
    offset = dest.stat().st_size if dest.exists() else 0
    # Identity encoding: the byte offsets on disk must be the server's byte offsets.
    headers["Accept-Encoding"] = "identity"
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
        if check_space:
            check_space(total - offset if total is not None else SPACE_CHECK_INTERVAL)
        validator.save(response)
        if offset:
            reporter.status(f"resuming at {offset:,} of {total:,} bytes" if total else f"resuming at {offset:,} bytes")
        # The resumed part is the whole partial file: hash it once, then keep feeding new bytes.
        digest = sha256_of(dest, NullReporter()) if offset else hashlib.sha256()
        reporter.begin(f"downloading {dest.name}", total, offset)
        try:
            with dest.open("r+b" if offset else "wb") as handle:
                handle.seek(offset)
                handle.truncate()
                head = b"" if offset == 0 else MAGIC_BYTES  # a resumed file was checked when it began
                written, next_check = offset, offset + SPACE_CHECK_INTERVAL
                # Write each network read as it arrives (no re-chunking), so a cut loses nothing.
                for block in response.iter_raw():
                    if len(head) < len(MAGIC_BYTES):
                        head += block[: len(MAGIC_BYTES) - len(head)]
                        if not MAGIC_BYTES.startswith(head):
                            raise NotGGUF(f"{url} does not serve a GGUF file", "point at a .gguf model file")
                    handle.write(block)
                    digest.update(block)
                    reporter.advance(len(block))
                    written += len(block)
                    if check_space and written >= next_check:
                        check_space(total - written if total is not None else SPACE_CHECK_INTERVAL)
                        next_check = written + SPACE_CHECK_INTERVAL
        except NotGGUF:
            discard(dest)
            raise
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            held = dest.stat().st_size if dest.exists() else 0
            raise InsufficientDisk(f"the disk filled up while downloading {dest.name} ({human_bytes(held)} downloaded)", "free some space, or set SOVEREIGN_HOME to a bigger disk") from None
        finally:
            reporter.end()
    if total is not None and dest.stat().st_size != total:
        raise httpx.RemoteProtocolError(f"got {dest.stat().st_size} of {total} bytes")
    return digest.hexdigest()
