"""What every source receives and returns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sovereign.config import Settings
from sovereign.store.progress import PullReporter
from sovereign.store.store import Store

SHARD_PATTERN = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class Expected:
    """What the catalog promises about a single-file model (None where unknown)."""

    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class FetchContext:
    """Everything a source needs to fetch: where to stage, what to expect, whom to tell."""

    store: Store
    settings: Settings
    reporter: PullReporter
    expected: Expected = Expected()
    mirrors: tuple[str, ...] = ()  # extra Hugging Face endpoints from --mirror, tried first
    copy_local: bool = False


@dataclass(frozen=True)
class FetchedFile:
    """One complete, checked file: staged in the store's partial folder, or in place."""

    path: Path
    filename: str
    size: int
    sha256: str | None  # known for every staged file; None only for files registered in place
    verified: bool  # sha256 matched a value promised before the download
    in_place: bool = False


@dataclass
class Fetched:
    """A source's result: the model's files in order (split 1 first) and where they came from."""

    files: list[FetchedFile]
    detail: str = ""
    cleanup: list[Path] = field(default_factory=list)  # staging folders to delete once committed


class Source(Protocol):
    """Fetches one reference's bytes into the store's staging area."""

    kind: str

    def describe(self) -> str:
        """A short human description, e.g. 'hf.co/owner/repo:Q4_K_M'."""

    def fetch(self, ctx: FetchContext) -> Fetched:
        """Fetch and check the model's files, or raise a PullError."""


def shard_siblings(names: list[str], first: str) -> list[str]:
    """All split files of the set `first` belongs to, in order (just [first] if it is not split)."""
    match = SHARD_PATTERN.match(Path(first).name)
    if not match:
        return [first]
    folder = str(Path(first).parent)
    wanted = [f"{match['prefix']}-{i:05d}-of-{match['count']}.gguf" for i in range(1, int(match["count"]) + 1)]
    by_name = {Path(n).name: n for n in names if str(Path(n).parent) == folder}
    return [by_name.get(w, str(Path(folder) / w) if folder != "." else w) for w in wanted]
