"""`serve --upstream`: the closed API while it answers, the local model when it is blocked (sovereign/gateway).

A fake upstream on loopback (tests/fake_upstream.py) is switched between healthy, 451, 403, refused,
black hole and mid-stream failure; the official clients point at sovereign (over the scripted
engine) and must get a valid answer in every mode, with `x-sovereign-served-by` saying who gave it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from sovereign.errors import BadUpstream
from sovereign.gateway import Gateway
from sovereign.gateway.upstream import parse_upstream
from sovereign.model_routes import ModelRoutes
from sovereign.server.app import ServerOptions, create_app
from tests.fake_engine import FakeEngine
from tests.fake_upstream import FORBIDDEN_KEY, TEXT, FakeUpstream
from tests.servers import InProcessServer

LOCAL = "fake:model"
CLIENT_KEY = "sk-ant-client-secret-0001"
ASK = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as running:
        yield running


@pytest.fixture
def gateway(upstream: FakeUpstream) -> Gateway:
    upstreams = {
        "anthropic": parse_upstream(f"anthropic={upstream.url}", {}),
        "openai": parse_upstream(f"openai={upstream.url}/v1", {}),
    }
    routes = ModelRoutes((("claude-*", LOCAL), ("gpt-*", LOCAL)), fallback=LOCAL)
    return Gateway(upstreams, routes, timeout=0.5, answer_timeout=0.5, threshold=3, probe_every=0.1)


@pytest.fixture
def server(gateway: Gateway) -> Iterator[InProcessServer]:
    with InProcessServer(create_app(FakeEngine(), ServerOptions(preload=(LOCAL,), gateway=gateway))) as running:
        yield running


def _anthropic(server: InProcessServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=CLIENT_KEY, max_retries=0, timeout=10)


def _openai(server: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=10)


def _ask_anthropic(server: InProcessServer, *, stream: bool = False) -> tuple[str, str]:
    """The answer's text and who served it, through the official client."""
    client = _anthropic(server)
    if stream:
        with client.messages.with_streaming_response.create(
            model="claude-opus-4-8", max_tokens=32, messages=ASK, stream=True
        ) as response:  # type: ignore[arg-type]
            served = response.headers["x-sovereign-served-by"]
            text = "".join(
                event.delta.text
                for event in response.parse()
                if event.type == "content_block_delta" and event.delta.type == "text_delta"
            )  # type: ignore[union-attr]
        return text, served
    raw = client.messages.with_raw_response.create(model="claude-opus-4-8", max_tokens=32, messages=ASK)  # type: ignore[arg-type]
    message = raw.parse()
    return "".join(block.text for block in message.content if block.type == "text"), raw.headers[
        "x-sovereign-served-by"
    ]


def _ask_openai(server: InProcessServer, *, stream: bool = False) -> tuple[str, str]:
    client = _openai(server)
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4.1", messages=ASK, stream=True
        ) as response:  # type: ignore[arg-type]
            served = response.headers["x-sovereign-served-by"]
            text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
        return text, served
    raw = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=ASK)  # type: ignore[arg-type]
    return raw.parse().choices[0].message.content or "", raw.headers["x-sovereign-served-by"]


def _ask_responses(server: InProcessServer) -> tuple[str, str]:
    raw = _openai(server).responses.with_raw_response.create(model="gpt-4.1", input="hello there")
    return raw.parse().output_text, raw.headers["x-sovereign-served-by"]


def test_a_healthy_upstream_answers_everything(
    server: InProcessServer, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for ask in (
        _ask_anthropic,
        lambda s: _ask_anthropic(s, stream=True),
        _ask_openai,
        lambda s: _ask_openai(s, stream=True),
        _ask_responses,
    ):
        text, served = ask(server)
        assert (text, served) == (TEXT, "upstream")
    # The client's own credentials reach the upstream unchanged, and never sovereign's logs.
    sent = upstream.requests_to("/v1/messages")[0].headers
    assert (
        CLIENT_KEY in (sent.get("x-api-key"), sent.get("authorization", "").removeprefix("Bearer "))
        and sent["anthropic-version"]
    )
    assert upstream.requests_to("/v1/chat/completions")[0].headers["authorization"] == f"Bearer {CLIENT_KEY}"
    assert CLIENT_KEY not in caplog.text


@pytest.mark.parametrize("mode", ["451", "403", "refused", "blackhole"])
def test_a_blocked_upstream_falls_back_to_the_local_model(
    server: InProcessServer, upstream: FakeUpstream, mode: str
) -> None:
    upstream.mode = mode
    for ask in (
        _ask_anthropic,
        lambda s: _ask_anthropic(s, stream=True),
        _ask_openai,
        lambda s: _ask_openai(s, stream=True),
        _ask_responses,
    ):
        text, served = ask(server)
        assert served == f"local:{LOCAL}" and text.startswith("You said:"), (mode, text, served)


def test_the_circuit_opens_after_three_blocks_and_closes_when_the_upstream_answers(
    server: InProcessServer, upstream: FakeUpstream
) -> None:
    upstream.mode = "451"
    for _ in range(3):
        assert _ask_anthropic(server)[1] == f"local:{LOCAL}"
    health = httpx.get(server.url + "/health").json()["upstreams"]["anthropic"]
    assert health["circuit"] == "open" and health["last_cause"] == "451"
    tried = len(upstream.requests_to("/v1/messages"))
    assert _ask_anthropic(server)[1] == f"local:{LOCAL}"
    assert len(upstream.requests_to("/v1/messages")) == tried, "an open circuit must not try the upstream"
    metrics = httpx.get(server.url + "/metrics").text
    assert (
        'sovereign_gateway_fallbacks_total{cause="451"} 3.0' in metrics
        and 'sovereign_gateway_circuit_open{upstream="anthropic"} 1.0' in metrics
    )
    upstream.mode = "healthy"
    deadline = time.monotonic() + 5
    while httpx.get(server.url + "/health").json()["upstreams"]["anthropic"]["circuit"] == "open":
        assert time.monotonic() < deadline, "the probe never closed the circuit"
        time.sleep(0.05)
    assert _ask_anthropic(server) == (TEXT, "upstream")
    assert (
        httpx.get(server.url + "/health").json()["upstreams"]["openai"]["circuit"] == "closed"
    )  # each upstream has its own


def test_one_clients_forbidden_key_does_not_send_everyone_local(upstream: FakeUpstream) -> None:
    upstreams = {"anthropic": parse_upstream(f"anthropic={upstream.url}", {})}
    gateway = Gateway(
        upstreams, ModelRoutes((), fallback=LOCAL), timeout=0.5, threshold=3, probe_every=600
    )  # no timed probe in this test
    with InProcessServer(create_app(FakeEngine(), ServerOptions(preload=(LOCAL,), gateway=gateway))) as server:
        forbidden = anthropic.Anthropic(base_url=server.url, api_key=FORBIDDEN_KEY, max_retries=0, timeout=10)
        for _ in range(3):  # a 403 falls back, as asked; three in a row open the circuit...
            raw = forbidden.messages.with_raw_response.create(model="claude-x", max_tokens=8, messages=ASK)  # type: ignore[arg-type]
            assert raw.headers["x-sovereign-served-by"] == f"local:{LOCAL}"
        deadline = time.monotonic() + 5
        while httpx.get(server.url + "/health").json()["upstreams"]["anthropic"]["circuit"] == "open":
            assert time.monotonic() < deadline, "the route answers a keyless probe, yet the circuit stayed open"
            time.sleep(0.02)
        assert _ask_anthropic(server) == (TEXT, "upstream")  # ...until a probe at once shows the route itself answers


def test_an_upstream_400_reaches_the_client_unchanged(server: InProcessServer, upstream: FakeUpstream) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        _anthropic(server).messages.create(model="bad-request", max_tokens=8, messages=ASK)  # type: ignore[arg-type]
    assert refused.value.response.headers["x-sovereign-served-by"] == "upstream"
    with pytest.raises(openai.BadRequestError):
        _openai(server).chat.completions.create(model="bad-request", messages=ASK)  # type: ignore[arg-type]
    assert httpx.get(server.url + "/health").json()["upstreams"]["anthropic"]["failures"] == 0


def test_a_local_model_by_name_never_goes_upstream(server: InProcessServer, upstream: FakeUpstream) -> None:
    raw = _anthropic(server).messages.with_raw_response.create(model=LOCAL, max_tokens=16, messages=ASK)  # type: ignore[arg-type]
    assert raw.headers["x-sovereign-served-by"] == f"local:{LOCAL}"
    assert raw.parse().content[0].text.startswith("You said:")  # type: ignore[union-attr]
    assert upstream.requests_to("/v1/messages") == []


def test_a_stream_that_breaks_midway_ends_with_an_error_and_opens_the_circuit(
    server: InProcessServer, upstream: FakeUpstream, gateway: Gateway
) -> None:
    gateway.circuits[
        "anthropic"
    ].probe_every = 60  # the fake answers probes in this mode: keep the circuit open for the check
    upstream.mode = "midstream"
    with pytest.raises(anthropic.APIError):
        _ask_anthropic(server, stream=True)
    assert httpx.get(server.url + "/health").json()["upstreams"]["anthropic"]["circuit"] == "open"
    text, served = _ask_anthropic(server)  # the next request goes local at once
    assert served == f"local:{LOCAL}" and text.startswith("You said:")


def test_the_upstreams_own_key_replaces_the_clients(upstream: FakeUpstream) -> None:
    up = parse_upstream(f"anthropic={upstream.url}", {"SOVEREIGN_UPSTREAM_KEY_ANTHROPIC": "sk-ant-configured"})
    gateway = Gateway({"anthropic": up}, ModelRoutes(fallback=LOCAL), timeout=0.5)
    with InProcessServer(create_app(FakeEngine(), ServerOptions(preload=(LOCAL,), gateway=gateway))) as server:
        assert _ask_anthropic(server) == (TEXT, "upstream")
    assert upstream.requests_to("/v1/messages")[0].headers["x-api-key"] == "sk-ant-configured"


def test_bad_upstream_values_are_refused() -> None:
    for text in ("bedrock=https://x", "anthropic", "openai=ftp://x", "openai=not a url"):
        with pytest.raises(BadUpstream):
            parse_upstream(text, {})


def test_serve_with_an_upstream_end_to_end(real_model_home: Path, upstream: FakeUpstream) -> None:
    """The command line as the README gives it.

    The upstream answers while it can; the real local model, once it is blocked.
    """
    from tests.conftest import GEMMA
    from tests.servers import ServerProcess

    args = [GEMMA, "--upstream", f"openai={upstream.url}/v1", "--route", f"gpt-*={GEMMA}", "--upstream-timeout", "1"]
    with ServerProcess(
        real_model_home, *args, env={"SOVEREIGN_UPSTREAM_KEY_OPENAI": "sk-configured-upstream-key"}
    ) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sovereign-or-anything", max_retries=0, timeout=60)
        raw = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=ASK, max_tokens=4)  # type: ignore[arg-type]
        assert raw.headers["x-sovereign-served-by"] == "upstream" and raw.parse().choices[0].message.content == TEXT
        assert (
            upstream.requests_to("/v1/chat/completions")[0].headers["authorization"]
            == "Bearer sk-configured-upstream-key"
        )
        upstream.mode = "refused"
        raw = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=ASK, max_tokens=4)  # type: ignore[arg-type]
        assert raw.headers["x-sovereign-served-by"] == f"local:{GEMMA}" and raw.parse().model == GEMMA
        assert httpx.get(server.url + "/health").json()["upstreams"]["openai"]["last_cause"] == "connect"
        log = server.log()
    assert f"upstream openai: {upstream.url}/v1" in log and "SOVEREIGN_UPSTREAM_KEY_OPENAI" in log  # said at start-up
    assert "sk-configured-upstream-key" not in log


def test_each_way_of_not_answering_is_named_by_its_cause(upstream: FakeUpstream) -> None:
    """refused -> connect, an unknown host -> dns, plain text where TLS was expected -> tls, silence -> timeout."""
    import asyncio
    import socket
    import threading

    from sovereign.gateway.upstream import blocked_cause

    plain = socket.create_server(("127.0.0.1", 0))  # answers a TLS hello with plain HTTP, then hangs up

    def answer_plainly() -> None:
        connection, _ = plain.accept()
        with connection:
            connection.recv(1024)
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    threading.Thread(target=answer_plainly, daemon=True).start()
    upstream.mode = "refused"
    gateway = Gateway({}, ModelRoutes((), fallback=LOCAL), timeout=0.5)

    async def cause_of(url: str) -> str | None:
        try:
            (await gateway.send("GET", url, {}, b"", 0.5)).release()
        except Exception as error:  # noqa: BLE001 - the point is which one
            return blocked_cause(error)
        return "answered"

    async def causes() -> list[str | None]:
        found = [
            await cause_of(url)
            for url in (
                f"{upstream.url}/v1/models",
                "http://sovereign-test.invalid/v1/models",
                f"https://127.0.0.1:{plain.getsockname()[1]}/v1/models",
            )
        ]
        upstream.mode = "blackhole"
        found.append(await cause_of(f"{upstream.url}/v1/models"))
        await gateway.close()
        return found

    with plain:
        assert asyncio.run(causes()) == ["connect", "dns", "tls", "timeout"]


def test_only_a_403_or_451_has_the_circuit_probe_at_once() -> None:
    """Those may be about one client's key; a run of 5xx (with --upstream-retries) waits for the timed probe."""
    import asyncio

    from sovereign.gateway.circuit import Circuit

    async def probes_after_opening(cause: str) -> int:
        calls = 0

        async def probe() -> bool:
            nonlocal calls
            calls += 1
            return False

        circuit = Circuit("test", probe, threshold=1, probe_every=600)
        circuit.record_block(cause)
        await asyncio.sleep(0.05)
        circuit.stop()
        return calls

    assert [asyncio.run(probes_after_opening(cause)) for cause in ("403", "451", "503", "timeout")] == [1, 1, 0, 0]
