"""Watching a model's output for the moment a lazy grammar starts to apply (a tool call opening)."""

from __future__ import annotations

import codecs
import re

from sovereign.engine.requests import GrammarTrigger

# Start patterns are tried only while the answer's text is this short: past it, the answer began as something else.
START_WINDOW = 256


class TriggerWatch:
    """Fed each token's text; says where the constrained part begins once a marker or start pattern matches.

    Reasoning is skipped: when the answer opens with the family's reasoning block (or the prompt
    opened it), only the text after its end marker is searched.
    """

    def __init__(self, trigger: GrammarTrigger) -> None:
        self._trigger = trigger
        self._patterns = [re.compile(p) for p in trigger.start_patterns]
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._text = ""  # the answer so far
        self._answer_from: int | None = None if trigger.in_reasoning else 0  # where the searchable text begins
        self._scanned = 0  # markers were searched up to here
        self._searched_reasoning = 0  # the reasoning's end marker was searched up to here
        self._settled = trigger.reasoning is None or trigger.in_reasoning  # whether a reasoning block can still open

    def feed(self, piece: bytes) -> str | None:
        """Note one token's text; the constrained text the first time a trigger matches.

        The constrained text runs from the call's opening to here.
        """
        self._text += self._decoder.decode(piece)
        if not self._find_answer():
            return None
        begin = self._answer_from or 0
        longest = max((len(m) for m in self._trigger.markers), default=0)
        searched_from = begin + max(0, self._scanned - longest)  # only the new text, and a marker that straddles it
        starts = [i for m in self._trigger.markers if (i := self._text.find(m, searched_from)) >= 0]
        self._scanned = len(self._text) - begin
        if starts:
            return self._text[min(starts) :]
        if self._scanned <= START_WINDOW:
            answer = self._text[begin:]
            for pattern in self._patterns:
                match = pattern.match(answer)
                if match:
                    return answer[match.start(1) if match.re.groups else match.start() :]
        return None

    def _find_answer(self) -> bool:
        """Whether the answer (past any reasoning) has begun; sets where it begins."""
        reasoning = self._trigger.reasoning
        if self._answer_from is None:  # inside the reasoning block: wait for its end
            assert reasoning is not None
            end = self._text.find(reasoning[1], self._searched_reasoning)
            self._searched_reasoning = max(0, len(self._text) - len(reasoning[1]) + 1)  # only new text next time
            if end < 0:
                return False
            self._answer_from = end + len(reasoning[1])
            self._settled = True
        if not self._settled:
            assert reasoning is not None
            lead = self._text.lstrip()
            if lead.startswith(reasoning[0]):  # the model opened a reasoning block: it ends before the answer
                self._answer_from = None
                self._text = lead[len(reasoning[0]) :]
                self._searched_reasoning = 0
                return self._find_answer()
            if reasoning[0].startswith(lead):
                return False  # blank so far, or the start of the reasoning marker
            self._settled = True
        return True
