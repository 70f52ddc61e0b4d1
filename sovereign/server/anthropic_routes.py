"""Anthropic-compatible endpoints: POST /v1/messages (plain and streamed) and /v1/messages/count_tokens."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from sovereign.engine import Finished
from sovereign.server import anthropic_convert as convert
from sovereign.server.anthropic_schemas import CountTokensBody, MessageParam, MessagesBody
from sovereign.server.body import json_body
from sovereign.server.context_editing import apply_context_edits, parse_context_management
from sovereign.server.running import collect, event_stream
from sovereign.server.sse import named_event
from sovereign.server.state import engine

router = APIRouter()
Body = TypeVar("Body", MessagesBody, CountTokensBody)
_EDITING_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="context-editing")


@router.post("/v1/messages", response_model=None)
async def create_message(
    request: Request, body: Annotated[MessagesBody, Depends(json_body(MessagesBody))]
) -> JSONResponse | StreamingResponse:
    body, applied = await _edit_context(request, body)
    chat = convert.chat_request_from(body)
    generation = await engine(request).submit(chat)
    message_id = convert.new_id("msg")
    edits = {"applied_edits": applied} if body.context_management is not None else None
    if not body.stream:
        (result,) = await collect(request, [generation])
        finished = result.finished or Finished("cancelled", result.usage)
        message = convert.message_json(
            message_id,
            generation.model,
            result.text,
            result.tool_calls,
            finished,
            body.stop_sequences,
            result.reasoning,
        )
        return JSONResponse({**message, "context_management": edits} if edits is not None else message)
    events = convert.stream_events(
        message_id,
        generation.model,
        generation.prompt_tokens,
        aiter(generation),
        body.stop_sequences,
        context_management=edits,
    )
    # An error once the status line is out travels as Anthropic's `error` event.
    return event_stream(events, [generation], error_frame=lambda error: named_event(error.anthropic_body()))


@router.post("/v1/messages/count_tokens")
async def count_tokens(
    request: Request, body: Annotated[CountTokensBody, Depends(json_body(CountTokensBody))]
) -> dict[str, Any]:
    if body.context_management is None:
        return {"input_tokens": await engine(request).count_tokens(convert.chat_request_from(body))}
    original = await engine(request).count_tokens(convert.chat_request_from(body))
    edited, _ = await _edit_context(request, body)
    return {
        "input_tokens": await engine(request).count_tokens(convert.chat_request_from(edited)),
        "context_management": {"original_input_tokens": original},
    }


async def _edit_context(request: Request, body: Body) -> tuple[Body, list[dict[str, Any]]]:
    """The body with Anthropic's context edits applied to its messages, and the edits as the response reports them."""
    if body.context_management is None:
        return body, []
    parse_context_management(body.context_management)  # a bad config is a 400 before any work
    served_by = engine(request)
    loop = asyncio.get_running_loop()

    def count_tokens(messages: list[dict[str, Any]]) -> int:
        """The prompt tokens of the conversation with these messages (tokenizing only, in the model's process)."""
        trial = body.model_copy(update={"messages": [MessageParam.model_validate(m) for m in messages]})
        return asyncio.run_coroutine_threadsafe(served_by.count_tokens(convert.chat_request_from(trial)), loop).result()

    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    # Its own threads: the token counts it waits on need the default pool's, which it must never exhaust.
    edited, applied = await loop.run_in_executor(
        _EDITING_THREADS, apply_context_edits, messages, body.context_management, count_tokens
    )
    if not applied:
        return body, []
    return body.model_copy(update={"messages": [MessageParam.model_validate(m) for m in edited]}), applied
