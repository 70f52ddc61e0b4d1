"""Grammars for tool calls written in each family's own syntax: forced (required or named) or lazy (auto).

A model is trained on its template's call syntax (`<tool_call>{…}</tool_call>` for Qwen,
`[TOOL_CALLS]name[ARGS]{…}` for Magistral, DeepSeek's `<｜tool▁call▁begin｜>…`), so that is what the
grammar makes it write: forcing bare JSON instead takes it off the distribution it learned.

- `tool_choice: required` or a named function: the grammar applies from the first token. A model
  that reasons may reason first (up to its end marker), then must call.
- `auto`: the grammar is lazy (llama-server's term). The model writes freely until it opens a call
  in its family's syntax (GrammarTrigger); from there the call must name an offered tool and carry
  arguments its schema allows.

Argument grammars come from json_grammar's converter, within its budget; in auto mode tools
beyond the budget leave the output unconstrained rather than failing the request.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sovereign.engine.formats import ChatFormat
from sovereign.engine.json_grammar import (
    _BoundedSchemaConverter,
    _gbnf_literal,
    check_budget,
)
from sovereign.engine.requests import GrammarTrigger, ToolChoice
from sovereign.engine.tools import functions_of
from sovereign.errors import InvalidRequest

log = logging.getLogger(__name__)

WS = "call-ws"  # bounded whitespace between a call's parts: an unbounded run lets a model loop on newlines
MAX_CALLS = 32  # calls in one turn, so that a parallel block cannot go on forever


@dataclass(frozen=True)
class CallGrammar:
    """GBNF for the calls, and when it applies: None from the first token, else once the trigger matches."""

    gbnf: str
    trigger: GrammarTrigger | None


@dataclass(frozen=True)
class _Tool:
    name: str
    args: str  # the rule for its arguments object
    params: list[tuple[str, str, bool]]  # (key, value rule, required) in schema order, for the XML families


class _Rules:
    """One grammar's rules: the converter's (arguments) and ours (the family's frame), in one namespace."""

    def __init__(self) -> None:
        self.converter = _BoundedSchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self.converter._add_rule(WS, "[ \\t\\n]{0,20}")
        self._excluded: dict[str, str] = {}

    def add(self, name: str, body: str) -> str:
        """A named rule (the name made unique if taken)."""
        return self.converter._add_rule(name, body)

    def schema(self, schema: Any, name: str) -> str:
        """The rule for JSON values a schema allows."""
        resolved = self.converter.resolve_refs(json.loads(json.dumps(schema)), name)
        return self.converter.visit(resolved, name)

    def excluding(self, marker: str) -> str:
        """A rule for any text that does not contain `marker` (a string automaton, one rule per matched prefix)."""
        if marker in self._excluded:
            return self._excluded[marker]
        base = f"call-text-without-{len(self._excluded)}"  # a prefix no schema's $defs name takes
        names = [f"{base}-{k}" for k in range(len(marker))]
        alphabet = sorted(set(marker))
        others = "[^" + "".join(f"\\u{ord(c):04X}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08X}" for c in alphabet) + "]"
        for k, name in enumerate(names):
            alternatives = [f"{others} {names[0]}"]
            for c in alphabet:
                j = _next_state(marker, k, c)
                if j < len(marker):  # reaching len(marker) would complete the marker: no such path
                    alternatives.append(f"{_gbnf_literal(c)} {names[j]}")
            self.converter._rules[name] = "| " + " | ".join(
                alternatives
            )  # the empty first: every state may end the text
        self._excluded[marker] = names[0]
        return names[0]

    def grammar(self, root: str) -> str:
        self.converter._rules["root"] = root
        return self.converter.format_grammar()


def _next_state(marker: str, matched: int, c: str) -> int:
    """How much of `marker` is matched after `c` follows its first `matched` characters (KMP's automaton)."""
    text = marker[:matched] + c
    for length in range(min(len(text), len(marker)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def _lit(text: str) -> str:
    return _gbnf_literal(text)


def _seq(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _many(item: str, sep: str, parallel: bool) -> str:
    """One item, or up to MAX_CALLS separated by `sep`."""
    return item if not parallel else f"{item} ({_seq(sep, item)}){{0,{MAX_CALLS - 1}}}"


def _object(r: _Rules, tool: _Tool, args_key: str = "arguments", *, extra: str = "") -> str:
    """`{"name": "NAME", "<args_key>": {…}}`, the JSON call most families write."""
    return _seq(
        '"{"',
        WS,
        _lit('"name"'),
        WS,
        '":"',
        WS,
        _lit(json.dumps(tool.name, ensure_ascii=False)),
        WS,
        '","',
        WS,
        _lit(json.dumps(args_key)),
        WS,
        '":"',
        WS,
        tool.args,
        extra,
        WS,
        '"}"',
    )


def _alternatives(r: _Rules, tools: list[_Tool], build: Callable[[_Tool], str], name: str) -> str:
    """A rule that is one call to any of the tools, written as `build` writes it."""
    return r.add(name, " | ".join(f"( {build(tool)} )" for tool in tools))


def _json_list(r: _Rules, item: str, parallel: bool) -> str:
    return _seq('"["', WS, _many(item, f'{WS} "," {WS}', parallel), WS, '"]"')


def _xml_value(r: _Rules, schema: Any, close: str, name: str) -> str:
    """A parameter's value in an XML format: raw text for strings, else JSON for its schema."""
    kinds = schema.get("type") if isinstance(schema, dict) else None
    kinds = set(kinds) if isinstance(kinds, list) else {kinds} if kinds else set()
    if not kinds or "string" in kinds:
        return r.excluding(close)
    return r.schema(schema, name)


def _xml_params(tool: _Tool, open_key: Callable[[str], str], value_close: str) -> str:
    """A call's parameters in schema order, the required ones required; free keys when the schema names none."""
    if not tool.params:
        return ""
    parts = []
    for key, value, required in tool.params:
        part = f'( {open_key(key)} {value} "\\n"? {_lit(value_close)} {WS} )'
        parts.append(part if required else part + "?")
    return " ".join(parts)


def _family_root(fmt: str, r: _Rules, tools: list[_Tool], parallel: bool, forced: bool) -> tuple[str, GrammarTrigger]:
    """The family's call block as GBNF, and what opens it (for the lazy grammar)."""
    sep = WS
    if fmt == "hermes":
        call = _alternatives(r, tools, lambda t: _seq('"<tool_call>"', WS, _object(r, t), WS, '"</tool_call>"'), "call")
        return _many(call, sep, parallel), GrammarTrigger(markers=("<tool_call>",))
    if fmt == "qwen3_coder":

        def coder(t: _Tool) -> str:
            params = _xml_params(t, lambda k: f'{_lit(f"<parameter={k}>")} "\\n"?', "</parameter>") or _free_xml(
                r, "<parameter=", ">", "</parameter>"
            )
            return _seq(
                '"<tool_call>"', WS, _lit(f"<function={t.name}>"), WS, params, '"</function>"', WS, '"</tool_call>"'
            )

        return _many(_alternatives(r, tools, coder, "call"), sep, parallel), GrammarTrigger(markers=("<tool_call>",))
    if fmt == "glm45":

        def glm(t: _Tool) -> str:
            params = _xml_params(
                t, lambda k: f'{_lit(f"<arg_key>{k}</arg_key>")} {WS} "<arg_value>"', "</arg_value>"
            ) or _free_xml(r, "<arg_key>", f'</arg_key>" {WS} "<arg_value>', "</arg_value>")
            return _seq('"<tool_call>"', _lit(t.name), WS, params, '"</tool_call>"')

        return _many(_alternatives(r, tools, glm, "call"), sep, parallel), GrammarTrigger(markers=("<tool_call>",))
    if fmt == "llama3":
        call = _alternatives(r, tools, lambda t: _object(r, t, "parameters"), "call")
        return call, GrammarTrigger(start_patterns=(r'\s*(\{\s*"name")',))
    if fmt == "mistral":
        call_id = r.add("call-id", '"[CALL_ID]" [a-zA-Z0-9]{1,40}')
        listed = _alternatives(
            r,
            tools,
            lambda t: _object(
                r, t, extra=f' ({WS} "," {WS} "\\"id\\"" {WS} ":" {WS} "\\"" [a-zA-Z0-9]{{1,40}} "\\"")?'
            ),
            "listed-call",
        )
        named = _alternatives(r, tools, lambda t: _seq(_lit(t.name), f"{call_id}?", '"[ARGS]"', t.args), "named-call")
        named_calls = _many(f'"[TOOL_CALLS]" {named}', WS, parallel)
        return f'( "[TOOL_CALLS]" {_json_list(r, listed, parallel)} | {named_calls} )', GrammarTrigger(
            markers=("[TOOL_CALLS]",)
        )
    if fmt in ("phi4_mini", "granite"):
        items = _json_list(r, _alternatives(r, tools, lambda t: _object(r, t), "call"), parallel)
        if fmt == "granite":
            return f'"<|tool_call|>" {WS} {items}', GrammarTrigger(markers=("<|tool_call|>",))
        return f'( "<|tool_call|>" {WS} {items} {WS} "<|/tool_call|>" | "functools" {items} )', GrammarTrigger(
            markers=("<|tool_call|>", "functools")
        )
    if fmt == "command_r7b":

        def action(t: _Tool) -> str:
            return _seq(
                '"{"',
                WS,
                '"\\"tool_call_id\\""',
                WS,
                '":"',
                WS,
                '"\\"" [0-9]{1,3} "\\""',
                WS,
                '","',
                WS,
                '"\\"tool_name\\""',
                WS,
                '":"',
                WS,
                _lit(json.dumps(t.name, ensure_ascii=False)),
                WS,
                '","',
                WS,
                '"\\"parameters\\""',
                WS,
                '":"',
                WS,
                t.args,
                WS,
                '"}"',
            )

        items = _json_list(r, _alternatives(r, tools, action, "call"), parallel)
        return f'"<|START_ACTION|>" {WS} {items} {WS} "<|END_ACTION|>"', GrammarTrigger(markers=("<|START_ACTION|>",))
    if fmt in ("deepseek_r1", "deepseek_v3_1"):
        if fmt == "deepseek_r1":

            def deepseek(t: _Tool) -> str:
                return _seq(
                    '"<｜tool▁call▁begin｜>function<｜tool▁sep｜>"',
                    _lit(t.name),
                    '"\\n```json\\n"',
                    t.args,
                    WS,
                    '"```"',
                    WS,
                    '"<｜tool▁call▁end｜>"',
                )
        else:

            def deepseek(t: _Tool) -> str:
                return _seq(
                    '"<｜tool▁call▁begin｜>"', _lit(t.name), '"<｜tool▁sep｜>"', t.args, WS, '"<｜tool▁call▁end｜>"'
                )

        calls = _many(_alternatives(r, tools, deepseek, "call"), sep, parallel)
        return f'"<｜tool▁calls▁begin｜>" {WS} {calls} {WS} "<｜tool▁calls▁end｜>"', GrammarTrigger(
            markers=("<｜tool▁calls▁begin｜>",)
        )
    if fmt == "kimi_k2":

        def kimi(t: _Tool) -> str:
            return _seq(
                '"<|tool_call_begin|>"',
                _lit(f"functions.{t.name}:"),
                "[0-9]{1,3}",
                WS,
                '"<|tool_call_argument_begin|>"',
                t.args,
                WS,
                '"<|tool_call_end|>"',
            )

        calls = _many(_alternatives(r, tools, kimi, "call"), sep, parallel)
        return f'"<|tool_calls_section_begin|>" {WS} {calls} {WS} "<|tool_calls_section_end|>"', GrammarTrigger(
            markers=("<|tool_calls_section_begin|>",)
        )
    if fmt == "gpt_oss":
        # `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{…}`,
        # ended by <|call|> (an end of generation).
        header = r.add("harmony-header", '" "? ("<|channel|>commentary" " "?)? ("<|constrain|>"? "json")? " "?')
        call = _alternatives(
            r, tools, lambda t: _seq(_lit(f"to=functions.{t.name}"), header, '"<|message|>"', t.args), "call"
        )
        return call, GrammarTrigger(markers=("to=functions.",))
    # Generic: what our own instructions ask for (all a forced call may be), and the shapes small models drift into.
    call = _alternatives(r, tools, lambda t: _object(r, t), "call")
    if forced:
        return call, GrammarTrigger()
    tagged = _many(_seq('"<tool_call>"', WS, call, WS, '"</tool_call>"'), sep, parallel)
    root = f'( {call} | {_json_list(r, call, parallel)} | {tagged} | "```" "json"? {WS} {call} {WS} "```" )'
    patterns = (r"\s*(<tool_call>)", r'\s*(\{\s*"name")', r'\s*(\[\s*\{\s*"name")', r'\s*(```(?:json)?\s*\{\s*"name")')
    return root, GrammarTrigger(start_patterns=patterns)


def _free_xml(r: _Rules, open_: str, mid: str, close: str) -> str:
    """Parameters of any name, for a tool whose schema lists none."""
    return f'( {_lit(open_)} [^>\\n<]{{1,64}} "{mid}" {r.excluding(close)} {_lit(close)} {WS} )*'


def _after_reasoning(fmt: ChatFormat, r: _Rules, calls: str, in_reasoning: bool) -> str:
    """The whole answer: the model's reasoning, if it reasons, then `calls` (the calls, or a call or a text answer)."""
    if fmt.name == "generic":
        return calls
    if fmt.name == "gpt_oss":
        analysis = _seq('"<|channel|>analysis<|message|>"', r.excluding("<|end|>"), '"<|end|><|start|>assistant"')
        return f'( {analysis} )? "<|channel|>commentary " {calls}'
    if fmt.reasoning is None:
        return f"{WS} {calls}"
    start, end = fmt.reasoning
    thought = _seq(r.excluding(end), _lit(end), WS)
    return f"{thought} {calls}" if in_reasoning else f"( {_lit(start)} {thought} )? {WS} {calls}"


def call_grammar(
    fmt: ChatFormat,
    tools: list[dict[str, Any]],
    choice: ToolChoice,
    *,
    parallel: bool,
    in_reasoning: bool,
    text_schema: dict[str, Any] | None = None,
) -> CallGrammar | None:
    """The grammar for this request's calls; None when auto mode cannot constrain them (schemas beyond the budget).

    `text_schema` (auto mode): a text answer must match it, as OpenAI applies a response format to the
    final text turn; the grammar then applies from the first token: calls, or JSON of that schema.
    A forced call leaves no text turn, so there it is ignored.
    """
    forced = choice.mode in ("required", "function")
    text_schema = None if forced else text_schema
    key = json.dumps(
        [fmt.name, fmt.reasoning, tools, choice.mode, choice.function, parallel, in_reasoning, text_schema],
        sort_keys=True,
        default=str,
    )
    try:
        return _cached(key, fmt, forced)
    except InvalidRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - the converter raises bare Exceptions and asserts on what it cannot handle
        detail = str(exc) or type(exc).__name__
        if forced:
            raise InvalidRequest(f"the tools' parameter schemas cannot be enforced: {detail}", "tools") from None
        log.info("tool calls left unconstrained: %s", detail)
        return None


@functools.lru_cache(maxsize=32)
def _cached(key: str, fmt: ChatFormat, forced: bool) -> CallGrammar:
    """call_grammar's work, remembered: an agent sends the same tools with every turn."""
    _, _, tools, mode, function, parallel, in_reasoning, text_schema = json.loads(key)
    functions = functions_of(tools)
    if mode == "function":
        functions = [f for f in functions if f["name"] == function]
        if not functions:
            raise InvalidRequest(
                f"tool_choice names function {function!r}, which is not among the tools", "tool_choice"
            )
    check_budget([f.get("parameters") or {} for f in functions] + ([text_schema] if text_schema is not None else []))
    r = _Rules()
    value_close = "</arg_value>" if fmt.name == "glm45" else "</parameter>"
    described = []
    for index, function in enumerate(functions):
        schema = function.get("parameters") or {"type": "object"}
        args = r.schema(schema, f"tool{index}-args")
        params = []
        if fmt.name in ("qwen3_coder", "glm45") and isinstance(schema.get("properties"), dict):
            required = set(schema.get("required") or [])
            for key_name, prop in schema["properties"].items():
                params.append(
                    (key_name, _xml_value(r, prop, value_close, f"tool{index}-{key_name}"), key_name in required)
                )
        described.append(_Tool(function["name"], args, params))
    block, trigger = _family_root(fmt.name, r, described, parallel, forced)
    if forced:
        return CallGrammar(r.grammar(_after_reasoning(fmt, r, block, in_reasoning)), None)
    if text_schema is not None:
        answer = f"( {block} | {r.schema(text_schema, 'text')} )"
        return CallGrammar(r.grammar(_after_reasoning(fmt, r, answer, in_reasoning)), None)
    trigger = GrammarTrigger(trigger.markers, trigger.start_patterns, fmt.reasoning, in_reasoning)
    return CallGrammar(r.grammar(block), trigger)
