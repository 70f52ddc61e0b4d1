"""Progress by callback: the store reports what it is doing and how many bytes moved; only the CLI draws."""

from __future__ import annotations

from typing import Protocol


class PullReporter(Protocol):
    """Receives a pull's progress. Every method must be cheap; they run on the download path."""

    def status(self, message: str) -> None:
        """A line of news: the source being tried, a fallback, a resume."""

    def begin(self, label: str, total: int | None, completed: int = 0) -> None:
        """A byte-counted phase starts (download, assembly, verification)."""

    def advance(self, nbytes: int) -> None:
        """nbytes more of the current phase are done."""

    def end(self) -> None:
        """The current phase is over."""


class NullReporter:
    """A reporter that ignores everything (library use and tests)."""

    def status(self, message: str) -> None:
        """Ignore a status line."""

    def begin(self, label: str, total: int | None, completed: int = 0) -> None:
        """Ignore a phase start."""

    def advance(self, nbytes: int) -> None:
        """Ignore progress."""

    def end(self) -> None:
        """Ignore a phase end."""
