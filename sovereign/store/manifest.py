"""Manifests: what a store name points at (blobs or in-place files) plus the facts shown by list/show."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelFile:
    """One file of a model: a content-addressed blob, or a file registered in place."""

    filename: str
    size: int
    digest: str | None = None  # "sha256:<hex>" for blobs
    path: str | None = None  # absolute path for files registered in place (never deleted by rm)
    mtime_ns: int | None = None  # in-place files: the modification time seen when registered (for "changed")

    @property
    def in_place(self) -> bool:
        """Whether this file lives outside the store."""
        return self.path is not None


@dataclass(frozen=True)
class SourceRecord:
    """Where a model came from, for `show`."""

    kind: str  # hf | url | local | pip
    reference: str
    detail: str = ""


@dataclass(frozen=True)
class Manifest:
    """Everything the store knows about one name."""

    name: str
    files: tuple[ModelFile, ...]
    source: SourceRecord
    gguf: dict[str, Any]
    pulled_at: str
    license: str | None = None
    sha256_verified: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Total bytes of the model's files."""
        return sum(f.size for f in self.files)

    @property
    def digests(self) -> set[str]:
        """The blobs this manifest keeps alive."""
        return {f.digest for f in self.files if f.digest}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, with the schema version."""
        data = asdict(self)
        for entry in data["files"]:  # left out when unknown, so blob manifests read as before
            if entry.get("mtime_ns") is None:
                entry.pop("mtime_ns", None)
        data["schema"] = SCHEMA_VERSION
        data["size"] = self.size
        return data

    def dumps(self) -> str:
        """Serialized manifest text."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> Manifest:
        """Parse manifest text (raises ValueError/KeyError/TypeError when damaged)."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
            raise ValueError("not a manifest of schema 1")
        files = tuple(ModelFile(**f) for f in data["files"])
        # A digest becomes a path under blobs/ and is deleted by rm: accept nothing but a digest.
        if not files or any(
            not (f.digest and DIGEST.match(f.digest)) and not (f.path and f.digest is None) for f in files
        ):
            raise ValueError("a file entry has neither a valid digest nor an in-place path")
        return cls(
            name=data["name"],
            files=files,
            source=SourceRecord(**data["source"]),
            gguf=dict(data["gguf"]),
            pulled_at=data["pulled_at"],
            license=data.get("license"),
            sha256_verified=bool(data.get("sha256_verified")),
            extra=dict(data.get("extra") or {}),
        )
