"""The calls a stream already sent as deltas, so that the closing ToolCallsEvent adds only the others."""

from __future__ import annotations

from collections.abc import Iterable

from sovereign.engine import ToolCall


class StreamedCalls:
    """Ids of the calls streamed piece by piece; the engine's ToolCallsEvent at the end lists every call again."""

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def mark(self, call_id: str) -> None:
        """Note a call whose deltas are being streamed."""
        self._ids.add(call_id)

    def unstreamed(self, calls: Iterable[ToolCall]) -> list[ToolCall]:
        """The calls not streamed yet (answers read whole: forced calls, generic formats), in their order."""
        return [call for call in calls if call.id not in self._ids]
