"""Anthropic-compatible endpoints: POST /v1/messages (plain and streamed) and /v1/messages/count_tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from sovereign.engine import Engine, Finished, Generation
from sovereign.server import anthropic_convert as convert
from sovereign.server.anthropic_schemas import CountTokensBody, MessagesBody
from sovereign.server.errors import from_exception
from sovereign.server.running import collect
from sovereign.server.sse import named_event

router = APIRouter()


def _engine(request: Request) -> Engine:
    return request.app.state.engine


@router.post("/v1/messages", response_model=None)
async def create_message(request: Request, body: MessagesBody) -> JSONResponse | StreamingResponse:
    chat = convert.chat_request_from(body)
    generation = await _engine(request).submit(chat)
    message_id = convert.new_id("msg")
    if not body.stream:
        (result,) = await collect(request, [generation])
        finished = result.finished or Finished("cancelled", result.usage)
        return JSONResponse(convert.message_json(message_id, generation.model, result.text, result.tool_calls, finished, body.stop_sequences))
    events = convert.stream_events(message_id, generation.model, generation.prompt_tokens, aiter(generation), body.stop_sequences)
    return StreamingResponse(_guarded(events, generation), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _guarded(frames: AsyncIterator[bytes], generation: Generation) -> AsyncIterator[bytes]:
    """Stream the frames; an error once the status line is out travels as Anthropic's `error` event."""
    try:
        async for frame in frames:
            yield frame
    except Exception as exc:
        error = from_exception(exc)
        yield named_event(error.anthropic_body())
    finally:
        await generation.cancel()


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request, body: CountTokensBody) -> dict[str, Any]:
    return {"input_tokens": await _engine(request).count_tokens(convert.chat_request_from(body))}
