"""JSON schema to GBNF: llama-cpp-python's converter, plus the integer bounds it ignores, within a budget.

llama-cpp-python's SchemaConverter turns `{"type": "integer", "minimum": 0, "maximum": 150}` into
"any integer", so a model may answer 1854810429760522. llama.cpp's own C++ converter enforces
the bounds; this does the same by spelling the range out digit by digit, as a regex for a
numeric range would.

More departures, the first three because the original can take a server down:
- Repetitions (minLength/maxLength, minItems/maxItems, `{m,n}` in patterns) use GBNF's own `{m,n}`.
  The original nests one optional group per repetition, `(c (c (c)?)?)?`: llama.cpp's parser
  recurses once per level (a segfault near 20,000) and refuses more than ~1,000 levels anyway,
  and `minLength: 10**9` is built as a billion-item Python string first.
- Enums become a trie of named rules, one live parse at a time: as flat alternatives, every
  value is a parse that llama.cpp checks against every token of the vocabulary (a 1,000-value
  enum cost 6 s per token on a 262k-token vocabulary).
- Before anything is built, `check_budget` refuses schemas beyond the limits below, naming where.
- Strings hold no raw control characters (JSON forbids them; the original let them through), and
  constants keep their JSON escapes (the original let GBNF read `\\n` in a value as a line break).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any


def _load_llama_grammar() -> types.ModuleType:
    """llama-cpp-python's llama_grammar module, which is plain Python, without running its package's __init__.

    Importing `llama_cpp.llama_grammar` would load libllama into the server's process, which never
    decodes (engine/runtime/ does, in each model's process): the module is read from its file instead.
    """
    if (loaded := sys.modules.get("llama_cpp.llama_grammar")) is not None:
        return loaded
    package = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
    if package is None or not package.submodule_search_locations:
        raise ImportError("llama-cpp-python is not installed")
    path = Path(next(iter(package.submodule_search_locations))) / "llama_grammar.py"
    spec = importlib.util.spec_from_file_location("sovereign._llama_grammar", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot read {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


llama_grammar = _load_llama_grammar()
RESERVED_NAMES = llama_grammar.RESERVED_NAMES
if TYPE_CHECKING:  # the class's type only: importing the package at run time would load libllama
    from llama_cpp.llama_grammar import SchemaConverter
else:
    SchemaConverter = llama_grammar.SchemaConverter

# The converter's own integer rule allows at most 16 digits: an unstated bound means that many.
MAX_DIGITS = 16
LARGEST = 10**MAX_DIGITS - 1
BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

# The budget, checked before anything is built. Within it a grammar compiles in milliseconds and
# its parse stays small; measurements in tests/test_hardening_engine.py.
MAX_REPEAT = 100_000  # minLength, maxLength, minItems, maxItems, and each count in a pattern's {m,n}
MAX_DEPTH = 64  # nesting of the schema document: ~30 levels of objects, far past real schemas
MAX_ENUM = 10_000  # values of one enum
MAX_PATTERN = 1_000  # characters of one pattern
MAX_SCHEMA_CHARS = 1_000_000  # the schema as JSON text
MAX_GRAMMAR_CHARS = 2_000_000  # the GBNF it becomes
COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems")
# llama.cpp's grammar parser refuses a repetition once (rules inside the repeated group) x (count)
# reaches 2,000 (MAX_REPETITION_THRESHOLD), and each optional copy is a rule: longer runs are spelled
# as blocks of this many, so that one run makes at most ~1,200 rules (200 blocks + 2 x 499 optional).
REPEAT_BLOCK = 500
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


class SchemaTooComplex(ValueError):
    """A schema beyond the budget; the message says where and which limit."""


class SchemaInvalid(ValueError):
    """Not a JSON Schema at all (`multipleOf: 0`, `minimum: "a"`); the message says what and where."""


def check_valid(schema: Any) -> None:
    """Refuse a schema its own draft's metaschema refuses ($schema's draft, else 2020-12), naming the place.

    The converter would otherwise accept some (`multipleOf: 0`) and trip over others with Python's own words.
    """
    from jsonschema.exceptions import best_match
    from jsonschema.validators import Draft202012Validator, validator_for

    checker = validator_for(schema, default=Draft202012Validator)
    error = best_match(checker(checker.META_SCHEMA, format_checker=checker.FORMAT_CHECKER).iter_errors(schema))
    if error is not None:
        message = error.message if len(error.message) <= 200 else error.message[:200] + "…"
        raise SchemaInvalid(f"{message} at /{'/'.join(str(part) for part in error.absolute_path)}")


def check_budget(schema: Any) -> None:
    """Refuse, before anything is built from it, a schema beyond the limits above (walked without recursion)."""
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_CHARS:
        raise SchemaTooComplex(f"the schema is {size} characters of JSON, more than the {MAX_SCHEMA_CHARS} allowed")
    pending: list[tuple[Any, str, int]] = [(schema, "", 1)]
    while pending:
        node, path, depth = pending.pop()
        if depth > MAX_DEPTH:
            where = path if len(path) <= 120 else f"{path[:60]}…{path[-60:]}"
            raise SchemaTooComplex(f"the schema nests deeper than {MAX_DEPTH} levels at {where}")
        if isinstance(node, list):
            pending.extend((item, f"{path}/{index}", depth + 1) for index, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            where = f"{path}/{key}"
            # Keys are checked only with values of their own kind: a property may be named "pattern" or "enum".
            if key in COUNT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                _check_count(value, where)
            elif key == "pattern" and isinstance(value, str):
                _check_pattern(value, where)
            elif key == "enum" and isinstance(value, list) and len(value) > MAX_ENUM:
                raise SchemaTooComplex(f"the enum at {where} has {len(value)} values, more than the {MAX_ENUM} allowed")
            if isinstance(value, (dict, list)):
                pending.append((value, where, depth + 1))


def _check_count(value: float, where: str) -> None:
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise SchemaTooComplex(f"{where} must be a whole number of at least 0, not {value}")
    if value > MAX_REPEAT:
        raise SchemaTooComplex(
            f"{where} is {int(value)}, more than the {MAX_REPEAT} this server can enforce (leave it out for no limit)"
        )


def _check_pattern(pattern: str, where: str) -> None:
    if len(pattern) > MAX_PATTERN:
        raise SchemaTooComplex(
            f"the pattern at {where} is {len(pattern)} characters long, more than the {MAX_PATTERN} allowed"
        )
    for match in _QUANTIFIER.finditer(pattern):
        for count in match.groups():
            if count and int(count) > MAX_REPEAT:
                raise SchemaTooComplex(
                    f"the pattern at {where} repeats {count} times, more than the {MAX_REPEAT} this server can enforce"
                )


def _repetition(
    item: str,
    min_items: int,
    max_items: int | None,
    separator_rule: str | None = None,
    item_rule_is_literal: bool = False,
) -> str:
    """llama_grammar._build_repetition's contract, spelled with GBNF's {m,n}.

    The contract: min..max copies of a term, max None for no limit.
    """
    if separator_rule:
        if max_items == 0:
            return ""
        more = _times(f"({separator_rule} {item})", max(min_items - 1, 0), None if max_items is None else max_items - 1)
        body = f"{item} {more}".rstrip()
        # An empty alternative rather than `?`: a `?` on a group counts the group's rules against that limit.
        return body if min_items > 0 else f"({body} | )"
    return _times(item, min_items, max_items)


def _times(term: str, low: int, high: int | None) -> str:
    """`term` repeated low..high times (high None: no limit)."""
    if high is not None and high < low:
        raise ValueError(f"the minimum {low} is more than the maximum {high}")
    more = f"{term}*" if high is None else _up_to(term, high - low)
    return " ".join(part for part in (_exactly(term, low), more) if part)


def _exactly(term: str, count: int) -> str:
    if count <= 1:
        return term if count == 1 else ""
    if count <= REPEAT_BLOCK:
        return f"{term}{{{count}}}"
    blocks, rest = divmod(count, REPEAT_BLOCK)
    return f"({term}{{{REPEAT_BLOCK}}}){{{blocks}}} {_exactly(term, rest)}".rstrip()


def _up_to(term: str, count: int) -> str:
    if count <= 1:
        return f"{term}?" if count == 1 else ""
    if count <= REPEAT_BLOCK:
        return f"{term}{{0,{count}}}"
    # Fewer than `blocks` whole blocks and then less than a block, or `blocks` blocks and then at most `rest`:
    # each count has one spelling, and the parse never holds more than a few stacks.
    blocks, rest = divmod(count, REPEAT_BLOCK)
    block = f"({term}{{{REPEAT_BLOCK}}})"
    short = " ".join(
        part for part in (f"{block}{{0,{blocks - 1}}}" if blocks > 1 else "", f"{term}{{0,{REPEAT_BLOCK - 1}}}") if part
    )
    full = " ".join(part for part in (f"{block}{{{blocks}}}" if blocks > 1 else block, _up_to(term, rest)) if part)
    return f"({short} | {full})"


# JSON forbids raw control characters in strings, and the original's `char` lets them through (a model then
# writes a line break inside a string and the document does not parse): llama.cpp's C++ rule instead.
_PRIMITIVES = {
    **llama_grammar.PRIMITIVE_RULES,
    "char": llama_grammar.BuiltinRule(
        r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])', []
    ),
}


def _rebound(function: Callable[..., Any]) -> Callable[..., Any]:
    """One of SchemaConverter's methods, seeing our _repetition and `char` rule in place of the module's.

    The same code under other globals (its nested functions inherit them), so llama_grammar itself is untouched.
    """
    namespace = {**vars(llama_grammar), "_build_repetition": _repetition, "PRIMITIVE_RULES": _PRIMITIVES}
    return types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )


def _gbnf_literal(text: str) -> str:
    """A GBNF string literal matching exactly `text` (backslashes and quotes escaped, control characters as \\x)."""
    escaped = "".join(_LITERAL_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x20 else c) for c in text)
    return f'"{escaped}"'


_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class _BoundedSchemaConverter(SchemaConverter):
    """SchemaConverter that enforces integer bounds, repeats with {m,n}, and builds enums as tries."""

    _visit_original = _rebound(SchemaConverter.visit)
    _visit_pattern = _rebound(SchemaConverter._visit_pattern)
    _add_primitive = _rebound(SchemaConverter._add_primitive)

    def visit(self, schema: dict[str, Any], name: str) -> str:
        rule_name = f"{name}-" if name in RESERVED_NAMES else (name or "root")
        if isinstance(schema, dict) and schema.get("type") == "integer" and any(key in schema for key in BOUND_KEYS):
            low, high = integer_bounds(schema)
            if low > high:
                raise ValueError(f"no integer lies between its minimum {low} and maximum {high}")
            return self._add_rule(rule_name, f"({' | '.join(integer_range(low, high))}) space")
        # The branch the original takes for an enum (after $ref, unions, type lists and const).
        if (
            isinstance(schema, dict)
            and isinstance(schema.get("enum"), list)
            and schema["enum"]
            and not any(key in schema for key in ("$ref", "oneOf", "anyOf", "const"))
            and not isinstance(schema.get("type"), list)
        ):
            return self._add_rule(rule_name, self._trie([json.dumps(value) for value in schema["enum"]], rule_name))
        return self._visit_original(schema, name)

    def _generate_constant_rule(self, value: Any) -> str:
        # The original leaves JSON's own backslash escapes for GBNF to read as escapes ("a\nb" became a line break).
        return _gbnf_literal(json.dumps(value))

    def _trie(self, texts: list[str], name: str) -> str:
        """Alternatives for these exact texts, one named rule per branching point (built without recursion)."""
        root = ""
        pending: list[tuple[str | None, list[str], int]] = [(None, sorted(set(texts)), 0)]
        while pending:
            rule, group, offset = pending.pop()
            alternatives = []
            ends_here = bool(group) and len(group[0]) == offset  # sorted: a text that ends here comes first
            branches: dict[str, list[str]] = {}
            for text in group[1:] if ends_here else group:
                branches.setdefault(text[offset], []).append(text)
            for members in branches.values():
                shared = len(members[0]) if len(members) == 1 else len(_common_prefix(members[0], members[-1]))
                edge = _gbnf_literal(members[0][offset:shared])
                if len(members) == 1:
                    alternatives.append(edge)
                else:
                    child = self._add_rule(
                        f"{name}-{len(self._rules)}", f"<{len(self._rules)}>"
                    )  # a unique placeholder: a fresh name
                    alternatives.append(f"{edge} {child}")
                    pending.append((child, members, shared))
            body = " | ".join(alternatives)
            body = f"({body})?" if ends_here else body
            if rule is None:
                root = body
            else:
                self._rules[rule] = body
        return root


def _common_prefix(a: str, b: str) -> str:
    """The longest shared beginning (of the first and last of a sorted group: every member shares it)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def json_schema_to_gbnf(schema: dict[str, Any]) -> str:
    """GBNF that admits exactly the JSON documents `schema` allows; SchemaTooComplex past the budget."""
    check_budget(schema)
    converter = _BoundedSchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "input")  # resolves in place: work on a copy
    converter.visit(resolved, "")
    grammar = converter.format_grammar()
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise SchemaTooComplex(
            f"the schema makes a grammar of {len(grammar)} characters, more than the {MAX_GRAMMAR_CHARS} allowed"
        )
    return grammar


def integer_bounds(schema: dict[str, Any]) -> tuple[int, int]:
    """The smallest and largest integer a schema admits (the 16-digit limit where it states none)."""
    low, high = -LARGEST, LARGEST
    if (value := schema.get("minimum")) is not None:
        low = max(low, math.ceil(value))
    if (value := schema.get("exclusiveMinimum")) is not None:
        low = max(low, math.floor(value) + 1)
    if (value := schema.get("maximum")) is not None:
        high = min(high, math.floor(value))
    if (value := schema.get("exclusiveMaximum")) is not None:
        high = min(high, math.ceil(value) - 1)
    return low, high


def integer_range(low: int, high: int) -> list[str]:
    """GBNF alternatives matching the decimal integers from low to high, and nothing else."""
    alternatives = []
    if low < 0:  # the negative part: a minus sign, then the magnitudes
        alternatives += [f'"-" {alt}' for alt in _naturals(-min(high, -1), -low)]
    if high >= 0:
        alternatives += _naturals(max(low, 0), high)
    return alternatives


def _naturals(low: int, high: int) -> list[str]:
    """Alternatives for low..high (0 <= low <= high), without leading zeros: one group per digit count."""
    alternatives = []
    while low <= high:
        top_of_length = 10 ** len(str(low)) - 1
        alternatives += _same_length(str(low), str(min(high, top_of_length)))
        low = top_of_length + 1
    return alternatives


def _same_length(low: str, high: str) -> list[str]:
    """Alternatives for the digit strings of one length from low to high."""
    if low == high:
        return [f'"{low}"']
    shared = next(i for i, (a, b) in enumerate(zip(low, high, strict=True)) if a != b)
    head = f'"{low[:shared]}" ' if shared else ""
    rest = len(low) - shared - 1
    first, last = int(low[shared]), int(high[shared])
    any_tail = " [0-9]" * rest
    alternatives = []
    if low[shared + 1 :] != "0" * rest:  # the lowest leading digit, followed by a tail from low's up
        alternatives += [f'{head}"{first}" {alt}' for alt in _same_length(low[shared + 1 :], "9" * rest)]
        first += 1
    upper = []
    if high[shared + 1 :] != "9" * rest:  # the highest leading digit, followed by a tail up to high's
        upper = [f'{head}"{last}" {alt}' for alt in _same_length("0" * rest, high[shared + 1 :])]
        last -= 1
    if first <= last:  # leading digits in between take any tail
        alternatives.append(f"{head}[{first}-{last}]{any_tail}")
    return alternatives + upper
