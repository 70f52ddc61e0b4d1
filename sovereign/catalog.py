"""The catalog: models.toml -> ModelSpec (short names, ordered sources, hashes, templates).

The built-in catalog ships with the package; `$SOVEREIGN_HOME/models.toml` extends it and
overrides entries of the same name. See the header of models.toml for the format.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sovereign.config import Settings
from sovereign.errors import CatalogError, InvalidReference
from sovereign.refs import CatalogRef, ModelName, SourceRef, parse_name, parse_reference

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODEL_KEYS = {
    "description",
    "sources",
    "file",
    "sha256",
    "size",
    "license",
    "context_length",
    "stop",
    "template",
    "chat_template",
    "aliases",
    "shape",
}
_SHAPE_KEYS = {"params": int, "layers": int, "kv_heads": int, "head_dim": int, "quantization": str}


@dataclass(frozen=True)
class CatalogShape:
    """A model's size and attention shape as the catalog states it (for `fit`, before any download)."""

    params: int
    layers: int
    kv_heads: int
    head_dim: int
    quantization: str

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 keys and values for one token over every layer."""
        return self.layers * self.kv_heads * self.head_dim * 2 * 2


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry: where to get a model and how to run it."""

    name: ModelName
    sources: tuple[SourceRef, ...]
    description: str = ""
    file: str | None = None
    sha256: str | None = None
    size: int | None = None
    license: str | None = None
    context_length: int | None = None
    stop: tuple[str, ...] = ()
    chat_template: str | None = None
    aliases: tuple[ModelName, ...] = ()
    shape: CatalogShape | None = None
    defined_in: Path | None = None


@dataclass
class Catalog:
    """All known short names, with aliases, and the default model."""

    default: ModelName
    specs: dict[ModelName, ModelSpec] = field(default_factory=dict)
    aliases: dict[ModelName, ModelName] = field(default_factory=dict)

    def get(self, name: ModelName) -> ModelSpec | None:
        """The entry for a name or alias, or None."""
        return self.specs.get(self.aliases.get(name, name))

    def canonical(self, name: ModelName) -> ModelName:
        """The entry name an alias points at (the name itself otherwise)."""
        return self.aliases.get(name, name)

    def names_like(self, name: ModelName) -> list[str]:
        """Catalog names of the same family, to suggest when a tag is unknown."""
        return sorted(str(n) for n in self.specs if n.parts == name.parts)


def builtin_catalog_path() -> Path:
    """models.toml inside the installed package, or at the top of a source checkout."""
    packaged = resources.files("sovereign").joinpath("models.toml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "models.toml"


def _line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing needle (1 if absent), to point users at it."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    return 1


class _EntryReader:
    """Validates one [models."name"] table, raising CatalogError that names file and line."""

    def __init__(self, path: Path, text: str, key: str, table: Any, templates: dict[str, str]) -> None:
        self.path, self.text, self.key, self.table, self.templates = path, text, key, table, templates
        self.line = _line_of(text, f'"{key}"')

    def fail(self, problem: str) -> CatalogError:
        return CatalogError(
            f"{self.path}:{self.line}: model '{self.key}': {problem}",
            "fix the entry (see the header of the built-in models.toml)",
        )

    def typed(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.table.get(key, default)
        if value is not default and not isinstance(value, kind):
            raise self.fail(f"'{key}' must be {getattr(kind, '__name__', kind)}, not {type(value).__name__}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        values = self.typed(key, list, [])
        if not all(isinstance(v, str) for v in values):
            raise self.fail(f"'{key}' must be a list of strings")
        return tuple(values)

    def shape(self) -> CatalogShape | None:
        table = self.typed("shape", dict)
        if table is None:
            return None
        if set(table) != set(_SHAPE_KEYS):
            raise self.fail(f"'shape' must have exactly the keys {', '.join(_SHAPE_KEYS)}")
        for key, kind in _SHAPE_KEYS.items():
            if not isinstance(table[key], kind) or isinstance(table[key], bool) or (kind is int and table[key] <= 0):
                raise self.fail(f"'shape.{key}' must be a {'positive integer' if kind is int else 'string'}")
        return CatalogShape(**table)

    def read(self) -> ModelSpec:
        if not isinstance(self.table, dict):
            raise self.fail("must be a table")
        unknown = sorted(set(self.table) - _MODEL_KEYS)
        if unknown:
            raise self.fail(f"unknown key '{unknown[0]}' (known: {', '.join(sorted(_MODEL_KEYS))})")
        try:
            name = parse_name(self.key, default_tag="latest")
            aliases = tuple(parse_name(a) for a in self.strings("aliases"))
            refs = tuple(parse_reference(s) for s in self.strings("sources"))
        except InvalidReference as exc:
            raise self.fail(exc.message) from None
        sources = tuple(s for s in refs if not isinstance(s, CatalogRef))
        if not sources or len(sources) != len(refs):
            raise self.fail("'sources' must list at least one hf.co/, https://, pip: or local source")
        sha = self.typed("sha256", str)
        if sha is not None and not _SHA256.match(sha):
            raise self.fail("'sha256' must be 64 lower-case hex digits")
        template_name = self.typed("template", str)
        if template_name is not None and template_name not in self.templates:
            raise self.fail(f"template '{template_name}' is not defined under [templates]")
        return ModelSpec(
            name=name,
            sources=sources,
            description=self.typed("description", str, ""),
            file=self.typed("file", str),
            sha256=sha,
            size=self.typed("size", int),
            license=self.typed("license", str),
            context_length=self.typed("context_length", int),
            stop=self.strings("stop"),
            chat_template=self.templates.get(template_name or "", self.typed("chat_template", str)),
            aliases=aliases,
            shape=self.shape(),
            defined_in=self.path,
        )


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc.strerror}", "check the file's permissions") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The decoder's message already ends in "(at line N, column M)".
        raise CatalogError(f"{path}: invalid TOML: {exc}", "fix the syntax at that line") from None


def _merge_file(catalog: Catalog, path: Path, inherited_templates: dict[str, str]) -> dict[str, str]:
    text, data = _read_toml(path)
    templates = dict(inherited_templates)
    raw_templates = data.get("templates", {})
    if not isinstance(raw_templates, dict) or not all(isinstance(v, str) for v in raw_templates.values()):
        raise CatalogError(
            f"{path}:{_line_of(text, '[templates')}: [templates] must map names to strings", "fix the [templates] table"
        )
    templates.update(raw_templates)
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise CatalogError(
            f"{path}:{_line_of(text, 'models')}: 'models' must be a table", 'write entries as [models."family:tag"]'
        )
    for key, table in models.items():
        spec = _EntryReader(path, text, key, table, templates).read()
        catalog.specs[spec.name] = spec
        catalog.aliases.pop(spec.name, None)
        for alias in spec.aliases:
            catalog.aliases[alias] = spec.name
    if "default" in data:
        try:
            catalog.default = parse_name(str(data["default"]))
        except InvalidReference as exc:
            raise CatalogError(
                f"{path}:{_line_of(text, 'default')}: {exc.message}", "set default to a catalog name"
            ) from None
    return templates


def load_catalog(settings: Settings, builtin: Path | None = None) -> Catalog:
    """The built-in catalog merged with the user's `$SOVEREIGN_HOME/models.toml`, if present."""
    catalog = Catalog(default=parse_name("gemma3:270m"))
    templates = _merge_file(catalog, builtin or builtin_catalog_path(), {})
    if settings.user_catalog.is_file():
        _merge_file(catalog, settings.user_catalog, templates)
    if catalog.get(catalog.default) is None:
        raise CatalogError(f"the default model '{catalog.default}' is not in the catalog", "add it or change 'default'")
    return catalog
