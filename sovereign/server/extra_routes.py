"""llama-server's extensions that clients rely on: /tokenize and /detokenize."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from sovereign.server.errors import APIError
from sovereign.server.schemas import _Strict

router = APIRouter()


class TokenizeBody(_Strict):
    content: str
    model: str | None = None  # default: the first model the server was started with
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeBody(_Strict):
    tokens: list[int] = Field(default_factory=list)
    model: str | None = None


def _model_name(request: Request, given: str | None) -> str:
    name = given or next(iter(request.app.state.default_models), None)
    if name is None:
        raise APIError(400, "Name a model.", param="model", code="missing_required_parameter")
    return name


@router.post("/tokenize")
async def tokenize(request: Request, body: TokenizeBody) -> dict[str, Any]:
    model = await request.app.state.pool.get(_model_name(request, body.model))
    tokens = model.backend.tokenize(body.content, special=body.parse_special)
    if body.add_special:
        tokens = model.backend.with_bos(tokens)
    if body.with_pieces:
        return {"tokens": [{"id": t, "piece": model.backend.token_text(t)} for t in tokens]}
    return {"tokens": tokens}


@router.post("/detokenize")
async def detokenize(request: Request, body: DetokenizeBody) -> dict[str, Any]:
    model = await request.app.state.pool.get(_model_name(request, body.model))
    bad = next((t for t in body.tokens if not 0 <= t < model.backend.n_vocab), None)
    if bad is not None:
        raise APIError(400, f"Token {bad} is outside this model's vocabulary of {model.backend.n_vocab}.", param="tokens", code="invalid_value")
    return {"content": b"".join(model.backend.piece(t) for t in body.tokens).decode("utf-8", "replace")}
