"""The catalog settings a manifest carries: a ModelSpec's run settings into a manifest, and back into a spec.

An imported model may be unknown to the local models.toml; its bundle carries what the catalog said
about running it (template, stops, context, license), kept in the manifest under CATALOG_EXTRA.
"""

from __future__ import annotations

from typing import Any

from sovereign.catalog import ModelSpec
from sovereign.refs import parse_name
from sovereign.store.manifest import Manifest

CATALOG_EXTRA = "catalog"  # Manifest.extra key holding the catalog settings a bundle carried


def catalog_settings(spec: ModelSpec | None, manifest: Manifest) -> dict[str, Any] | None:
    """What the catalog says about running a model (template, stops, context, license), for the bundle."""
    if spec is None:
        carried = manifest.extra.get(CATALOG_EXTRA)  # imported before: pass it on
        return dict(carried) if isinstance(carried, dict) else None
    return {
        "name": str(spec.name),
        "description": spec.description,
        "chat_template": spec.chat_template,
        "stop": list(spec.stop),
        "context_length": spec.context_length,
        "license": spec.license,
    }


def extra_with_settings(extra: dict[str, Any], settings: Any) -> dict[str, Any]:
    """A manifest's extra holding the catalog settings a bundle carried (as it was when it carried none)."""
    return {**extra, CATALOG_EXTRA: settings} if settings else extra


def spec_from_manifest(manifest: Manifest) -> ModelSpec | None:
    """A catalog entry rebuilt from the settings an imported model carries (None if it carries none).

    The engine's pool can fall back to it when the local catalog does not know the model:
    `return self.catalog.get(parse_name(manifest.name)) or spec_from_manifest(manifest)`.
    """
    data = manifest.extra.get(CATALOG_EXTRA)
    if not isinstance(data, dict):
        return None
    stop = data.get("stop") or []
    context = data.get("context_length")
    return ModelSpec(
        name=parse_name(manifest.name),
        sources=(),
        description=str(data.get("description") or ""),
        license=data.get("license") if isinstance(data.get("license"), str) else None,
        context_length=context if isinstance(context, int) and context > 0 else None,
        stop=tuple(s for s in stop if isinstance(s, str)) if isinstance(stop, list) else (),
        chat_template=data.get("chat_template") if isinstance(data.get("chat_template"), str) else None,
    )
