"""Chat templates: Jinja rendered in a sandbox, with user text kept apart from template text.

A template's own text may contain control tokens (`<start_of_turn>`), which must become
control tokens. Message contents must not: a user who types `<end_of_turn>` would forge a
turn. So each content is swapped for a sentinel before rendering, the rendered prompt is
split at the sentinels, and the pieces are tokenized with and without special-token parsing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sovereign.errors import InvalidRequest

# Private-use code points: they do not occur in real text, and no template transforms them.
_SENTINEL = re.compile("\ue000(\\d+)\ue001")

# For a model with neither its own template nor a catalog one: a plain transcript.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOPS = ("\nUser:",)


@dataclass(frozen=True)
class Segment:
    """A run of prompt text; `trusted` text is the template's own and may hold control tokens."""

    text: str
    trusted: bool


class _TemplateRaised(Exception):
    """raise_exception() called by a template (it rejects the conversation's shape)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    # Hugging Face's tojson: no HTML escaping, non-ASCII kept.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template and the special-token texts it expects."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", origin: str = "gguf") -> None:
        self.source = source
        self.origin = origin  # gguf | catalog | fallback
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.supports_tools = "tools" in source
        try:
            self._template = _environment().from_string(source)
        except TemplateError as exc:
            raise InvalidRequest(f"the model's chat template does not compile: {exc}", "model") from None

    def render(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True) -> list[Segment]:
        """The prompt for these messages, split into trusted template text and untrusted contents."""
        contents: list[str] = []

        def hide(text: str) -> str:
            contents.append(text)
            return f"\ue000{len(contents) - 1}\ue001"

        hidden = [{**message, "content": hide(message["content"])} if isinstance(message.get("content"), str) else message for message in messages]
        try:
            rendered = self._template.render(
                messages=hidden,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except _TemplateRaised as exc:
            raise InvalidRequest(f"the model's chat template rejected the conversation: {exc}", "messages") from None
        except (TemplateError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise InvalidRequest(f"the model's chat template could not render these messages: {exc}", "messages") from None
        segments: list[Segment] = []
        cursor = 0
        for match in _SENTINEL.finditer(rendered):
            if match.start() > cursor:
                segments.append(Segment(rendered[cursor : match.start()], trusted=True))
            segments.append(Segment(contents[int(match.group(1))], trusted=False))
            cursor = match.end()
        if cursor < len(rendered):
            segments.append(Segment(rendered[cursor:], trusted=True))
        return [s for s in segments if s.text]
