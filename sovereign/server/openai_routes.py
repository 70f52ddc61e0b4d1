"""OpenAI-compatible endpoints: models, chat completions, completions, embeddings."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from sovereign.engine import Finished, Generation, ReasoningDelta, TextDelta, ToolCallDelta, ToolCallsEvent, Usage
from sovereign.engine.api import EngineAPI, ModelInfo
from sovereign.engine.requests import Event
from sovereign.errors import ModelNotFound
from sovereign.server import openai_convert as convert
from sovereign.server.body import json_body
from sovereign.server.errors import APIError
from sovereign.server.running import collect, event_stream, until_disconnect
from sovereign.server.schemas import ChatCompletionBody, CompletionBody, EmbeddingBody
from sovereign.server.sse import data_event as _sse
from sovereign.server.state import engine as _engine
from sovereign.server.streamed_calls import StreamedCalls

router = APIRouter()


async def _start_all(engine: EngineAPI, requests: list[Any]) -> list[Generation]:
    """Submit every choice; if one is refused, cancel those already queued and raise."""
    generations: list[Generation] = []
    try:
        for request in requests:
            generations.append(await engine.submit(request))
    except BaseException:
        for generation in generations:
            await generation.cancel()
        raise
    return generations


async def _interleave(generations: list[Generation]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several choices as they come, tagged with the choice index."""
    if len(generations) == 1:
        async for event in generations[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for event in generation:
                await queue.put((index, event))
            await queue.put((index, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it in the request's task
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _error_event(error: APIError) -> bytes:
    """A failure after the headers are sent travels as an event, as OpenAI does."""
    return _sse(error.body())


# --- models -------------------------------------------------------------------------


def _model_json(model: ModelInfo) -> dict[str, Any]:
    try:
        created = int(datetime.fromisoformat(model.pulled_at).timestamp()) if model.pulled_at else 0
    except (TypeError, ValueError):
        created = 0
    return {
        "id": model.name,
        "object": "model",
        "created": created,
        "owned_by": "sovereign",
        "size": model.size,
        "architecture": model.architecture,
        "quantization": model.quantization,
        "parameters": model.parameters,
        "context_length": model.context_length,
        "loaded": model.loaded,
    }


def _anthropic_model_json(model: ModelInfo, model_id: str | None = None) -> dict[str, Any]:
    """A model in Anthropic's shape; `model_id`, when an alias was asked for, is the name the client used."""
    shown = model_id or model.name
    display = model.name if shown == model.name else f"{model.name} (answering for {shown})"
    return {
        "type": "model",
        "id": shown,
        "display_name": display,
        "created_at": model.pulled_at or "1970-01-01T00:00:00Z",
    }


def _speaks_anthropic(request: Request) -> bool:
    """Anthropic's SDKs send anthropic-version with every request; /v1/models then answers in their shape."""
    return "anthropic-version" in request.headers


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    models = _engine(request).models()
    if _speaks_anthropic(request):  # pagination (limit, after_id, before_id) is accepted: everything fits one page
        data = [_anthropic_model_json(m) for m in models]
        return {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    return {"object": "list", "data": [_model_json(m) for m in models]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    try:
        model = _engine(request).model(model_id)
    except ModelNotFound as exc:
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found") from exc
    return _anthropic_model_json(model, model_id) if _speaks_anthropic(request) else _model_json(model)


# --- chat completions ---------------------------------------------------------------


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request, body: Annotated[ChatCompletionBody, Depends(json_body(ChatCompletionBody))]
) -> JSONResponse | StreamingResponse:
    engine = _engine(request)
    requests = [convert.chat_request_from(body, i) for i in range(body.n)]
    generations = await _start_all(engine, requests)
    model_name = generations[0].model
    completion_id = convert.new_id("chatcmpl")
    if not body.stream:
        results = await collect(request, generations)
        return JSONResponse(convert.chat_completion_json(completion_id, model_name, results, body.logprobs))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return event_stream(
        _chat_chunks(generations, completion_id, model_name, body.logprobs, include_usage),
        generations,
        error_frame=_error_event,
        last=_sse("[DONE]"),
    )


async def _chat_chunks(
    generations: list[Generation],
    completion_id: str,
    model: str,
    want_logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The chunks of every choice as their events come, then the usage chunk when it was asked for."""
    created = int(time.time())
    usage: list[Usage | None] = [None] * len(generations)

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        payload = convert.chat_chunk_json(completion_id, model, created, index, delta, finish, logprobs, include_usage)
        return _sse(payload)

    # Per choice: the engine's call index -> the index the client sees, the next such index, the calls streamed.
    call_indexes: list[dict[int, int]] = [{} for _ in generations]
    next_call = [0] * len(generations)
    streamed = [StreamedCalls() for _ in generations]
    for index in range(len(generations)):
        yield chunk(index, {"role": "assistant", "content": "", "refusal": None})
    async for index, event in _interleave(generations):
        if isinstance(event, TextDelta):
            yield chunk(index, {"content": event.text}, logprobs=event.logprobs if want_logprobs else None)
        elif isinstance(event, ReasoningDelta):
            yield chunk(index, {"reasoning_content": event.text})
        elif isinstance(event, ToolCallDelta):
            # Name first, then the arguments as the model writes them: the shape the SDK's stream helpers reassemble.
            if event.id is not None:
                call_index = call_indexes[index][event.index] = next_call[index]
                next_call[index] += 1
                streamed[index].mark(event.id)
                yield chunk(index, _call_opened(call_index, event.id, event.name))
            elif event.index in call_indexes[index]:
                yield chunk(index, _call_arguments(call_indexes[index][event.index], event.arguments))
        elif isinstance(event, ToolCallsEvent):
            for call in streamed[index].unstreamed(event.calls):  # answers read whole: forced calls, generic formats
                call_index = next_call[index]
                next_call[index] += 1
                yield chunk(index, _call_opened(call_index, call.id, call.name))
                yield chunk(index, _call_arguments(call_index, call.arguments))
        elif isinstance(event, Finished):
            usage[index] = event.usage
            yield chunk(index, {}, event.reason)
    if include_usage:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "sovereign",
            "choices": [],
            "usage": convert.usage_json(usage, len(usage)),
        }
        if len(generations) == 1 and generations[0].stats is not None:
            payload["timings"] = convert.timings_json(generations[0].stats)  # as llama-server's last chunk has them
        yield _sse(payload)


def _call_opened(call_index: int, call_id: str, name: str | None) -> dict[str, Any]:
    """A chunk's delta that starts a call: its id and name, no arguments yet."""
    call = {"index": call_index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    return {"tool_calls": [call]}


def _call_arguments(call_index: int, arguments: str) -> dict[str, Any]:
    """A chunk's delta that carries a piece of a call's arguments."""
    return {"tool_calls": [{"index": call_index, "function": {"arguments": arguments}}]}


# --- text completions ---------------------------------------------------------------


@router.post("/v1/completions", response_model=None)
async def completions(
    request: Request, body: Annotated[CompletionBody, Depends(json_body(CompletionBody))]
) -> JSONResponse | StreamingResponse:
    engine = _engine(request)
    pairs = convert.completion_requests_from(body)
    generations = await _start_all(engine, [r for _p, r in pairs])
    model_name = generations[0].model
    completion_id = convert.new_id("cmpl")
    echoes = [await _echo_text(engine, prompt, body) for prompt, _r in pairs]
    if not body.stream:
        results = await collect(request, generations)
        choices = []
        for index, result in enumerate(results):
            choices.append(
                {
                    "index": index,
                    "text": echoes[index] + result.text,
                    "logprobs": convert.completion_logprobs_json(result.logprobs, len(echoes[index]))
                    if body.logprobs is not None
                    else None,
                    "finish_reason": result.finish_reason,
                }
            )
        return JSONResponse(
            {
                "id": completion_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": choices,
                "usage": convert.usage_json([r.usage for r in results], body.n),
                "system_fingerprint": "sovereign",
            }
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return event_stream(
        _completion_chunks(generations, completion_id, model_name, echoes, body, include_usage),
        generations,
        error_frame=_error_event,
        last=_sse("[DONE]"),
    )


async def _echo_text(engine: EngineAPI, prompt: str | list[int], body: CompletionBody) -> str:
    """The prompt as text when echo is asked for."""
    if not body.echo:
        return ""
    if isinstance(prompt, str):
        return prompt
    return await engine.detokenize(body.model, prompt, special=True)


async def _completion_chunks(
    generations: list[Generation],
    completion_id: str,
    model: str,
    echoes: list[str],
    body: CompletionBody,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    created = int(time.time())
    usage: list[Usage | None] = [None] * len(generations)
    offsets = [len(e) for e in echoes]

    def chunk(index: int, text: str, finish: str | None, logprobs: Any) -> bytes:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return _sse(payload)

    for index, echo in enumerate(echoes):
        if echo:
            yield chunk(index, echo, None, None)
    async for index, event in _interleave(generations):
        if isinstance(event, TextDelta):
            logprobs = (
                convert.completion_logprobs_json(event.logprobs, offsets[index]) if body.logprobs is not None else None
            )
            offsets[index] += len(event.text)
            yield chunk(index, event.text, None, logprobs)
        elif isinstance(event, Finished):
            usage[index] = event.usage
            yield chunk(index, "", event.reason, None)
    if include_usage:
        yield _sse(
            {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": convert.usage_json(usage, body.n),
            }
        )


# --- embeddings -------------------------------------------------------------------------


@router.post("/v1/embeddings")
async def embeddings(
    request: Request, body: Annotated[EmbeddingBody, Depends(json_body(EmbeddingBody))]
) -> dict[str, Any]:
    # One text or one token list, else a list of them (which kind a list holds is told by its first item).
    inputs = cast(
        "list[str | list[int]]",
        [body.input]
        if isinstance(body.input, str) or (body.input and isinstance(body.input[0], int))
        else list(body.input),
    )
    if not inputs:
        raise APIError(400, "input must not be empty.", param="input", code="invalid_value")
    # A client that hangs up stops the inputs not yet embedded (and the one under way, between chunks).
    model_name, vectors, tokens = await until_disconnect(request, _engine(request).embed(body.model, inputs))
    if body.dimensions is not None and body.dimensions != len(vectors[0]):
        raise APIError(
            400,
            (
                f"This model's embeddings have {len(vectors[0])} dimensions; dimensions={body.dimensions} is "
                "not supported."
            ),
            param="dimensions",
            code="invalid_value",
        )
    data = []
    for index, vector in enumerate(vectors):
        encoded: Any = vector
        if body.encoding_format == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
