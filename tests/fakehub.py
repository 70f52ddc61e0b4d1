"""A small stand-in for the Hugging Face Hub on loopback, speaking the endpoints huggingface-hub calls.

    GET  /api/models/{owner}/{repo}[/revision/{rev}]   model info with siblings (size, LFS sha256)
    HEAD /{owner}/{repo}/resolve/{rev}/{path}          file metadata (ETag, size, commit)
    GET  /{owner}/{repo}/resolve/{rev}/{path}          file bytes, honouring Range (bytes=a- and bytes=a-b) and If-Range

Knobs per repository let tests cut transfers, corrupt bytes, gate access, refuse ranges and slow
things down; `per_connection_bytes_per_second` caps every connection (as a CDN edge does).
Every request is recorded so tests can assert on Range headers and byte counts.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeRepo:
    """Files of one repository and how the hub misbehaves when serving them."""

    files: dict[str, bytes]
    gated_token: str | None = None  # when set, downloads need `Authorization: Bearer <token>`
    corrupt: bool = False  # serve bytes that do not match the advertised sha256
    cut_after: int | None = None  # first `cuts` GETs stop after this many body bytes
    cuts: int = 0
    bytes_per_second: float | None = None  # throttle
    # Interrupt tests: once this many body bytes of the repo's files went out (over all connections), every
    # transfer stops, sets `held` and waits for `release`, so a client cannot finish before it is interrupted.
    hold_after: int | None = None
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    sent_bytes: int = 0
    accept_ranges: bool = True  # False: ignore Range headers and send no Accept-Ranges (always 200)
    advertise_ranges: bool | None = None  # send Accept-Ranges regardless of accept_ranges (a server that lies)


@dataclass
class Request:
    """One request the hub saw."""

    method: str
    path: str
    range: str | None
    authorization: str | None
    body_bytes: int = 0


@dataclass
class FakeHub:
    """The hub's state: repositories and the request log."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location (302)
    log: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    per_connection_bytes_per_second: float | None = None  # cap on each connection's body bytes, all repos

    def served(self, filename: str) -> int:
        """Body bytes of a file the hub wrote to its sockets, over every request."""
        return sum(r.body_bytes for r in self.downloads(filename))

    def downloads(self, filename: str) -> list[Request]:
        """GET requests for a file's bytes."""
        return [r for r in self.log if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(filename)]


_SHA_CACHE: dict[int, tuple[bytes, str]] = {}  # id -> (the bytes, kept alive so the id stays theirs; sha256)


def _sha(data: bytes) -> str:
    """sha256 of a served file, computed once per bytes object: range requests come many per file."""
    cached = _SHA_CACHE.get(id(data))
    if cached is None or cached[0] is not data:
        if len(_SHA_CACHE) >= 16:
            _SHA_CACHE.clear()
        cached = _SHA_CACHE[id(data)] = (data, hashlib.sha256(data).hexdigest())
    return cached[1]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _record(self) -> Request:
        request = Request(
            self.command,
            unquote(urlparse(self.path).path),
            self.headers.get("Range"),
            self.headers.get("Authorization"),
        )
        with self.hub.lock:
            self.hub.log.append(request)
        return request

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def do_GET(self) -> None:
        request = self._record()
        if request.path.startswith("/portal/"):  # a captive portal: 200 and HTML for everything
            body = b"<html><body>Please log in to continue</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return None
        if request.path in self.hub.redirects:
            self.send_response(302)
            self.send_header("Location", self.hub.redirects[request.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        parts = request.path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._model_info("/".join(parts[2:4]))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file("/".join(parts[:2]), "/".join(parts[4:]), request)
        self._error(404, None, "not found")

    do_HEAD = do_GET

    def _model_info(self, repo_id: str) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        siblings = [
            {
                "rfilename": name,
                "size": len(data),
                "blobId": _sha(data)[:40],
                "lfs": {"sha256": _sha(data), "size": len(data), "pointerSize": 134},
            }
            for name, data in sorted(repo.files.items())
        ]
        self._json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": COMMIT,
                "private": False,
                "gated": "manual" if repo.gated_token else False,
                "siblings": siblings,
            },
        )

    def _file(self, repo_id: str, filename: str, request: Request) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            return self._error(
                401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. "
                "You must have access to it and be authenticated to access it.",
            )
        data = repo.files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist")
        etag = _sha(data)
        served = data[:-64] + bytes(b ^ 0xFF for b in data[-64:]) if repo.corrupt else data
        start, end = 0, len(data)  # end: one past the last byte served
        if_range = self.headers.get("If-Range")
        honour_range = repo.accept_ranges and (
            if_range is None or if_range == f'"{etag}"'
        )  # a stale If-Range gets the whole new file
        if honour_range and request.range and request.range.startswith("bytes="):
            first, _, last = request.range[len("bytes=") :].partition("-")
            start = int(first or 0)
            end = min(end, int(last) + 1) if last else end
        ranged = bool(start) or end < len(data)
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", COMMIT)
        if repo.accept_ranges if repo.advertise_ranges is None else repo.advertise_ranges:
            self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return
        self._send_body(repo, memoryview(served)[start:end], request)

    def _hold(self, repo: FakeRepo, sent: int) -> None:
        """Count bytes sent from the repo; past hold_after, wait for the test to release it (two minutes at most)."""
        with self.hub.lock:
            repo.sent_bytes += sent
            holding = repo.hold_after is not None and repo.sent_bytes >= repo.hold_after
        if holding:
            repo.held.set()
            repo.release.wait(120)

    def _send_body(self, repo: FakeRepo, body: bytes | memoryview, request: Request) -> None:
        limit = len(body)
        with self.hub.lock:
            if repo.cuts > 0 and repo.cut_after is not None:
                repo.cuts -= 1
                limit = min(limit, repo.cut_after)
        step = 64 * 1024
        cap = self.hub.per_connection_bytes_per_second
        began, sent = time.monotonic(), 0  # a connection serves one request at a time: pace each body
        view = memoryview(body)
        try:
            for offset in range(0, limit, step):
                chunk = view[offset : min(offset + step, limit)]
                self.wfile.write(chunk)
                request.body_bytes += len(chunk)
                self._hold(repo, len(chunk))
                if repo.bytes_per_second:
                    time.sleep(len(chunk) / repo.bytes_per_second)
                if cap:
                    sent += len(chunk)
                    ahead = began + sent / cap - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if limit < len(body):
            self.close_connection = True  # the client sees a body shorter than Content-Length


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-transfer are part of the tests, not errors worth printing."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class FakeHubServer:
    """Runs a FakeHub on a free loopback port in a background thread."""

    def __init__(self, hub: FakeHub | None = None, per_connection_bytes_per_second: float | None = None) -> None:
        self.hub = hub or FakeHub()
        if per_connection_bytes_per_second is not None:
            self.hub.per_connection_bytes_per_second = per_connection_bytes_per_second
        handler = type("Handler", (_Handler,), {"hub": self.hub})
        self.server = _QuietServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The endpoint to put in HF_ENDPOINT."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
