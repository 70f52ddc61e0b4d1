"""Slow clients cannot hold the server, and a client that leaves is not an error (issue 24).

Against a real uvicorn serving the app around the fake engine, in a thread of the test process, with
the read limits shortened to a second or so: idle connections, heads sent a byte at a time
(slowloris) and bodies that stall are closed while /health keeps answering; connections beyond
the cap are refused; a stream outlives every limit, since they bound reading a request, never
writing its answer. An Anthropic stream dropped during its prefill logs no error and stops its
generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager, suppress

import httpx
import pytest
import uvicorn

from sovereign.engine import ChatRequest, CompletionRequest, Finished, Generation, TextDelta, Usage
from sovereign.engine.requests import Event
from sovereign.server import connections
from sovereign.server.app import ServerOptions, create_app
from sovereign.server.connections import ReadLimits, protocol_with
from sovereign.server.guards import BodyLimit
from tests.fake_engine import FakeEngine
from tests.servers import free_port

SHORT = ReadLimits(header_timeout=1.0, max_connections=64)
BODY_TIMEOUT, BODY_MIN_RATE = 1.0, 100.0  # the body's pace, shortened likewise
DEADLINE = 30.0  # seconds any expected close may take on a loaded two-core machine (the limits are ~1 s)
CHAT = {"model": "fake:model", "messages": [{"role": "user", "content": "hello there"}]}


class Served:
    """The app around an engine, on a real uvicorn on a free loopback port, in a thread."""

    def __init__(self, engine: FakeEngine, limits: ReadLimits, body_pace: tuple[float, float]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(engine, ServerOptions())
        for middleware in app.user_middleware:  # the stack is built at the first request: shorten the body's pace
            if middleware.cls is BodyLimit:
                middleware.kwargs.update(body_timeout=body_pace[0], body_min_rate=body_pace[1])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            http=protocol_with(limits),
            log_config=None,  # records propagate to the root logger, where caplog sees them
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + DEADLINE
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def connect(self) -> socket.socket:
        """A raw connection to the server."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)

    def healthy(self) -> bool:
        """Whether /health answers now, on a fresh connection."""
        return httpx.get(f"{self.url}/health", timeout=DEADLINE).status_code == 200


@contextmanager
def serving(
    engine: FakeEngine | None = None,
    limits: ReadLimits = SHORT,
    body_pace: tuple[float, float] = (BODY_TIMEOUT, BODY_MIN_RATE),
) -> Iterator[Served]:
    """A server with these limits for the length of a test."""
    with Served(engine or FakeEngine(), limits, body_pace) as served:
        yield served


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or reset), without waiting."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        while chunk := sock.recv(65536):
            if not select.select([sock], [], [], 0)[0]:
                return False  # it answered something and is still open
            del chunk
    except OSError:
        return True
    return True


def wait_closed(
    sockets: list[socket.socket], served: Served, *, trickle: Callable[[socket.socket], None] | None = None
) -> float:
    """Poll until the server has closed every socket (feeding each a byte per round); the seconds it took.

    /health must answer on a fresh connection the whole time.
    """
    started = time.monotonic()
    open_ = list(sockets)
    while open_:
        assert time.monotonic() - started < DEADLINE, f"{len(open_)} of {len(sockets)} connections still open"
        for sock in list(open_):
            if trickle is not None:
                try:
                    trickle(sock)
                except OSError:  # already closed by the server, which is what we wait for
                    pass
            if closed_by_server(sock):
                open_.remove(sock)
        assert served.healthy()
        time.sleep(0.2)
    return time.monotonic() - started


# --- slow and idle clients ---------------------------------------------------------------------------


def test_idle_connections_are_closed_after_the_head_deadline() -> None:
    with serving() as served:
        idle = [served.connect() for _ in range(8)]
        took = wait_closed(idle, served)
    assert took >= SHORT.header_timeout * 0.8  # closed by the deadline, not refused at once


def test_a_head_sent_a_byte_at_a_time_is_closed() -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000
    sent: dict[int, int] = {}  # bytes of the head sent so far, by socket

    def next_byte(sock: socket.socket) -> None:
        offset = sent.setdefault(sock.fileno(), 0)
        sock.sendall(head[offset : offset + 1])
        sent[sock.fileno()] = offset + 1

    with serving() as served:
        slow = [served.connect() for _ in range(8)]
        wait_closed(slow, served, trickle=next_byte)


def test_a_kept_alive_connection_must_send_its_next_head_in_time() -> None:
    with serving() as served:
        sock = served.connect()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next head starts, and never ends
        wait_closed([sock], served, trickle=lambda s: s.sendall(b"X"))


def _stalled_body(served: Served, path: str, *, trickle: bool) -> tuple[bytes, float]:
    """Send a head announcing 1000 bytes, then a few of them, then one a while or none; what came back and when."""
    sock = served.connect()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n{".encode()
    )
    started, answer = time.monotonic(), b""
    while time.monotonic() - started < DEADLINE:
        if select.select([sock], [], [], 0.2)[0]:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
        elif trickle:
            with suppress(OSError):  # closed already: what it answered is read on the next turn
                sock.sendall(b" ")
    sock.close()
    return answer, time.monotonic() - started


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "a-byte-at-a-time"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_body_that_stops_coming_gets_408_and_is_closed(path: str, trickle: bool) -> None:
    with serving() as served:
        answer, took = _stalled_body(served, path, trickle=trickle)
        assert served.healthy()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in head.lower()
    error = json.loads(body)
    if path == "/v1/messages":
        assert error["type"] == "error" and "stopped arriving" in error["error"]["message"], error
    else:
        assert error["error"]["code"] == "request_timeout", error
    assert BODY_TIMEOUT * 0.8 <= took < DEADLINE


def test_a_body_sent_in_pieces_at_a_fair_pace_is_served() -> None:
    body = json.dumps({**CHAT, "user": "x" * 800}).encode()
    timeout = 3.0
    with serving(body_pace=(timeout, 100.0)) as served:
        sock = served.connect()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        # 200 bytes a second, twice the least pace, with pauses of a third of the body timeout
        for start in range(0, len(body), 200):
            time.sleep(timeout / 3)
            sock.sendall(body[start : start + 200])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b"You said: hello there" in answer


class SlowStream(FakeEngine):
    """A fake that writes one word every half second: a stream that outlasts every read limit."""

    async def submit(self, request: ChatRequest | CompletionRequest) -> Generation:
        self._check(request.model)
        return Generation(request.model, self._words(), lambda: None, 3)

    async def _words(self) -> AsyncGenerator[Event, None]:
        for index in range(6):
            await asyncio.sleep(0.5)
            yield TextDelta(f" w{index}")
        yield Finished("stop", Usage(3, 6))


def test_a_stream_longer_than_every_limit_is_not_cut() -> None:
    with serving(SlowStream()) as served:
        with httpx.stream(
            "POST", f"{served.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=DEADLINE
        ) as response:
            text = "".join(response.iter_text())
    assert all(f"w{index}" in text for index in range(6)) and text.rstrip().endswith("data: [DONE]"), text


def test_connections_over_the_cap_are_refused_and_the_rest_served() -> None:
    limits = ReadLimits(header_timeout=60, max_connections=4)
    with serving(limits=limits) as served:
        held = [served.connect() for _ in range(limits.max_connections)]
        deadline = time.monotonic() + DEADLINE
        while len(served.server.server_state.connections) < limits.max_connections:  # the server has taken them
            assert time.monotonic() < deadline
            time.sleep(0.05)
        extra = served.connect()
        answer = b""
        try:
            while chunk := extra.recv(65536):
                answer += chunk
        except OSError:
            pass
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"too_many_connections" in answer
        held.pop().close()
        deadline = time.monotonic() + DEADLINE
        while True:  # the server sees the close on its next turn of the loop
            try:
                if served.healthy():
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for sock in held:
            sock.close()


def test_the_cap_stays_under_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    resource = pytest.importorskip("resource")  # Unix only
    limits: dict[str, tuple[int, int]] = {}
    monkeypatch.setattr(resource, "setrlimit", lambda kind, pair: limits.update(set=pair))
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (1024, 524288))
    assert connections.reserve_descriptors(1024) == 1024  # raised to fit, as far as the hard limit allows
    assert limits["set"] == (1024 + connections.FD_HEADROOM, 524288)
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (1024, 1024))
    assert connections.reserve_descriptors(1024) == 1024 - connections.FD_HEADROOM
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (256, 256))
    assert connections.reserve_descriptors(1024) == 128  # half of a tiny limit, never none


# --- item 2: an Anthropic stream dropped during prefill ----------------------------------------------


class SlowPrefill(FakeEngine):
    """A fake whose generations spend a minute in prefill; it notes when one is stopped and closed."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = threading.Event()
        self.closed = threading.Event()

    async def submit(self, request: ChatRequest | CompletionRequest) -> Generation:
        self._check(request.model)
        self.requests.append(request)
        return Generation(request.model, self._prefill(), self.stopped.set, 3)

    async def _prefill(self) -> AsyncGenerator[Event, None]:
        try:
            await asyncio.sleep(60)
            yield Finished("stop", Usage(3, 0))
        finally:
            self.closed.set()


def test_an_anthropic_stream_dropped_in_prefill_is_no_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    engine = SlowPrefill()
    body = {**CHAT, "max_tokens": 50, "stream": True}
    with serving(engine) as served:
        with httpx.stream("POST", f"{served.url}/v1/messages", json=body, timeout=DEADLINE) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                assert "message_start" in line  # the stream is open; the generation is in its prefill
                break
        # The client has gone: the generation must be stopped and its generator closed.
        assert engine.stopped.wait(DEADLINE) and engine.closed.wait(DEADLINE)
        assert served.healthy()
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]
