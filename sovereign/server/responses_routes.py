"""OpenAI's Responses API, stateless: POST /v1/responses, plain and streamed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from sovereign.engine import Finished
from sovereign.server import responses_convert as convert
from sovereign.server.body import json_body
from sovereign.server.running import collect, event_stream
from sovereign.server.schemas import ResponsesBody
from sovereign.server.state import engine

router = APIRouter()


@router.post("/v1/responses", response_model=None)
async def create_response(
    request: Request, body: Annotated[ResponsesBody, Depends(json_body(ResponsesBody))]
) -> JSONResponse | StreamingResponse:
    generation = await engine(request).submit(convert.chat_request_from(body))
    shell = convert.ResponseShell(body, generation.model)
    if not body.stream:
        (result,) = await collect(request, [generation])
        finished = result.finished or Finished("cancelled", result.usage)
        return JSONResponse(convert.response_json(shell, result.text, result.tool_calls, finished, result.reasoning))
    frames = convert.stream_events(shell, aiter(generation))
    return event_stream(frames, [generation])  # stream_events reports failures itself, as response.failed
