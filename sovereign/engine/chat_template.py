"""Chat templates: Jinja rendered in a sandbox, with user text kept apart from template text.

A template's own text may contain control tokens (`<start_of_turn>`), which must become
control tokens. Message contents must not: a user who types `<end_of_turn>` would forge a
turn. So each content is swapped for a sentinel before rendering, the rendered prompt is
split at the sentinels, and the pieces are tokenized with and without special-token parsing.

A template comes with the model file or the catalog, not from the client, but a broken or hostile
one must cost its request a 4xx, not the server a thread or its memory: rendering runs under a
budget of time, loop items, value sizes and output (and Python's own recursion limit).
"""

from __future__ import annotations

import json
import math
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from sovereign.errors import BadChatTemplate, InvalidRequest

# Private-use code points: they do not occur in real text, and no template transforms them.
_SENTINEL = re.compile("\ue000(\\d+)\ue001")

# For a model with neither its own template nor a catalog one: a plain transcript.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOPS = ("\nUser:",)

# The rendering budget. Real templates loop over the messages and build a few kilobytes.
MAX_RANGE = 10_000  # items in one range()
MAX_RANGE_ITEMS = 1_000_000  # items of all range() calls in one render
MAX_VALUE = 16 * 2**20  # characters (or items) of one string or list built by +, * or %
MAX_INT_BITS = 4_096  # an integer built by * or **
MAX_OUTPUT = 16 * 2**20  # characters rendered (message contents are sentinels here, so this is template text)
MAX_RENDER_SECONDS = 5.0
_FORMAT_WIDTH = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")


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


@dataclass
class _RenderBudget:
    """What one render may still spend."""

    deadline: float = field(default_factory=lambda: time.monotonic() + MAX_RENDER_SECONDS)
    range_items: int = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise SecurityError(f"rendering took longer than {MAX_RENDER_SECONDS:g} s")


# The budget of the render running in this thread (renders run on several threads at once).
_budget: ContextVar[_RenderBudget | None] = ContextVar("chat_template_budget", default=None)


def _check_time() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.check_time()


def _range(*args: int) -> range:
    """range() with a cap per call and per render (the sandbox's own cap is 100,000 per call, and raises OverflowError)."""
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise SecurityError(f"range() of {len(numbers)} items; templates may use at most {MAX_RANGE}")
    budget = _budget.get()
    if budget is not None:
        budget.range_items += len(numbers)
        if budget.range_items > MAX_RANGE_ITEMS:
            raise SecurityError(f"the template's loops ran past {MAX_RANGE_ITEMS} items")
        budget.check_time()
    return numbers


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would be huge, before computing it."""
    sized = (str, list, tuple)
    if operator == "*":
        if isinstance(left, int) and isinstance(right, sized):
            left, right = right, left
        if isinstance(left, sized) and isinstance(right, int) and len(left) * right > MAX_VALUE:
            raise SecurityError(f"a value of {len(left) * right} items; templates may build at most {MAX_VALUE}")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise SecurityError("an integer too large for a template")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        if right * math.log2(abs(left)) > MAX_INT_BITS:
            raise SecurityError("an integer too large for a template")
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized) and len(left) + len(right) > MAX_VALUE:
        raise SecurityError(f"a value of {len(left) + len(right)} items; templates may build at most {MAX_VALUE}")
    elif operator == "%" and isinstance(left, str):
        for match in _FORMAT_WIDTH.finditer(left):
            if any(part == "*" or (part and int(part) > MAX_VALUE) for part in match.groups()):
                raise SecurityError("a format width too large for a template")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every call and the size-making operators checked against the budget."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        _check_time()  # recursion and long loops make calls: the clock is read here
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _range
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
        except (TemplateError, RecursionError, MemoryError, ValueError) as exc:
            where = "its chat_template in models.toml" if origin == "catalog" else "a chat_template for it in models.toml"
            raise BadChatTemplate(f"the model's {origin} chat template does not compile: {exc}", f"fix {where}") from None

    def render(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True) -> list[Segment]:
        """The prompt for these messages, split into trusted template text and untrusted contents."""
        contents: list[str] = []

        def hide(text: str) -> str:
            contents.append(text)
            return f"\ue000{len(contents) - 1}\ue001"

        hidden = [{**message, "content": hide(message["content"])} if isinstance(message.get("content"), str) else message for message in messages]
        variables = {"messages": hidden, "tools": tools or None, "add_generation_prompt": add_generation_prompt, "bos_token": self.bos_token, "eos_token": self.eos_token}
        try:
            rendered = self._render(variables)
        except _TemplateRaised as exc:
            raise InvalidRequest(f"the model's chat template rejected the conversation: {exc}", "messages") from None
        except RecursionError:
            raise InvalidRequest("the model's chat template recursed too deeply on these messages", "messages") from None
        except Exception as exc:  # a template is code: whatever it raises is its failure to render, not the server's
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

    def _render(self, variables: dict[str, Any]) -> str:
        """Render within the budget: output is read as it is made, so a runaway template stops early."""
        token = _budget.set(budget := _RenderBudget())
        try:
            parts: list[str] = []
            size = 0
            for part in self._template.generate(**variables):
                size += len(part)
                if size > MAX_OUTPUT:
                    raise SecurityError(f"the template rendered more than {MAX_OUTPUT} characters")
                budget.check_time()
                parts.append(part)
            return "".join(parts)
        finally:
            _budget.reset(token)
