"""A resumable HTTP(S) download into a partial file: Range requests, If-Range, retries, progress."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from sovereign.errors import AccessDenied, NotGGUF, SourceUnavailable
from sovereign.store.gguf_header import MAGIC_BYTES
from sovereign.store.progress import PullReporter

RETRIES = 5
TIMEOUT = httpx.Timeout(connect=15.0, read=60.0, write=60.0, pool=15.0)


class _Validator:
    """The ETag / Last-Modified of a partial file, so a changed remote file restarts the download."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".http.json")

    def load(self) -> str | None:
        try:
            return json.loads(self.path.read_text()).get("validator")
        except (OSError, ValueError):
            return None

    def save(self, response: httpx.Response) -> None:
        validator = response.headers.get("etag") or response.headers.get("last-modified")
        self.path.write_text(json.dumps({"validator": validator}))


def _raise_for_status(response: httpx.Response, url: str) -> None:
    if response.status_code in (401, 403):
        raise AccessDenied(f"{url} refused access (HTTP {response.status_code})", "check the URL or its credentials")
    if response.status_code >= 400:
        raise SourceUnavailable(f"{url} answered HTTP {response.status_code}", "check the URL, or try another source")


def _total_size(response: httpx.Response, offset: int) -> int | None:
    content_range = response.headers.get("content-range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("content-length")
    return offset + int(length) if length and length.isdigit() else None


def download(
    url: str,
    dest: Path,
    reporter: PullReporter,
    *,
    headers: dict[str, str] | None = None,
    check_space: Callable[[int], None] | None = None,
    client: httpx.Client | None = None,
) -> str:
    """Download url into dest, resuming from dest's current size; retry broken transfers.

    Returns the sha256 of the whole file, computed as the bytes arrive (no second read).
    """
    owned = client is None
    client = client or httpx.Client(timeout=TIMEOUT, follow_redirects=True)
    try:
        for attempt in range(RETRIES + 1):
            try:
                return _download_once(client, url, dest, reporter, dict(headers or {}), check_space)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout) as exc:
                if attempt == RETRIES:
                    raise SourceUnavailable(f"the transfer from {url} kept breaking ({type(exc).__name__})", "run the same pull again to resume") from None
                reporter.status(f"transfer interrupted ({type(exc).__name__}); resuming")
                time.sleep(min(2**attempt, 10) * 0.25)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                raise SourceUnavailable(f"cannot reach {httpx.URL(url).host} ({type(exc).__name__})", "check the network, or try another source") from None
    finally:
        if owned:
            client.close()
    raise AssertionError("unreachable")


def _hash_prefix(path: Path, length: int) -> hashlib._Hash:
    """A sha256 object fed with the first `length` bytes of path (the part a resume keeps)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        remaining = length
        while remaining and (block := handle.read(min(remaining, 8 * 1024 * 1024))):
            digest.update(block)
            remaining -= len(block)
    return digest


def _download_once(
    client: httpx.Client, url: str, dest: Path, reporter: PullReporter, headers: dict[str, str], check_space: Callable[[int], None] | None
) -> str:
    validator = _Validator(dest)
    offset = dest.stat().st_size if dest.exists() else 0
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if previous := validator.load():
            headers["If-Range"] = previous
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 416 and offset:
            return _hash_prefix(dest, offset).hexdigest()  # we hold every byte; the caller checks them
        _raise_for_status(response, url)
        if response.status_code != 206:
            offset = 0  # the server ignored the Range (or the file changed): start over
        total = _total_size(response, offset)
        if check_space and total is not None:
            check_space(total - offset)
        validator.save(response)
        if offset:
            reporter.status(f"resuming at {offset:,} of {total:,} bytes" if total else f"resuming at {offset:,} bytes")
        digest = _hash_prefix(dest, offset) if offset else hashlib.sha256()
        reporter.begin(f"downloading {dest.name}", total, offset)
        try:
            with dest.open("ab" if offset else "wb") as handle:
                checked = offset > 0
                # Write each network read as it arrives (no re-chunking), so a cut loses nothing.
                for block in response.iter_bytes():
                    handle.write(block)
                    digest.update(block)
                    reporter.advance(len(block))
                    if not checked and handle.tell() >= len(MAGIC_BYTES):
                        checked = True
                        handle.flush()
                        with dest.open("rb") as head:
                            magic = head.read(len(MAGIC_BYTES))
                        if magic != MAGIC_BYTES:
                            raise NotGGUF(f"{url} does not serve a GGUF file", "point at a .gguf model file")
        except NotGGUF:
            dest.unlink(missing_ok=True)
            raise
        finally:
            reporter.end()
    return digest.hexdigest()
