"""OpenAI request bodies, validated strictly: an unknown parameter is an error, never ignored."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal, cast

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

# A template's variables are flags and short settings (enable_thinking, reasoning_effort): this is far above them,
# and keeps a body from handing the template renderer a huge value to walk on every request.
MAX_TEMPLATE_KWARGS_BYTES = 64 * 1024


def bounded_template_kwargs(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """chat_template_kwargs, refused when their JSON is over MAX_TEMPLATE_KWARGS_BYTES."""
    if value is not None and len(orjson.dumps(value)) > MAX_TEMPLATE_KWARGS_BYTES:
        raise ValueError(f"at most {MAX_TEMPLATE_KWARGS_BYTES // 1024} KiB of JSON (template variables are settings)")
    return value


VALIDATION_CHUNK = 64  # items of a long list validated in the first call; later calls are sized to CHUNK_SECONDS
CHUNK_SECONDS = 0.005  # pydantic holds the GIL for one call: the event loop waits at most about this long


def _validate_in_chunks(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Validate a long list a chunk at a time, letting other threads (the event loop) run in between.

    Bodies are validated in worker threads, but pydantic holds the GIL for as long as one call takes:
    150,000 typed content blocks in one call held every other request for over a second.
    """
    if not isinstance(value, list) or len(value) <= VALIDATION_CHUNK:
        return handler(value)
    items: list[Any] = []
    start, size = 0, VALIDATION_CHUNK
    while start < len(value):
        time.sleep(0)  # lets the event loop take the GIL
        began = time.perf_counter()
        try:
            items.extend(handler(value[start : start + size]))
        except ValidationError as exc:
            raise _shifted(exc, start, lambda: handler(value)) from None
        took = time.perf_counter() - began
        start += size
        size = max(1, min(4096, int(size * CHUNK_SECONDS / max(took, 1e-5))))
    return items


def _shifted(exc: ValidationError, start: int, whole: Callable[[], Any]) -> ValidationError:
    """A chunk's errors at their places in the whole list (or the whole list's, if pydantic cannot rebuild them)."""
    try:
        line_errors = [
            cast(
                "InitErrorDetails",
                {"type": e["type"], "loc": (start + int(e["loc"][0]), *e["loc"][1:]), "input": e["input"]}
                | ({"ctx": e["ctx"]} if "ctx" in e else {}),
            )
            for e in exc.errors()
        ]
        return ValidationError.from_exception_data(exc.title, line_errors)
    except Exception:  # noqa: BLE001 - an error type pydantic cannot rebuild: validate the whole list for its errors
        try:
            whole()
        except ValidationError as full:
            return full
        return exc


InChunks = WrapValidator(_validate_in_chunks)


class _Strict(BaseModel):
    """Unknown fields refused. (Lone surrogates never get this far: the body decoder refuses them.)"""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: FunctionName


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = "{}"


class MessageToolCall(BaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(BaseModel):
    """A chat message; extra fields (e.g. `name`, `refusal`) are accepted as the API allows them."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class _SamplingFields(_Strict):
    """Parameters shared by chat and text completions."""

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: float | None = Field(default=None, gt=0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias}")
        return value


class ChatCompletionBody(_SamplingFields):
    messages: Annotated[list[Message], InChunks] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], InChunks] | None = None
    # The tools exactly as the client wrote them: templates render them as JSON, and a model was trained on
    # its clients' key order (name, description, parameters), not on this schema's.
    _tools_as_sent: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = (
        None  # llama-server's and vLLM's name: extra variables for the chat template
    )

    _bounded_kwargs = field_validator("chat_template_kwargs")(bounded_template_kwargs)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_tools_as_sent(
        cls, data: Any, handler: ModelWrapValidatorHandler[ChatCompletionBody]
    ) -> ChatCompletionBody:
        body = handler(data)
        raw = data.get("tools") if isinstance(data, dict) else None
        if body.tools and isinstance(raw, list):
            body._tools_as_sent = copy.deepcopy(raw)
        elif body.tools:
            body._tools_as_sent = [tool.model_dump(exclude_unset=True) for tool in body.tools]
        return body

    @property
    def tools_as_sent(self) -> list[dict[str, Any]]:
        """The validated tools, in the client's own JSON (key order included; no defaults added)."""
        return self._tools_as_sent


class CompletionBody(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=1)


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingBody(_Strict):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _few_inputs(cls, value: Any) -> Any:
        # A list of lists or of strings is that many inputs (a flat list of numbers is one input's token ids).
        if isinstance(value, list) and value and not isinstance(value[0], int) and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, not {len(value)}")
        return value


# --- the Responses API (stateless) ------------------------------------------------------


class ResponsesFunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    # Codex marks tools meant to be found through its tool_search tool; tool_search is dropped here
    # (see responses_convert), so a deferred function is simply offered like any other.
    defer_loading: bool | None = None


class ResponsesReasoning(_Strict):
    # Codex sends effort up to "xhigh" (and the SDK knows "max"); above "high" they reach the template as "high".
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: str | None = None  # accepted; the reasoning item carries the whole reasoning, never a summary
    generate_summary: str | None = None
    context: str | None = None  # which turns' reasoning OpenAI keeps: stateless here, so ignored
    mode: str | None = None  # "standard"/"pro": an OpenAI service tier for reasoning, ignored


class ResponsesTextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponsesText(_Strict):
    format: ResponsesTextFormat | None = None  # honoured: json_schema (Codex's --output-schema) is enforced by grammar
    verbosity: str | None = None  # Codex sends low/medium/high; accepted and ignored (no local model takes it)


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class ResponsesBody(_Strict):
    """A Responses request. Fields marked [Codex] are those OpenAI's Codex CLI (codex-rs ResponsesApiRequest) sends."""

    model: str  # [Codex] honoured
    input: str | list[dict[str, Any]]  # [Codex] honoured: the whole conversation, every turn (Codex sends store=false)
    instructions: str | None = None  # [Codex] honoured: becomes the first system message
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    text: ResponsesText | None = None  # [Codex] format honoured, verbosity ignored (see ResponsesText)
    # [Codex] function tools are offered; a `namespace` tool (Codex's multi_agent_v1 group, MCP servers) is flattened
    # into function tools named <namespace>__<name>, and calls go back with `name` and `namespace` split again;
    # built-in tools (web_search, image_generation, tool_search, custom, ...) are dropped with a warning and
    # listed in the response's `sovereign_dropped_tools`.
    tools: list[dict[str, Any]] | None = None
    # [Codex] sends "auto". A dict forcing a built-in tool (web_search_preview, custom, mcp, ...) is refused:
    # the tool was dropped, so obeying is impossible and ignoring it would change the answer.
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # [Codex] honoured
    stream: bool = False  # [Codex] honoured (Codex always streams)
    previous_response_id: str | None = (
        None  # refused: nothing is stored (Codex sends it only over its websocket transport)
    )
    conversation: Any = None  # refused likewise
    background: bool | None = None
    store: bool | None = None  # [Codex] sends false; accepted, nothing is ever stored
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = None
    ignore_eos: bool = False  # sovereign's extension, as on the other endpoints
    reasoning: ResponsesReasoning | None = (
        None  # [Codex] effort reaches the template; summaries are the whole reasoning
    )
    # Accepted and ignored: they shape OpenAI's service, not a local model's output.
    truncation: str | None = None
    # [Codex] sends ["reasoning.encrypted_content"]: there is no encrypted reasoning to return; reasoning
    # items carry their text in `summary` and Codex hands them back in `input`, where they are skipped.
    include: list[str] | None = None
    stream_options: dict[str, Any] | None = None  # [Codex] newer versions send it; event framing is fixed here
    service_tier: str | None = None  # [Codex] "priority"/"flex": there is one tier locally
    prompt_cache_key: str | None = None  # [Codex] the session id: the engine's prefix cache needs no key
    safety_identifier: str | None = None
    top_logprobs: int | None = None
    # [Codex] client bookkeeping (installation/session/turn ids, as string pairs): never read.
    client_metadata: dict[str, Any] | None = None
    # [Codex] ChatGPT-backend access programs: meaningless to a local server, ignored.
    access_programs: Any = None
    prompt_cache_retention: str | None = None  # OpenAI's cache lifetime: ignored, like prompt_cache_key
