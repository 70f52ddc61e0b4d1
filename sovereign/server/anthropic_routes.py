"""Anthropic-compatible endpoints: POST /v1/messages (plain and streamed) and /v1/messages/count_tokens."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from sovereign.engine import Finished
from sovereign.server import anthropic_convert as convert
from sovereign.server.anthropic_schemas import CountTokensBody, MessagesBody
from sovereign.server.state import engine
from sovereign.server.running import collect, event_stream
from sovereign.server.sse import named_event

router = APIRouter()


@router.post("/v1/messages", response_model=None)
async def create_message(request: Request, body: MessagesBody) -> JSONResponse | StreamingResponse:
    chat = convert.chat_request_from(body)
    generation = await engine(request).submit(chat)
    message_id = convert.new_id("msg")
    if not body.stream:
        (result,) = await collect(request, [generation])
        finished = result.finished or Finished("cancelled", result.usage)
        return JSONResponse(convert.message_json(message_id, generation.model, result.text, result.tool_calls, finished, body.stop_sequences, result.reasoning))
    events = convert.stream_events(message_id, generation.model, generation.prompt_tokens, aiter(generation), body.stop_sequences)
    # An error once the status line is out travels as Anthropic's `error` event.
    return event_stream(events, [generation], error_frame=lambda error: named_event(error.anthropic_body()))


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request, body: CountTokensBody) -> dict[str, Any]:
    return {"input_tokens": await engine(request).count_tokens(convert.chat_request_from(body))}
