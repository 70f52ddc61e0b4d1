"""llama-server's extensions that clients rely on: /tokenize, /detokenize and /apply-template."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field, field_validator

from sovereign.server.body import json_body
from sovereign.server.schemas import _Strict, bounded_template_kwargs
from sovereign.server.state import engine, model_name

router = APIRouter()


class TokenizeBody(_Strict):
    content: str
    model: str | None = None  # default: the first model the server was started with
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class ApplyTemplateBody(_Strict):
    messages: list[dict[str, Any]]
    model: str | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    _bounded_kwargs = field_validator("chat_template_kwargs")(bounded_template_kwargs)


class DetokenizeBody(_Strict):
    tokens: list[int] = Field(default_factory=list)
    model: str | None = None


@router.post("/tokenize")
async def tokenize(request: Request, body: Annotated[TokenizeBody, Depends(json_body(TokenizeBody))]) -> dict[str, Any]:
    model = model_name(request, body.model)
    tokens = await engine(request).tokenize(model, body.content, special=body.parse_special, add_bos=body.add_special)
    if body.with_pieces:
        pieces = await engine(request).token_texts(model, tokens)
        return {"tokens": [{"id": t, "piece": piece} for t, piece in zip(tokens, pieces, strict=True)]}
    return {"tokens": tokens}


@router.post("/detokenize")
async def detokenize(
    request: Request, body: Annotated[DetokenizeBody, Depends(json_body(DetokenizeBody))]
) -> dict[str, Any]:
    return {"content": await engine(request).detokenize(model_name(request, body.model), body.tokens)}


@router.post("/apply-template")
async def apply_template(
    request: Request, body: Annotated[ApplyTemplateBody, Depends(json_body(ApplyTemplateBody))]
) -> dict[str, Any]:
    model = model_name(request, body.model)
    prompt = await engine(request).apply_template(
        model, body.messages, body.tools, body.chat_template_kwargs, body.add_generation_prompt
    )
    return {"prompt": prompt}
