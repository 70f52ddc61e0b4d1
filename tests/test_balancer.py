"""Several sovereign servers behind nginx, request by request: the README's recipe, run as written (issue 26).

docs/nginx-balancer.conf is the file users copy; this test runs that very file, with loopback ports in
place of the example addresses, in front of two servers over the scripted engine. The official clients
talk to nginx with retries off, so any error nginx lets through would fail the test.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from types import TracebackType

import anthropic
import httpx
import openai
import pytest

from sovereign.engine import ChatRequest, CompletionRequest, Generation, TextDelta
from sovereign.engine.requests import Event
from sovereign.errors import ServerBusy
from sovereign.server.app import ServerOptions, create_app
from tests.conftest import skip_or_fail
from tests.fake_engine import FakeEngine
from tests.servers import InProcessServer, free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "docs" / "nginx-balancer.conf"
EXAMPLE_SERVERS = ("192.168.1.11:11800", "192.168.1.12:11800")
EXAMPLE_LISTEN = "listen 8080;"
MODEL = "fake:model"
KEY = "sk-balancer-test"
ASK = "hello there"
ANSWER = f"You said: {ASK}"


class BusyEngine(FakeEngine):
    """The scripted engine with every slot taken: it answers 503 server_overloaded, and counts the refusals."""

    refused = 0

    async def submit(self, request: ChatRequest | CompletionRequest) -> Generation:
        self.refused += 1
        raise ServerBusy(8, 2)


class GatedEngine(FakeEngine):
    """The scripted engine that, after its first word, waits for the test to open its gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting = threading.Event()

    async def submit(self, request: ChatRequest | CompletionRequest) -> Generation:
        generation = await super().submit(request)
        return Generation(generation.model, self._gated(aiter(generation)), generation.stop, generation.prompt_tokens)

    async def _gated(self, events: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
        first = True
        async for event in events:
            yield event
            if first and isinstance(event, TextDelta):
                first = False
                self.waiting.set()
                await asyncio.to_thread(self.gate.wait, 30)  # the bound only ends a failed test sooner
                self.waiting.clear()


class DyingServer:
    """A machine that dies with the request: it accepts the connection, reads, and closes without answering."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.accepted = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._done.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            with connection:
                self.accepted += 1
                connection.settimeout(5)
                try:
                    connection.recv(65536)
                except OSError:
                    pass

    def __enter__(self) -> DyingServer:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._done.set()
        self._thread.join(10)
        self._listener.close()


def nginx_binary() -> str | None:
    """nginx on PATH, or where Debian puts it (/usr/sbin is not on a plain user's PATH)."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def recipe_for(servers: list[str], port: int) -> str:
    """docs/nginx-balancer.conf with these servers and a loopback listener in place of the examples."""
    text = RECIPE.read_text()
    for example, actual in zip(EXAMPLE_SERVERS, servers, strict=True):
        assert text.count(f"server {example} ") == 1, f"the recipe no longer names {example}: update this test"
        text = text.replace(f"server {example} ", f"server {actual} ")
    assert text.count(EXAMPLE_LISTEN) == 1, f"the recipe no longer has '{EXAMPLE_LISTEN}': update this test"
    return text.replace(EXAMPLE_LISTEN, f"listen 127.0.0.1:{port};")


class Nginx:
    """nginx in the foreground with the recipe as its only site; every file it writes lies under `directory`."""

    def __init__(self, binary: str, directory: Path, servers: list[str]) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Run as root (CI), nginx would drop its workers to `nobody`, who cannot enter pytest's private temp dir.
        user = (
            f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"
            if os.geteuid() == 0
            else ""
        )
        temp = {kind: directory / kind for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        self.config = directory / "nginx.conf"
        self.config.write_text(
            f"{user}\nworker_processes 1;\npid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'} info;\n"
            "events { worker_connections 256; }\nhttp {\n"
            f"    access_log {directory / 'access.log'};\n"
            + "".join(f"    {kind}_temp_path {path};\n" for kind, path in temp.items())
            + recipe_for(servers, self.port)
            + "\n}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Nginx:
        command = [self.binary, "-p", str(self.directory), "-c", str(self.config), "-e", "stderr"]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"nginx rejects the recipe:\n{check.stderr}"
        self._stderr = (self.directory / "stderr.log").open("wb")
        self.process = subprocess.Popen([*command, "-g", "daemon off;"], stdout=self._stderr, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError(f"nginx did not listen in 30 s:\n{self.log()}")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # nginx's fast shutdown: master and workers exit
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()


def _server(engine: FakeEngine) -> InProcessServer:
    return InProcessServer(create_app(engine, ServerOptions(api_keys=(KEY,), preload=(MODEL,))))


@pytest.fixture
def binary() -> str:
    found = nginx_binary()
    if found is None:
        skip_or_fail("nginx is not installed (apt-get install nginx): the balancer recipe runs on it")
    assert found is not None
    return found


@pytest.fixture
def engines() -> tuple[FakeEngine, FakeEngine]:
    return FakeEngine(), FakeEngine()


@pytest.fixture
def servers(engines: tuple[FakeEngine, FakeEngine]) -> Iterator[tuple[InProcessServer, InProcessServer]]:
    with _server(engines[0]) as first, _server(engines[1]) as second:
        yield first, second


@pytest.fixture
def balancer(binary: str, servers: tuple[InProcessServer, InProcessServer], tmp_path: Path) -> Iterator[Nginx]:
    directory = tmp_path / "nginx"
    directory.mkdir()
    with Nginx(binary, directory, [f"127.0.0.1:{server.port}" for server in servers]) as running:
        yield running


def _openai(balancer: Nginx) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{balancer.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def _anthropic(balancer: Nginx) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=balancer.url, api_key=KEY, max_retries=0, timeout=30)


def ask_openai(balancer: Nginx, *, stream: bool) -> str:
    """One chat completion through the balancer; its whole text."""
    client = _openai(balancer)
    messages = [{"role": "user", "content": ASK}]
    if not stream:
        reply = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
        assert reply.choices[0].finish_reason == "stop"
        return reply.choices[0].message.content or ""
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))  # type: ignore[arg-type]
    assert chunks[-1].choices[0].finish_reason == "stop"
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def ask_anthropic(balancer: Nginx, *, stream: bool) -> str:
    """One Anthropic message through the balancer; its whole text."""
    client = _anthropic(balancer)
    messages = [{"role": "user", "content": ASK}]
    if not stream:
        message = client.messages.create(model=MODEL, max_tokens=64, messages=messages)  # type: ignore[arg-type]
        assert message.stop_reason == "end_turn"
        return "".join(block.text for block in message.content if block.type == "text")
    with client.messages.stream(model=MODEL, max_tokens=64, messages=messages) as events:  # type: ignore[arg-type]
        kinds = [event.type for event in events]
        final = events.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    assert final.stop_reason == "end_turn"
    return "".join(block.text for block in final.content if block.type == "text")


ASKS = [
    lambda b: ask_openai(b, stream=False),
    lambda b: ask_openai(b, stream=True),
    lambda b: ask_anthropic(b, stream=False),
    lambda b: ask_anthropic(b, stream=True),
]


def test_requests_are_spread_over_both_servers(balancer: Nginx, engines: tuple[FakeEngine, FakeEngine]) -> None:
    for _ in range(6):
        assert ask_openai(balancer, stream=False) == ANSWER
    assert all(engine.requests for engine in engines), [len(engine.requests) for engine in engines]
    assert sum(len(engine.requests) for engine in engines) == 6


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_chat_through_the_balancer(balancer: Nginx, stream: bool) -> None:
    for _ in range(2):  # one on each server
        assert ask_openai(balancer, stream=stream) == ANSWER


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_anthropic_messages_through_the_balancer(balancer: Nginx, stream: bool) -> None:
    for _ in range(2):
        assert ask_anthropic(balancer, stream=stream) == ANSWER


def test_the_chat_page_works_through_the_balancer_by_its_name(balancer: Nginx) -> None:
    """The page, opened as http://NAME:PORT/, calls the API with that Origin: nginx must pass the port on."""
    name = f"box.local:{balancer.port}"  # a name of this machine, behind the balancer's port
    page = httpx.get(balancer.url + "/", headers={"Host": name, "Accept": "text/html"})
    assert page.status_code == 200 and '<textarea id="input"' in page.text
    headers = {"Host": name, "Origin": f"http://{name}", "Authorization": f"Bearer {KEY}"}
    assert httpx.get(balancer.url + "/v1/models", headers=headers).status_code == 200


def test_a_stopped_server_is_passed_over(
    balancer: Nginx, servers: tuple[InProcessServer, InProcessServer], engines: tuple[FakeEngine, FakeEngine]
) -> None:
    for ask in ASKS:
        assert ask(balancer) == ANSWER
    servers[0].__exit__(None, None, None)  # the machine goes away: its port now refuses connections
    before = [len(engine.requests) for engine in engines]
    for _ in range(3):  # more than max_fails: each server is tried again, and refused again
        for ask in ASKS:
            assert ask(balancer) == ANSWER
    after = [len(engine.requests) for engine in engines]
    assert after == [before[0], before[1] + 3 * len(ASKS)], (before, after, balancer.log())
    assert "Connection refused" in balancer.log()  # nginx did try the stopped server, and passed over it


def test_a_busy_server_passes_its_requests_on(binary: str, tmp_path: Path) -> None:
    """A server with every slot taken answers 503 (OpenAI routes); nginx sends the request to the next."""
    busy, idle = BusyEngine(), FakeEngine()
    with _server(busy) as busy_server, _server(idle) as idle_server:
        directory = tmp_path / "nginx"
        directory.mkdir()
        with Nginx(binary, directory, [f"127.0.0.1:{s.port}" for s in (busy_server, idle_server)]) as balancer:
            for _ in range(4):
                assert ask_openai(balancer, stream=False) == ANSWER
                assert ask_openai(balancer, stream=True) == ANSWER
    assert len(idle.requests) == 8
    assert busy.refused > 0  # the busy server was asked, and its 503 never reached the client


def test_a_server_that_dies_with_the_request_is_passed_over(binary: str, tmp_path: Path) -> None:
    """The request reached a server that closed without answering: nginx sends it to the next (non_idempotent)."""
    alive = FakeEngine()
    with DyingServer() as dying, _server(alive) as server:
        directory = tmp_path / "nginx"
        directory.mkdir()
        with Nginx(binary, directory, [f"127.0.0.1:{dying.port}", f"127.0.0.1:{server.port}"]) as balancer:
            for ask in ASKS:
                assert ask(balancer) == ANSWER
    assert len(alive.requests) == len(ASKS)
    assert dying.accepted > 0  # nginx did send a request there first


def test_streams_are_not_held_back(binary: str, tmp_path: Path) -> None:
    """The first words of both APIs' streams reach the client while the server is still generating."""
    engines = GatedEngine(), GatedEngine()
    try:
        with _server(engines[0]) as first, _server(engines[1]) as second:
            directory = tmp_path / "nginx"
            directory.mkdir()
            with Nginx(binary, directory, [f"127.0.0.1:{s.port}" for s in (first, second)]) as balancer:
                for _ in range(2):  # one on each server
                    _gated_openai_stream(balancer, engines)
                    _gated_anthropic_stream(balancer, engines)
    finally:
        for engine in engines:
            engine.gate.set()


def _open_gates(engines: tuple[GatedEngine, GatedEngine]) -> None:
    """Assert that a server is still mid-generation, then let both finish."""
    assert any(engine.waiting.is_set() for engine in engines), "the first words came only after the whole answer"
    for engine in engines:
        engine.gate.set()


def _gated_openai_stream(balancer: Nginx, engines: tuple[GatedEngine, GatedEngine]) -> None:
    for engine in engines:
        engine.gate.clear()
    stream = _openai(balancer).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": ASK}],
        stream=True,  # type: ignore[arg-type]
    )
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and not text:
            _open_gates(engines)
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert text == ANSWER


def _gated_anthropic_stream(balancer: Nginx, engines: tuple[GatedEngine, GatedEngine]) -> None:
    for engine in engines:
        engine.gate.clear()
    messages = [{"role": "user", "content": ASK}]
    text = ""
    with _anthropic(balancer).messages.stream(model=MODEL, max_tokens=64, messages=messages) as events:  # type: ignore[arg-type]
        for piece in events.text_stream:
            if piece and not text:
                _open_gates(engines)
            text += piece
    assert text == ANSWER


def test_the_readme_shows_the_recipe_as_it_is() -> None:
    """Every line of the README's nginx block is a line of docs/nginx-balancer.conf (comments aside)."""
    blocks = re.findall(r"^```nginx\n(.*?)^```$", (ROOT / "README.md").read_text(), flags=re.M | re.S)
    assert len(blocks) == 1
    recipe = {line.split(" #")[0].strip() for line in RECIPE.read_text().splitlines()}
    missing = [line.strip() for line in blocks[0].splitlines() if line.strip() and line.strip() not in recipe]
    assert not missing, f"the README shows lines that docs/nginx-balancer.conf lacks: {missing}"
