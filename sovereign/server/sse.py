"""Server-sent event frames, as each API spells them."""

from __future__ import annotations

import json
from typing import Any


def _json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def data_event(payload: dict[str, Any] | str) -> bytes:
    """A `data:` frame alone, as OpenAI's chat and completion streams send them ("[DONE]" stays as it is)."""
    return f"data: {payload if isinstance(payload, str) else _json(payload)}\n\n".encode()


def named_event(event: dict[str, Any]) -> bytes:
    """A frame whose `event:` line repeats the payload's type, as Anthropic's and the Responses streams send them.

    The Anthropic SDK skips frames without an `event:` line.
    """
    return f"event: {event['type']}\ndata: {_json(event)}\n\n".encode()
