"""The APIs' error envelopes (OpenAI's; Anthropic's under /v1/messages), and the mapping from our exceptions to them."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from sovereign.errors import (
    ContextLengthExceeded,
    InvalidReference,
    InvalidRequest,
    ModelCrashed,
    ModelLoadError,
    ModelNotFound,
    RequestTimedOut,
    ServerBusy,
    SovereignError,
    WorkerUnavailable,
)

log = logging.getLogger(__name__)

# Anthropic's error types by status; 503 (every slot busy) becomes its 529 overloaded_error.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def speaks_anthropic(path: str) -> bool:
    """Whether a path belongs to the Anthropic Messages API, whose clients expect its envelope."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


class APIError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        anthropic_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.anthropic_message = anthropic_message or message  # where Anthropic's clients parse their own wording
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @property
    def anthropic_status(self) -> int:
        return 529 if self.code == "server_overloaded" else self.status

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(
            self.anthropic_status, "api_error" if self.status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": kind, "message": self.anthropic_message}}

    def response_for(self, path: str) -> JSONResponse:
        """This error in the envelope of the API that `path` belongs to."""
        if speaks_anthropic(path):
            return JSONResponse(self.anthropic_body(), status_code=self.anthropic_status, headers=self.headers)
        return self.response()


def from_exception(exc: BaseException) -> APIError:
    """The API error for anything a request can raise."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ModelNotFound):
        return APIError(
            404, f"{exc.message}; {exc.hint}" if exc.hint else exc.message, param="model", code="model_not_found"
        )
    if isinstance(exc, ContextLengthExceeded):
        return APIError(
            400,
            (
                f"This model's maximum context length is {exc.n_ctx} tokens. However, your messages resulted "
                f"in {exc.prompt_tokens} tokens. Please reduce the length of the messages."
            ),
            param="messages",
            code="context_length_exceeded",
            # Claude Code reads these numbers to compact its conversation and retry.
            anthropic_message=f"prompt is too long: {exc.prompt_tokens} tokens > {exc.n_ctx} maximum",
        )
    if isinstance(exc, InvalidRequest):
        return APIError(400, exc.message, param=exc.param, code="invalid_value")
    if isinstance(exc, ServerBusy):
        return APIError(
            503,
            (
                f"The server is overloaded: every slot is busy and {exc.queued} requests are waiting. Retry "
                f"after {exc.retry_after} seconds."
            ),
            type="server_error",
            code="server_overloaded",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, WorkerUnavailable):
        return APIError(
            503,
            f"The model's RPC worker {exc.worker} {exc.reason}" + (f" ({exc.hint})" if exc.hint else "") + ".",
            type="server_error",
            code="worker_unavailable",
        )
    if isinstance(exc, RequestTimedOut):
        return APIError(
            504,
            f"The request timed out: it did not finish within the server's {exc.limit:g} s limit.",
            type="server_error",
            code="timeout",
        )
    if isinstance(exc, ModelCrashed):
        return APIError(
            500,
            (
                f"The model {exc.model} crashed ({exc.signal}) while serving this request; send it again to "
                "reload the model."
            ),
            type="server_error",
            code="model_crashed",
        )
    if isinstance(exc, ModelLoadError):
        return APIError(
            500,
            f"The model could not be loaded: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""),
            type="server_error",
            code="model_load_failed",
        )
    if isinstance(exc, InvalidReference):  # a malformed model name names no model
        return APIError(404, f"The model does not exist: {exc.message}.", param="model", code="model_not_found")
    if isinstance(exc, SovereignError):
        return APIError(500, str(exc), type="server_error")
    if isinstance(exc, UnicodeError):
        # Only request text reaches an encoder: text the schemas let through is still the client's fault.
        return APIError(
            400,
            "The request holds text that is not valid Unicode (a lone UTF-16 surrogate such as \\ud800?).",
            code="invalid_value",
        )
    log.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "The server had an error while processing your request.", type="server_error")


def field_path(loc: tuple[Any, ...], body: Any) -> list[str]:
    """An error's location in the client's own field names, found by following it through the request body.

    Pydantic also names the member of a union it tried (`str`, `list[...]`, a validator, the `type` of a tagged
    union's block) which is no field of the request: such parts are left out. A last part that is not in the
    body is kept: it names a missing or unknown field.
    """
    parts: list[str] = []
    value = body
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if part == "body" and position == 0:
            continue
        if isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif isinstance(value, dict) and part in value and not (part == value.get("type") and not last):
            value = value[part]
        elif not last and isinstance(value, (dict, list)):
            continue  # a union member's tag
        parts.append(str(part))
    return parts


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 list, as OpenAI's 400 naming the offending field (the most precise, when a union failed)."""
    body = getattr(exc, "body", None)
    located: list[tuple[dict[str, Any], list[str]]] = [
        (error, field_path(tuple(error.get("loc", ())), body)) for error in exc.errors()
    ]
    # A union reports one error per member: the member that got furthest into the value says what is wrong.
    first, location = max(located, key=lambda pair: len(pair[1]), default=({}, []))
    param = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(
            400,
            "We could not parse the JSON body of your request. The request body must be valid JSON.",
            code="invalid_json",
        )
    if kind == "extra_forbidden":
        return APIError(
            400,
            f"Unrecognized request argument supplied: {location[-1] if location else param}",
            param=param,
            code="unknown_parameter",
        )
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "model_attributes_type" and not location:
        return APIError(400, "The request body must be a JSON object.", code="invalid_json")
    if kind == "lone_surrogate":
        where = ".".join(part for part in (param, first.get("ctx", {}).get("where")) if part) or None
        return APIError(400, f"Invalid value for '{where}': {first.get('msg')}.", param=where, code="invalid_value")
    return APIError(
        400,
        f"Invalid value for '{param}': {first.get('msg', 'invalid')}.",
        param=param,
        code="invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value",
    )


def install(app: FastAPI) -> None:
    """Answer every error in the envelope; the server keeps serving."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response_for(request.url.path)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response_for(request.url.path)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response_for(request.url.path)

    @app.exception_handler(SovereignError)
    async def on_ours(request: Request, exc: SovereignError) -> JSONResponse:
        return from_exception(exc).response_for(request.url.path)

    @app.exception_handler(Exception)
    async def on_anything(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response_for(request.url.path)
