"""A download's partial file and its JSON sidecar: what proves the bytes held so far may be resumed.

The sidecar holds one of two records; partial downloads already on disk use them, so they stay byte for byte:

    {"validator": "<etag>"}                                                 a single stream
    {"validator": "<etag>", "size": N, "segment": S, "done": [d0, d1, ...]}  a parallel download
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

from sovereign.errors import InsufficientDisk
from sovereign.store.files import human_bytes, sidecar_path
from sovereign.store.http.transport import validator_of

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class SegmentRecord:
    """A parallel download's resume record: validator, file size, segment size and bytes done per segment."""

    validator: str
    size: int
    segment: int
    done: tuple[int, ...]

    @property
    def count(self) -> int:
        """How many segments the file is cut into."""
        return -(-self.size // self.segment)

    @classmethod
    def fresh(cls, validator: str, size: int, segment: int) -> SegmentRecord:
        """The record of a download that has not written a byte yet."""
        return cls(validator, size, segment, (0,) * -(-size // segment))

    @classmethod
    def from_json(cls, state: object) -> SegmentRecord | None:
        """The record a sidecar's parsed JSON holds, or None when it is not a whole, consistent one."""
        if not isinstance(state, dict) or not all(k in state for k in ("validator", "size", "segment", "done")):
            return None
        validator, size, segment, done = state["validator"], state["size"], state["segment"], state["done"]
        valid = (
            isinstance(validator, str)
            and isinstance(size, int)
            and isinstance(segment, int)
            and segment > 0
            and size >= 0
            and isinstance(done, list)
            and len(done) == -(-size // segment)
            and all(isinstance(d, int) and d >= 0 for d in done)
        )
        return cls(validator, size, segment, tuple(done)) if valid else None

    def to_json(self) -> str:
        """The sidecar's text, key for key what every earlier version wrote."""
        state = {"validator": self.validator, "size": self.size, "segment": self.segment, "done": list(self.done)}
        return json.dumps(state)


class Sidecar:
    """The ETag / Last-Modified of a partial file, so a changed remote file restarts the download."""

    def __init__(self, path: Path) -> None:
        self.path = sidecar_path(path)

    def load(self) -> str | None:
        """The validator a single stream recorded (None when there is none to trust)."""
        try:
            return json.loads(self.path.read_text()).get("validator")
        except (OSError, ValueError, AttributeError):
            return None

    def save(self, response: httpx.Response) -> None:
        """Record the validator of the response a single stream is writing."""
        self.path.write_text(json.dumps({"validator": validator_of(response)}))

    def is_segmented(self) -> bool:
        """Whether the sidecar belongs to a parallel download (whose file size proves nothing)."""
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(state, dict) and ("segment" in state or "done" in state)

    def load_segments(self) -> SegmentRecord | None:
        """A parallel download's state: validator, size, segment size and bytes done per segment."""
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return SegmentRecord.from_json(state)

    def save_segments(self, record: SegmentRecord) -> None:
        """Record per-segment progress atomically: a torn sidecar must never claim bytes not written."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(record.to_json())
        os.replace(temporary, self.path)


def discard_partial(dest: Path) -> None:
    """Forget a partial file and its sidecar (not its folder: the download starts over in it)."""
    dest.unlink(missing_ok=True)
    sidecar_path(dest).unlink(missing_ok=True)


def disk_filled(dest: Path, held: int) -> InsufficientDisk:
    """The error for a disk that filled up midway, saying how much of the file is held."""
    return InsufficientDisk(
        f"the disk filled up while downloading {dest.name} ({human_bytes(held)} downloaded)",
        "free some space, or set SOVEREIGN_HOME to a bigger disk",
    )
