"""Finding where JSON values end in text that may still be growing, without parsing it fully."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# Jump between the characters that matter with the regex engine: a Python loop per character
# would make re-scanning a long argument at every token quadratic in slow code.
_STRUCT = re.compile(r'[\\"{}\[\]]')
_IN_STRING = re.compile(r'[\\"]')
_SCALAR = re.compile(r"-?[0-9A-Za-z_.+\-]+")
_WS = re.compile(r"\s*")


def skip_ws(text: str, i: int) -> int:
    """The index of the first non-whitespace character at or after i."""
    return _WS.match(text, i).end()  # type: ignore[union-attr]


def string_end(text: str, i: int) -> int | None:
    """The index just past the JSON string opening at text[i], or None while it is unterminated."""
    j = i + 1
    while True:
        m = _IN_STRING.search(text, j)
        if m is None:
            return None
        if m.group() == "\\":
            j = m.end() + 1
            if j > len(text):
                return None
            continue
        return m.end()


def value_end(text: str, i: int, final: bool = False) -> int | None:
    """The index just past the JSON value starting at text[i], or None while it is incomplete."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return string_end(text, i)
    if c in "{[":
        depth, j = 0, i
        while True:
            m = _STRUCT.search(text, j)
            if m is None:
                return None
            ch = m.group()
            if ch == '"':
                end = string_end(text, m.start())
                if end is None:
                    return None
                j = end
                continue
            if ch == "\\":
                j = m.end() + 1
                continue
            depth += 1 if ch in "{[" else -1
            j = m.end()
            if depth == 0:
                return j
    m = _SCALAR.match(text, i)
    if m is None:
        return None
    # A number at the end of the text may still grow ("1" -> "12").
    return m.end() if (m.end() < len(text) or final) else None


@dataclass
class ObjectScan:
    """What a call object `{"name": …, "arguments": …}` holds so far."""

    name: str | None = None
    id: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None
    first_key: str | None = None
    bad: bool = False


def scan_object(
    text: str,
    i: int,
    name_keys: tuple[str, ...],
    args_keys: tuple[str, ...],
    id_keys: tuple[str, ...] = ("id",),
    final: bool = False,
) -> ObjectScan:
    """Scan a call object opening at text[i] ('{'), as far as the text goes."""
    scan = ObjectScan()
    j = i + 1
    while True:
        j = skip_ws(text, j)
        if j >= len(text):
            return scan
        if text[j] == "}":
            scan.end = j + 1
            return scan
        if text[j] != '"':
            scan.bad = True
            return scan
        key_end = string_end(text, j)
        if key_end is None:
            return scan
        key = json.loads(text[j:key_end])
        if scan.first_key is None:
            scan.first_key = key
        j = skip_ws(text, key_end)
        if j >= len(text):
            return scan
        if text[j] != ":":
            scan.bad = True
            return scan
        v = skip_ws(text, j + 1)
        if key in args_keys:
            scan.args_start = v
        end = value_end(text, v, final)
        if end is None:
            return scan
        if key in args_keys:
            scan.args_end = end
        elif key in name_keys or key in id_keys:
            try:
                value = json.loads(text[v:end])
            except ValueError:
                scan.bad = True
                return scan
            if key in name_keys and isinstance(value, str):
                scan.name = value
            elif key in id_keys:
                scan.id = str(value)
        j = skip_ws(text, end)
        if j < len(text) and text[j] == ",":
            j += 1
        elif j < len(text) and text[j] != "}":
            scan.bad = True
            return scan


def args_text(text: str, scan: ObjectScan) -> tuple[str, bool]:
    """The arguments' JSON text seen so far, and whether it is whole; a JSON-encoded string is unwrapped when whole."""
    if scan.args_start is None or scan.args_start >= len(text):
        return "", False
    if text[scan.args_start] == '"':
        # Arguments sent as a string holding JSON: only usable once the string is whole.
        if scan.args_end is None:
            return "", False
        try:
            return str(json.loads(text[scan.args_start : scan.args_end])), True
        except ValueError:
            return "", True
    end = scan.args_end if scan.args_end is not None else len(text)
    return text[scan.args_start : end], scan.args_end is not None
