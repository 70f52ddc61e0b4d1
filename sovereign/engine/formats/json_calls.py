"""Section parsers for formats whose calls are JSON objects: tagged, listed, or bare."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from sovereign.engine.formats.base import Call, Section
from sovereign.engine.formats.jsonscan import args_text, scan_object, skip_ws, value_end

NAME_KEYS = ("name",)
ARGS_KEYS = ("arguments", "parameters")
# Keys a call object may open with; a bare JSON answer opening with another key is not a call.
CALL_KEYS = ("name", "arguments", "parameters", "type", "function", "id")


def _partial_close(text: str, i: int, close: str) -> bool:
    """True while text[i:] could still grow into `close`."""
    rest = text[i:]
    return len(rest) < len(close) and close.startswith(rest)


def call_object(
    text: str,
    i: int,
    final: bool,
    name_keys: tuple[str, ...] = NAME_KEYS,
    args_keys: tuple[str, ...] = ARGS_KEYS,
    id_keys: tuple[str, ...] = ("id",),
) -> tuple[Call, int | None, bool]:
    """The call in the object at text[i], where it ends, and whether it is malformed."""
    scan = scan_object(text, i, name_keys, args_keys, id_keys, final)
    args, whole = args_text(text, scan)
    call = Call(scan.name, args, complete=scan.end is not None, id=scan.id)
    if scan.end is not None and not whole:
        call.args = "{}" if scan.args_start is None else args
    return call, scan.end, scan.bad


@dataclass
class TaggedJson:
    """`{…}` then an optional closing tag: Hermes' `<tool_call>…</tool_call>`."""

    close: str | None = "</tool_call>"

    def parse(self, text: str, final: bool) -> Section:
        i = skip_ws(text, 0)
        if i >= len(text):
            return Section()
        if text[i] != "{":
            return Section(rejected=True)
        call, end, bad = call_object(text, i, final)
        if bad and call.name is None:
            return Section(rejected=True)
        if end is None:
            return Section([call])
        j = skip_ws(text, end)
        if self.close and text.startswith(self.close, j):
            return Section([call], end=j + len(self.close))
        if self.close and not final and (j >= len(text) or _partial_close(text, j, self.close)):
            return Section([call])
        return Section([call], end=end)  # a missing closing tag is forgiven


@dataclass
class JsonList:
    """`[{…}, {…}]` (or one object) with an optional closing tag: Mistral, Phi-4, Granite, Command R7B."""

    close: str | None = None
    name_keys: tuple[str, ...] = NAME_KEYS
    args_keys: tuple[str, ...] = ARGS_KEYS
    id_keys: tuple[str, ...] = ("id",)

    def parse(self, text: str, final: bool) -> Section:
        i = skip_ws(text, 0)
        if i >= len(text):
            return Section()
        if text[i] == "{":
            call, end, bad = call_object(text, i, final, self.name_keys, self.args_keys, self.id_keys)
            if bad or (end is not None and call.name is None):
                return Section(rejected=True)
            return self._close(text, [call], end, final)
        if text[i] != "[":
            return Section(rejected=True)
        calls: list[Call] = []
        j = i + 1
        while True:
            j = skip_ws(text, j)
            if j >= len(text):
                return Section(calls)
            if text[j] == "]":
                return self._close(text, calls, j + 1, final) if calls else Section(rejected=True)
            if text[j] == "," and calls:
                j += 1
                continue
            if text[j] != "{":
                return Section(calls, end=j) if calls else Section(rejected=True)
            call, end, bad = call_object(text, j, final, self.name_keys, self.args_keys, self.id_keys)
            if (bad or (end is not None and call.name is None)) and not calls:
                return Section(rejected=True)
            calls.append(call)
            if end is None:
                return Section(calls)
            j = end

    def _close(self, text: str, calls: list[Call], end: int | None, final: bool) -> Section:
        if end is None:
            return Section(calls)
        j = skip_ws(text, end)
        if self.close and text.startswith(self.close, j):
            return Section(calls, end=j + len(self.close))
        if self.close and not final and (j >= len(text) or _partial_close(text, j, self.close)):
            return Section(calls)
        return Section(calls, end=end)


@dataclass
class BareJson:
    """A whole answer that is a call object or a list of them (Llama 3.x, generic), optionally in a ``` fence."""

    known: frozenset[str] = frozenset()
    fenced: bool = False

    def parse(self, text: str, final: bool) -> Section:
        i = 0
        if self.fenced:  # after "```": an optional "json" and a newline, then the value, then "```"
            if not final and len(text) < 4 and "json".startswith(text):
                return Section()
            m = re.match(r"(?:json)?\s*", text)
            i = m.end() if m else 0
            if i >= len(text) or (not final and i == len(text)):
                return Section()
        if i >= len(text):
            return Section(rejected=final)
        if text[i] not in "{[":
            return Section(rejected=True)
        result = JsonList().parse(text[i:], final) if text[i] == "[" else self._object(text[i:], final)
        if result.rejected or not result.calls:
            return result
        first = result.calls[0]
        if first.name is not None and self.known and first.name not in self.known:
            return Section(rejected=True)
        if first.name is None:
            # Nothing may stream before we know this JSON is a call and not an answer.
            return Section(rejected=final)
        if result.end is not None:
            result.end += i
            if self.fenced:
                j = skip_ws(text, result.end)
                if text.startswith("```", j):
                    result.end = j + 3
                elif not final and _partial_close(text, j, "```"):
                    result.end = None
        return result

    def _object(self, text: str, final: bool) -> Section:
        call, end, bad = call_object(text, 0, final)
        scan_key = re.match(r'\{\s*"([^"\\]*)"', text)
        if bad or (scan_key and scan_key.group(1) not in CALL_KEYS):
            return Section(rejected=True)
        if end is not None and call.name is None:
            return Section(rejected=True)
        return Section([call], end=end)


@dataclass
class PythonTag:
    """Llama 3.1's `<|python_tag|>`: JSON call, a built-in `tool.call(k=v)`, or code for the `python` tool."""

    known: frozenset[str] = frozenset()

    def parse(self, text: str, final: bool) -> Section:
        for stop in ("<|eom_id|>", "<|eot_id|>"):
            at = text.find(stop)
            if at >= 0:
                result = self.parse(text[:at], True)
                return Section(result.calls, end=at + len(stop)) if result.calls else result
        i = skip_ws(text, 0)
        if i < len(text) and text[i] == "{":
            result = BareJson().parse(text[i:], final)
            if result.end is not None:
                result.end += i
            return result
        if not final:
            return Section()  # built-in calls and code are read whole, at the end
        body = text.strip()
        m = re.fullmatch(r"(\w+)\.call\((.*)\)", body, re.DOTALL)
        if m:
            try:
                node = ast.parse(f"f({m.group(2)})", mode="eval").body
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}  # type: ignore[attr-defined]
                return Section([Call(m.group(1), json.dumps(args, ensure_ascii=False), True)], end=len(text))
            except (SyntaxError, ValueError):
                pass
        if not body:
            return Section(rejected=True)
        return Section([Call("python", json.dumps({"code": body}, ensure_ascii=False), True)], end=len(text))


@dataclass
class DeepSeek:
    """DeepSeek R1 (`function<｜tool▁sep｜>NAME\\n```json …```) and V3.1 (`NAME<｜tool▁sep｜>{…}`) calls."""

    begin: str = "<｜tool▁call▁begin｜>"
    sep: str = "<｜tool▁sep｜>"
    end: str = "<｜tool▁call▁end｜>"
    close: str = "<｜tool▁calls▁end｜>"

    def parse(self, text: str, final: bool) -> Section:
        calls: list[Call] = []
        j = 0
        while True:
            j = skip_ws(text, j)
            if text.startswith(self.close, j):
                return Section(calls, end=j + len(self.close))
            if j >= len(text) or _partial_close(text, j, self.close) or _partial_close(text, j, self.begin):
                return Section(calls, end=j if final and calls else None)
            if not text.startswith(self.begin, j):
                return Section(calls, end=j) if calls else Section(rejected=True)
            head = j + len(self.begin)
            sep = text.find(self.sep, head)
            if sep < 0:
                return Section(calls, end=None) if not final else Section(calls, end=len(text) if calls else None)
            kind, v = text[head:sep].strip(), sep + len(self.sep)
            if kind == "function":  # R1: the name is on the line after the separator
                nl = text.find("\n", v)
                if nl < 0:
                    return Section(calls)
                name, v = text[v:nl].strip(), nl + 1
                fence = re.compile(r"\s*```(?:json)?\s*").match(text, v)
                if fence:
                    v = fence.end()
            else:
                name = kind
            v = skip_ws(text, v)
            if not final and (v >= len(text) or text[v] not in '{["'):
                return Section(calls)  # still inside the fence's opening, or nothing yet
            call = Call(name)
            calls.append(call)
            vend = value_end(text, v, final)
            call.args = text[v:vend] if vend is not None else text[v:]
            if vend is None:
                return Section(calls)
            k = re.compile(r"\s*(?:```)?\s*").match(text, vend).end()  # type: ignore[union-attr]
            if text.startswith(self.end, k):
                call.complete, j = True, k + len(self.end)
            elif final or not (k >= len(text) or _partial_close(text, k, self.end) or _partial_close(text, k, "```")):
                call.complete, j = True, k
            else:
                return Section(calls)


@dataclass
class Kimi:
    """Kimi K2: `<|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{…}<|tool_call_end|>`."""

    def parse(self, text: str, final: bool) -> Section:
        begin, arg, end, close = (
            "<|tool_call_begin|>",
            "<|tool_call_argument_begin|>",
            "<|tool_call_end|>",
            "<|tool_calls_section_end|>",
        )
        calls: list[Call] = []
        j = 0
        while True:
            j = skip_ws(text, j)
            if text.startswith(close, j):
                return Section(calls, end=j + len(close))
            if j >= len(text) or _partial_close(text, j, close) or _partial_close(text, j, begin):
                return Section(calls, end=j if final and calls else None)
            if not text.startswith(begin, j):
                return Section(calls, end=j) if calls else Section(rejected=True)
            a = text.find(arg, j)
            if a < 0:
                return Section(calls)
            call_id = text[j + len(begin) : a].strip()
            name = re.sub(r":\d+$", "", call_id)
            name = name[len("functions.") :] if name.startswith("functions.") else name
            call = Call(name, id=call_id)
            calls.append(call)
            v = skip_ws(text, a + len(arg))
            vend = value_end(text, v, final)
            call.args = text[v:vend] if vend is not None else text[v:]
            if vend is None:
                return Section(calls)
            k = skip_ws(text, vend)
            if text.startswith(end, k):
                call.complete, j = True, k + len(end)
            elif final or not (k >= len(text) or _partial_close(text, k, end)):
                call.complete, j = True, k
            else:
                return Section(calls)
