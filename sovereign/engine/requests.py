"""What goes into the engine (requests, sampling parameters) and what comes out (events).

The server builds these from HTTP bodies and consumes the events; nothing here knows
about HTTP or about llama.cpp, so the scheduler behind the engine can change freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass(frozen=True)
class GrammarTrigger:
    """When a lazy grammar starts to apply: the output is free until a tool call opens (llama-server's lazy grammar).

    The grammar then applies from where the match begins (its first group's start, if it has one),
    the text from there on replayed into it. Reasoning is never searched: a call a model drafts
    while thinking is not a call.
    """

    markers: tuple[str, ...] = ()  # literal openers, anywhere in the answer text
    start_patterns: tuple[str, ...] = ()  # regular expressions that must match where the answer text begins
    reasoning: tuple[str, str] | None = None  # the family's reasoning markers (start, end)
    in_reasoning: bool = False  # the prompt opened the reasoning block


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Defaults follow llama-server's, which suit small local models."""

    max_tokens: int | None = None  # None: until end of turn or the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: no logprobs; N: the chosen token's plus the N most likely
    ignore_eos: bool = False  # keep generating past end-of-turn (benchmarks)
    grammar: str | None = None  # GBNF the output must match
    grammar_trigger: GrammarTrigger | None = None  # set: the grammar is lazy, applying only once a call opens
    special_pieces: bool = (
        False  # control tokens as their text (a family's markup, e.g. <|python_tag|>), not as nothing
    )


@dataclass(frozen=True)
class ToolChoice:
    """OpenAI's tool_choice: 'auto', 'none', 'required', or one named function."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    function: str | None = None


@dataclass(frozen=True)
class ReasoningControl:
    """What a client asked of the model's reasoning; None leaves the model's own default."""

    enabled: bool | None = None  # Anthropic's thinking enabled/disabled; reasoning_effort "none" disables
    effort: str | None = None  # low, medium, high (OpenAI's reasoning_effort; gpt-oss's template reads it)
    budget_tokens: int | None = None  # reasoning tokens before the family's end marker is forced

    def template_kwargs(self) -> dict[str, Any]:
        """The variables reasoning templates read.

        Qwen 3 and GLM enable_thinking, DeepSeek V3.1 thinking, gpt-oss reasoning_effort.
        """
        kwargs: dict[str, Any] = {}
        if self.enabled is not None:
            kwargs["enable_thinking"] = self.enabled
            kwargs["thinking"] = self.enabled
        if self.effort is not None:
            kwargs["reasoning_effort"] = self.effort
        return kwargs


@dataclass(frozen=True)
class ChatRequest:
    """A conversation to continue. `messages` use OpenAI's shape (role, content, tool_calls…)."""

    model: str
    messages: list[dict[str, Any]]
    sampling: SamplingParams = SamplingParams()
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: ToolChoice = ToolChoice()
    json_schema: dict[str, Any] | None = None  # response_format json_schema
    json_object: bool = False  # response_format json_object
    format_param: str = "response_format"  # where the API took the output format from (named in errors)
    reasoning: ReasoningControl = ReasoningControl()
    parallel_tool_calls: bool = True  # False: at most one call per answer
    template_kwargs: Mapping[str, Any] = field(
        default_factory=dict
    )  # chat_template_kwargs: extra template variables, last word

    def all_template_kwargs(self) -> dict[str, Any]:
        """The template's extra variables: those the reasoning controls imply, then the client's own on top."""
        return {**self.reasoning.template_kwargs(), **self.template_kwargs}


@dataclass(frozen=True)
class CompletionRequest:
    """Raw text (or token ids) to continue, with no chat template."""

    model: str
    prompt: str | list[int]
    sampling: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its log-probability, and the most likely alternatives."""

    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]] = field(default_factory=list)


@dataclass(frozen=True)
class ToolCall:
    """A parsed function call: `arguments` is the JSON text the model produced."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Usage:
    """Token counts for one generation."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused rather than recomputed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text (never split inside a UTF-8 character or a stop string)."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of the model's reasoning (its <think> block or analysis channel), kept apart from the answer."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A tool call as the model writes it: first its id and name (with empty arguments), then pieces of its arguments.

    Streaming APIs forward these; the ToolCallsEvent at the end still carries every checked call whole.
    """

    index: int
    id: str | None = None  # set on the call's first delta, with its name
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ToolCallsEvent:
    """The tool calls the model made, parsed, once they are complete."""

    calls: list[ToolCall]


@dataclass(frozen=True)
class Finished:
    """The last event of every stream."""

    reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None  # the stop string that ended the text, when one did


Event = TextDelta | ReasoningDelta | ToolCallDelta | ToolCallsEvent | Finished
