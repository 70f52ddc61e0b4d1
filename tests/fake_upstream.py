"""A fake closed upstream API (Anthropic and OpenAI shapes) on loopback, for the gateway tests and benchmark.

    with FakeUpstream() as up:
        anthropic.Anthropic(base_url=up.url, api_key="k")        # the root
        openai.OpenAI(base_url=up.url + "/v1", api_key="k")      # root + /v1
        up.mode = "451"                                          # switch behaviour at any time

Endpoints (healthy mode), plain JSON or SSE when the body has "stream": true:

    POST /v1/messages                Anthropic Message "upstream says hi" (model echoed)
    POST /v1/messages/count_tokens   {"input_tokens": 42}
    POST /v1/chat/completions        chat.completion / chat.completion.chunk ... data: [DONE]
    POST /v1/responses               Response / response.created ... response.completed
    GET  /v1/models                  OpenAI list with "gpt-upstream" (Anthropic's shape if anthropic-version is sent)
    POST /v1/embeddings              one 4-float vector per input (base64 when encoding_format is "base64")

Model "bad-request" gets a 400 in the API's own error envelope, and a request carrying the key
FORBIDDEN_KEY a 403 (a key without the permission; the route itself is open). A streamed chat
completion for model "bench-N" sends N content chunks as fast as possible (paced by `chunk_interval`
seconds), and "bench-N-every-U" one every U microseconds, as a model streaming tokens does.

Modes: healthy, 451, 403 (every request answered with that status), refused (the listening socket
is closed and open connections dropped; the port is kept and re-listened when the mode leaves
"refused"), blackhole (connections are accepted and never answered), midstream (streams send a
few valid chunks, then the connection is aborted; plain answers are healthy).

The server is a minimal HTTP/1.1 implementation on asyncio in one background thread, so every SSE
chunk is written to the socket as it is produced (chunked transfer encoding, TCP_NODELAY).
Every request read is recorded in `requests` (a list guarded by `lock`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

MODES = ("healthy", "451", "403", "refused", "blackhole", "midstream")
TEXT = "upstream says hi"
PIECES = ["upstream", " says", " hi"]
FORBIDDEN_KEY = "sk-forbidden-key"  # in healthy mode, requests with this key get a 403 permission error
MIDSTREAM_PIECES = 2  # content chunks a "midstream" stream sends before the connection is cut
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 451: "Unavailable For Legal Reasons"}


@dataclass
class Request:
    """One request the fake upstream read."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None when empty or not JSON
    raw: bytes = b""


class _Cut(Exception):
    """Raised to abort the connection in the middle of a streamed answer."""


def _sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event; `data` is JSON-encoded unless it is already a string."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {text}\n\n".encode()


def _is_anthropic(path: str) -> bool:
    """Whether a path belongs to Anthropic's API (its error envelope differs from OpenAI's)."""
    return path.startswith("/v1/messages")


def _error_body(path: str, status: int, kind: str, message: str) -> dict[str, Any]:
    """An error in the envelope of the API that owns `path`."""
    if _is_anthropic(path):
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}


def _bench_shape(model: str) -> tuple[int, float]:
    """For "bench-N" or "bench-N-every-U": N chunks, U microseconds apart; (0, 0) otherwise.

    The pace comes back in seconds, 0 when not given.
    """
    match = re.fullmatch(r"bench-(\d+)(?:-every-(\d+))?", model)
    return (int(match[1]), int(match[2] or 0) / 1e6) if match else (0, 0.0)


class FakeUpstream:
    """A fake Anthropic/OpenAI upstream on 127.0.0.1, running in a background thread while in a `with` block."""

    def __init__(
        self, mode: str = "healthy", chunk_interval: float = 0.0, port: int = 0, host: str = "127.0.0.1"
    ) -> None:
        """Configure the server; it starts on `__enter__` (or `start()`) on `port` (0: a free one)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.host = host
        self.port = port
        self.chunk_interval = chunk_interval
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self._mode = mode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- public API ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The root URL (Anthropic clients); OpenAI clients use url + "/v1"."""
        return f"http://{self.host}:{self.port}"

    @property
    def mode(self) -> str:
        """The current behaviour, one of MODES."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        """Switch behaviour; entering/leaving "refused" closes/reopens the listener before returning."""
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self._mode = value
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._apply_mode(), self._loop).result(10)

    @property
    def last(self) -> Request:
        """The most recent request read."""
        with self.lock:
            return self.requests[-1]

    def requests_to(self, path: str) -> list[Request]:
        """The requests read for one path."""
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def clear(self) -> None:
        """Forget the requests recorded so far."""
        with self.lock:
            self.requests.clear()

    def start(self) -> FakeUpstream:
        """Start the loop thread and listen (unless the mode is "refused", then only reserve a port)."""
        started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(started,), name="fake-upstream", daemon=True)
        self._thread.start()
        started.wait(10)
        asyncio.run_coroutine_threadsafe(self._apply_mode(), self._loop).result(10)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and join its thread."""
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FakeUpstream:
        """Start serving."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop serving."""
        self.stop()

    # -- loop side ----------------------------------------------------------------------------

    def _run(self, started: threading.Event) -> None:
        """The background thread: run the event loop until stopped."""
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(started.set)
        self._loop.run_forever()

    async def _apply_mode(self) -> None:
        """Make the listener match the mode: closed (and connections dropped) for "refused", open otherwise."""
        if self._mode == "refused":
            if self._server is not None:
                self._server.close()
                self._server = None
            if self.port == 0:  # reserve a port number that nothing listens on
                with socket.socket() as sock:
                    sock.bind((self.host, 0))
                    self.port = sock.getsockname()[1]
            self._drop_connections()
        elif self._server is None:
            server = await asyncio.start_server(self._connection, self.host, self.port, reuse_address=True)
            self.port = server.sockets[0].getsockname()[1]
            self._server = server

    def _drop_connections(self) -> None:
        """Abort every open connection (as if the server process died)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _shutdown(self) -> None:
        """Close the listener, drop connections and cancel handlers."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._drop_connections()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection: keep-alive requests until the client closes or the mode cuts it."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self._writers.add(writer)
        try:
            while True:
                if self._mode == "blackhole":
                    while await reader.read(65536):  # swallow whatever comes, answer nothing
                        pass
                    return
                request = await self._read_request(reader)
                if request is None:
                    return
                if self._mode == "blackhole":
                    await reader.read()  # until the client gives up
                    return
                with self.lock:
                    self.requests.append(request)
                keep = await self._respond(request, writer)
                if not keep or request.headers.get("connection", "").lower() == "close":
                    return
        except (_Cut, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)  # type: ignore[arg-type]
            if not writer.transport.is_closing():
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        """Parse one HTTP/1.1 request (Content-Length or chunked body); None at a clean end of connection."""
        head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
        if not head.strip():
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            raw = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the blank line
                        pass
                    break
                raw += (await reader.readexactly(size + 2))[:-2]
        else:
            raw = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        parts = urlsplit(target)
        return Request(
            method.upper(), parts.path, dict(parse_qsl(parts.query, keep_blank_values=True)), headers, body, raw
        )

    async def _send(self, writer: asyncio.StreamWriter, status: int, payload: Any) -> bool:
        """Write a whole JSON answer."""
        data = json.dumps(payload).encode()
        writer.write(
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\nrequest-id: req_fake\r\nx-request-id: req_fake\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        return True

    async def _stream(
        self, writer: asyncio.StreamWriter, events: Iterator[bytes], cut_after: int | None, interval: float
    ) -> bool:
        """Write an SSE answer chunk by chunk; abort the connection after `cut_after` events when set."""
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\nrequest-id: req_fake\r\nx-request-id: req_fake\r\n\r\n"
        )
        await writer.drain()
        for sent, event in enumerate(events):
            if cut_after is not None and sent >= cut_after:
                await asyncio.sleep(0.01)  # let the valid chunks reach the client before the cut
                raise _Cut
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            if interval > 0:
                await asyncio.sleep(interval)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _respond(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request according to the mode, the path and the body."""
        path, body = request.path, request.body if isinstance(request.body, dict) else {}
        anthropic = _is_anthropic(path)
        keys = (request.headers.get("x-api-key"), request.headers.get("authorization", "").removeprefix("Bearer "))
        if self._mode in ("451", "403") or FORBIDDEN_KEY in keys:
            status = 403 if self._mode == "healthy" else int(self._mode)
            kind = (
                ("permission_error" if anthropic else "permission_denied")
                if status == 403
                else "unavailable_for_legal_reasons"
            )
            return await self._send(writer, status, _error_body(path, status, kind, f"fake upstream answers {status}"))
        model = str(body.get("model", ""))
        if model == "bad-request":
            return await self._send(
                writer,
                400,
                _error_body(path, 400, "invalid_request_error", "fake upstream rejects model 'bad-request'"),
            )
        streaming = body.get("stream") is True
        route = (request.method, path)
        if route == ("POST", "/v1/messages/count_tokens"):
            return await self._send(writer, 200, {"input_tokens": 42})
        if route == ("GET", "/v1/models"):
            return await self._send(writer, 200, self._models(anthropic="anthropic-version" in request.headers))
        if route == ("POST", "/v1/embeddings"):
            return await self._send(writer, 200, self._embeddings(body))
        builders = {
            "/v1/messages": (self._message, self._message_events),
            "/v1/chat/completions": (self._chat, self._chat_events),
            "/v1/responses": (self._response, self._response_events),
        }
        if request.method == "POST" and path in builders:
            whole, events = builders[path]
            if not streaming:
                return await self._send(writer, 200, whole(model))
            cut = None
            if self._mode == "midstream":
                cut = {"/v1/messages": 3, "/v1/responses": 4, "/v1/chat/completions": 1}[path] + MIDSTREAM_PIECES
            return await self._stream(writer, events(model, body), cut, _bench_shape(model)[1] or self.chunk_interval)
        return await self._send(
            writer,
            404,
            _error_body(
                path,
                404,
                "not_found_error" if anthropic else "invalid_request_error",
                f"no route {request.method} {path}",
            ),
        )

    # -- canned answers -----------------------------------------------------------------------

    @staticmethod
    def _models(anthropic: bool) -> dict[str, Any]:
        """The model list, in OpenAI's shape (Anthropic's when the client is Anthropic's SDK)."""
        if anthropic:
            entry = {
                "type": "model",
                "id": "claude-upstream",
                "display_name": "Claude Upstream",
                "created_at": "2025-01-01T00:00:00Z",
            }
            return {"data": [entry], "has_more": False, "first_id": "claude-upstream", "last_id": "claude-upstream"}
        return {
            "object": "list",
            "data": [{"id": "gpt-upstream", "object": "model", "created": 1700000000, "owned_by": "upstream"}],
        }

    @staticmethod
    def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
        """One small vector per input; base64 little-endian float32 when asked (the OpenAI SDK's default)."""
        inputs = body.get("input", "")
        items = (
            [inputs]
            if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int))
            else list(inputs)
        )
        data = []
        for index, _ in enumerate(items):
            vector = [0.1 * (index + 1), 0.2, 0.3, 0.4]
            encoded: Any = (
                base64.b64encode(struct.pack("<4f", *vector)).decode()
                if body.get("encoding_format") == "base64"
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        return {
            "object": "list",
            "data": data,
            "model": body.get("model", ""),
            "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
        }

    @staticmethod
    def _message(model: str) -> dict[str, Any]:
        """A whole Anthropic Message."""
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": TEXT}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": len(PIECES)},
        }

    def _message_events(self, model: str, body: dict[str, Any]) -> Iterator[bytes]:
        """Anthropic's Messages event stream."""
        start = self._message(model) | {
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        }
        yield _sse({"type": "message_start", "message": start}, "message_start")
        yield _sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start",
        )
        yield _sse({"type": "ping"}, "ping")
        for piece in PIECES:
            yield _sse(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
                "content_block_delta",
            )
        yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": len(PIECES)},
        }
        yield _sse(delta, "message_delta")
        yield _sse({"type": "message_stop"}, "message_stop")

    @staticmethod
    def _chat(model: str) -> dict[str, Any]:
        """A whole chat.completion."""
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": TEXT, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(PIECES), "total_tokens": 10 + len(PIECES)},
        }

    def _chat_events(self, model: str, body: dict[str, Any]) -> Iterator[bytes]:
        """A chat.completion.chunk stream ending with [DONE]; "bench-N" models stream N one-word chunks."""
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return _sse(base | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""})
        if _bench_shape(model)[0]:
            count = _bench_shape(model)[0]
            template = chunk({"content": "tok "})
            for _ in range(count):
                yield template
        else:
            count = len(PIECES)
            for piece in PIECES:
                yield chunk({"content": piece})
        yield chunk({}, "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            yield _sse(
                base
                | {
                    "choices": [],
                    "usage": {"prompt_tokens": 10, "completion_tokens": count, "total_tokens": 10 + count},
                }
            )
        yield _sse("[DONE]")

    @staticmethod
    def _response(
        model: str,
        status: str = "completed",
        text: str = TEXT,
        response_id: str | None = None,
        item_id: str = "msg_fake",
    ) -> dict[str, Any]:
        """A Responses API Response object."""
        output = (
            []
            if status == "in_progress"
            else [
                {
                    "type": "message",
                    "id": item_id,
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ]
        )
        usage = (
            None
            if status == "in_progress"
            else {
                "input_tokens": 10,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": len(PIECES),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 10 + len(PIECES),
            }
        )
        return {
            "id": response_id or f"resp_{uuid.uuid4().hex[:24]}",
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": {},
            "temperature": 1.0,
            "top_p": 1.0,
            "text": {"format": {"type": "text"}},
            "usage": usage,
        }

    def _response_events(self, model: str, body: dict[str, Any]) -> Iterator[bytes]:
        """The Responses event stream, response.created through response.completed."""
        rid, item = f"resp_{uuid.uuid4().hex[:24]}", f"msg_{uuid.uuid4().hex[:24]}"
        sequence = iter(range(1_000_000))

        def event(kind: str, **fields: Any) -> bytes:
            return _sse({"type": kind, "sequence_number": next(sequence), **fields}, kind)

        pending = self._response(model, "in_progress", response_id=rid)
        yield event("response.created", response=pending)
        yield event("response.in_progress", response=pending)
        yield event(
            "response.output_item.added",
            output_index=0,
            item={"type": "message", "id": item, "status": "in_progress", "role": "assistant", "content": []},
        )
        yield event(
            "response.content_part.added",
            item_id=item,
            output_index=0,
            content_index=0,
            part={"type": "output_text", "text": "", "annotations": []},
        )
        for piece in PIECES:
            yield event(
                "response.output_text.delta", item_id=item, output_index=0, content_index=0, delta=piece, logprobs=[]
            )
        yield event("response.output_text.done", item_id=item, output_index=0, content_index=0, text=TEXT, logprobs=[])
        part = {"type": "output_text", "text": TEXT, "annotations": []}
        yield event("response.content_part.done", item_id=item, output_index=0, content_index=0, part=part)
        done = self._response(model, response_id=rid, item_id=item)
        yield event("response.output_item.done", output_index=0, item=done["output"][0])
        yield event("response.completed", response=done)


def main() -> None:
    """Run a FakeUpstream until interrupted: python -m tests.fake_upstream [--port P] [--interval S]."""
    import argparse

    parser = argparse.ArgumentParser(description="Serve the fake upstream until interrupted.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between streamed chunks")
    parser.add_argument("--mode", choices=MODES, default="healthy")
    args = parser.parse_args()
    with FakeUpstream(args.mode, args.interval, args.port) as up:
        print(up.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
