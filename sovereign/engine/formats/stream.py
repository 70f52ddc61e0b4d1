"""The streaming machine most families share: content, a reasoning block, and tool-call sections opened by markers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sovereign.engine.formats.base import (
    ContentDelta,
    FormatEvent,
    ReasoningDelta,
    SectionParser,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    new_call_id,
)


@dataclass(frozen=True)
class Opener:
    """A marker that opens a tool-call section, and the parser of what follows it."""

    marker: str
    section: Callable[[], SectionParser]
    at_start: bool = False  # only where the answer begins (bare JSON calls), not mid-text
    keep: bool = False  # the marker is part of the section's text (a JSON call's "{")


@dataclass(frozen=True)
class Spec:
    """One family's markup: its reasoning markers, section openers and markers to drop silently."""

    reasoning: tuple[str, str] | None
    openers: tuple[Opener, ...]
    drop: tuple[str, ...] = ()


@dataclass
class TextChannel:
    """Content or reasoning text: strips whitespace next to markup, which is formatting, not text."""

    kind: type
    strip: bool = True
    held_ws: str = ""
    emitted: bool = False

    def put(self, text: str, out: list[FormatEvent]) -> None:
        if self.strip:
            text = text.lstrip()
            if not text:
                return
            self.strip = False
        text = self.held_ws + text
        body = text.rstrip()
        self.held_ws = text[len(body) :]
        if body:
            out.append(self.kind(body))
            self.emitted = True

    def cut(self) -> None:
        """Markup follows: whitespace before it is dropped, and so is whitespace after it."""
        self.held_ws = ""
        self.strip = True


@dataclass
class _Started:
    index: int
    sent: int = 0
    ended: bool = False


def _held(buf: str, markers: list[str]) -> int:
    """Length of the longest tail of buf that could still grow into one of the markers."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(buf)), best, -1):
            if buf.endswith(marker[:n]):
                best = n
                break
    return best


@dataclass
class MarkupParser:
    """Streaming parser driven by a Spec; `in_reasoning` when the prompt already opened the reasoning block."""

    spec: Spec
    in_reasoning: bool = False
    _buf: str = ""
    _mode: str = "content"
    _content: TextChannel = field(default_factory=lambda: TextChannel(ContentDelta))
    _reasoning: TextChannel = field(default_factory=lambda: TextChannel(ReasoningDelta))
    _reasoned: bool = False
    _calls: int = 0
    _opener: Opener | None = None
    _section: SectionParser | None = None
    _sec_text: str = ""
    _started: list[_Started] = field(default_factory=list)
    _sec_ws: str = ""

    def __post_init__(self) -> None:
        if self.in_reasoning and self.spec.reasoning:
            self._mode = "reasoning"

    def feed(self, text: str) -> list[FormatEvent]:
        """Events for a new piece of model output."""
        out: list[FormatEvent] = []
        if self._mode == "section":
            self._sec_text += text
        else:
            self._buf += text
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[FormatEvent]:
        """Events for the end of output: held text is released, unfinished markup becomes content."""
        out: list[FormatEvent] = []
        while self._step(out, final=True):
            pass
        return out

    def _step(self, out: list[FormatEvent], final: bool) -> bool:
        if self._mode == "reasoning":
            return self._step_reasoning(out, final)
        if self._mode == "section":
            return self._step_section(out, final)
        return self._step_content(out, final)

    def _step_reasoning(self, out: list[FormatEvent], final: bool) -> bool:
        start, end = self.spec.reasoning  # type: ignore[misc]
        if not self._reasoning.emitted and not self._reasoned:
            # The template opened the block, yet models often write the opening marker again.
            lead = self._buf.lstrip()
            if lead.startswith(start):
                self._buf = lead[len(start) :]
            elif lead and start.startswith(lead) and not final:
                return False
        pos = self._buf.find(end)
        if pos >= 0:
            self._reasoning.put(self._buf[:pos], out)
            self._reasoning.cut()
            self._buf = self._buf[pos + len(end) :]
            self._mode, self._reasoned = "content", True
            self._content.cut()
            return True
        keep = 0 if final else _held(self._buf, [end])
        self._reasoning.put(self._buf[: len(self._buf) - keep], out)
        self._buf = self._buf[len(self._buf) - keep :]
        return False

    def _at_start(self) -> bool:
        return not self._content.emitted and self._calls == 0

    def _step_content(self, out: list[FormatEvent], final: bool) -> bool:
        buf, at_start = self._buf, self._at_start()
        found: tuple[int, str, object] | None = None
        anywhere: list[tuple[str, object]] = [(m, "drop") for m in self.spec.drop]
        anywhere += [(o.marker, o) for o in self.spec.openers if not o.at_start]
        if self.spec.reasoning and at_start and not self._reasoned:
            anywhere.append((self.spec.reasoning[0], "think"))
        for marker, what in anywhere:
            pos = buf.find(marker)
            if pos >= 0 and (found is None or pos < found[0] or (pos == found[0] and len(marker) > len(found[1]))):
                found = (pos, marker, what)
        lead = len(buf) - len(buf.lstrip())
        starters = [o for o in self.spec.openers if o.at_start] if at_start else []
        for opener in starters:
            if buf.startswith(opener.marker, lead) and (found is None or lead <= found[0]):
                found = (lead, opener.marker, opener)
        if found is not None:
            pos, marker, what = found
            self._content.put(buf[:pos], out)
            self._sec_ws = self._content.held_ws  # given back if the section proves not to be markup
            self._content.cut()
            rest = buf[pos + len(marker) :]
            if what == "think":
                self._mode, self._buf = "reasoning", rest
            elif what == "drop":
                self._buf = rest
            else:
                assert isinstance(what, Opener)
                self._mode, self._opener, self._section = "section", what, what.section()
                self._sec_text, self._buf, self._started = (marker if what.keep else "") + rest, "", []
            return True
        keep = 0
        if not final:
            keep = _held(buf, [m for m, _ in anywhere])
            if any(o.marker.startswith(buf[lead:]) for o in starters) and lead < len(buf):
                keep = len(buf)
        self._content.put(buf[: len(buf) - keep], out)
        self._buf = buf[len(buf) - keep :]
        if final:
            self._content.held_ws = ""
        return False

    def _step_section(self, out: list[FormatEvent], final: bool) -> bool:
        assert self._section is not None and self._opener is not None
        result = self._section.parse(self._sec_text, final)
        if result.rejected and not self._started:
            return self._reject(out)
        for k, call in enumerate(result.calls):
            if k == len(self._started):
                if call.name is None:
                    break
                self._started.append(_Started(self._calls))
                out.append(ToolCallStart(self._calls, call.id or new_call_id(), call.name))
                self._calls += 1
            state = self._started[k]
            if state.ended:
                continue
            args = call.args
            if call.complete and not args and state.sent == 0:
                args = "{}"
            if len(args) > state.sent:
                out.append(ToolCallArgsDelta(state.index, args[state.sent :]))
                state.sent = len(args)
            if call.complete:
                out.append(ToolCallEnd(state.index))
                state.ended = True
        if result.end is None and not final:
            return False
        if result.end is None and not self._started:
            return self._reject(out)
        for state in self._started:
            if not state.ended:
                if state.sent == 0:  # cut off before its arguments: still a valid (empty) object
                    out.append(ToolCallArgsDelta(state.index, "{}"))
                out.append(ToolCallEnd(state.index))
                state.ended = True
        self._buf = self._sec_text[result.end :] if result.end is not None else ""
        self._mode, self._section, self._opener, self._sec_text = "content", None, None, ""
        self._content.cut()
        return True

    def _reject(self, out: list[FormatEvent]) -> bool:
        """Not markup after all: the opener is text, and what followed is scanned again as content."""
        opener = self._opener
        assert opener is not None
        text = self._sec_text[len(opener.marker) :] if opener.keep else self._sec_text
        self._content.strip, self._content.held_ws = False, self._sec_ws
        self._content.put(opener.marker, out)
        self._mode, self._section, self._opener, self._sec_text = "content", None, None, ""
        self._buf = text
        return True
