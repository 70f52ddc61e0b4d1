"""Chat templates: Jinja rendered in a sandbox exactly as Hugging Face renders them, with user text kept apart.

A template's own text may contain control tokens (`<start_of_turn>`), which must become control
tokens. Text that came from the client (message contents, reasoning, tool calls and results,
tools, template kwargs) must not: a user who types `<end_of_turn>` would forge a turn. The
template renders the real contents, so a template that inspects or transforms them (Qwen 3's
`content.startswith('<tool_response>')`, DeepSeek-R1's split on `</think>`) renders exactly as
its makers' reference renderer does. Only the control tokens inside client strings are wrapped
in private-use markers before rendering (Hugging Face's own `mark_control_tokens` scheme): after
rendering, a marked token becomes an untrusted segment, tokenized as plain text, and the markers
are dropped. A template that cuts a marked token apart leaves lone markers, which are dropped too
but still break the text, so the pieces on either side cannot join into a control token.

A template comes with the model file or the catalog, not from the client, but a broken or hostile
one must cost its request a 4xx, not the server a thread or its memory: rendering runs under a
budget of time, loop items, value sizes and output (and Python's own recursion limit).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, meta, nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.runtime import Context, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace

from sovereign.errors import BadChatTemplate, InvalidRequest

# Private-use code points around a control token typed by the client (they are stripped from client
# text first, so they cannot be forged). A marked token is untrusted; a lone marker is dropped.
_START, _END = "\ue000", "\ue001"
_MARKED = re.compile(f"{_START}([^{_START}{_END}]*){_END}|[{_START}{_END}]")

# Without the vocabulary's list of control tokens, these are taken for control tokens: the
# `<|…|>` and `<｜…｜>` shapes anywhere, and token-shaped literals of the template's own text.
_ALWAYS_CONTROL = r"<\|[^|<>\s]{1,64}\|>|<｜[^<>｜]{1,64}｜>"
_TOKEN_SHAPED = re.compile(
    r"<\|[^|<>\s]{1,64}\|>|<｜[^<>｜]{1,64}｜>|</?[A-Za-z_][\w:.▁-]{0,48}>|\[/?[A-Z][A-Z_]{1,30}\]"
)
# Tags that templates write as plain text (llama.cpp's GGUFs keep them as user-defined tokens, which
# it parses even in plain text, so marking them buys nothing), and which templates split and strip on.
_PLAIN_TAGS = re.compile(
    r"</?(think|thinking|tool_call|tool_calls|tool_response|tool_responses|tools|arg_key|arg_value|function|parameter|answer|reasoning|response|seed:think|seed:tool_call|minimax:tool_call|invoke|result|output|code)>"
)
# The variables render() sets itself (client kwargs may not replace them).
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
# The names a message's reasoning goes by; Hugging Face fills them from one another before rendering.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

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
MAX_OUTPUT = 16 * 2**20  # characters rendered, message contents included
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


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Hugging Face's tojson: no HTML escaping, non-ASCII kept, its options exposed.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateDict:
    """Hugging Face's `dict` global: callable and `fromkeys`, no attribute tricks."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """Hugging Face's `namespace`: no underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"templates cannot store underscore-prefixed attributes on a namespace: {name!r}")


class _Generation(Extension):
    """Hugging Face's `{% generation %}` block (it marks assistant text for training); renders its body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Macro) -> str:
        return str(caller())


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
    """range() with a cap per call and per render.

    The sandbox's own cap is 100,000 per call, and raises OverflowError.
    """
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
    elif (
        operator == "+" and isinstance(left, sized) and isinstance(right, sized) and len(left) + len(right) > MAX_VALUE
    ):
        raise SecurityError(f"a value of {len(left) + len(right)} items; templates may build at most {MAX_VALUE}")
    elif operator == "%" and isinstance(left, str):
        for match in _FORMAT_WIDTH.finditer(left):
            if any(part == "*" or (part and int(part) > MAX_VALUE) for part in match.groups()):
                raise SecurityError("a format width too large for a template")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every call and the size-making operators checked against the budget."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_time()  # recursion and long loops make calls: the clock is read here
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)


def _environment() -> ImmutableSandboxedEnvironment:
    # Hugging Face's environment (transformers.utils.chat_template_utils), plus the budget.
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.globals["range"] = _range
    return env


def _template_literals(env: ImmutableSandboxedEnvironment, source: str) -> list[str]:
    """The template's literal text and string constants (where its own control tokens are written)."""
    tree = env.parse(source)
    literals = [node.data for node in tree.find_all(nodes.TemplateData)]
    return literals + [node.value for node in tree.find_all(nodes.Const) if isinstance(node.value, str)]


def _control_pattern(tokens: Iterable[str], *, guessed: bool) -> re.Pattern[str]:
    """A regex for the control tokens, the longest match first (so a token wins over the tokens inside it).

    Written as a trie: Gemma 3 has 6,250 control tokens, and a flat alternation tries each of them at
    every position of a client's text.
    """
    alternatives = [_trie_regex(set(tokens) - {""})]
    if guessed:
        alternatives.append(_ALWAYS_CONTROL)
    return re.compile("|".join(a for a in alternatives if a) or "(?!)")


def _trie_regex(words: set[str]) -> str:
    """A regex matching exactly these strings, the longest where several match, as nested groups.

    Built without recursion.
    """
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # the end of a word
    # Post-order over the trie: each node's regex is built from its children's.
    built: dict[int, str] = {}
    pending: list[tuple[dict[str, Any], bool]] = [(root, False)]
    while pending:
        node, children_done = pending.pop()
        if not children_done:
            pending.append((node, True))
            pending.extend((child, False) for char, child in node.items() if char)
            continue
        branches = [re.escape(char) + built[id(child)] for char, child in sorted(node.items()) if char]
        ends_here = "" in node
        if not branches:
            built[id(node)] = ""
        elif len(branches) == 1 and not ends_here:
            built[id(node)] = branches[0]
        else:
            built[id(node)] = "(?:" + "|".join(branches) + ")" + ("?" if ends_here else "")
    return built[id(root)]


def _mark(value: Any, control: re.Pattern[str]) -> Any:
    """Client data with each control token inside its strings wrapped in markers (dict keys left alone)."""
    if isinstance(value, str):
        value = value.replace(_START, "").replace(_END, "")
        return control.sub(lambda m: f"{_START}{m.group(0)}{_END}", value)
    if isinstance(value, dict):
        return {key: _mark(item, control) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(item, control) for item in value]
    return value


def _alias_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hugging Face's reasoning aliases: `reasoning_content` and `thinking` filled from whichever is set."""
    aliased = []
    for message in messages:
        reasoning = (
            next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
            if isinstance(message, dict)
            else None
        )
        aliased.append(
            {"thinking": reasoning, **message, "reasoning_content": reasoning} if reasoning is not None else message
        )
    return aliased


def check_kwargs(kwargs: dict[str, Any]) -> None:
    """Template kwargs come from the client: they may add variables, not replace the conversation."""
    reserved = sorted((_RESERVED | {"self"}) & kwargs.keys())
    if reserved:
        raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")


def _segments(rendered: str, control: re.Pattern[str]) -> list[Segment]:
    """The rendering split at the markers: marked tokens untrusted, the rest trusted, lone markers dropped.

    A lone marker means the template cut a marked token: a control token right after a lone start
    marker, or right before a lone end marker, is what is left of it, so it is untrusted too."""
    pieces: list[tuple[str, str]] = []  # (kind, text): text | token | start | end
    cursor = 0
    for match in _MARKED.finditer(rendered):
        pieces.append(("text", rendered[cursor : match.start()]))
        pieces.append(
            ("token", match.group(1))
            if match.group(1) is not None
            else ("start" if match.group(0) == _START else "end", "")
        )
        cursor = match.end()
    pieces.append(("text", rendered[cursor:]))
    segments: list[Segment] = []
    for index, (kind, text) in enumerate(pieces):
        if kind == "token":
            segments.append(Segment(text, trusted=False))
        elif kind == "text":
            head = control.match(text) if index > 0 and pieces[index - 1][0] == "start" else None
            if head:
                segments.append(Segment(head.group(0), trusted=False))
                text = text[head.end() :]
            tail = (
                next((m for m in control.finditer(text) if m.end() == len(text)), None)
                if index + 1 < len(pieces) and pieces[index + 1][0] == "end"
                else None
            )
            segments.append(Segment(text[: tail.start()] if tail else text, trusted=True))
            if tail:
                segments.append(Segment(tail.group(0), trusted=False))
    return [segment for segment in segments if segment.text]


class ChatTemplate:
    """A compiled chat template and the special-token texts it expects."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        origin: str = "gguf",
        control_tokens: Iterable[str] | None = None,
    ) -> None:
        """`control_tokens`: the vocabulary's control tokens; without them, token-shaped text is taken for one."""
        self.source = source
        self.origin = origin  # gguf | catalog | fallback
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = _environment()
        guessed = control_tokens is None
        try:
            self._template = env.from_string(source)
            # The template reads the `tools` variable (not merely says the word): then it renders tools itself.
            self.supports_tools = "tools" in meta.find_undeclared_variables(env.parse(source))
            if control_tokens is None:
                found = {m.group(0) for text in _template_literals(env, source) for m in _TOKEN_SHAPED.finditer(text)}
                control_tokens = {token for token in found if not _PLAIN_TAGS.fullmatch(token)}
        except (TemplateError, RecursionError, MemoryError, ValueError) as exc:
            where = (
                "its chat_template in models.toml" if origin == "catalog" else "a chat_template for it in models.toml"
            )
            raise BadChatTemplate(
                f"the model's {origin} chat template does not compile: {exc}", f"fix {where}"
            ) from None
        self._control = _control_pattern({*control_tokens, bos_token, eos_token}, guessed=guessed)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        documents: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[Segment]:
        """The prompt for these messages, split into trusted template text and untrusted client text.

        `kwargs` are extra template variables (a client's `chat_template_kwargs`, e.g. `enable_thinking`)."""
        check_kwargs(kwargs)
        mark = self._control
        try:
            variables = {
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                **_mark(kwargs, mark),
                "messages": _mark(_alias_reasoning(messages), mark),
                "tools": _mark(tools or None, mark),
                "documents": _mark(documents, mark),
                "add_generation_prompt": add_generation_prompt,
            }
            rendered = self._render(variables)
        except _TemplateRaised as exc:
            raise InvalidRequest(f"the model's chat template rejected the conversation: {exc}", "messages") from None
        except RecursionError:
            raise InvalidRequest(
                "the model's chat template recursed too deeply on these messages", "messages"
            ) from None
        except Exception as exc:  # noqa: BLE001 - a template is code: what it raises is its failure to render, not ours
            raise InvalidRequest(
                f"the model's chat template could not render these messages: {exc}", "messages"
            ) from None
        return _segments(rendered, mark)

    def render_text(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt as one text, as the model's makers render it (what /apply-template shows)."""
        check_kwargs(template_kwargs or {})
        return "".join(
            segment.text
            for segment in self.render(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
            )
        )

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
