"""The transport policy of every download: https only, one client shape, typed status errors, retries.

Plain http is refused on every hop, redirects included, unless the host is loopback or the user
allowed it: a model fetched over plain http could be swapped in transit.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import ssl

import httpcore
import httpx

from sovereign.errors import AccessDenied, InsecureSource, SourceUnavailable

MIB = 1024 * 1024
RETRIES = 5
TIMEOUT = httpx.Timeout(connect=15.0, read=60.0, write=60.0, pool=15.0)
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
# httpcore reads an HTTP/1.1 body 64 KiB per recv, and each read costs a trip through h11 and httpx:
# at hundreds of MB/s that Python overhead, not the network, is the limit. A recv returns what has
# arrived without waiting for the whole size, so a larger ceiling only means fewer, fuller reads,
# for every client in the process (measured: about a fifth less CPU per downloaded byte).
READ_SIZE = MIB
if getattr(httpcore.HTTP11Connection, "READ_NUM_BYTES", READ_SIZE) < READ_SIZE:
    httpcore.HTTP11Connection.READ_NUM_BYTES = READ_SIZE
# A transfer that broke midway: retried (resuming where it stopped), unlike a host that cannot be reached.
TRANSIENT = (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout, httpx.WriteError, httpx.WriteTimeout)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (from 0): doubling from a quarter second, at most 2.5 s."""
    return min(2**attempt, 10) * 0.25


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


def validator_of(response: httpx.Response) -> str | None:
    """The response's ETag, else its Last-Modified: what If-Range needs to resume safely."""
    return response.headers.get("etag") or response.headers.get("last-modified")


def raise_for_status(response: httpx.Response, url: str) -> None:
    """Access refused and other HTTP errors as our typed errors."""
    if response.status_code in (401, 403):
        raise AccessDenied(f"{url} refused access (HTTP {response.status_code})", "check the URL or its credentials")
    if response.status_code >= 400:
        raise SourceUnavailable(f"{url} answered HTTP {response.status_code}", "check the URL, or try another source")


def content_range_start(response: httpx.Response) -> int | None:
    """Where a 206 answer's Content-Range says its bytes start (None when it states no range)."""
    match = CONTENT_RANGE.match(response.headers.get("content-range", ""))
    return int(match[1]) if match else None


def content_range_total(response: httpx.Response) -> int | None:
    """The file's full size as a 206 answer's Content-Range states it (None for '*' or none)."""
    match = CONTENT_RANGE.match(response.headers.get("content-range", ""))
    return int(match[3]) if match and match[3] != "*" else None


def total_size(response: httpx.Response, offset: int) -> int | None:
    """The full size of the file a response (starting at `offset`) belongs to, if the headers say."""
    if (total := content_range_total(response)) is not None:
        return total
    length = response.headers.get("content-length")
    return offset + int(length) if length and length.isdigit() else None
