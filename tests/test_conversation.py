"""Conversations as agents write them render with every strict template of the corpus (engine/conversation.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sovereign.engine import tools as tool_calls
from sovereign.engine.chat_template import ChatTemplate
from sovereign.engine.conversation import normalize
from sovereign.engine.engine import _render_as_allowed
from sovereign.errors import InvalidRequest

TEMPLATES = sorted((Path(__file__).parent / "templates").rglob("*.jinja"))
TOOLS = [
    {
        "type": "function",
        "function": {"name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}},
    }
]
CALL = {
    "id": "call00001a",
    "type": "function",
    "function": {"name": "read_file", "arguments": json.dumps({"path": "a.txt"})},
}

# The shapes real agent clients send (Codex: two developer messages; Claude Code: system reminders
# between turns, several user turns in a row; both: a system note after a tool result).
SHAPES: dict[str, list[dict[str, Any]]] = {
    "codex_two_developer_messages": [
        {"role": "developer", "content": "You are Codex."},
        {"role": "developer", "content": "Sandbox: read-only."},
        {"role": "user", "content": "say hello"},
    ],
    "claude_code_system_between_turns": [
        {"role": "system", "content": "You are Claude Code."},
        {"role": "user", "content": "say hello"},
        {"role": "system", "content": "<system-reminder>Be brief.</system-reminder>"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "again"},
    ],
    "user_turns_in_a_row_and_a_trailing_system": [
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "ok"},
        {"role": "assistant", "content": "and more"},
        {"role": "user", "content": "third"},
        {"role": "system", "content": "Answer now."},
    ],
    "system_after_a_tool_result": [
        {"role": "user", "content": "read a.txt"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call00001a", "content": "hello"},
        {"role": "system", "content": "The file was read."},
        {"role": "user", "content": "what did it say?"},
    ],
}
# Templates that refuse an agent's shape for reasons no reshaping fixes, each with its reason (the
# reference renderer fails on them too); the test checks they still do, so a fix shows up.
KNOWN_REFUSALS = {
    (
        "Kimi-K2-Instruct",
        "system_after_a_tool_result",
    ): "it appends to a list, which the sandbox (Hugging Face's too) forbids",
    (
        "Kimi-K2-Thinking",
        "system_after_a_tool_result",
    ): "it appends to a list, which the sandbox (Hugging Face's too) forbids",
    (
        "meetkai-functionary-medium-v3.2",
        "system_after_a_tool_result",
    ): "it concatenates call arguments as text, which Hugging Face's convention passes as a mapping",
}
BASIC = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "again"},
]


def _render(template: ChatTemplate, messages: list[dict[str, Any]]) -> str:
    """As the engine renders a chat request.

    Normalized, tools folded for templates without them, reshaped on refusal.
    """
    shaped = tool_calls.as_template_messages(normalize(messages), TOOLS, native=template.supports_tools)
    return "".join(
        segment.text for segment in _render_as_allowed(template, shaped, TOOLS if template.supports_tools else None, {})
    )


def test_normalize_folds_and_merges() -> None:
    shaped = normalize(SHAPES["claude_code_system_between_turns"])
    assert [m["role"] for m in shaped] == ["system", "user", "assistant", "user"]
    # A note joins its user turn in front of what the user typed, which stays last (and the note cacheable).
    assert shaped[1]["content"] == "<system-reminder>Be brief.</system-reminder>\n\nsay hello"
    codex = normalize(SHAPES["codex_two_developer_messages"])
    assert codex == [
        {"role": "system", "content": "You are Codex.\n\nSandbox: read-only."},
        {"role": "user", "content": "say hello"},
    ]
    rows = normalize(SHAPES["user_turns_in_a_row_and_a_trailing_system"])
    assert [m["role"] for m in rows] == ["user", "assistant", "user"]
    assert (
        rows[0]["content"] == "first\n\nsecond"
        and rows[1]["content"] == "ok\n\nand more"
        and rows[2]["content"] == "Answer now.\n\nthird"
    )
    tool = normalize(SHAPES["system_after_a_tool_result"])
    assert [m["role"] for m in tool] == ["user", "assistant", "tool", "user"]
    assert tool[3]["content"] == "The file was read.\n\nwhat did it say?"
    # Notes keep their order, and never come between a call and its result.
    ordered = normalize(
        [
            {"role": "user", "content": "A"},
            {"role": "system", "content": "S1"},
            {"role": "system", "content": "S2"},
            {"role": "assistant", "content": "B"},
        ]
    )
    assert ordered[0]["content"] == "S1\n\nS2\n\nA"
    between = normalize(
        [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "system", "content": "note"},
            {"role": "tool", "tool_call_id": "call00001a", "content": "r"},
        ]
    )
    assert [m["role"] for m in between] == ["user", "assistant", "tool", "user"] and between[-1]["content"] == "note"
    original = json.dumps(SHAPES)
    for shape in SHAPES.values():
        normalize(shape)
    assert json.dumps(SHAPES) == original, "normalize must not change the client's messages"


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_agent_shapes_render_wherever_a_plain_conversation_does(path: Path) -> None:
    template = ChatTemplate(path.read_text(encoding="utf-8"), bos_token="<s>", eos_token="</s>")
    try:
        _render(template, BASIC)
    except InvalidRequest:
        pytest.skip("the template refuses even a plain system/user/assistant conversation")
    for name, shape in SHAPES.items():
        if (path.stem, name) in KNOWN_REFUSALS:
            with pytest.raises(InvalidRequest):
                _render(template, shape)
            continue
        text = _render(template, shape)
        for message in shape:
            if isinstance(message.get("content"), str) and message["content"]:
                assert message["content"] in text, f"{name}: {message['content']!r} was lost"
