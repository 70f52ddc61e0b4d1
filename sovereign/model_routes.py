"""Model names a client asks for, mapped to the local models that answer them (`serve --alias 'claude-*=qwen3:8b'`).

Agent clients ask for their vendor's model names (Claude Code for `claude-opus-…`, the OpenAI
Agents SDK for `gpt-…`). A rule is a glob and a local model; the first rule that matches wins.
Closed-API names that no rule maps and no pulled model has fall back to the default served model,
so an agent started without `--model` still gets an answer, and the response names the model
that gave it. The gateway's `--route` shares this parsing and matching.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from sovereign.errors import BadRoute

# Names only a closed API serves: without a rule, these go to the default model instead of a 404.
CLOSED_API_NAMES = ("claude-*", "gpt-*", "chatgpt-*", "o1*", "o3*", "o4*")


@dataclass(frozen=True)
class ModelRoutes:
    """Glob rules from model names to local models, and the model that closed-API names fall back to."""

    rules: tuple[tuple[str, str], ...] = ()
    fallback: str | None = None  # the default served model

    def mapped(self, name: str) -> str | None:
        """The local model the first matching rule names, or None."""
        return next((target for pattern, target in self.rules if fnmatch.fnmatchcase(name, pattern)), None)

    def fallback_for(self, name: str) -> str | None:
        """The default model, for a closed-API name that no rule maps; None for any other name."""
        return self.fallback if is_closed_api_name(name) else None


def is_closed_api_name(name: str) -> bool:
    """Whether only a closed API serves this model name (claude-…, gpt-…)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CLOSED_API_NAMES)


def parse_route(text: str, option: str = "--alias") -> tuple[str, str]:
    """'claude-*=qwen3:8b' as (glob, model); BadRoute naming the option otherwise."""
    pattern, sep, target = (part.strip() for part in text.partition("="))
    if not sep or not pattern or not target:
        raise BadRoute(f"{option} {text!r} is not GLOB=MODEL", f"for example: {option} 'claude-*=qwen3:8b'")
    return pattern, target
