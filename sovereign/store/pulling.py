"""`pull`: resolve a reference, try its sources in order, verify, and commit to the store atomically."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime

from filelock import Timeout

from sovereign.catalog import Catalog, ModelSpec
from sovereign.config import Settings
from sovereign.errors import AllSourcesFailed, InsufficientDisk, InvalidReference, ModelNotFound, PullError
from sovereign.refs import CatalogRef, ModelName, SourceRef, parse_name, parse_reference
from sovereign.store.files import discard, human_bytes
from sovereign.store.gguf_header import read_gguf_info
from sovereign.store.manifest import Manifest, ModelFile, SourceRecord
from sovereign.store.progress import PullReporter
from sovereign.store.sources import FetchContext, Fetched, make_source
from sovereign.store.sources.base import Expected
from sovereign.store.store import Store


@dataclass(frozen=True)
class PullOptions:
    """What the user can ask of a pull beyond the reference."""

    name: str | None = None  # store the model under this name instead of the derived one
    mirrors: tuple[str, ...] = ()
    copy_local: bool = False
    force: bool = False


@dataclass(frozen=True)
class PullPlan:
    """The name a pull will create and the sources to try, in order."""

    name: ModelName
    sources: tuple[SourceRef, ...]
    expected: Expected = Expected()
    spec: ModelSpec | None = None


@dataclass
class PullResult:
    """What a pull did."""

    manifest: Manifest
    source: str
    already_present: bool = False
    failures: list[tuple[str, PullError]] = field(default_factory=list)


def plan_pull(reference: str, catalog: Catalog, options: PullOptions) -> PullPlan:
    """Turn what the user typed into a name and an ordered list of sources."""
    override = parse_name(options.name) if options.name else None  # validated before anything else
    ref = parse_reference(reference)
    if isinstance(ref, CatalogRef):
        spec = catalog.get(ref.name)
        if spec is None:
            similar = catalog.names_like(ref.name)
            hint = (
                f"known tags: {', '.join(similar)}"
                if similar
                else "run `sovereign catalog` to see known names, or pull hf.co/OWNER/REPO"
            )
            raise ModelNotFound(f"unknown model '{ref.name}'", hint)
        return PullPlan(override or spec.name, spec.sources, Expected(spec.sha256, spec.size), spec)
    return PullPlan(override or ref.default_name(), (ref,))


def pull(
    reference: str,
    *,
    settings: Settings,
    catalog: Catalog,
    store: Store,
    reporter: PullReporter,
    options: PullOptions = PullOptions(),
) -> PullResult:
    """Pull a model so that it appears in the store only when complete and verified."""
    plan = plan_pull(reference, catalog, options)
    lock = store.lock(f"pull:{plan.name}")
    try:
        lock.acquire(timeout=0.2)
    except Timeout:
        reporter.status(f"another pull of {plan.name} is running; waiting for it")
        lock.acquire()
    try:
        existing = store.get(plan.name)
        if existing and not options.force and all(p.exists() for p in store.file_paths(existing)):
            if plan.spec is None and existing.source.reference not in {make_source(s).describe() for s in plan.sources}:
                raise InvalidReference(
                    f"'{plan.name}' already holds a model from {existing.source.reference}",
                    "choose another name with --name, or `sovereign rm` it first",
                )
            return PullResult(existing, existing.source.reference, already_present=True)
        with store.pulling():
            return _pull_locked(plan, settings, store, reporter, options)
    except InsufficientDisk as exc:
        raise _with_partial_hint(exc, store, reference) from None
    finally:
        lock.release()


def _with_partial_hint(exc: InsufficientDisk, store: Store, reference: str) -> InsufficientDisk:
    """The disk is full and partial downloads hold part of it: say how much, and the two ways out."""
    _, held = store.partial_usage()
    if not held:
        return exc
    return InsufficientDisk(
        exc.message,
        f"partial downloads keep {human_bytes(held)} in {store.partial_dir}; free some space and run "
        f"`sovereign pull {reference}` again to resume, or `sovereign prune` to delete them",
    )


def _pull_locked(
    plan: PullPlan, settings: Settings, store: Store, reporter: PullReporter, options: PullOptions
) -> PullResult:
    failures: list[tuple[str, PullError]] = []
    for index, ref in enumerate(plan.sources):
        source = make_source(ref)
        if len(plan.sources) > 1:
            reporter.status(f"trying source {index + 1}/{len(plan.sources)}: {source.describe()}")
        ctx = FetchContext(store, settings, reporter, plan.expected, options.mirrors, options.copy_local)
        try:
            with store.lock(f"fetch:{source.describe()}"):
                fetched = source.fetch(ctx)
                manifest = _commit(plan, store, source.kind, source.describe(), fetched)
        except InsufficientDisk:
            raise  # another source would need the same space
        except PullError as exc:
            failures.append((source.describe(), exc))
            if index + 1 < len(plan.sources):
                reporter.status(f"source failed: {exc.message}")
            continue
        return PullResult(manifest, source.describe(), failures=failures)
    if len(failures) == 1:
        raise failures[0][1]
    summary = "; ".join(f"{where}: {exc.message}" for where, exc in failures)
    raise AllSourcesFailed(f"every source of {plan.name} failed: {summary}", failures[-1][1].hint, failures)


def _commit(plan: PullPlan, store: Store, kind: str, reference: str, fetched: Fetched) -> Manifest:
    """Read the header, move blobs into place and publish the manifest (in that order)."""
    try:
        info = read_gguf_info([f.path for f in fetched.files])
    except PullError:
        for file in fetched.files:
            if not file.in_place:
                discard(file.path)
        raise
    with store.gc_lock():
        files = []
        for file in fetched.files:
            if file.in_place:
                files.append(ModelFile(filename=file.filename, size=file.size, path=str(file.path)))
            else:
                placed = store.place_blob(file.path, file.sha256 or "")
                files.append(ModelFile(filename=file.filename, size=placed.size, digest=placed.digest))
        manifest = Manifest(
            name=str(plan.name),
            files=tuple(files),
            source=SourceRecord(kind=kind, reference=reference, detail=fetched.detail),
            gguf=info.to_json(),
            pulled_at=datetime.now(UTC).isoformat(timespec="seconds"),
            license=(plan.spec.license if plan.spec else None) or info.license,
            sha256_verified=all(f.verified for f in fetched.files),
        )
        store.save(plan.name, manifest)
    for folder in fetched.cleanup:
        shutil.rmtree(folder, ignore_errors=True)
    return manifest
