"""No request may kill or wedge the server (issue 12).

Foreign Hosts and Origins, huge bodies, lone surrogates, long names: none of them may.

The guards are tested twice: in-process around a tiny app (every rule, fast), and against the real
`sovereign serve` of the session, which must answer each bad request in its API's envelope and keep serving.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sovereign.errors import InvalidReference, SovereignError
from sovereign.refs import MAX_PART_LENGTH, parse_name
from sovereign.server import errors
from sovereign.server.guards import BodyLimit, HostGuard, allowed_hosts_for, parse_size
from tests.conftest import GEMMA
from tests.servers import ServerProcess

# --- the guards around a tiny app ---------------------------------------------------------


def _app(*, allowed_hosts: tuple[str, ...] = (), cors_origins: tuple[str, ...] = (), max_body: int = 1024) -> FastAPI:
    app = FastAPI()
    errors.install(app)
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(HostGuard, allowed_hosts=allowed_hosts, cors_origins=cors_origins)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": []}

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        return {"size": len(json.dumps(body))}

    @app.post("/v1/messages")
    async def messages(body: dict[str, Any]) -> dict[str, Any]:
        return {"size": len(json.dumps(body))}

    return app


def _call(app: FastAPI, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:11800") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def _openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:11800",
        "localhost",
        "LOCALHOST:1",
        "[::1]:11800",
        "::1",
        "app.localhost:8080",
        "0.0.0.0:11800",
        "192.168.1.20",
        "printer.local",
        "host.docker.internal:11800",
    ],
)
def test_this_machines_names_pass(host: str) -> None:
    assert _call(_app(), "GET", "/v1/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "host", ["attacker.example", "attacker.example:11800", "localhost.attacker.example", "8.8.8.8", "127.0.0.1.nip.io"]
)
def test_a_foreign_host_is_refused_as_dns_rebinding(host: str) -> None:
    error = _openai_error(_call(_app(), "GET", "/v1/models", headers={"Host": host}), 403, "host_not_allowed")
    assert "--allowed-hosts" in error["message"]


def test_anthropic_clients_get_anthropics_envelope() -> None:
    response = _call(_app(), "POST", "/v1/messages", json={}, headers={"Host": "attacker.example"})
    assert response.status_code == 403 and response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "permission_error"


def test_allowed_hosts_open_the_guard() -> None:
    named = _app(allowed_hosts=("models.example.com", "*.corp.example"))
    assert _call(named, "GET", "/v1/models", headers={"Host": "models.example.com:443"}).status_code == 200
    assert _call(named, "GET", "/v1/models", headers={"Host": "gpu1.corp.example"}).status_code == 200
    assert _call(named, "GET", "/v1/models", headers={"Host": "attacker.example"}).status_code == 403
    assert (
        _call(_app(allowed_hosts=("*",)), "GET", "/v1/models", headers={"Host": "attacker.example"}).status_code == 200
    )


def test_allowed_hosts_follow_the_bind_address() -> None:
    assert (
        allowed_hosts_for("127.0.0.1", None) == ()
        and allowed_hosts_for("::1", None) == ()
        and allowed_hosts_for("localhost", None) == ()
    )
    assert allowed_hosts_for("0.0.0.0", None) == ("*",), (
        "bound beyond loopback, every Host is expected (as Ollama does)"
    )
    assert allowed_hosts_for("0.0.0.0", "a.example, B.example") == ("a.example", "b.example")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:3000", True),
        ("http://127.0.0.1:5173", True),
        ("https://ui.localhost", True),
        ("http://[::1]:8080", True),
        ("vscode-webview://abc", True),
        ("http://127.0.0.1:11800", True),
        ("https://evil.example", False),
        ("null", False),
        ("http://localhost.evil.example", False),
        ("http://192.168.1.1", False),
    ],
)
def test_browser_origins(origin: str, allowed: bool) -> None:
    response = _call(_app(), "POST", "/v1/chat/completions", json={"a": 1}, headers={"Origin": origin})
    if allowed:
        assert response.status_code == 200, response.text
    else:
        _openai_error(response, 403, "origin_not_allowed")


def test_a_cors_origin_is_allowed() -> None:
    assert (
        _call(
            _app(cors_origins=("https://app.example",)), "GET", "/v1/models", headers={"Origin": "https://app.example"}
        ).status_code
        == 200
    )
    assert (
        _call(_app(cors_origins=("*",)), "GET", "/v1/models", headers={"Origin": "https://any.example"}).status_code
        == 200
    )
    assert (
        _call(
            _app(cors_origins=("https://app.example",)), "GET", "/v1/models", headers={"Origin": "https://evil.example"}
        ).status_code
        == 403
    )


def test_a_body_over_the_limit_is_refused_from_content_length() -> None:
    error = _openai_error(_call(_app(), "POST", "/v1/chat/completions", content=b"x" * 2000), 413, "request_too_large")
    assert "--max-body" in error["message"]
    anthropic = _call(_app(), "POST", "/v1/messages", content=b"x" * 2000)
    assert anthropic.status_code == 413 and anthropic.json()["error"]["type"] == "request_too_large"
    assert _call(_app(), "POST", "/v1/chat/completions", json={"a": "x" * 900}).status_code == 200


def test_a_streamed_body_is_counted_as_it_arrives() -> None:
    sent = []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            sent.append(1)
            yield b"x" * 100

    _openai_error(_call(_app(), "POST", "/v1/chat/completions", content=chunks()), 413, "request_too_large")
    assert len(sent) < 20, "refused at the chunk that passed the limit, not after the whole body"

    async def small() -> AsyncIterator[bytes]:
        yield b'{"a": '
        yield b"1}"

    assert _call(
        _app(), "POST", "/v1/chat/completions", content=small(), headers={"Content-Type": "application/json"}
    ).json() == {"size": 8}


def test_the_limit_holds_behind_the_api_key_check() -> None:
    """The key check is a BaseHTTPMiddleware, whose task group would turn an exception from receive() into a 400."""
    from sovereign.server.app import ServerOptions, create_app
    from tests.fake_engine import FakeEngine

    app = create_app(FakeEngine(), ServerOptions(preload=("fake:model",), api_keys=("k",), max_body=1000))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield b"x" * 100

    headers = {"Authorization": "Bearer k", "x-api-key": "k", "Content-Type": "application/json"}
    _openai_error(
        _call(app, "POST", "/v1/chat/completions", content=chunks(), headers=headers), 413, "request_too_large"
    )
    assert (
        _call(app, "POST", "/v1/messages", content=chunks(), headers=headers).json()["error"]["type"]
        == "request_too_large"
    )
    small = {"model": "fake:model", "messages": [{"role": "user", "content": "hi"}]}
    assert _call(app, "POST", "/v1/chat/completions", json=small, headers=headers).status_code == 200


def test_an_open_host_still_refuses_a_rebound_pages_origin() -> None:
    """Bound beyond loopback every Host passes.

    But a page on attacker.example still cannot drive the server from a browser.
    """
    headers = {"Host": "attacker.example:11800", "Origin": "http://attacker.example:11800"}
    _openai_error(
        _call(_app(allowed_hosts=("*",)), "POST", "/v1/chat/completions", json={}, headers=headers),
        403,
        "origin_not_allowed",
    )


def test_sizes_parse() -> None:
    assert (
        parse_size("32MiB") == 32 * 1024 * 1024
        and parse_size("100MB") == 100 * 1024 * 1024
        and parse_size("1g") == 1024**3
    )
    assert parse_size("4096") == 4096
    for bad in ("", "lots", "-1", "0", "0.5", "12 parsecs"):
        with pytest.raises(SovereignError, match="--max-body"):
            parse_size(bad)


def test_model_names_are_bounded() -> None:
    assert parse_name("a" * MAX_PART_LENGTH + ":" + "b" * MAX_PART_LENGTH).tag == "b" * MAX_PART_LENGTH
    assert str(parse_name(f"hf.co/{'o' * 96}/{'r' * 96}:{'t' * 128}")).startswith("hf.co/")
    for name in (
        "a" * 256,
        "a" * (MAX_PART_LENGTH + 1) + ":x",
        "x:" + "t" * (MAX_PART_LENGTH + 1),
        "/".join(["abcdef"] * 60),
        "a" * 1_000_000,
    ):
        with pytest.raises(InvalidReference) as error:
            parse_name(name)
        assert len(str(error.value)) < 300, "the message does not echo a huge name back"


# --- against the real server --------------------------------------------------------------


def test_real_server_refuses_a_foreign_host_on_every_path(server: ServerProcess) -> None:
    for path in ("/v1/models", "/health", "/metrics"):
        response = httpx.get(f"{server.url}{path}", headers={"Host": "attacker.example"})
        assert response.status_code == 403, (path, response.text)
    assert httpx.get(f"{server.base_url}/models", headers={"Host": f"localhost:{server.port}"}).status_code == 200
    assert httpx.get(f"{server.base_url}/models").status_code == 200
    foreign = httpx.post(
        f"{server.url}/v1/messages", json={}, headers={"Host": "attacker.example", "anthropic-version": "2023-06-01"}
    )
    assert foreign.status_code == 403 and foreign.json()["error"]["type"] == "permission_error"
    evil = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": GEMMA, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Origin": "https://evil.example"},
    )
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "origin_not_allowed"


def test_allowed_hosts_option_opens_the_real_server(real_model_home: Any) -> None:
    with ServerProcess(
        real_model_home, GEMMA, "--allowed-hosts", "models.example.com", "--max-body", "1MiB"
    ) as running:
        assert httpx.get(f"{running.base_url}/models", headers={"Host": "models.example.com"}).status_code == 200
        assert httpx.get(f"{running.base_url}/models", headers={"Host": "attacker.example"}).status_code == 403
        too_big = httpx.post(f"{running.base_url}/embeddings", json={"model": GEMMA, "input": "x" * (1024 * 1024)})
        assert too_big.status_code == 413 and "1 MiB" in too_big.json()["error"]["message"]


def test_a_bad_serve_option_is_one_line() -> None:
    from tests.conftest import assert_clean_error, run_cli

    assert_clean_error(run_cli("serve", "--max-body", "lots", "--port", "1"), "--max-body")


def test_a_huge_declared_body_is_refused_before_it_is_sent(server: ServerProcess) -> None:
    """50 MB announced: the 413 comes back at once, without waiting for (or reading) a byte of it."""
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {50 * 1000 * 1000}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"request_too_large" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer, answer
    assert b"100 Continue" not in answer, "the body was never invited"
    # Not a byte of the body was sent, so an answer at all proves it was not awaited (a server waiting for it
    # would leave recv to time out); the bound only says "at once": milliseconds, even on a saturated machine.
    assert time.monotonic() - started < 10
    assert httpx.get(f"{server.url}/health").status_code == 200


def peak_memory_growth(pid: int) -> Callable[[], int]:
    """From now, how far a process's peak resident memory has risen above its current one (Linux's VmHWM, reset)."""

    def kib(key: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {key} line")

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: the peak becomes the current resident size
    resident = kib("VmRSS")
    return lambda: (kib("VmHWM") - resident) * 1024


def test_a_huge_body_sent_in_full_is_refused_quickly(server: ServerProcess) -> None:
    assert server.process is not None
    body = b'{"model": "' + GEMMA.encode() + b'", "input": "' + b"x" * (40 * 1024 * 1024) + b'"}'
    grown = peak_memory_growth(server.process.pid)
    started = time.monotonic()
    response = httpx.post(
        f"{server.base_url}/embeddings", content=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    # Memory, not time, shows the body was never read: holding it costs 40 MiB and parsing it more (a 30 MiB body
    # that is parsed raises the peak by ~150 MiB), where the refusal from Content-Length raised it by under 1 MiB.
    assert grown() < 8 * 2**20, f"the server's peak memory rose by {grown() / 2**20:.0f} MiB: it read the body"
    # A hang guard only: the refusal takes 0.05 s, parsing 40 MiB under a second, so time cannot tell them apart.
    assert time.monotonic() - started < 30

    def chunks() -> Any:
        yield b'{"model": "' + GEMMA.encode() + b'", "input": "'
        for _ in range(40):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    streamed = httpx.post(
        f"{server.base_url}/embeddings", content=chunks(), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert streamed.status_code == 413, streamed.text
    assert httpx.get(f"{server.url}/health").status_code == 200


# Each text endpoint, a body with a lone surrogate in one text field, and the field the 400 must name.
SURROGATE_CASES = [
    (
        "/v1/chat/completions",
        {"model": GEMMA, "messages": [{"role": "user", "content": "hi \ud800"}]},
        "messages.0.content",
    ),
    ("/v1/completions", {"model": GEMMA, "prompt": "\udfff tail"}, "prompt"),
    ("/v1/embeddings", {"model": GEMMA, "input": ["fine", "bad \ud800"]}, "input.1"),
    ("/tokenize", {"model": GEMMA, "content": "\ud800"}, "content"),
    (
        "/v1/messages",
        {
            "model": GEMMA,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}],
        },
        "messages.0.content.0.text",
    ),
    (
        "/v1/messages/count_tokens",
        {"model": GEMMA, "messages": [{"role": "user", "content": "ok"}], "system": "\ud800"},
        "system",
    ),
    ("/v1/responses", {"model": GEMMA, "input": [{"role": "user", "content": "\ud800"}]}, "input.0.content"),
]


@pytest.mark.parametrize(("path", "body", "field"), SURROGATE_CASES, ids=[case[0] for case in SURROGATE_CASES])
def test_a_lone_surrogate_is_a_400_naming_the_field(
    server: ServerProcess, path: str, body: dict[str, Any], field: str
) -> None:
    # json.dumps writes the surrogate as the escape \ud800, as a client's JSON encoder would.
    response = httpx.post(f"{server.url}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    if path.startswith("/v1/messages"):
        assert response.json()["type"] == "error" and response.json()["error"]["type"] == "invalid_request_error"
        assert field in response.json()["error"]["message"]
    else:
        error = response.json()["error"]
        assert error["param"] == field and error["code"] == "invalid_value" and "surrogate" in error["message"], error
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_lone_surrogate_in_a_key_is_named_safely(server: ServerProcess) -> None:
    body = f'{{"model": "{GEMMA}", "messages": [{{"role": "user", "content": "hi", "\\ud800": 1}}]}}'
    response = httpx.post(
        f"{server.base_url}/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.\\ud800"


@pytest.mark.parametrize("length", [129, 256, 300, 5000])
def test_overlong_model_names_are_not_found_not_500(server: ServerProcess, length: int) -> None:
    name = "m" * length
    chat = httpx.post(
        f"{server.base_url}/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found", chat.text
    retrieve = httpx.get(f"{server.base_url}/models/{name}")
    assert retrieve.status_code == 404 and retrieve.json()["error"]["code"] == "model_not_found", retrieve.text
    anthropic = httpx.post(
        f"{server.url}/v1/messages",
        json={"model": name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert anthropic.status_code == 404 and anthropic.json()["error"]["type"] == "not_found_error", anthropic.text
    assert httpx.get(f"{server.url}/health").status_code == 200
