"""Reading a model's answer as it streams.

Text is cut at stop strings, then read as content, reasoning and tool calls by its format.

Two readers share one surface (feed text as it comes, finish once):
- FamilyOutput: the model family's parser (engine/formats), for templates whose family is known:
  Qwen's `<think>` and `<tool_call>`, Llama's `<|python_tag|>`, Mistral's `[TOOL_CALLS]`, harmony…
- PlainOutput: for the generic format (our own tool instructions) and `--reasoning-format none`:
  text passes through, except an answer that opens like a call, which is held and parsed at the end.
"""

from __future__ import annotations

import codecs
import json
import logging
from typing import Any, Protocol

from sovereign.engine import formats
from sovereign.engine import tools as tool_calls
from sovereign.engine.requests import (
    Event,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolCallsEvent,
)

log = logging.getLogger(__name__)


class OutputReader(Protocol):
    """Turns an answer's text, piece by piece, into events."""

    def feed(self, text: str, logprob: TokenLogprob | None) -> list[Event]: ...

    def finish(self, truncated: bool = False) -> list[Event]:
        """What is left once the answer has ended (tool calls among it); `truncated`: max_tokens cut it."""
        ...


class FamilyOutput:
    """A family parser's events as engine events.

    Calls to offered tools stream as deltas, then come whole, checked, at the end.
    """

    def __init__(self, fmt: formats.ChatFormat, tools: list[dict[str, Any]], *, in_reasoning: bool) -> None:
        self._parser = fmt.parser(tools or None, in_reasoning=in_reasoning)
        self._offered = {f["name"] for f in tool_calls.functions_of(tools)} if tools else set()
        self._calls: dict[int, list[str]] = {}  # index -> [id, name, arguments so far]
        self._logprobs: list[TokenLogprob] = []

    def feed(self, text: str, logprob: TokenLogprob | None) -> list[Event]:
        if logprob is not None:
            self._logprobs.append(logprob)
        return self._convert(self._parser.feed(text)) if text else []

    def finish(self, truncated: bool = False) -> list[Event]:
        events = self._convert(self._parser.finish())
        calls = [
            call
            for call in (self._checked(*parts, truncated=truncated) for parts in self._calls.values())
            if call is not None
        ]
        return events + ([ToolCallsEvent(calls)] if calls else [])

    def _convert(self, parsed: list[formats.FormatEvent]) -> list[Event]:
        events: list[Event] = []
        for event in parsed:
            if isinstance(event, formats.ContentDelta):
                logprobs, self._logprobs = self._logprobs, []
                events.append(TextDelta(event.text, logprobs))
            elif isinstance(event, ReasoningDelta):  # the engine's own event already
                events.append(event)
            elif isinstance(event, formats.ToolCallStart):
                self._calls[event.index] = [event.id, event.name, ""]
                if event.name in self._offered:
                    events.append(ToolCallDelta(event.index, event.id, event.name))
            elif isinstance(event, formats.ToolCallArgsDelta) and event.index in self._calls:
                self._calls[event.index][2] += event.text
                if self._calls[event.index][1] in self._offered and event.text:
                    events.append(ToolCallDelta(event.index, arguments=event.text))
        return events

    def _checked(self, call_id: str, name: str, arguments: str, *, truncated: bool = False) -> ToolCall | None:
        """The call, its arguments as a JSON object's text; None for a tool not offered or arguments that are no object.

        A call cut off by max_tokens keeps its arguments as far as they got, as OpenAI returns them.
        """
        if name not in self._offered:
            log.info("the model called %r, which is not among the offered tools: dropped", name)
            return None
        if truncated:
            try:
                json.loads(arguments or "{}")
            except ValueError:
                return ToolCall(call_id, name, arguments)
        try:
            value = json.loads(arguments or "{}")
        except ValueError:
            log.info("the model's call to %r has arguments that are not JSON: dropped", name)
            return None
        if not isinstance(value, dict):
            return None
        return ToolCall(call_id, name, json.dumps(value, ensure_ascii=False))


class PlainOutput:
    """Passes text through, except text that is (or may be) a tool call, which is held and parsed at the end."""

    def __init__(self, mode: str, tools: list[dict[str, Any]]) -> None:
        self._tools = tools
        self._decided = mode != "auto"
        self._holding = mode == "forced"
        self._held_text = ""
        self._held_logprobs: list[TokenLogprob] = []
        self._pending_logprobs: list[TokenLogprob] = []

    def feed(self, text: str, logprob: TokenLogprob | None) -> list[Event]:
        if logprob is not None:
            self._pending_logprobs.append(logprob)
        if self._holding or not self._decided:
            self._held_text += text
            self._held_logprobs.extend(self._pending_logprobs)
            self._pending_logprobs = []
            if self._decided:
                return []
            lead = self._held_text.lstrip()
            if not lead or any(len(lead) < len(o) and o.startswith(lead) for o in tool_calls.CALL_OPENINGS):
                return []  # blank so far, or could still become "<tool_call>": wait for more
            self._decided = True
            self._holding = any(lead.startswith(o) for o in tool_calls.CALL_OPENINGS)
            if self._holding:
                return []
            text, self._held_text = self._held_text, ""
            logprobs, self._held_logprobs = self._held_logprobs, []
            return [TextDelta(text, logprobs)] if text else []
        if not text:
            return []
        logprobs, self._pending_logprobs = self._pending_logprobs, []
        return [TextDelta(text, logprobs)]

    def finish(self, truncated: bool = False) -> list[Event]:
        if not self._held_text:
            return []
        calls = tool_calls.parse_calls(self._held_text, self._tools) if self._tools else []
        if calls:
            return [ToolCallsEvent(calls)]
        if truncated and self._tools:  # a call cut off by max_tokens: the generic parser reads it as far as it got
            cut = FamilyOutput(formats.FORMATS["generic"], self._tools, in_reasoning=False)
            cut.feed(self._held_text, None)
            partial: list[Event] = [event for event in cut.finish(truncated=True) if isinstance(event, ToolCallsEvent)]
            if partial:
                return partial
        return [TextDelta(self._held_text, self._held_logprobs)]


def reader_for(
    fmt: formats.ChatFormat, tool_mode: str, tools: list[dict[str, Any]], *, raw_reasoning: bool, in_reasoning: bool
) -> OutputReader:
    """The reader for one answer: the family's parser where it applies, else plain text with held-back calls."""
    if fmt.name == "generic" or raw_reasoning:
        return PlainOutput(tool_mode, tools)
    return FamilyOutput(fmt, tools, in_reasoning=in_reasoning)


class TextAssembler:
    """Bytes to text without splitting UTF-8 characters; holds back text that may begin a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, piece: bytes) -> tuple[str, str | None]:
        """Text safe to emit now, and the stop string reached if one was (the stop itself is dropped)."""
        self._pending += self._decoder.decode(piece)
        hits = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        if hits:
            index, stop = min(hits, key=lambda hit: hit[0])  # the earliest; among equals, the first listed
            out, self._pending = self._pending[:index], ""
            return out, stop
        hold = max(
            (
                n
                for s in self._stops
                for n in range(min(len(s) - 1, len(self._pending)), 0, -1)
                if self._pending.endswith(s[:n])
            ),
            default=0,
        )
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, None

    def flush(self) -> str:
        """What is left at the end (a held-back partial stop string is real text after all)."""
        rest, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return rest


class ReasoningBudget:
    """Counts the tokens of an open reasoning block.

    Once the budget is spent, says so (once), so the end marker is forced.

    It watches the raw text for the family's markers: the parser's events lag behind it (partial
    markers and whitespace are held back), and a block must not be charged for tokens after it closed.
    """

    def __init__(self, fmt: formats.ChatFormat, tokens: int, *, opened: bool) -> None:
        assert fmt.reasoning is not None
        self._start, self.end_marker = fmt.reasoning
        self._left = tokens
        self._open = opened  # the prompt opened the block
        self._done = False  # the block has closed, or the marker was forced
        self._tail = ""

    def spent(self, piece: str) -> bool:
        """Note one more token's text; True exactly once, when an open reasoning block has used up the budget."""
        if self._done:
            return False
        self._tail = (self._tail + piece)[-(len(self._start) + len(self.end_marker) + 16) :]
        if not self._open and self._start in self._tail:
            self._open = True
            self._tail = self._tail[self._tail.index(self._start) + len(self._start) :]
            return False
        if self._open and self.end_marker in self._tail:
            self._done = True
            return False
        if not self._open:
            return False
        self._left -= 1
        if self._left > 0:
            return False
        self._done = True
        return True


class FirstCallOnly:
    """Lets through the first tool call of an answer and drops the others, streamed or whole."""

    def __init__(self) -> None:
        self._first: int | None = None

    def filter(self, event: Event) -> Event | None:
        if isinstance(event, ToolCallDelta):
            if self._first is None and event.id is not None:
                self._first = event.index
            return event if event.index == self._first else None
        if isinstance(event, ToolCallsEvent):
            return ToolCallsEvent(event.calls[:1])
        return event
