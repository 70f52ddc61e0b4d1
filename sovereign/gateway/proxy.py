"""The gateway's ASGI middleware: each API request goes to its upstream, or to the local model when that one is blocked.

Per request:
- a request that names a local model, or a path no upstream serves, is answered locally;
- otherwise, while the upstream's circuit is closed, it is forwarded (the client's own credentials,
  or the upstream's configured key) and the answer relayed as it arrives, status and body unchanged;
- when the upstream is blocked (refused, reset, DNS, TLS, no first byte in time, 451, 403; 5xx and
  429 too after --upstream-retries when asked), the same request is answered by the local route of
  the same API, its model mapped by --route / --fallback; the client only sees the
  `x-sovereign-served-by` header (`upstream` or `local:MODEL`);
- a stream that breaks after it began cannot be replayed: it ends with the API's error event and
  the circuit opens, so the next request goes local at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sovereign.engine.api import EngineAPI
from sovereign.gateway.circuit import Circuit
from sovereign.gateway.upstream import CAUSES, Upstream, blocked_cause, kind_of
from sovereign.model_routes import ModelRoutes
from sovereign.server.body import decode_in_thread
from sovereign.server.errors import APIError

log = logging.getLogger(__name__)
SERVED_BY = b"x-sovereign-served-by"
LOCAL_NAME_SECONDS = 5.0  # how long whether a name is a pulled model is remembered (a pull takes effect this late)
# Headers that belong to one connection, not to the request (RFC 9110 §7.6.1), and those set anew for the upstream.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_CREDENTIALS = frozenset({"authorization", "x-api-key"})


@dataclass
class Gateway:
    """The upstreams, how local fallbacks are chosen, and what counts as blocked."""

    upstreams: dict[str, Upstream]  # by kind
    routes: ModelRoutes  # --route rules and --fallback
    timeout: float = 5.0  # seconds to connect, and to the first byte of a streamed answer
    answer_timeout: float = (
        300.0  # seconds to a non-streamed answer's first byte (it comes when the whole answer is made)
    )
    retries: int = 0  # 5xx/429 retries before falling back; 0: such answers reach the client as they are
    causes: frozenset[str] = frozenset(CAUSES)  # the triggers left on
    threshold: int = 3
    probe_every: float = 30.0
    own_keys: bool = False  # sovereign has --api-key: the client's credentials are ours, never sent upstream
    circuits: dict[str, Circuit] = field(default_factory=dict)
    # aiohttp, for its C HTTP parser: with httpcore's pure-Python one (h11), parsing a fast stream's chunks
    # took two thirds of the gateway's CPU (profiled), which added TTFT and cost throughput.
    _session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        for kind, upstream in self.upstreams.items():
            self.circuits[kind] = Circuit(
                kind, self._prober(upstream), threshold=self.threshold, probe_every=self.probe_every
            )
        # Made here, registered on the server's /metrics registry by register().
        self.served = Counter(
            "sovereign_gateway_requests",
            "Gateway requests by who served them (upstream or local).",
            ["served_by"],
            registry=None,
        )
        self.fallbacks = Counter(
            "sovereign_gateway_fallbacks",
            "Requests answered locally instead of upstream, by cause.",
            ["cause"],
            registry=None,
        )
        self.circuit_open = Gauge(
            "sovereign_gateway_circuit_open",
            "1 while an upstream's circuit is open (requests go local).",
            ["upstream"],
            registry=None,
        )
        for kind, circuit in self.circuits.items():

            def is_open(circuit: Circuit = circuit) -> float:
                return float(circuit.is_open)

            self.circuit_open.labels(kind).set_function(is_open)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP client for every upstream, made on first use (inside the server's event loop)."""
        if self._session is None:
            # No connection cap: one per request in flight, kept alive for the next. Proxy variables are not
            # read (trust_env=False): requests go where --upstream says, and nowhere else.
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, trust_env=False, skip_auto_headers=("User-Agent", "Accept")
            )
        return self._session

    async def send(
        self, method: str, url: str, headers: dict[str, str], body: bytes, first_byte: float
    ) -> aiohttp.ClientResponse:
        """The upstream's status and headers within `first_byte` seconds, its body unread.

        No read timeout: models pause.
        """
        timeouts = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
        request = self.session.request(
            method, url, headers=headers, data=body or None, allow_redirects=False, timeout=timeouts
        )
        return await asyncio.wait_for(request, first_byte)

    def _prober(self, upstream: Upstream) -> Callable[[], Awaitable[bool]]:
        async def probe() -> bool:
            response = await self.send("GET", upstream.probe_url(), upstream.auth_headers(), b"", self.timeout)
            response.release()
            return str(response.status) not in self.causes

        return probe

    def health(self) -> dict[str, Any]:
        """What /health says about each upstream (its URL, not its key)."""
        return {kind: {"url": up.base_url, **self.circuits[kind].state()} for kind, up in self.upstreams.items()}

    def register(self, registry: CollectorRegistry) -> None:
        """Show the gateway's counters and circuit states on the server's /metrics."""
        for metric in (self.served, self.fallbacks, self.circuit_open):
            registry.register(metric)

    async def close(self) -> None:
        for circuit in self.circuits.values():
            circuit.stop()
        if self._session is not None:
            await self._session.close()


class _Unreachable(Exception):
    """The upstream failed in a way whose fallback was switched off (--no-fallback-on); answered 502."""


class _Blocked(Exception):
    """The upstream cannot answer; `cause` says why."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class GatewayMiddleware:
    """ASGI middleware that sends API requests upstream, or to the app behind it (the local model)."""

    def __init__(self, app: ASGIApp, gateway: Gateway, engine: EngineAPI) -> None:
        self.app = app
        self.gateway = gateway
        self.engine = engine
        self._local_names: dict[
            str, tuple[bool, float]
        ] = {}  # name -> (is local, until when): the store is read once a while

    def _is_local(self, name: str) -> bool:
        """Whether a request names a local model (remembered for LOCAL_NAME_SECONDS: it reads the store)."""
        now = time.monotonic()
        known = self._local_names.get(name)
        if known is None or known[1] < now:
            if len(self._local_names) > 1024:  # names come from clients: keep the memory bounded
                self._local_names.clear()
            known = (self.engine.is_local(name), now + LOCAL_NAME_SECONDS)
            self._local_names[name] = known
        return known[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        kind = kind_of(scope["path"], headers)
        upstream = self.gateway.upstreams.get(kind) if kind else None
        if upstream is None:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:  # the client left before its request was whole: nothing to answer
            return
        payload = await _json_object(body)
        model = payload.get("model") if isinstance(payload, dict) else None
        if isinstance(model, str) and self._is_local(model):  # a local model by name never goes upstream
            await self._local(scope, receive, body, send, model, None)
            return
        circuit = self.gateway.circuits[upstream.kind]
        if circuit.is_open:
            await self._local(scope, receive, body, send, model, "circuit_open")
            return
        streamed = bool(payload and payload.get("stream"))
        try:
            response = await self._ask(upstream, scope, headers, body, streamed)
        except _Blocked as blocked:
            circuit.record_block(blocked.cause)
            await self._local(scope, receive, body, send, model, blocked.cause)
            return
        except _Unreachable as error:
            response_for = APIError(
                502,
                f"The upstream API could not be reached ({error}).",
                type="server_error",
                code="upstream_unreachable",
            )
            await response_for.response_for(scope["path"])(scope, receive, send)
            return
        circuit.record_success()
        self.gateway.served.labels("upstream").inc()
        await self._relay_answer(upstream, scope, receive, send, response)

    # --- upstream ---------------------------------------------------------------------

    async def _ask(
        self, upstream: Upstream, scope: Scope, headers: dict[str, str], body: bytes, streamed: bool
    ) -> aiohttp.ClientResponse:
        """The upstream's answer, its body not yet read; _Blocked when the upstream is blocked."""
        gateway = self.gateway
        forwarded = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP}
        if upstream.key is not None or gateway.own_keys:  # the upstream's own key replaces whatever the client sent
            forwarded = {k: v for k, v in forwarded.items() if k not in _CREDENTIALS} | upstream.auth_headers()
        forwarded["accept-encoding"] = "identity"  # relayed as is, and an error event can still be appended
        url = upstream.url_for(scope["path"], scope["query_string"])
        first_byte = gateway.timeout if streamed else max(gateway.timeout, gateway.answer_timeout)
        for attempt in range(gateway.retries + 1):
            response = await self._first_byte(scope["method"], url, forwarded, body, first_byte)
            retryable = response.status >= 500 or response.status == 429
            if str(response.status) in gateway.causes:
                response.release()
                raise _Blocked(str(response.status))
            if not (retryable and gateway.retries):
                return response
            response.release()
            if attempt == gateway.retries:
                raise _Blocked(str(response.status))
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _first_byte(
        self, method: str, url: str, headers: dict[str, str], body: bytes, limit: float
    ) -> aiohttp.ClientResponse:
        """The upstream's status line and headers within `limit` seconds; _Blocked when it cannot be reached."""
        try:
            return await self.gateway.send(method, url, headers, body, limit)
        except (aiohttp.ClientError, OSError) as error:  # TimeoutError is an OSError
            cause = blocked_cause(error) or "connect"
            if cause not in self.gateway.causes:
                raise _Unreachable(cause) from None
            raise _Blocked(cause) from None

    async def _relay_answer(
        self, upstream: Upstream, scope: Scope, receive: Receive, send: Send, response: aiohttp.ClientResponse
    ) -> None:
        """Relay status, headers and body as they arrive; stop the upstream when the client hangs up."""
        relayed = [
            (k.lower(), v)
            for k, v in response.raw_headers
            if k.lower().decode("latin-1") not in _HOP_BY_HOP - {"content-length"}
        ]
        event_stream = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in relayed)
        relay = asyncio.create_task(_relay(response, send))
        watch = asyncio.create_task(_disconnected(receive))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [*relayed, (SERVED_BY, b"upstream")],
                }
            )
            await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not relay.done():  # the client hung up: stop reading (and paying for) the upstream's answer
                return
            try:
                relay.result()
            except (aiohttp.ClientError, OSError) as error:  # broke after it began: no replay
                log.warning("upstream %s broke off mid-answer (%s)", upstream.kind, type(error).__name__)
                self.gateway.circuits[upstream.kind].record_block("midstream", at_once=True)
                if not event_stream:
                    raise  # a plain body cut short: the connection is closed, its length tells the client
                await send(
                    {
                        "type": "http.response.body",
                        "body": _error_frame(upstream.kind, scope["path"]),
                        "more_body": True,
                    }
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            for task in (relay, watch):
                task.cancel()
            await asyncio.gather(relay, watch, return_exceptions=True)
            response.close()  # a body read to its end left the connection in the pool already; one cut short is dropped

    # --- local ------------------------------------------------------------------------

    async def _local(
        self, scope: Scope, receive: Receive, body: bytes, send: Send, model: str | None, cause: str | None
    ) -> None:
        """Answer with the local route of the same API, the model mapped when the request named an upstream one."""
        local = model
        if cause is not None:
            self.gateway.fallbacks.labels(cause).inc()
            log.info("upstream blocked (%s): answering locally", cause)
            if isinstance(model, str):
                local = self.gateway.routes.mapped(model) or self.gateway.routes.fallback or model
                body = await _with_model(body, local)
        served = f"local:{local}" if local else "local"
        self.gateway.served.labels("local").inc()
        replay = _replay(body, receive)

        async def send_marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (SERVED_BY, served.encode("latin-1"))]}
            await send(message)

        await self.app(scope, replay, send_marked)


async def _relay(response: aiohttp.ClientResponse, send: Send) -> None:
    """The upstream's body to the client as it arrives.

    Each read takes everything buffered since the last one, so a fast stream's many small SSE events leave
    in one write. A slow client makes `send` wait, which stops the reads, so aiohttp stops reading the socket.
    """
    async for data in response.content.iter_any():
        await send({"type": "http.response.body", "body": data, "more_body": True})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body (the body-size guard in front has bounded it); None when the client left mid-way."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _disconnected(receive: Receive) -> None:
    """Return when the client hangs up (the request body is already read, so the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that hands the app this body once, then the connection's own messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body's JSON object, decoded off the event loop under the local routes' bounds; None if it is not one."""
    try:
        value = await decode_in_thread(body)
    except (APIError, RequestValidationError):
        return None
    return value if isinstance(value, dict) else None


async def _with_model(body: bytes, model: str) -> bytes:
    """The request body with another model named."""
    payload = await _json_object(body)
    if payload is None:
        return body
    return await asyncio.to_thread(orjson.dumps, {**payload, "model": model})


def _error_frame(kind: str, path: str) -> bytes:
    """The API's in-stream error event, for an upstream stream that broke off."""
    message = "The upstream API stopped answering mid-stream; send the request again to have the local model answer it."
    if kind == "anthropic":
        payload: dict[str, Any] = {"type": "error", "error": {"type": "api_error", "message": message}}
        return f"event: error\ndata: {json.dumps(payload)}\n\n".encode()
    if path == "/v1/responses":
        payload = {"type": "error", "code": "upstream_failed", "message": message, "param": None, "sequence_number": 0}
        return f"event: error\ndata: {json.dumps(payload)}\n\n".encode()
    payload = {"error": {"message": message, "type": "server_error", "code": "upstream_failed"}}
    return f"data: {json.dumps(payload)}\n\n".encode()
