"""JSON schema to GBNF: llama-cpp-python's converter, plus the integer bounds it ignores.

llama-cpp-python's SchemaConverter turns `{"type": "integer", "minimum": 0, "maximum": 150}` into
"any integer", so a model may answer 1854810429760522. llama.cpp's own C++ converter enforces
the bounds; this does the same by spelling the range out digit by digit, as a regex for a
numeric range would.
"""

from __future__ import annotations

import json
import math
from typing import Any

from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

# The converter's own integer rule allows at most 16 digits: an unstated bound means that many.
MAX_DIGITS = 16
LARGEST = 10**MAX_DIGITS - 1
BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


class _BoundedSchemaConverter(SchemaConverter):
    """SchemaConverter that enforces minimum/maximum (and the exclusive forms) on integers."""

    def visit(self, schema: dict[str, Any], name: str) -> str:
        if isinstance(schema, dict) and schema.get("type") == "integer" and any(key in schema for key in BOUND_KEYS):
            low, high = integer_bounds(schema)
            if low > high:
                raise ValueError(f"no integer lies between its minimum {low} and maximum {high}")
            rule_name = f"{name}-" if name in RESERVED_NAMES else (name or "root")
            return self._add_rule(rule_name, f"({' | '.join(integer_range(low, high))}) space")
        return super().visit(schema, name)


def json_schema_to_gbnf(schema: dict[str, Any]) -> str:
    """GBNF that admits exactly the JSON documents `schema` allows."""
    converter = _BoundedSchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "input")  # resolves in place: work on a copy
    converter.visit(resolved, "")
    return converter.format_grammar()


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
