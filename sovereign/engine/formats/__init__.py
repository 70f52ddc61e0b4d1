"""Model families' output formats.

Detect one from a chat template, then parse its reasoning and tool calls as they stream:

fmt = detect(chat_template)
parser = fmt.parser(tools)          # tools: OpenAI-shaped, optional
for piece in pieces: events += parser.feed(piece)
events += parser.finish()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sovereign.engine.formats.base import (
    ContentDelta,
    FormatEvent,
    FormatParser,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from sovereign.engine.formats.families import spec_for
from sovereign.engine.formats.harmony import HarmonyParser
from sovereign.engine.formats.stream import MarkupParser

__all__ = [
    "FORMATS",
    "ChatFormat",
    "ContentDelta",
    "FormatEvent",
    "FormatParser",
    "ReasoningDelta",
    "ToolCallArgsDelta",
    "ToolCallEnd",
    "ToolCallStart",
    "detect",
]


@dataclass(frozen=True)
class ChatFormat:
    """A family's output format: its name, reasoning markers, and whether its template writes tool calls natively."""

    name: str
    reasoning: tuple[str, str] | None
    native_tools: bool = True  # False: the template knows no tools, so the prompt needs our instructions
    opens_reasoning: bool = False  # the generation prompt ends inside the reasoning block

    def parser(self, tools: list[dict[str, Any]] | None = None, *, in_reasoning: bool | None = None) -> FormatParser:
        """A fresh streaming parser for one answer.

        `in_reasoning` overrides `opens_reasoning` (e.g. per template kwargs).
        """
        if self.name == "gpt_oss":
            return HarmonyParser()
        opened = self.opens_reasoning if in_reasoning is None else in_reasoning
        return MarkupParser(spec_for(self.name, tools), in_reasoning=opened)


THINK = ("<think>", "</think>")
FORMATS: dict[str, ChatFormat] = {
    f.name: f
    for f in (
        ChatFormat("hermes", THINK),
        ChatFormat("qwen3_coder", THINK),
        ChatFormat("llama3", None),
        ChatFormat("mistral", ("[THINK]", "[/THINK]")),
        ChatFormat("phi4_mini", None),
        ChatFormat("deepseek_r1", THINK),
        ChatFormat("deepseek_v3_1", THINK),
        ChatFormat("gpt_oss", ("<|channel|>analysis<|message|>", "<|end|>")),
        ChatFormat("granite", THINK),
        ChatFormat("command_r7b", ("<|START_THINKING|>", "<|END_THINKING|>")),
        ChatFormat("glm45", THINK),
        ChatFormat("kimi_k2", THINK),
        ChatFormat("generic", THINK, native_tools=False),
    )
}


def _family(t: str) -> str:
    """The family whose markers the template contains; the order settles templates that mention several."""
    if "<|channel|>" in t and "<|message|>" in t:
        return "gpt_oss"
    if "<|START_ACTION|>" in t:
        return "command_r7b"
    if "<｜tool▁calls▁begin｜>" in t:
        # V3.1 writes the name before the separator; R1 writes "function" there and a fenced JSON block.
        return "deepseek_r1" if "```json" in t else "deepseek_v3_1"
    if "<|tool_calls_section_begin|>" in t or "<|im_system|>tool_declare" in t:
        return "kimi_k2"
    if "<arg_key>" in t:
        return "glm45"
    if "<function=" in t and "<parameter=" in t:
        return "qwen3_coder"
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|tool_call|>" in t and "<|start_of_role|>" in t:
        return "granite"
    if "functools" in t or ("<|tool|>" in t and "<|/tool|>" in t) or "<|tool_call|>" in t:
        return "phi4_mini"
    if "<|python_tag|>" in t or ("<|start_header_id|>" in t and '"parameters"' in t):
        return "llama3"
    return "generic"


def _opens_reasoning(t: str, fmt: ChatFormat) -> bool:
    """Whether the generation prompt ends inside the reasoning block (Qwen3-Thinking-2507, DeepSeek-R1)."""
    if not fmt.reasoning or fmt.name == "gpt_oss":
        return False
    start, end = fmt.reasoning
    at = t.rfind("add_generation_prompt")
    tail = t[at:] if at >= 0 else ""
    # A template that can also close the block right away (Qwen3's enable_thinking=false) leaves it to the model.
    return start in tail and end not in tail


def detect(chat_template: str | None) -> ChatFormat:
    """The output format of the model whose chat template this is; generic when nothing matches."""
    if not chat_template:
        return FORMATS["generic"]
    fmt = FORMATS[_family(chat_template)]
    if _opens_reasoning(chat_template, fmt):
        fmt = ChatFormat(fmt.name, fmt.reasoning, fmt.native_tools, opens_reasoning=True)
    return fmt
