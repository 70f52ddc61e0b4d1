"""Section parsers for XML-style calls (Qwen3-Coder, GLM 4.5/4.6): parameters become a JSON object."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from sovereign.engine.formats.base import Call, Section


def convert(value: str, schema: dict[str, Any] | None) -> Any:
    """A parameter's text as the JSON value its schema asks for; without a schema, JSON if it parses, else text."""
    types = (schema or {}).get("type")
    types = set(types) if isinstance(types, list) else {types} if types else set()
    if "string" in types or (types and not types - {"string", "null"}):
        return value
    stripped = value.strip()
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    if not types:
        return value
    if types & {"integer", "number"}:
        try:
            return float(stripped) if "." in stripped else int(stripped)
        except ValueError:
            return value
    if "boolean" in types and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    return value


def _strip_nl(value: str) -> str:
    """Drop the one newline the format puts on each side of a value."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


@dataclass
class _XmlCalls:
    """Shared body: a call's name, then key/value pairs, each emitted as `"key": value` once whole."""

    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _args(self, name: str, pairs: list[tuple[str, str]], closed: bool) -> str:
        props = (self.schemas.get(name) or {}).get("properties") or {}
        parts = [
            f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(convert(v, props.get(k)), ensure_ascii=False)}"
            for k, v in pairs
        ]
        return "{" + ", ".join(parts) + ("}" if closed else "")


@dataclass
class QwenCoder(_XmlCalls):
    """`<function=NAME><parameter=KEY>\\nVALUE\\n</parameter></function></tool_call>`."""

    def parse(self, text: str, final: bool) -> Section:
        calls: list[Call] = []
        pos = 0
        for m in re.finditer(r"<function=([^>\n]*)>(.*?)(</function>|$)", text, re.DOTALL):
            if text[pos : m.start()].strip():
                break
            name, body, closed = m.group(1).strip(), m.group(2), bool(m.group(3))
            pairs = [
                (k.strip(), _strip_nl(v))
                for k, v in re.findall(r"<parameter=([^>\n]*)>(.*?)</parameter>", body, re.DOTALL)
            ]
            calls.append(Call(name, self._args(name, pairs, closed or final), closed or final))
            pos = m.end()
            if not closed:
                break
        rest = text[pos:].lstrip()
        if not calls:
            if rest and not "<function=".startswith(rest[:10]) and not rest.startswith("<function="):
                return Section(rejected=True)
            return Section(rejected=final)
        if not calls[-1].complete:
            return Section(calls)
        tail = text[pos:]
        closing = re.match(r"\s*</tool_call>", tail)
        if closing:
            return Section(calls, end=pos + closing.end())
        if not final and "</tool_call>".startswith(rest):
            return Section(calls)
        return Section(calls, end=pos)


@dataclass
class Glm(_XmlCalls):
    """`NAME\\n<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>\\n</tool_call>`."""

    def parse(self, text: str, final: bool) -> Section:
        m = re.match(r"\s*([^<\n]+?)\s*(?=\n|<arg_key>|</tool_call>)", text)
        if not m:
            if "<" in text.strip()[:1] and not final:
                return Section(rejected=not "</tool_call>".startswith(text.strip()))
            return Section(rejected=final)
        name = m.group(1).strip()
        body = text[m.end() :]
        close = body.find("</tool_call>")
        body = body[:close] if close >= 0 else body
        pairs = re.findall(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", body, re.DOTALL)
        if close >= 0:
            return Section(
                [Call(name, self._args(name, [(k.strip(), v) for k, v in pairs], True), True)],
                end=m.end() + close + len("</tool_call>"),
            )
        return Section(
            [Call(name, self._args(name, [(k.strip(), v) for k, v in pairs], final), final)],
            end=len(text) if final else None,
        )
