"""What uvicorn lacks for clients that connect and dawdle: a deadline for a request's head, a cap on connections.

uvicorn's httptools protocol arms no timer until it has sent a first response, and its keep-alive
timer stops at the first byte of the next request; its `limit_concurrency` is checked only once a
request's head is in. So a client that connects and sends nothing, or sends its head a byte every
few seconds (slowloris), holds a connection and a file descriptor as long as it likes (issue 24: 800
such clients held 800). llama-server (cpp-httplib's read timeout), Ollama (Go's ReadHeaderTimeout)
and Apache (mod_reqtimeout) bound this; so does this protocol:

- a request's head must be complete within `header_timeout` of the connection, or of the previous
  response on a kept-alive one; else the connection is closed (there is nothing to answer yet);
- at most `max_connections` are open at once; one more is answered 503 and closed at once.

A body's pace is timed where the app reads it, by guards.BodyLimit, which answers 408 in the API's
envelope. Nothing is timed while a response is written: a long prefill or a long stream is never cut.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sovereign.server.errors import APIError

HEADER_TIMEOUT = 20.0  # seconds; a real client sends its head (a few hundred bytes) in milliseconds
# Agents keep many connections open, far more than --parallel slots; the cap is there to keep file
# descriptors (one per connection) from running out, which would stop model loads and accepts alike.
MAX_CONNECTIONS = 1024
FD_HEADROOM = 256  # descriptors kept for the server's own files: model processes' sockets, blobs, caches, logs


@dataclass(frozen=True)
class ReadLimits:
    """How long a client may take to send a request, and how many connections may be open at once."""

    header_timeout: float = HEADER_TIMEOUT
    max_connections: int = MAX_CONNECTIONS


def server_protocol() -> type[asyncio.Protocol]:
    """The protocol `sovereign serve` runs: the default limits, the cap kept under the open-file limit."""
    return protocol_with(ReadLimits(max_connections=reserve_descriptors(MAX_CONNECTIONS)))


def protocol_with(limits: ReadLimits) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol with these limits, for `uvicorn.Config(http=...)` (which takes a class)."""
    return type("LimitedProtocol", (LimitedProtocol,), {"limits": limits})


def reserve_descriptors(connections: int) -> int:
    """How many connections fit under the open-file limit, raised first toward what they need (as Go's runtime does)."""
    try:
        import resource
    except ImportError:  # Windows has no such per-process limit to mind
        return connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):  # macOS refuses more than kern.maxfilesperproc: keep the limit there is
            pass
    if soft == resource.RLIM_INFINITY:
        return connections
    return max(1, min(connections, max(soft - FD_HEADROOM, soft // 2)))


def _busy() -> bytes:
    """The 503 for a connection over the cap, as bytes the protocol writes itself.

    Its request is unread, so its path is unknown: OpenAI's envelope, which most clients read.
    """
    error = APIError(
        503,
        "The server has too many open connections. Retry in a moment, or reuse connections (keep-alive).",
        type="server_error",
        code="too_many_connections",
        headers={"Retry-After": "1"},
    )
    response = error.response()
    headers = b"".join(name + b": " + value + b"\r\n" for name, value in response.raw_headers)
    return b"HTTP/1.1 503 Service Unavailable\r\n" + headers + b"connection: close\r\n\r\n" + bytes(response.body)


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request's head, and a cap on connections."""

    limits: ClassVar[ReadLimits] = ReadLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Refuse a connection over the cap; start the clock for the first request's head."""
        if len(self.connections) >= self.limits.max_connections:
            # Closed at once: a refused connection that lingered would hold the descriptor the cap saves.
            self._refused = True
            cast(asyncio.Transport, transport).write(_busy())  # uvloop's transports are not asyncio's classes
            transport.close()
            return
        super().connection_made(cast(asyncio.Transport, transport))
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock (a refused connection was never counted)."""
        if self._refused:
            return
        self._stop_head_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse, unless this connection was refused."""
        if not self._refused:
            super().data_received(data)

    def on_headers_complete(self) -> None:
        """The head is in: its deadline is over (the body's pace is BodyLimit's to time)."""
        self._stop_head_clock()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        """A response is out: the next request's head has `header_timeout` to arrive."""
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_head()  # not when a pipelined request, whose head is in, has just been started

    def _await_head(self) -> None:
        """Close the connection unless a request's head is complete within `header_timeout`."""
        self._stop_head_clock()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
