"""Context editing (Anthropic's `context_management`) as a pure function over a message list."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from sovereign.errors import InvalidRequest
from sovereign.server.context_editing import (
    CLEARED_TOOL_RESULT,
    AppliedEdit,
    ClearThinking,
    ClearToolUses,
    apply_context_edits,
    parse_context_management,
)


def tokens(messages: list[dict[str, Any]]) -> int:
    """A deterministic stand-in for a tokenizer: a quarter of the JSON's characters."""
    return len(json.dumps(messages)) // 4


def tool_turns(names: list[str], result_size: int = 400) -> list[dict[str, Any]]:
    """A user question, then one assistant tool_use and one user tool_result per name, then a final question."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Look around the repository."}]
    for i, name in enumerate(names):
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"calling {name}"},
                    {"type": "tool_use", "id": f"tu_{i}", "name": name, "input": {"path": f"file_{i}.py"}},
                ],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": f"tu_{i}", "content": f"result {i} " + "x" * result_size}
                ],
            }
        )
    messages.append({"role": "user", "content": "Now summarise."})
    return messages


def result_of(messages: list[dict[str, Any]], i: int) -> Any:
    """The content of tool result `tu_{i}`."""
    for message in messages:
        if isinstance(message["content"], list):
            for block in message["content"]:
                if block.get("type") == "tool_result" and block["tool_use_id"] == f"tu_{i}":
                    return block["content"]
    raise KeyError(i)


def input_of(messages: list[dict[str, Any]], i: int) -> Any:
    """The input of tool use `tu_{i}`."""
    for message in messages:
        if isinstance(message["content"], list):
            for block in message["content"]:
                if block.get("type") == "tool_use" and block["id"] == f"tu_{i}":
                    return block["input"]
    raise KeyError(i)


def clear_tools(**fields: Any) -> dict[str, Any]:
    """A context_management config with one clear_tool_uses edit."""
    return {"edits": [{"type": "clear_tool_uses_20250919", **fields}]}


TRIGGER_LOW = {"type": "input_tokens", "value": 100}


# ---------------------------------------------------------------- clear_tool_uses


def test_no_config_changes_nothing() -> None:
    messages = tool_turns(["read"] * 5)
    for config in (None, {}, {"edits": []}):
        edited, applied = apply_context_edits(messages, config, tokens)
        assert edited == messages and applied == []


def test_below_the_default_trigger_nothing_changes() -> None:
    messages = tool_turns(["read"] * 5)
    assert tokens(messages) < 100_000
    edited, applied = apply_context_edits(messages, clear_tools(), tokens)
    assert edited == messages
    assert applied == []


def test_below_an_explicit_trigger_nothing_changes() -> None:
    messages = tool_turns(["read"] * 5)
    edited, applied = apply_context_edits(
        messages, clear_tools(trigger={"type": "input_tokens", "value": tokens(messages)}), tokens
    )
    assert edited == messages and applied == []


def test_above_trigger_the_oldest_results_are_cleared_and_the_last_three_kept() -> None:
    messages = tool_turns(["read"] * 5)
    edited, applied = apply_context_edits(messages, clear_tools(trigger=TRIGGER_LOW), tokens)
    assert [result_of(edited, i) == CLEARED_TOOL_RESULT for i in range(5)] == [True, True, False, False, False]
    assert result_of(edited, 4) == result_of(messages, 4)
    assert input_of(edited, 0) == {"path": "file_0.py"}  # inputs stay by default
    assert len(applied) == 1
    assert applied[0] == {
        "type": "clear_tool_uses_20250919",
        "cleared_tool_uses": 2,
        "cleared_input_tokens": tokens(messages) - tokens(edited),
    }
    assert applied[0]["cleared_input_tokens"] > 150
    assert len(edited) == len(messages)
    assert edited[-1] == messages[-1]


def test_keep_n() -> None:
    messages = tool_turns(["read"] * 5)
    edited, applied = apply_context_edits(
        messages, clear_tools(trigger=TRIGGER_LOW, keep={"type": "tool_uses", "value": 1}), tokens
    )
    assert [result_of(edited, i) == CLEARED_TOOL_RESULT for i in range(5)] == [True, True, True, True, False]
    assert applied[0]["cleared_tool_uses"] == 4


def test_keep_zero_clears_every_result() -> None:
    messages = tool_turns(["read"] * 3)
    edited, applied = apply_context_edits(
        messages, clear_tools(trigger=TRIGGER_LOW, keep={"type": "tool_uses", "value": 0}), tokens
    )
    assert all(result_of(edited, i) == CLEARED_TOOL_RESULT for i in range(3))
    assert applied[0]["cleared_tool_uses"] == 3


def test_fewer_uses_than_keep_changes_nothing() -> None:
    messages = tool_turns(["read"] * 3)
    edited, applied = apply_context_edits(messages, clear_tools(trigger=TRIGGER_LOW), tokens)
    assert edited == messages and applied == []


def test_tool_uses_trigger() -> None:
    messages = tool_turns(["read"] * 5)
    edited, applied = apply_context_edits(messages, clear_tools(trigger={"type": "tool_uses", "value": 5}), tokens)
    assert applied == []
    edited, applied = apply_context_edits(messages, clear_tools(trigger={"type": "tool_uses", "value": 4}), tokens)
    assert applied[0]["cleared_tool_uses"] == 2


def test_exclude_tools_are_never_cleared() -> None:
    messages = tool_turns(["memory", "read", "read", "memory", "read", "read", "read"])
    edited, applied = apply_context_edits(messages, clear_tools(trigger=TRIGGER_LOW, exclude_tools=["memory"]), tokens)
    cleared = [result_of(edited, i) == CLEARED_TOOL_RESULT for i in range(7)]
    # The three most recent clearable uses (4, 5, 6) stay; memory (0, 3) is excluded.
    assert cleared == [False, True, True, False, False, False, False]
    assert applied[0]["cleared_tool_uses"] == 2


def test_clear_tool_inputs_true_blanks_inputs_of_cleared_uses() -> None:
    messages = tool_turns(["read", "grep", "read", "read", "read"])
    edited, applied = apply_context_edits(messages, clear_tools(trigger=TRIGGER_LOW, clear_tool_inputs=True), tokens)
    assert input_of(edited, 0) == {} and input_of(edited, 1) == {}
    assert input_of(edited, 2) == {"path": "file_2.py"}
    assert applied[0]["cleared_tool_uses"] == 2


def test_clear_tool_inputs_list_blanks_only_those_tools() -> None:
    messages = tool_turns(["read", "grep", "read", "read", "read"])
    edited, _ = apply_context_edits(messages, clear_tools(trigger=TRIGGER_LOW, clear_tool_inputs=["grep"]), tokens)
    assert input_of(edited, 0) == {"path": "file_0.py"}
    assert input_of(edited, 1) == {}
    assert result_of(edited, 0) == CLEARED_TOOL_RESULT and result_of(edited, 1) == CLEARED_TOOL_RESULT


def test_clear_at_least_not_reached_changes_nothing() -> None:
    messages = tool_turns(["read"] * 5)
    possible = apply_context_edits(messages, clear_tools(trigger=TRIGGER_LOW), tokens)[1][0]["cleared_input_tokens"]
    edited, applied = apply_context_edits(
        messages,
        clear_tools(trigger=TRIGGER_LOW, clear_at_least={"type": "input_tokens", "value": possible + 1}),
        tokens,
    )
    assert edited == messages and applied == []
    edited, applied = apply_context_edits(
        messages, clear_tools(trigger=TRIGGER_LOW, clear_at_least={"type": "input_tokens", "value": possible}), tokens
    )
    assert applied[0]["cleared_input_tokens"] == possible


def test_result_with_block_content_and_several_uses_in_one_turn() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "a", "name": "read", "input": {}},
                {"type": "tool_use", "id": "b", "name": "read", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "text", "text": "y" * 800}]},
                {"type": "tool_result", "tool_use_id": "b", "content": [{"type": "text", "text": "z" * 800}]},
            ],
        },
    ]
    edited, applied = apply_context_edits(
        messages, clear_tools(trigger=TRIGGER_LOW, keep={"type": "tool_uses", "value": 1}), tokens
    )
    assert edited[2]["content"][0]["content"] == CLEARED_TOOL_RESULT
    assert edited[2]["content"][1] == messages[2]["content"][1]
    assert edited[2]["content"][0]["tool_use_id"] == "a"
    assert applied[0]["cleared_tool_uses"] == 1


def test_input_is_never_mutated() -> None:
    messages = tool_turns(["read"] * 5) + [
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "t", "signature": "s"}, {"type": "text", "text": "done"}],
        },
        {"role": "user", "content": "again"},
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "u", "signature": "s"}, {"type": "text", "text": "ok"}],
        },
    ]
    snapshot = copy.deepcopy(messages)
    config = {
        "edits": [
            {"type": "clear_thinking_20251015"},
            {"type": "clear_tool_uses_20250919", "trigger": TRIGGER_LOW, "clear_tool_inputs": True},
        ]
    }
    edited, applied = apply_context_edits(messages, config, tokens)
    assert [a["type"] for a in applied] == ["clear_thinking_20251015", "clear_tool_uses_20250919"]
    assert messages == snapshot
    assert edited != messages


# ---------------------------------------------------------------- clear_thinking


def thinking_conversation() -> list[dict[str, Any]]:
    """Three user turns; the second is a tool loop of two assistant messages; every assistant message thinks."""
    think = lambda t: {"type": "thinking", "thinking": t * 200, "signature": "sig"}  # noqa: E731
    return [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [think("a"), {"type": "text", "text": "answer one"}]},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": [think("b"), {"type": "tool_use", "id": "t1", "name": "read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "redacted_thinking", "data": "opaque"},
                think("c"),
                {"type": "text", "text": "answer two"},
            ],
        },
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": [think("d"), {"type": "text", "text": "answer three"}]},
        {"role": "user", "content": "fourth"},
    ]


def kinds(message: dict[str, Any]) -> list[str]:
    """The block types of a message."""
    return [block["type"] for block in message["content"]]


def test_clear_thinking_default_keeps_the_last_turn() -> None:
    messages = thinking_conversation()
    edited, applied = apply_context_edits(messages, {"edits": [{"type": "clear_thinking_20251015"}]}, tokens)
    assert kinds(edited[1]) == ["text"]
    assert kinds(edited[3]) == ["tool_use"]
    assert kinds(edited[5]) == ["text"]
    assert kinds(edited[7]) == ["thinking", "text"]
    assert applied == [
        {
            "type": "clear_thinking_20251015",
            "cleared_thinking_turns": 2,
            "cleared_input_tokens": tokens(messages) - tokens(edited),
        }
    ]


def test_clear_thinking_keep_n_counts_a_tool_loop_as_one_turn() -> None:
    messages = thinking_conversation()
    edited, applied = apply_context_edits(
        messages,
        {"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 2}}]},
        tokens,
    )
    assert kinds(edited[1]) == ["text"]
    assert kinds(edited[3]) == ["thinking", "tool_use"]
    assert kinds(edited[5]) == ["redacted_thinking", "thinking", "text"]
    assert applied[0]["cleared_thinking_turns"] == 1


def test_clear_thinking_keep_all_changes_nothing() -> None:
    messages = thinking_conversation()
    for keep in ("all", {"type": "all"}):
        edited, applied = apply_context_edits(
            messages, {"edits": [{"type": "clear_thinking_20251015", "keep": keep}]}, tokens
        )
        assert edited == messages and applied == []


def test_clear_thinking_keep_more_than_there_are_changes_nothing() -> None:
    messages = thinking_conversation()
    edited, applied = apply_context_edits(
        messages,
        {"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 9}}]},
        tokens,
    )
    assert edited == messages and applied == []


def test_clear_thinking_leaves_string_content_alone() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "plain"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "s"}]},
    ]
    edited, applied = apply_context_edits(
        messages,
        {"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 0}}]},
        tokens,
    )
    assert edited[1] == {"role": "assistant", "content": "plain"}
    assert edited[3]["content"] == []
    assert applied[0]["cleared_thinking_turns"] == 1


# ---------------------------------------------------------------- the shapes


def test_parse_fills_anthropics_defaults() -> None:
    thinking, tools = parse_context_management(
        {"edits": [{"type": "clear_thinking_20251015"}, {"type": "clear_tool_uses_20250919"}]}
    )
    assert thinking == ClearThinking(keep=1)
    assert tools == ClearToolUses(trigger_type="input_tokens", trigger_value=100_000, keep=3, clear_at_least=0)


def test_applied_edit_to_dict_matches_the_sdk_shapes() -> None:
    assert AppliedEdit("clear_tool_uses_20250919", 10, cleared_tool_uses=2).to_dict() == {
        "type": "clear_tool_uses_20250919",
        "cleared_input_tokens": 10,
        "cleared_tool_uses": 2,
    }
    assert AppliedEdit("clear_thinking_20251015", 5, cleared_thinking_turns=1).to_dict() == {
        "type": "clear_thinking_20251015",
        "cleared_input_tokens": 5,
        "cleared_thinking_turns": 1,
    }


def test_applied_edits_validate_against_the_official_sdk_model() -> None:
    from anthropic.types.beta import BetaContextManagementResponse

    messages = thinking_conversation()[:-1] + tool_turns(["read"] * 5)
    config = {
        "edits": [{"type": "clear_thinking_20251015"}, {"type": "clear_tool_uses_20250919", "trigger": TRIGGER_LOW}]
    }
    _, applied = apply_context_edits(messages, config, tokens)
    parsed = BetaContextManagementResponse.model_validate({"applied_edits": applied})
    assert [edit.type for edit in parsed.applied_edits] == ["clear_thinking_20251015", "clear_tool_uses_20250919"]


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ("clear", "must be an object"),
        ({"edits": {}}, "must be a list"),
        ({"edits": [], "extra": 1}, "unknown field"),
        ({"edits": ["clear_tool_uses_20250919"]}, "must be an object"),
        ({"edits": [{"type": "clear_everything"}]}, "clear_everything"),
        ({"edits": [{"type": "compact_20260112"}]}, "not supported"),
        (clear_tools(trigger={"type": "input_tokens", "value": -1}), "negative"),
        (clear_tools(trigger={"type": "input_tokens", "value": "100"}), "integer"),
        (clear_tools(trigger={"type": "input_tokens", "value": True}), "integer"),
        (clear_tools(trigger={"type": "messages", "value": 3}), "trigger.type"),
        (clear_tools(trigger={"type": "input_tokens"}), "value is required"),
        (clear_tools(trigger=1000), "trigger must be an object"),
        (clear_tools(keep={"type": "tool_uses", "value": -3}), "negative"),
        (clear_tools(keep={"type": "input_tokens", "value": 3}), "keep.type"),
        (clear_tools(clear_at_least={"type": "tool_uses", "value": 3}), "clear_at_least.type"),
        (clear_tools(exclude_tools="memory"), "list of tool names"),
        (clear_tools(exclude_tools=[1]), "list of tool names"),
        (clear_tools(clear_tool_inputs="yes"), "boolean or a list"),
        (clear_tools(placeholder="gone"), "unknown field 'placeholder'"),
        ({"edits": [{"type": "clear_thinking_20251015", "keep": 2}]}, "keep must be an object"),
        ({"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": -1}}]}, "negative"),
        ({"edits": [{"type": "clear_tool_uses_20250919"}, {"type": "clear_thinking_20251015"}]}, "must come before"),
        ({"edits": [{"type": "clear_thinking_20251015"}, {"type": "clear_thinking_20251015"}]}, "more than once"),
    ],
)
def test_invalid_configs_are_invalid_requests(config: Any, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        apply_context_edits(tool_turns(["read"]), config, tokens)
    assert caught.value.param == "context_management"
    assert words in caught.value.message
    assert "\n" not in caught.value.message
