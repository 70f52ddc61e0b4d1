"""The local model store: manifests, content-addressed blobs, pulls from every kind of source."""

from __future__ import annotations

from sovereign.store.manifest import Manifest, ModelFile, SourceRecord
from sovereign.store.model_settings import spec_from_manifest
from sovereign.store.progress import NullReporter, PullReporter
from sovereign.store.pull import PullOptions, PullResult, plan_pull, pull
from sovereign.store.store import Store

__all__ = [
    "Manifest", "ModelFile", "NullReporter", "PullOptions", "PullReporter", "PullResult",
    "SourceRecord", "Store", "plan_pull", "pull", "spec_from_manifest",
]
