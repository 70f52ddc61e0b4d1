"""The one entry point of a download: resume what is held, over one stream or many ranges, retrying breaks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from sovereign.errors import SourceUnavailable
from sovereign.store.http.partial import Sidecar, discard_partial
from sovereign.store.http.segmented import (
    CONNECTIONS,
    CONNECTIONS_ENV,
    RangesIgnored,
    SegmentedDownload,
    first_record,
    parallel_eligible,
)
from sovereign.store.http.single import already_held, receive, resume_offset
from sovereign.store.http.transport import (
    RETRIES,
    TRANSIENT,
    backoff,
    check_transport,
    content_range_start,
    make_client,
    raise_for_status,
    total_size,
)
from sovereign.store.progress import PullReporter


@dataclass(frozen=True)
class DownloadOptions:
    """How one download may fetch: how many connections at most, and whether byte ranges are worth asking for."""

    connections: int
    ranges: bool = True  # False once the server ignored a range request: the next attempts use one stream


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
    options = DownloadOptions(connections=max(1, connections if connections is not None else _connections_from_env()))
    limits = httpx.Limits(max_connections=options.connections + 2, max_keepalive_connections=options.connections + 2)
    with make_client(allow_http, limits) as client:
        for attempt in range(RETRIES + 1):
            try:
                return _download_once(client, url, dest, reporter, dict(headers or {}), check_space, options)
            except TRANSIENT as exc:
                if isinstance(exc.__cause__, RangesIgnored):
                    options = replace(options, ranges=False)
                if attempt == RETRIES:
                    raise SourceUnavailable(
                        f"the transfer from {host} kept breaking ({type(exc).__name__})",
                        "run the same pull again to resume",
                    ) from None
                reporter.status(f"transfer interrupted ({type(exc).__name__}); resuming")
                time.sleep(backoff(attempt))
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError) as exc:
                raise SourceUnavailable(
                    f"cannot reach {host} ({type(exc).__name__})", "check the network, or try another source"
                ) from None
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
    options: DownloadOptions,
) -> str:
    """One attempt: go on with a parallel download's segments, or ask for the rest and pick how to fetch it."""
    sidecar = Sidecar(dest)
    # Identity encoding: the byte offsets on disk must be the server's byte offsets.
    headers["Accept-Encoding"] = "identity"
    record = sidecar.load_segments()
    if record is not None:
        # A preallocated file from a parallel download: its size says nothing, only the record does.
        if dest.exists() and dest.stat().st_size == record.size and options.ranges:
            return SegmentedDownload(
                client, url, dest, reporter, headers, check_space, options.connections, record
            ).run(None)
        discard_partial(dest)
    elif sidecar.is_segmented():
        discard_partial(dest)  # a damaged record of a parallel download: the bytes cannot be trusted
    offset = resume_offset(dest, sidecar, headers)
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 416 and offset:
            return already_held(response, dest, offset)
        raise_for_status(response, url)
        if response.status_code != 206 or content_range_start(response) != offset:
            offset = 0  # the server ignored the Range, or the file changed: start over
        total = total_size(response, offset)
        if offset == 0 and options.ranges and parallel_eligible(response, total, options.connections):
            assert total is not None
            record = first_record(response, total, options.connections)
            return SegmentedDownload(
                client, url, dest, reporter, headers, check_space, options.connections, record
            ).run(response)
        return receive(response, url, dest, reporter, offset, total, check_space)
