"""Request bodies, parsed and validated off the event loop, with bounds on the work one body may cause.

FastAPI parses and validates a body on the event loop, so one legal body can hold every other request:
23 MiB of `[0, 0, …]` (12 million values) held even /health for 19 s and took 3.8 GB. Here a body is
decoded by orjson (in C, and it refuses a lone surrogate while it parses) in one of two worker threads
(so at most two bodies are in memory as objects at once), after a count of its commas has bounded how
many values it can hold. The decoded value is then walked once, in that thread, against the caps below,
and only then handed to pydantic, whose validation work grows with what the caps allow and no further.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from sovereign.server.errors import APIError

# Real clients stay far below both: a 21k-token Claude Code request holds about 3,000 values and 200 items
# in its longest list. The value cap stays above OpenAI's own ceiling for an embeddings request (300k tokens,
# sent as token ids) and bounds the decoder's time (which holds the GIL) to about 70 ms; lists of numbers
# (token ids) are exempt from the item cap.
MAX_JSON_VALUES = 500_000
MAX_LIST_ITEMS = 10_000  # objects, lists or strings in one list: messages, content blocks, tools, inputs
PARSE_THREADS = 2  # bodies decoded at once: what bounds the memory hostile bodies can take together

_PARSERS = ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="body")
# A JSON string token (the unrolled form: no backtracking per character on a long string).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# A lone UTF-16 surrogate: valid in JSON's \uXXXX escapes, not in Unicode, so no tokenizer can take it.
_SURROGATE = re.compile("[\ud800-\udfff]")

Model = TypeVar("Model", bound=BaseModel)


def json_body(model: type[Model]) -> Callable[[Request], Awaitable[Model]]:
    """A FastAPI dependency that reads the request's body as `model`, the work done in a worker thread."""

    async def parsed(request: Request) -> Model:
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone, or cut off by the body limit (which has answered already)
            raise APIError(400, "The client left before its request body was whole.", code="invalid_json") from None
        return await asyncio.get_running_loop().run_in_executor(_PARSERS, parse_body, raw, model)

    return parsed


async def decode_in_thread(raw: bytes) -> Any:
    """The JSON value of a body (or an APIError), decoded under the same bounds, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_PARSERS, decode, raw)


def parse_body(raw: bytes, model: type[Model]) -> Model:
    """Decode, bound and validate one body; errors come out as the API's own 400 or 413."""
    data = decode(raw)
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # Shaped as FastAPI's own, so each API's handler names the field in its envelope.
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors], body=data) from None


def decode(raw: bytes) -> Any:
    """The body's JSON value, refused before decoding when it could hold more values than MAX_JSON_VALUES."""
    if not raw.strip():
        raise APIError(400, "The request body is empty: send a JSON object.", code="invalid_json")
    if value_bound(raw) > MAX_JSON_VALUES:
        raise _too_many_values()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "surrogate" in str(exc):
            raise _surrogate_error(raw) from None
        raise APIError(
            400,
            "We could not parse the JSON body of your request. The request body must be valid JSON.",
            code="invalid_json",
        ) from None
    check_shape(data)
    return data


def value_bound(raw: bytes) -> int:
    """At least as many as the JSON values in `raw` (one per comma outside strings, and one more).

    Counting all commas (a C loop over the bytes) settles almost every body; only one with more commas
    than the cap looks inside its strings, one string at a time, and stops once the strings alone are
    over the cap.
    """
    commas = raw.count(b",")
    if commas < MAX_JSON_VALUES:
        return commas + 1
    strings = 0
    for match in _STRING.finditer(raw):
        strings += 1
        if strings > MAX_JSON_VALUES:
            break
        commas -= raw.count(b",", match.start(), match.end())
    return max(commas + 1, strings)


def check_shape(data: Any) -> None:
    """Refuse a decoded body with more than MAX_JSON_VALUES values, or a list of more than MAX_LIST_ITEMS items."""
    seen = 0
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:  # iterative: nesting as deep as the decoder allows must not exhaust Python's stack
        value, path = stack.pop()
        if isinstance(value, dict):
            seen += len(value)
            stack.extend((item, (*path, str(key))) for key, item in value.items() if isinstance(item, dict | list))
        elif isinstance(value, list):
            seen += len(value)
            if len(value) > MAX_LIST_ITEMS and not all(type(item) in (int, float) for item in value):
                where = ".".join(path) or None
                raise APIError(
                    400,
                    f"Invalid value for '{where}': a list of at most {MAX_LIST_ITEMS:,} items, not {len(value):,}.",
                    param=where,
                    code="invalid_value",
                )
            stack.extend((item, (*path, str(i))) for i, item in enumerate(value) if isinstance(item, dict | list))
        if seen > MAX_JSON_VALUES:
            raise _too_many_values()


def _too_many_values() -> APIError:
    return APIError(
        413,
        f"The request body holds more than {MAX_JSON_VALUES:,} JSON values, far more than any model's context "
        "takes. Send less.",
        code="request_too_large",
    )


def _surrogate_error(raw: bytes) -> RequestValidationError:
    """The 400 for a lone surrogate, naming its field (found by the standard decoder, which keeps them)."""
    where = find_lone_surrogate(json.loads(raw))
    return RequestValidationError(
        [
            {
                "type": "lone_surrogate",
                "loc": ("body",),
                "msg": "the text holds a lone UTF-16 surrogate (such as \\ud800), which is not valid Unicode",
                "ctx": {"where": where},
            }
        ]
    )


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def find_lone_surrogate(data: Any) -> str | None:
    """The dotted location of the first string in parsed JSON that holds a lone surrogate, or None.

    For example 'messages.0.content'.
    """
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return ".".join(path)
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                # A key is named escaped: the error message must itself be valid UTF-8.
                shown = key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else str(key)
                if isinstance(key, str) and _has_surrogate(key):
                    return ".".join((*path, shown))
                stack.append((item, (*path, shown)))
        elif isinstance(value, list):
            stack.extend((item, (*path, str(index))) for index, item in reversed(list(enumerate(value))))
    return None
