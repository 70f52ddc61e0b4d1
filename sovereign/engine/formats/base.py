"""Events a format parser emits, and the pieces every family's parser shares."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

# Reasoning needs no translation on its way out: the parsers emit the engine's own event.
from sovereign.engine.requests import ReasoningDelta


@dataclass(frozen=True)
class ContentDelta:
    """A piece of the answer's visible text."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: its index in this turn, an id and the function's name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    """A piece of a tool call's arguments, as JSON text; the pieces concatenate to one JSON object."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    """A tool call's arguments are complete."""

    index: int


FormatEvent = ContentDelta | ReasoningDelta | ToolCallStart | ToolCallArgsDelta | ToolCallEnd


class FormatParser(Protocol):
    """A streaming parser of one family's output: feed text pieces, then finish once."""

    def feed(self, text: str) -> list[FormatEvent]: ...

    def finish(self) -> list[FormatEvent]: ...


@dataclass
class Call:
    """One tool call as a section parser sees it so far; `args` must only ever grow (it is streamed)."""

    name: str | None = None
    args: str = ""
    complete: bool = False
    id: str | None = None


@dataclass
class Section:
    """What a section parser made of the text after its opening marker."""

    calls: list[Call] = field(default_factory=list)
    end: int | None = None  # index just past the section's markup, once it is closed
    rejected: bool = False  # the text cannot be this markup: it is plain content after all


class SectionParser(Protocol):
    """Parses a tool-call section from its (growing) text; called again on the whole text at each feed."""

    def parse(self, text: str, final: bool) -> Section: ...


def new_call_id() -> str:
    """An id in OpenAI's style."""
    return "call_" + secrets.token_hex(12)


def tool_schemas(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Parameter schemas by function name, from OpenAI-shaped tools (or bare function objects)."""
    schemas: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            schemas[function["name"]] = function.get("parameters") or {}
    return schemas
