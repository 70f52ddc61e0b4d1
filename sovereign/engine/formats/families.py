"""Each family's markup, as data: which markers open reasoning and tool calls, and what parses the calls."""

from __future__ import annotations

import re
from typing import Any

from sovereign.engine.formats.base import Call, Section, tool_schemas
from sovereign.engine.formats.json_calls import (
    BareJson,
    DeepSeek,
    JsonList,
    Kimi,
    PythonTag,
    TaggedJson,
)
from sovereign.engine.formats.jsonscan import skip_ws, value_end
from sovereign.engine.formats.stream import Opener, Spec
from sovereign.engine.formats.xml_calls import Glm, QwenCoder

THINK = ("<think>", "</think>")


def spec_for(name: str, tools: list[dict[str, Any]] | None) -> Spec:
    """The Spec of a family by name; tools give XML formats their parameter types and bare JSON its known names."""
    schemas = tool_schemas(tools)
    known = frozenset(schemas)
    if name == "hermes":
        return Spec(THINK, (Opener("<tool_call>", TaggedJson),))
    if name == "qwen3_coder":
        return Spec(THINK, (Opener("<tool_call>", lambda: QwenCoder(schemas)),))
    if name == "glm45":
        return Spec(THINK, (Opener("<tool_call>", lambda: Glm(schemas)),))
    if name == "llama3":
        return Spec(
            None,
            (
                Opener("<|python_tag|>", lambda: PythonTag(known)),
                Opener("{", lambda: BareJson(known), at_start=True, keep=True),
            ),
            drop=("<|eom_id|>", "<|eot_id|>"),
        )
    if name == "mistral":
        return Spec(("[THINK]", "[/THINK]"), (Opener("[TOOL_CALLS]", MistralCalls),))
    if name == "phi4_mini":
        return Spec(
            None,
            (Opener("functools", JsonList), Opener("<|tool_call|>", lambda: JsonList(close="<|/tool_call|>"))),
        )
    if name == "granite":
        return Spec(THINK, (Opener("<|tool_call|>", JsonList),), drop=("<response>", "</response>"))
    if name == "command_r7b":
        return Spec(
            ("<|START_THINKING|>", "<|END_THINKING|>"),
            (
                Opener(
                    "<|START_ACTION|>",
                    lambda: JsonList("<|END_ACTION|>", ("tool_name",), ("parameters",), ("tool_call_id",)),
                ),
            ),
            drop=("<|START_RESPONSE|>", "<|END_RESPONSE|>"),
        )
    if name in ("deepseek_r1", "deepseek_v3_1"):
        return Spec(THINK, (Opener("<｜tool▁calls▁begin｜>", DeepSeek),))
    if name == "kimi_k2":
        return Spec(THINK, (Opener("<|tool_calls_section_begin|>", Kimi),))
    # Generic: what our own instructions ask for, plus the shapes small models drift into.
    return Spec(
        THINK,
        (
            Opener("<tool_call>", TaggedJson),
            Opener("{", lambda: BareJson(known), at_start=True, keep=True),
            Opener("[", lambda: BareJson(known), at_start=True, keep=True),
            Opener("```", lambda: BareJson(known, fenced=True), at_start=True),
        ),
    )


class MistralCalls:
    """After `[TOOL_CALLS]`: a JSON list (Nemo and older), or `NAME[ARGS]{…}` (Magistral, Ministral 3, Devstral)."""

    def __init__(self) -> None:
        self._list = JsonList()

    def parse(self, text: str, final: bool) -> Section:
        """Parse either shape, chosen by the first character."""
        i = skip_ws(text, 0)
        if i >= len(text) or text[i] in "[{":
            return self._list.parse(text, final) if i < len(text) else Section(rejected=final)
        m = re.compile(r"([\w.\-]+)(?:\[CALL_ID\]([\w\-]*))?\[ARGS\]").match(text, i)
        if m is None:
            partial = re.fullmatch(r"[\w.\-]*(?:\[[A-Z_]*\]?[\w\-]*)*(?:\[[A-Z_]*)?", text[i:])
            return Section(rejected=final or partial is None)
        v = skip_ws(text, m.end())
        end = value_end(text, v, final)
        call = Call(m.group(1), text[v:end] if end is not None else text[v:], end is not None, m.group(2) or None)
        return Section([call], end=end)
