"""Conversations as agents write them, reshaped into what every chat template accepts.

Agents send shapes the chat templates of open models refuse ("Conversation roles must
alternate"): Codex starts with two `developer` messages, Claude Code puts `system` reminders
between turns, and both send several user turns in a row. Anthropic's and OpenAI's services take
all of these, so sovereign does too:
- `developer` is the system role by another name;
- the leading system messages become one;
- a later system message is joined to the neighbouring user turn (the next one if it follows
  directly, else the one before; a user turn of its own when neither is a user turn), in front
  of that turn's own text: what a user typed comes last, so the context before it stays the same
  from one session to the next (Claude Code sends its environment note after the first message,
  and a prompt cache can reuse only what comes before the first difference);
- consecutive user turns (and consecutive assistant turns without tool calls) are joined.
Tool turns and assistant tool calls are kept as they are: templates place them themselves.
"""

from __future__ import annotations

import hashlib
from typing import Any

SYSTEM_ROLES = ("system", "developer")


def normalize(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with one leading system message at most, no later ones, and alternating plain turns."""
    leading: list[str] = []
    index = 0
    while index < len(messages) and messages[index].get("role") in SYSTEM_ROLES:
        leading.append(_text(messages[index]))
        index += 1
    rest = [dict(message) for message in messages[index:]]
    folded = _fold_late_system(rest)
    merged = _merge_turns(folded)
    system = [{"role": "system", "content": "\n\n".join(text for text in leading if text)}] if leading else []
    return system + merged


def _fold_late_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each system message after the first turn, joined to its neighbouring user turn (or made one), in order.

    Notes wait for the next user turn while tool results or more notes come first (a note must not
    come between a call and its result); before an assistant turn, or at the end, they join the
    user turn before them (in front of its text), or become one.
    """
    out: list[dict[str, Any]] = []
    pending: list[str] = []  # system notes waiting for the next user turn
    for position, message in enumerate(messages):
        role = message.get("role")
        if role not in SYSTEM_ROLES:
            if role == "user" and pending:
                message["content"] = _join(*pending, _text(message))
                pending = []
            out.append(message)
            continue
        pending.append(_text(message))
        following = messages[position + 1] if position + 1 < len(messages) else None
        if following is not None and following.get("role") in ("user", "tool", *SYSTEM_ROLES):
            continue  # joined to the user turn that comes, after any tool results
        if out and out[-1].get("role") == "user" and isinstance(out[-1].get("content"), str):
            out[-1]["content"] = _join(*pending, out[-1]["content"])
        else:
            out.append({"role": "user", "content": _join(*pending)})
        pending = []
    if pending:
        out.append({"role": "user", "content": _join(*pending)})
    return out


def _merge_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive user turns joined, and consecutive plain assistant turns (templates demand alternation)."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and _plain(previous)
            and _plain(message)
            and previous.get("role") == message.get("role")
            and message.get("role") in ("user", "assistant")
        ):
            previous["content"] = _join(previous["content"], message["content"])
            continue
        merged.append(message)
    return merged


def _plain(message: dict[str, Any]) -> bool:
    """A turn of text only: no tool calls, no reasoning, no name, content a string."""
    return isinstance(message.get("content"), str) and not (set(message) - {"role", "content"})


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _join(*texts: str) -> str:
    return "\n\n".join(text for text in texts if text)


# --- second tries, for templates that refuse what normalize() leaves ------------------------


def system_into_first_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leading system message joined to the first user turn (Gemma 2: "System role not supported")."""
    if (
        len(messages) < 2
        or messages[0].get("role") != "system"
        or messages[1].get("role") != "user"
        or not _plain(messages[1])
    ):
        return messages
    return [{"role": "user", "content": _join(_text(messages[0]), messages[1]["content"])}, *messages[2:]]


def user_after_tools_into_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A user turn right after tool results, joined to the last result.

    Mistral's templates want an assistant turn between.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        if (
            out
            and out[-1].get("role") == "tool"
            and message.get("role") == "user"
            and _plain(message)
            and isinstance(out[-1].get("content"), str)
        ):
            out[-1] = {**out[-1], "content": _join(out[-1]["content"], message["content"])}
            continue
        out.append(message)
    return out


def nine_character_call_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call ids as 9 alphanumerics, the same for a call and its result.

    Mistral's templates refuse OpenAI's and Anthropic's.
    """

    def short(call_id: Any) -> Any:
        return hashlib.sha256(call_id.encode()).hexdigest()[:9] if isinstance(call_id, str) else call_id

    out = []
    for message in messages:
        if message.get("tool_calls"):
            message = {
                **message,
                "tool_calls": [{**call, "id": short(call.get("id"))} for call in message["tool_calls"]],
            }
        if message.get("role") == "tool" and "tool_call_id" in message:
            message = {**message, "tool_call_id": short(message["tool_call_id"])}
        out.append(message)
    return out


# Tried in turn, each on top of the ones before, while the template still refuses.
RESHAPES = (system_into_first_user, user_after_tools_into_results, nine_character_call_ids)
