"""Anthropic Messages API request bodies.

Top-level fields are checked strictly (an unknown one is a 400, as Anthropic answers); fields the
API defines that a local model cannot act on (cache_control, service_tier, thinking, ...) are
accepted and ignored, so that SDK code sending them keeps working. Content blocks keep extra keys
(citations, cache_control) for the same reason.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sovereign.server.schemas import InChunks


class _Strict(BaseModel):
    """Unknown fields refused (lone surrogates, anywhere inside, are refused by the body decoder)."""

    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Open):
    type: Literal["text"]
    text: str


class ImageBlock(_Open):
    type: Literal["image"]
    source: dict[str, Any]


class DocumentBlock(_Open):
    type: Literal["document"]
    source: dict[str, Any]


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Open):
    """Reasoning an earlier answer carried, handed back by SDKs.

    It reaches the template as the message's reasoning_content.
    """

    type: Literal["thinking", "redacted_thinking"]


ContentBlock = Annotated[
    TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")
]


class ThinkingConfig(_Open):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)


class MessageParam(_Strict):
    role: Literal["user", "assistant", "system"]
    content: str | Annotated[list[ContentBlock], InChunks]
    # Claude Code's per-turn-control beta sets an effort per message; accepted and ignored, as the
    # request-level effort is (a local model has one way of answering).
    output_config: dict[str, Any] | None = None


class ToolParam(_Open):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    type: str | None = None  # "custom", or a server tool (web_search_..., bash_...) that is refused


class ToolChoiceParam(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _Conversation(_Strict):
    """What count_tokens and create share."""

    model: str
    messages: Annotated[list[MessageParam], InChunks] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[ToolParam], InChunks] | None = None
    tool_choice: ToolChoiceParam | None = None
    output_config: dict[str, Any] | None = (
        None  # {"format": {"type": "json_schema", "schema": ...}} is enforced; effort is ignored
    )
    thinking: ThinkingConfig | None = None  # enabled/disabled reaches the template; budget_tokens bounds the reasoning
    context_management: dict[str, Any] | None = (
        None  # context editing, applied before rendering (server/context_editing.py)
    )
    # Accepted and ignored: meaningful to Anthropic's service, not to a local model.
    cache_control: dict[str, Any] | None = None
    speed: str | None = None


class MessagesBody(_Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    ignore_eos: bool = False  # sovereign's extension (as on its OpenAI endpoints): generate through end-of-turn
    service_tier: str | None = None
    container: Any = None
    diagnostics: Any = None
    inference_geo: str | None = None


class CountTokensBody(_Conversation):
    pass
