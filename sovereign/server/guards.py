"""Guards in front of every route: which Host and Origin may call the server, and how large a body may be.

Both are pure ASGI middleware. The Host check stops DNS rebinding: a web page on attacker.example
whose name is made to resolve to 127.0.0.1 reaches a loopback server with `Host: attacker.example`,
so a server bound to loopback answers only names of this machine (Ollama's rules). The Origin check
stops any web page from driving the server from a browser unless `--cors-origin` names it. The body
limit answers 413 from Content-Length before a byte is read, and counts chunked bodies as they come,
so an oversized body never reaches the JSON parser. It also times the body: one that stops coming, or
comes a byte every few seconds, is answered 408 (issue 24; the head's own deadline is the protocol's,
in server/connections.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sovereign.errors import SovereignError
from sovereign.server.errors import APIError

DEFAULT_MAX_BODY = 32 * 1024 * 1024  # far above any prompt a local model's context holds (1M tokens ≈ 4 MiB)
BODY_TIMEOUT = 30.0  # seconds a request body may pause, and the grace before its pace counts
BODY_MIN_RATE = 500.0  # bytes a second a body must average past that grace (Apache mod_reqtimeout's default)
# Names that always mean this machine: no one outside can make them resolve elsewhere (Ollama's list).
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
# Desktop apps and editor webviews on this machine send these origins (as Ollama allows them).
_APP_SCHEMES = frozenset({"app", "file", "tauri", "vscode-webview", "vscode-file"})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str, option: str = "--max-body") -> int:
    """'32MiB', '64MB', '1G' or a plain number of bytes -> bytes (binary units)."""
    match = _SIZE.match(text)
    size = int(float(match[1]) * 1024 ** "_KMGT".index(match[2].upper() or "_")) if match else 0
    if size < 1:
        raise SovereignError(
            f"{option} takes a size such as 32MiB or 100MB, not '{text}'", f"for example {option} 64MiB"
        )
    return size


def is_loopback_bind(host: str) -> bool:
    """Whether a --host address listens on this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str, given: str | None) -> tuple[str, ...]:
    """The Host names to accept beyond this machine's: --allowed-hosts, else all when bound beyond loopback."""
    if given is None:
        return () if is_loopback_bind(bind_host) else ("*",)
    return tuple(entry.strip().lower() for entry in given.split(",") if entry.strip())


def hostname_of(value: str) -> str:
    """The name in a Host header (or an --allowed-hosts entry): lower-case, no port, no brackets, no trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def _local_address(name: str, *, loopback_only: bool) -> bool | None:
    """For an IP literal, whether it is this machine's (or a private network's); None for a name."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return None
    if loopback_only:
        return address.is_loopback
    return address.is_loopback or address.is_private or address.is_unspecified or address.is_link_local


def is_local_host(name: str) -> bool:
    """Whether a Host name can only mean this machine.

    A local or private IP literal, localhost, our hostname, *.localhost, *.local, *.internal.
    """
    if (local := _local_address(name, loopback_only=False)) is not None:
        return local
    return name in ("", "localhost", socket.gethostname().lower()) or name.endswith(_LOCAL_SUFFIXES)


def _matches(name: str, entries: Iterable[str]) -> bool:
    for entry in entries:
        if entry == "*":
            return True
        if entry.startswith(("*.", ".")):
            suffix = entry.lstrip("*")
            if name.endswith(suffix) or name == suffix[1:]:
                return True
        elif name == hostname_of(entry):
            return True
    return False


def _header(scope: Scope, key: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == key:
            return value.decode("latin-1")
    return None


class HostGuard:
    """Refuse (403) a Host that is not this machine's or allowed.

    Also a browser Origin that is neither this server's own page, loopback, nor a --cors-origin.
    """

    def __init__(
        self, app: ASGIApp, *, allowed_hosts: tuple[str, ...] = (), cors_origins: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.allowed_hosts = tuple(h.lower() for h in allowed_hosts)
        self.any_origin = "*" in cors_origins
        self.cors_origins = frozenset(o.lower().rstrip("/") for o in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host") or ""
        name = hostname_of(host)
        if not (is_local_host(name) or _matches(name, self.allowed_hosts)):
            error = APIError(
                403,
                f"Host '{host}' is not allowed: this server answers only requests addressed to this machine, "
                "as a guard against DNS rebinding. "
                f"Start it with --allowed-hosts {name or 'NAME'} to accept that name.",
                code="host_not_allowed",
            )
            await error.response_for(scope["path"])(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        if origin is not None and not (
            (_same_origin(origin, host) and self._names_this_server(name)) or self._origin_allowed(origin)
        ):
            hint = (
                f" A page served here at '{host}' may call it once the server is started with --allowed-hosts {name}."
                if _same_origin(origin, host)
                else ""
            )
            error = APIError(
                403,
                f"Origin '{origin}' is not allowed: web pages may call this server only from this machine or from an "
                "origin the server was started with (--cors-origin ORIGIN)." + hint,
                code="origin_not_allowed",
            )
            await error.response_for(scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _names_this_server(self, name: str) -> bool:
        """Whether a Host name that passed is one no web page can borrow through DNS rebinding.

        An IP address, a name of this machine, or one --allowed-hosts names; not a name let in only by the
        wildcard (the default when bound beyond loopback): attacker.example resolved to this server would
        otherwise be its own page's "same origin".
        """
        if _local_address(name, loopback_only=False) is not None:
            return True  # an IP literal: the page was loaded from this very address
        return is_local_host(name) or _matches(name, (entry for entry in self.allowed_hosts if entry != "*"))

    def _origin_allowed(self, origin: str) -> bool:
        normalized = origin.strip().lower().rstrip("/")
        if self.any_origin or normalized in self.cors_origins:
            return True
        if normalized == "null":  # sandboxed frames and opaque origins: anyone can be "null"
            return False
        try:
            parts = urlsplit(normalized)
            hostname = parts.hostname or ""
        except ValueError:
            return False
        if parts.scheme in _APP_SCHEMES:
            return True
        if parts.scheme not in ("http", "https"):
            return False
        local = _local_address(hostname, loopback_only=True)
        return local if local is not None else hostname == "localhost" or hostname.endswith(".localhost")


def _same_origin(origin: str, host: str) -> bool:
    """Whether a page calls the server from the origin the request is addressed to (the chat page on a LAN address).

    Not enough alone: a page on attacker.example whose name is rebound to this server is same-origin too, so
    the caller also requires a Host name that cannot be rebound (HostGuard._names_this_server).
    """
    try:
        parts = urlsplit(origin.strip().lower())
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host.strip().lower()


def _too_large_message(limit: int) -> str:
    size = f"{limit / 1024 / 1024:g} MiB" if limit >= 1024 * 1024 else f"{limit} bytes"
    return (
        f"The request body is larger than this server's limit of {size}. Send less, or start the server with "
        "a larger --max-body."
    )


def _too_slow() -> APIError:
    return APIError(
        408,
        "The request body stopped arriving, or came too slowly, before it was complete. Send the whole body "
        "without long pauses.",
        code="request_timeout",
        headers={"Connection": "close"},  # the rest of the body is not waited for: this connection is done
    )


class _Pace:
    """One body's clock: pauses of at most `timeout`, and past that an average of `rate` bytes a second.

    Only time spent waiting for the client counts, not time the app spends between two reads.
    """

    def __init__(self, timeout: float, rate: float) -> None:
        self.timeout = timeout
        self.rate = rate
        self.waited = 0.0
        self.received = 0
        self.done = False

    async def next(self, receive: Receive) -> Message | None:
        """The next message, or None when the client took too long to send it."""
        if self.done:
            return await receive()  # the body is in: what comes next is the disconnect, whenever it comes
        budget = min(self.timeout, self.timeout + self.received / self.rate - self.waited)
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            # Never zero: wait_for(..., 0) would give up without looking at bytes that are already here.
            message = await asyncio.wait_for(receive(), max(budget, 0.01))
        except TimeoutError:
            return None
        finally:
            self.waited += loop.time() - began
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
        return message


class BodyLimit:
    """Answer 413 to a body over `limit` bytes, and 408 to one that comes too slowly.

    413 at once from Content-Length, or as soon as a streamed body passes the limit; 408 when the body
    pauses over `body_timeout` seconds, or after that long averages under `body_min_rate` bytes a second.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int = DEFAULT_MAX_BODY,
        body_timeout: float = BODY_TIMEOUT,
        body_min_rate: float = BODY_MIN_RATE,
    ) -> None:
        self.app = app
        self.limit = limit
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            # Answered before reading: uvicorn then skips the body (and never sends `100 Continue`).
            await self._too_large().response_for(scope["path"])(scope, receive, send)
            return
        pace = _Pace(self.body_timeout, self.body_min_rate)
        started = over = answered = False

        async def counted() -> Message:
            nonlocal over, answered
            if over:
                return {"type": "http.disconnect"}
            message = await pace.next(receive)
            if message is None:
                refusal = _too_slow()
            elif pace.received > self.limit:
                refusal = self._too_large()
            else:
                return message
            # Answer here rather than raise: an exception from receive() reaches FastAPI wrapped
            # (by BaseHTTPMiddleware's task group) and would come out as a 400. The app is then
            # told the client left, and whatever it still sends is dropped.
            over = True
            if not started:
                answered = True
                await refusal.response_for(scope["path"])(scope, receive, send)
            return {"type": "http.disconnect"}

        async def noting(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, noting)

    def _too_large(self) -> APIError:
        return APIError(413, _too_large_message(self.limit), code="request_too_large")
