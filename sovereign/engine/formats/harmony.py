"""gpt-oss's harmony format: messages on channels; analysis is reasoning, `to=functions.X` a call, final content."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sovereign.engine.formats.base import (
    ContentDelta,
    FormatEvent,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    new_call_id,
)
from sovereign.engine.formats.stream import TextChannel

_MESSAGE = "<|message|>"
_ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")
_RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")
# A header longer than this without <|message|> is not a header: the model wrote plain text.
_MAX_HEADER = 256


def _held(buf: str) -> int:
    """Length of a tail that may be the start of a terminator."""
    for n in range(min(len(buf), 10), 0, -1):
        if any(end.startswith(buf[-n:]) for end in _ENDS):
            return n
    return 0


@dataclass
class HarmonyParser:
    """Streaming parser for output that follows a prompt ending in `<|start|>assistant`."""

    _buf: str = ""
    _in_body: bool = False
    _kind: str = "content"  # content | reasoning | call
    _call: int = -1
    _calls: int = 0
    _started: set[int] = field(default_factory=set)
    _content: TextChannel = field(default_factory=lambda: TextChannel(ContentDelta))
    _reasoning: TextChannel = field(default_factory=lambda: TextChannel(ReasoningDelta))

    def feed(self, text: str) -> list[FormatEvent]:
        """Events for a new piece of model output."""
        self._buf += text
        out: list[FormatEvent] = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[FormatEvent]:
        """Events for the end of output; an unterminated header is released as content."""
        out: list[FormatEvent] = []
        while self._step(out, final=True):
            pass
        if self._in_body and self._kind == "call":
            out.append(ToolCallEnd(self._call))
        elif not self._in_body and self._buf.strip():
            out.append(ContentDelta(self._buf.strip()))
        self._buf = ""
        return out

    def _step(self, out: list[FormatEvent], final: bool) -> bool:
        if self._in_body:
            return self._body(out, final)
        pos = self._buf.find(_MESSAGE)
        if pos < 0:
            head = self._buf.lstrip()
            if head and not "<|".startswith(head[:2]) and not "to=".startswith(head[:3]):
                # No header at all: the model answered in plain text.
                self._in_body, self._kind = True, "content"
                return True
            if len(self._buf) > _MAX_HEADER:
                self._in_body, self._kind = True, "content"
                return True
            return False
        header, self._buf = self._buf[:pos], self._buf[pos + len(_MESSAGE) :]
        recipient = _RECIPIENT.search(header)
        if recipient:
            self._kind, self._call = "call", self._calls
            self._calls += 1
            out.append(ToolCallStart(self._call, new_call_id(), recipient.group(1)))
        elif "<|channel|>analysis" in header:
            self._kind = "reasoning"
        else:
            self._kind = "content"  # final, and commentary preambles meant for the user
        self._in_body = True
        return True

    def _body(self, out: list[FormatEvent], final: bool) -> bool:
        ends = [(self._buf.find(e), e) for e in _ENDS if e in self._buf]
        if ends:
            pos, end = min(ends)
            self._emit(self._buf[:pos], out, closing=True)
            if self._kind == "call":
                out.append(ToolCallEnd(self._call))
            self._buf = self._buf[pos + (0 if end == "<|start|>" else len(end)) :]
            self._in_body = False
            return True
        keep = 0 if final else _held(self._buf)
        self._emit(self._buf[: len(self._buf) - keep], out, closing=final)
        self._buf = self._buf[len(self._buf) - keep :]
        return False

    def _emit(self, text: str, out: list[FormatEvent], closing: bool) -> None:
        if self._kind == "call":
            if text:
                out.append(ToolCallArgsDelta(self._call, text))
            return
        channel = self._reasoning if self._kind == "reasoning" else self._content
        channel.put(text, out)
        if closing:
            channel.cut()
