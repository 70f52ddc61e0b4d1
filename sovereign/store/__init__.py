"""The local model store: manifests, content-addressed blobs, pulls from every kind of source.

Pulling (and with it the HTTP clients) loads on first use: a model's process reads GGUF headers
from this package, and `sovereign list` reads manifests, without either paying for the network code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sovereign.store.manifest import Manifest, ModelFile, SourceRecord
from sovereign.store.model_settings import spec_from_manifest
from sovereign.store.progress import NullReporter, PullReporter
from sovereign.store.store import Store

if TYPE_CHECKING:
    from sovereign.store.pulling import PullOptions, PullResult, plan_pull, pull

_LAZY = frozenset({"PullOptions", "PullResult", "plan_pull", "pull"})


def __getattr__(name: str) -> Any:
    """The pull's names, imported when first asked for (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("sovereign.store.pulling"), name)


__all__ = [
    "Manifest",
    "ModelFile",
    "NullReporter",
    "PullOptions",
    "PullReporter",
    "PullResult",
    "SourceRecord",
    "Store",
    "plan_pull",
    "pull",
    "spec_from_manifest",
]
