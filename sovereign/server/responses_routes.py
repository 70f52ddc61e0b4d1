"""OpenAI's Responses API, stateless: POST /v1/responses, plain and streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from sovereign.engine import Engine, Finished, Generation
from sovereign.server import responses_convert as convert
from sovereign.server.running import collect
from sovereign.server.schemas import ResponsesBody

router = APIRouter()


@router.post("/v1/responses", response_model=None)
async def create_response(request: Request, body: ResponsesBody) -> JSONResponse | StreamingResponse:
    engine: Engine = request.app.state.engine
    generation = await engine.submit(convert.chat_request_from(body))
    shell = convert.ResponseShell(body, generation.model)
    if not body.stream:
        (result,) = await collect(request, [generation])
        finished = result.finished or Finished("cancelled", result.usage)
        return JSONResponse(convert.response_json(shell, result.text, result.tool_calls, finished))
    frames = convert.stream_events(shell, aiter(generation))
    return StreamingResponse(_cancelled_at_end(frames, generation), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _cancelled_at_end(frames: AsyncIterator[bytes], generation: Generation) -> AsyncIterator[bytes]:
    """Pass the frames through; stop generating when the client leaves or the stream ends."""
    try:
        async for frame in frames:
            yield frame
    finally:
        await generation.cancel()
