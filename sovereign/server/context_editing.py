"""Anthropic's context editing (`context_management`, beta `context-management-2025-06-27`) as a pure function.

An agent such as Claude Code re-sends its whole history on every request, and that history is mostly tool
results (file dumps, command output) and spent thinking. Anthropic's models have 200k-token windows and can
afford to carry that; a local model often has 8k–32k, so clearing stale tool results and old thinking before
the prompt is rendered is what lets a long agentic session keep running at all. The edits follow Anthropic's
documented semantics and the official SDK's shapes (`BetaContextManagementConfigParam` for the request,
`BetaContextManagementResponse.applied_edits` for the response): `clear_thinking_20251015` drops the
thinking blocks of all but the last `keep` assistant turns; `clear_tool_uses_20250919`, once the prompt is
over its trigger, replaces the results of all but the `keep` most recent tool uses with a placeholder. Edits
run in the order given, each on the output of the one before, and `clear_thinking_20251015` must come first
when both are present, as Anthropic requires. The caller keeps its full history; only the prompt is edited.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from sovereign.errors import InvalidRequest

CLEAR_TOOL_USES = "clear_tool_uses_20250919"
CLEAR_THINKING = "clear_thinking_20251015"
COMPACT = "compact_20260112"

# Anthropic does not document its placeholder's wording; this one tells the model what happened.
CLEARED_TOOL_RESULT = "[tool result cleared to save context]"


class _TypedValue(TypedDict):
    """Anthropic's `{"type": T, "value": N}` shape, as in a trigger."""

    type: str
    value: int


DEFAULT_TRIGGER: _TypedValue = {"type": "input_tokens", "value": 100_000}
DEFAULT_KEEP_TOOL_USES = 3
DEFAULT_KEEP_THINKING_TURNS = 1

_THINKING_TYPES = ("thinking", "redacted_thinking")
_PARAM = "context_management"


@dataclass(frozen=True)
class AppliedEdit:
    """One entry of the response's `context_management.applied_edits`."""

    type: str
    cleared_input_tokens: int
    cleared_tool_uses: int | None = None
    cleared_thinking_turns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The entry as Anthropic's JSON: type, cleared_input_tokens, and the count that fits the type."""
        out: dict[str, Any] = {"type": self.type, "cleared_input_tokens": self.cleared_input_tokens}
        if self.type == CLEAR_TOOL_USES:
            out["cleared_tool_uses"] = self.cleared_tool_uses or 0
        else:
            out["cleared_thinking_turns"] = self.cleared_thinking_turns or 0
        return out


@dataclass(frozen=True)
class ClearToolUses:
    """A validated `clear_tool_uses_20250919` edit with its defaults filled in."""

    trigger_type: str = "input_tokens"
    trigger_value: int = 100_000
    keep: int = DEFAULT_KEEP_TOOL_USES
    clear_at_least: int = 0
    exclude_tools: frozenset[str] = frozenset()
    clear_tool_inputs: bool | frozenset[str] = False

    def clears_input_of(self, name: str | None) -> bool:
        """Whether this edit also blanks the input of a cleared use of tool `name`."""
        if isinstance(self.clear_tool_inputs, bool):
            return self.clear_tool_inputs
        return name in self.clear_tool_inputs


@dataclass(frozen=True)
class ClearThinking:
    """A validated `clear_thinking_20251015` edit; `keep` is None for "all"."""

    keep: int | None = DEFAULT_KEEP_THINKING_TURNS


Edit = ClearToolUses | ClearThinking


# ---------------------------------------------------------------- validation


def _bad(message: str) -> InvalidRequest:
    """An InvalidRequest on the context_management parameter."""
    return InvalidRequest(message, param=_PARAM)


def _count(value: Any, where: str) -> int:
    """A non-negative integer (never a bool), or an error naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{where} must be an integer, got {type(value).__name__}")
    if value < 0:
        raise _bad(f"{where} must not be negative, got {value}")
    return value


def _typed_value(obj: Any, where: str, types: tuple[str, ...]) -> tuple[str, int]:
    """A `{"type": T, "value": N}` object with T among `types`: (T, N)."""
    if not isinstance(obj, dict):
        raise _bad(f'{where} must be an object like {{"type": "{types[0]}", "value": N}}')
    extra = set(obj) - {"type", "value"}
    if extra:
        raise _bad(f"{where} has unknown field {sorted(extra)[0]!r}")
    if obj.get("type") not in types:
        raise _bad(f"{where}.type must be {' or '.join(repr(t) for t in types)}, got {obj.get('type')!r}")
    if "value" not in obj:
        raise _bad(f"{where}.value is required")
    return obj["type"], _count(obj["value"], f"{where}.value")


def _names(value: Any, where: str) -> frozenset[str]:
    """A list of tool names."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"{where} must be a list of tool names")
    return frozenset(value)


def _parse_clear_tool_uses(edit: dict[str, Any], where: str) -> ClearToolUses:
    """A clear_tool_uses_20250919 edit, checked, with Anthropic's defaults."""
    allowed = {"type", "trigger", "keep", "clear_at_least", "exclude_tools", "clear_tool_inputs"}
    extra = set(edit) - allowed
    if extra:
        raise _bad(f"{where} has unknown field {sorted(extra)[0]!r}")
    trigger_type, trigger_value = DEFAULT_TRIGGER["type"], DEFAULT_TRIGGER["value"]
    if edit.get("trigger") is not None:
        trigger_type, trigger_value = _typed_value(edit["trigger"], f"{where}.trigger", ("input_tokens", "tool_uses"))
    keep = DEFAULT_KEEP_TOOL_USES
    if edit.get("keep") is not None:
        keep = _typed_value(edit["keep"], f"{where}.keep", ("tool_uses",))[1]
    clear_at_least = 0
    if edit.get("clear_at_least") is not None:
        clear_at_least = _typed_value(edit["clear_at_least"], f"{where}.clear_at_least", ("input_tokens",))[1]
    exclude: frozenset[str] = frozenset()
    if edit.get("exclude_tools") is not None:
        exclude = _names(edit["exclude_tools"], f"{where}.exclude_tools")
    inputs: bool | frozenset[str] = False
    raw_inputs = edit.get("clear_tool_inputs")
    if isinstance(raw_inputs, bool):
        inputs = raw_inputs
    elif raw_inputs is not None:
        if not isinstance(raw_inputs, list):
            raise _bad(f"{where}.clear_tool_inputs must be a boolean or a list of tool names")
        inputs = _names(raw_inputs, f"{where}.clear_tool_inputs")
    return ClearToolUses(trigger_type, trigger_value, keep, clear_at_least, exclude, inputs)


def _parse_clear_thinking(edit: dict[str, Any], where: str) -> ClearThinking:
    """A clear_thinking_20251015 edit: keep is {"type": "thinking_turns", "value": N}, "all" or {"type": "all"}."""
    extra = set(edit) - {"type", "keep"}
    if extra:
        raise _bad(f"{where} has unknown field {sorted(extra)[0]!r}")
    keep = edit.get("keep")
    if keep is None:
        return ClearThinking()
    if keep == "all" or keep == {"type": "all"}:
        return ClearThinking(keep=None)
    return ClearThinking(keep=_typed_value(keep, f"{where}.keep", ("thinking_turns",))[1])


def parse_context_management(config: Any) -> list[Edit]:
    """Check a request's `context_management` and return its edits in order; raises InvalidRequest."""
    if config is None:
        return []
    if not isinstance(config, dict):
        raise _bad("context_management must be an object with an 'edits' list")
    extra = set(config) - {"edits"}
    if extra:
        raise _bad(f"context_management has unknown field {sorted(extra)[0]!r}")
    raw = config.get("edits")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad("context_management.edits must be a list")
    edits: list[Edit] = []
    seen: set[str] = set()
    for i, edit in enumerate(raw):
        where = f"context_management.edits[{i}]"
        if not isinstance(edit, dict):
            raise _bad(f"{where} must be an object with a 'type'")
        kind = edit.get("type")
        if kind in seen:
            raise _bad(f"{where}: {kind} appears more than once")
        if kind == CLEAR_TOOL_USES:
            edits.append(_parse_clear_tool_uses(edit, where))
        elif kind == CLEAR_THINKING:
            if CLEAR_TOOL_USES in seen:
                raise _bad(f"{where}: {CLEAR_THINKING} must come before {CLEAR_TOOL_USES} in edits")
            edits.append(_parse_clear_thinking(edit, where))
        elif kind == COMPACT:
            raise _bad(f"{where}: {COMPACT} is not supported by this server")
        else:
            raise _bad(f"{where}.type must be {CLEAR_TOOL_USES!r} or {CLEAR_THINKING!r}, got {kind!r}")
        seen.add(kind)
    return edits


# ---------------------------------------------------------------- the edits


def _blocks(message: dict[str, Any]) -> list[Any]:
    """A message's content as a list of blocks (a string content has none worth editing)."""
    content = message.get("content")
    return content if isinstance(content, list) else []


def _is_block(block: Any, *types: str) -> bool:
    """Whether `block` is a dict block of one of `types`."""
    return isinstance(block, dict) and block.get("type") in types


def _tool_uses(messages: list[dict[str, Any]]) -> list[tuple[int, int, dict[str, Any]]]:
    """Every assistant tool_use block in order, as (message index, block index, block)."""
    found = []
    for m, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        for b, block in enumerate(_blocks(message)):
            if _is_block(block, "tool_use"):
                found.append((m, b, block))
    return found


def _tool_results(messages: list[dict[str, Any]]) -> dict[str, list[tuple[int, int]]]:
    """Where each tool_use id's results are: id → [(message index, block index)]."""
    found: dict[str, list[tuple[int, int]]] = {}
    for m, message in enumerate(messages):
        if message.get("role") != "user":
            continue
        for b, block in enumerate(_blocks(message)):
            if _is_block(block, "tool_result"):
                found.setdefault(str(block.get("tool_use_id")), []).append((m, b))
    return found


def _is_cleared(block: dict[str, Any]) -> bool:
    """Whether a tool_result already holds only the placeholder."""
    content = block.get("content")
    if content == CLEARED_TOOL_RESULT:
        return True
    return isinstance(content, list) and content == [{"type": "text", "text": CLEARED_TOOL_RESULT}]


class _Editor:
    """Copy-on-write edits of a message list: only the messages touched are copied."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = list(messages)
        self._copied: set[int] = set()

    def _own(self, m: int) -> dict[str, Any]:
        """Message `m`, copied (with its content list) on first write."""
        if m not in self._copied:
            message = dict(self.messages[m])
            message["content"] = list(_blocks(message))
            self.messages[m] = message
            self._copied.add(m)
        return self.messages[m]

    def replace_block(self, m: int, b: int, **fields: Any) -> None:
        """Set `fields` on block b of message m, in a copy of that block."""
        message = self._own(m)
        block = copy.copy(message["content"][b])
        block.update(fields)
        message["content"][b] = block

    def drop_blocks(self, m: int, types: tuple[str, ...]) -> None:
        """Remove every block of `types` from message m."""
        message = self._own(m)
        message["content"] = [block for block in message["content"] if not _is_block(block, *types)]


def _clear_tool_uses(
    messages: list[dict[str, Any]], edit: ClearToolUses, count_tokens: Callable[[list[dict[str, Any]]], int]
) -> tuple[list[dict[str, Any]], AppliedEdit | None]:
    """Apply one clear_tool_uses edit; None when it did not trigger or could not clear enough."""
    uses = _tool_uses(messages)
    before: int | None = None
    if edit.trigger_type == "tool_uses":
        if len(uses) <= edit.trigger_value:
            return messages, None
    else:
        before = count_tokens(messages)
        if before <= edit.trigger_value:
            return messages, None
    results = _tool_results(messages)
    clearable = [use for use in uses if use[2].get("name") not in edit.exclude_tools]
    older = clearable[: max(len(clearable) - edit.keep, 0)]
    editor = _Editor(messages)
    cleared = 0
    for m, b, use in older:
        touched = False
        for rm, rb in results.get(str(use.get("id")), []):
            if not _is_cleared(messages[rm]["content"][rb]):
                editor.replace_block(rm, rb, content=CLEARED_TOOL_RESULT)
                touched = True
        if edit.clears_input_of(use.get("name")) and use.get("input"):
            editor.replace_block(m, b, input={})
            touched = True
        cleared += touched
    if not cleared:
        return messages, None
    if before is None:
        before = count_tokens(messages)
    saved = max(before - count_tokens(editor.messages), 0)
    if saved < edit.clear_at_least:
        return messages, None
    return editor.messages, AppliedEdit(CLEAR_TOOL_USES, saved, cleared_tool_uses=cleared)


def _assistant_turns(messages: list[dict[str, Any]]) -> list[list[int]]:
    """Assistant message indices grouped into turns; a turn ends at a user message that is not only tool results."""
    turns: list[list[int]] = []
    current: list[int] = []
    for m, message in enumerate(messages):
        if message.get("role") == "assistant":
            current.append(m)
            continue
        blocks = _blocks(message)
        only_results = bool(blocks) and all(_is_block(block, "tool_result") for block in blocks)
        if not only_results and current:
            turns.append(current)
            current = []
    if current:
        turns.append(current)
    return turns


def _clear_thinking(
    messages: list[dict[str, Any]], edit: ClearThinking, count_tokens: Callable[[list[dict[str, Any]]], int]
) -> tuple[list[dict[str, Any]], AppliedEdit | None]:
    """Apply one clear_thinking edit; None when every thinking turn is kept."""
    if edit.keep is None:
        return messages, None
    thinking_turns = [
        turn
        for turn in _assistant_turns(messages)
        if any(_is_block(block, *_THINKING_TYPES) for m in turn for block in _blocks(messages[m]))
    ]
    older = thinking_turns[: max(len(thinking_turns) - edit.keep, 0)]
    if not older:
        return messages, None
    editor = _Editor(messages)
    for turn in older:
        for m in turn:
            if any(_is_block(block, *_THINKING_TYPES) for block in _blocks(messages[m])):
                editor.drop_blocks(m, _THINKING_TYPES)
    saved = max(count_tokens(messages) - count_tokens(editor.messages), 0)
    return editor.messages, AppliedEdit(CLEAR_THINKING, saved, cleared_thinking_turns=len(older))


def apply_context_edits(
    messages: list[dict[str, Any]],
    config: dict[str, Any] | None,
    count_tokens: Callable[[list[dict[str, Any]]], int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Apply `context_management` to `messages`: (edited messages, the response's `applied_edits`); never mutates."""
    edits = parse_context_management(config)
    applied: list[dict[str, Any]] = []
    for edit in edits:
        if isinstance(edit, ClearThinking):
            messages, result = _clear_thinking(messages, edit, count_tokens)
        else:
            messages, result = _clear_tool_uses(messages, edit, count_tokens)
        if result is not None:
            applied.append(result.to_dict())
    return messages, applied
