"""Where a long text may be cut into pieces that tokenize, one by one, exactly as the whole would.

llama.cpp first splits special and user-defined tokens out of a text (Gemma's runs of newlines,
tabs and spaces, its HTML tags), then tokenizes each stretch between them on its own. That split
is quadratic in how many it finds (each split walks its list from the start): 20,000 short lines
took seconds, 50 MB minutes. Pieces of about a kilobyte, cut only where the split would cut
anyway, make the whole linear.

A cut is exact right after a split-out token that is certain to be split out, with no split-out
token able to reach across the cut. Two kinds are certain:
- an "isolated" token: no split-out token contains it or overlaps it (prefix against suffix),
  so nothing can claim any part of an occurrence before it does (Gemma's tags, `<b>`);
- the end of a maximal run of one byte when every split-out token holding that byte is a run of
  it (Gemma's newlines, tabs, spaces): longer runs are matched first, leftmost first, so what is
  left at the run's end follows from its length alone.
Vocabularies with tokens that strip neighbouring spaces (LSTRIP/RSTRIP) get no cuts at all.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

PIECE_BYTES = 1_024  # a piece holds a few hundred split-out tokens at most: ~0.1 ms each, where 16 KB took 0.4 s
# llama.cpp splits out UNKNOWN, CONTROL and USER_DEFINED tokens when parsing special tokens, and without
# that only those USER_DEFINED tokens that are neither of the others (Gemma's </s> is both: not split out).
_ATTR_USER_DEFINED = 1 << 4
_ATTR_SPECIAL = (1 << 0) | (1 << 3)  # UNKNOWN | CONTROL
_ATTR_STRIPS = (1 << 7) | (1 << 8)  # LSTRIP | RSTRIP


@dataclass(frozen=True)
class Cutter:
    """Finds exact cut points for one split-out set (one per value of `special`)."""

    pattern: re.Pattern[bytes]  # isolated tokens (group "token") and runs of run bytes
    runs: dict[int, tuple[int, ...]]  # run byte -> lengths of its split-out runs, longest first

    def pieces(self, data: bytes, size: int = PIECE_BYTES) -> Iterator[bytes]:
        """`data` in pieces of about `size` bytes, cut only at exact points (one piece when there are none)."""
        start = 0
        while len(data) - start > size:
            cut = self._next_cut(data, start + size)
            if cut is None:
                break
            yield data[start:cut]
            start = cut
        yield data[start:]

    def _next_cut(self, data: bytes, position: int) -> int | None:
        for match in self.pattern.finditer(data, position):
            if match.lastgroup == "token":
                return match.end()
            byte, begin = data[match.end() - 1], match.start()
            while begin > 0 and data[begin - 1] == byte:  # the run may have begun before `position`
                begin -= 1
            if _run_end_claimed(match.end() - begin, self.runs[byte]):
                return match.end()
        return None


def _run_end_claimed(length: int, lengths: tuple[int, ...]) -> bool:
    """Whether a run's last byte ends up in a split-out token.

    Each length, longest first, takes blocks from the left.
    """
    for size in lengths:
        if length >= size:
            length %= size
    return length == 0


@dataclass(frozen=True)
class TokenizerCuts:
    """Cut finders for a vocabulary, and the most bytes one token stands for."""

    longest_token: int
    plain: Cutter | None  # for tokenizing with special=False
    special: Cutter | None  # for special=True

    @staticmethod
    def of(llama: Any, vocab: Any, n_vocab: int) -> TokenizerCuts:
        """Scan the vocabulary once (about a second for 262k tokens)."""
        always: list[bytes] = []
        special_only: list[bytes] = []
        strips = False
        buffer = ctypes.create_string_buffer(256)
        longest = 1
        for token in range(n_vocab):
            longest = max(longest, abs(llama.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)))
            attr = llama.llama_vocab_get_attr(vocab, token)
            if attr & (_ATTR_USER_DEFINED | _ATTR_SPECIAL):
                strips = strips or bool(attr & _ATTR_STRIPS)
                text = llama.llama_vocab_get_text(vocab, token) or b""
                (special_only if attr & _ATTR_SPECIAL else always).append(text)
        if strips:
            return TokenizerCuts(longest, None, None)
        return TokenizerCuts(longest, cutter(always, always), cutter(always + special_only, always))


def cutter(split_out: list[bytes], candidates: list[bytes]) -> Cutter | None:
    """The cut finder for a split-out set, cutting after those `candidates` that are isolated (None: no cuts)."""
    texts = {text for text in split_out if text}
    inside = {
        text[i:j]
        for text in texts
        for i in range(len(text))
        for j in range(i + 1, len(text) + 1)
        if (i, j) != (0, len(text))
    }
    prefixes = {text[:k] for text in texts for k in range(1, len(text))}
    suffixes = {text[k:] for text in texts for k in range(1, len(text))}
    isolated = sorted(
        (
            text
            for text in set(candidates) & texts
            if text not in inside
            and not any(text[k:] in prefixes for k in range(1, len(text)))
            and not any(text[:k] in suffixes for k in range(1, len(text)))
        ),
        key=lambda text: (-len(text), text),
    )
    runs: dict[int, tuple[int, ...]] = {}
    for byte in {b for text in texts for b in text if b < 0x80}:
        holding = [text for text in texts if byte in text]
        if all(text == bytes([byte]) * len(text) for text in holding):
            runs[byte] = tuple(sorted({len(text) for text in holding}, reverse=True))
    parts = []
    if isolated:
        parts.append(b"(?P<token>" + b"|".join(re.escape(text) for text in isolated) + b")")
    if runs:
        parts.append(b"(?P<run>" + b"|".join(re.escape(bytes([byte])) + b"++" for byte in sorted(runs)) + b")")
    return Cutter(re.compile(b"|".join(parts)), runs) if parts else None
