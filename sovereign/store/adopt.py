"""`adopt`: register the GGUF models other tools already downloaded, without copying a byte.

Stores scanned, in this order (the first to claim a name keeps it):

    ollama    $OLLAMA_MODELS or ~/.ollama/models
              manifests/<host>/<namespace>/<model>/<tag> (JSON); the layer of mediaType
              application/vnd.ollama.image.model is the GGUF, at blobs/sha256-<hex>
    hf        $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
              models--<org>--<repo>/snapshots/<rev>/**.gguf (symlinks into blobs/)
    lmstudio  ~/.lmstudio/models/<publisher>/<repo>/**.gguf and ~/.cache/lm-studio/models/…
    llamacpp  $LLAMA_CACHE, else ~/.cache/llama.cpp: <org>_<repo>_<file>.gguf

Names, derived from where a model lies and nothing else:

    ollama    registry.ollama.ai/library/qwen3/8b   -> qwen3:8b
              registry.ollama.ai/user/model/tag     -> user/model:tag
              hf.co/org/repo/Q4_K_M (other hosts)   -> hf.co/org/repo:Q4_K_M
    hf        models--org--repo/…/x-Q4_K_M.gguf     -> hf.co/org/repo:Q4_K_M
    lmstudio  publisher/repo/x-Q4_K_M.gguf          -> publisher/repo:Q4_K_M
    llamacpp  org_repo_x-Q4_K_M.gguf                -> hf.co/org/repo:Q4_K_M

The tag is the quantization found at the end of the file name (split suffix removed); without
one, or when two files of a repository share it, the file's stem. Split files
(-00001-of-0000N.gguf) are one model; vision projectors (mmproj) are left out.

Clashes are skipped, never suffixed, so a name always means the same file: a name that already
holds a different model in the store, or that an earlier store of this scan claimed, is skipped
with the reason (`sovereign pull PATH --name OTHER` registers such a file under another name).
A model already in the store (same file, or same sha256) is left as it is, so adopting again is
a no-op. An adopted model whose original was since deleted or changed is adopted afresh.

How a file is registered, never by copying: a hard link into blobs/ when the store is on the same
file system and the kernel allows it (the file is hashed and becomes an ordinary blob, so deleting
the original frees no space until `sovereign rm`); otherwise a reference to the file in place
(ModelFile.path, with its size and mtime, so `list` can tell when it goes missing or changes).
Ollama's Go chat templates are not translated: a model whose GGUF has no template of its own is
reported as such.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sovereign.errors import InvalidReference, PullError, StoreError
from sovereign.refs import ModelName, parse_name, sanitize_tag
from sovereign.store.files import sha256_file
from sovereign.store.gguf_header import has_gguf_magic, read_gguf_info
from sovereign.store.manifest import Manifest, ModelFile, SourceRecord
from sovereign.store.progress import NullReporter, PullReporter
from sovereign.store.sources.base import SHARD_PATTERN
from sovereign.store.store import Store

LAYOUTS = ("ollama", "hf", "lmstudio", "llamacpp")
LAYOUT_LABELS = {"ollama": "Ollama", "hf": "Hugging Face cache", "lmstudio": "LM Studio", "llamacpp": "llama.cpp cache"}
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_TEMPLATE_LAYER = "application/vnd.ollama.image.template"
OLLAMA_REGISTRY = "registry.ollama.ai"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_QUANT = re.compile(r"(?:^|[-_.])((?:UD-)?(?:I?Q\d[A-Za-z0-9_]*|TQ\d_\d|BF16|F16|FP16|F32|MXFP4))$", re.IGNORECASE)
NO_TEMPLATE_NOTE = (
    "its GGUF has no chat template and Ollama's Go template is not translated: a generic template will be used"
)


@dataclass(frozen=True)
class Candidate:
    """One model found in another tool's store."""

    layout: str  # ollama | hf | lmstudio | llamacpp
    name: str  # the derived store name (checked by adopt; an invalid one is skipped)
    files: tuple[Path, ...]  # as found (an HF snapshot's symlinks unresolved), split 1 first
    origin: str  # where the tool knows it from, e.g. "qwen3:8b" or "org/repo@rev"
    digests: tuple[str | None, ...] = ()  # sha256 hex the tool names each file by, where it does
    problem: str = ""  # why it cannot be adopted, found while scanning

    @property
    def size(self) -> int:
        """Bytes of the model's files (0 for files that are gone)."""
        total = 0
        for path in self.files:
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total


@dataclass
class Outcome:
    """What adopt did (or, with dry_run, would do) with one candidate."""

    candidate: Candidate
    action: str  # adopted | would adopt | present | skipped
    name: str
    how: str = ""  # hard link | in place (predicted for a dry run)
    reason: str = ""  # why skipped, or which name already holds it
    notes: list[str] = field(default_factory=list)
    manifest: Manifest | None = None


@dataclass
class AdoptReport:
    """Every candidate's outcome, in scan order, and the folders that were looked at."""

    outcomes: list[Outcome]
    scanned: dict[str, list[Path]]


# -- where the stores are ----------------------------------------------------------------------


def store_roots(environ: Mapping[str, str] | None = None, home: Path | None = None) -> dict[str, list[Path]]:
    """The folders each tool keeps its models in, from the environment (existing or not)."""
    env = os.environ if environ is None else environ
    home = home or Path(env.get("HOME") or Path.home())
    hf_cache = env.get("HF_HUB_CACHE") or (
        str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else str(home / ".cache" / "huggingface" / "hub")
    )
    return {
        "ollama": [Path(env.get("OLLAMA_MODELS") or home / ".ollama" / "models").expanduser()],
        "hf": [Path(hf_cache).expanduser()],
        "lmstudio": [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"],
        "llamacpp": [Path(env.get("LLAMA_CACHE") or home / ".cache" / "llama.cpp").expanduser()],
    }


# -- naming ------------------------------------------------------------------------------------


def _stem(filename: str) -> str:
    """A GGUF file's name without .gguf and without a split suffix."""
    match = SHARD_PATTERN.match(Path(filename).name)
    return match["prefix"] if match else Path(filename).name.removesuffix(".gguf")


def quant_tag(filename: str) -> str:
    """The quantization at the end of a file name (upper case), else the sanitized stem."""
    stem = _stem(filename)
    match = _QUANT.search(stem)
    return match[1].upper() if match else sanitize_tag(stem)


def _tags(files: list[str]) -> list[str]:
    """A tag for each model file of one repository: its quantization, or its stem where two share one."""
    tags = [quant_tag(f) for f in files]
    return [tag if tags.count(tag) == 1 else sanitize_tag(_stem(f)) for f, tag in zip(files, tags, strict=True)]


def _part(text: str) -> str:
    return sanitize_tag(text)


# -- finding models --------------------------------------------------------------------------


def _model_sets(files: Iterable[Path]) -> Iterator[tuple[Path, ...] | tuple[Path, str]]:
    """Group .gguf files into models: a single file, or a complete split set (else a problem)."""
    files = sorted(f for f in files if "mmproj" not in f.name.lower())
    by_name = {(f.parent, f.name): f for f in files}
    for path in files:
        match = SHARD_PATTERN.match(path.name)
        if not match:
            yield (path,)
            continue
        if match["index"] != "00001":
            continue
        count = int(match["count"])
        wanted = [f"{match['prefix']}-{i:05d}-of-{match['count']}.gguf" for i in range(1, count + 1)]
        found = [by_name.get((path.parent, w)) for w in wanted]
        missing = [w for w, f in zip(wanted, found, strict=True) if f is None]
        if missing:
            yield (path, f"split files missing next to it: {', '.join(missing)}")
        else:
            yield tuple(f for f in found if f is not None)


def _hex_name(path: Path) -> str | None:
    """The sha256 a content-addressed file is named by (HF blobs, Ollama's sha256-<hex>)."""
    try:
        name = path.resolve().name.removeprefix("sha256-").removeprefix("sha256:")
    except OSError:
        return None
    return name if _SHA256_HEX.match(name) else None


def scan_ollama(root: Path) -> Iterator[Candidate]:
    """Every tag under Ollama's manifests/ whose model layer is a blob here."""
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    for path in sorted(p for p in manifests.rglob("*") if p.is_file()):
        parts = path.relative_to(manifests).parts
        if len(parts) < 3 or any(p.startswith(".") for p in parts):
            continue
        host, *model_parts, tag = parts
        if host == OLLAMA_REGISTRY:
            if model_parts[0] == "library" and len(model_parts) == 2:
                model_parts = model_parts[1:]
            name_parts = model_parts
        else:
            name_parts = [host, *model_parts]
        name = f"{'/'.join(name_parts)}:{tag}"
        origin = (
            f"{'/'.join(model_parts)}:{tag}" if host == OLLAMA_REGISTRY else f"{host}/{'/'.join(model_parts)}:{tag}"
        )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            layers = data["layers"]
            model = next((layer for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER), None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            yield Candidate("ollama", name, (path,), origin, problem="its Ollama manifest cannot be read")
            continue
        if model is None:
            continue  # an adapter, a projector alone, or a cloud model: nothing to run here
        digest = str(model.get("digest", ""))
        hexdigest = digest.removeprefix("sha256:")
        if not _SHA256_HEX.match(hexdigest):
            yield Candidate(
                "ollama", name, (path,), origin, problem=f"its model layer has no sha256 digest ({digest or 'none'})"
            )
            continue
        blob = root / "blobs" / f"sha256-{hexdigest}"
        has_template = any(layer.get("mediaType") == OLLAMA_TEMPLATE_LAYER for layer in layers)
        problem = "" if blob.is_file() else f"its model blob {blob.name} is missing"
        yield Candidate(
            "ollama",
            name,
            (blob,),
            origin + (" (with an Ollama template)" if has_template else ""),
            (hexdigest,),
            problem,
        )


def _snapshot_order(repo_dir: Path) -> list[Path]:
    """A repository's snapshots, the one refs/main points at first."""
    snapshots = (
        sorted(p for p in (repo_dir / "snapshots").iterdir() if p.is_dir()) if (repo_dir / "snapshots").is_dir() else []
    )
    try:
        main = (repo_dir / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        main = ""
    return sorted(snapshots, key=lambda p: p.name != main)


def scan_hf(root: Path) -> Iterator[Candidate]:
    """Every GGUF model in the Hugging Face hub cache (one per file path, the main revision first)."""
    if not root.is_dir():
        return
    for repo_dir in sorted(root.glob("models--*--*")):
        org, _, repo = repo_dir.name.removeprefix("models--").partition("--")
        seen: set[str] = set()
        found: list[tuple[tuple[Path, ...] | tuple[Path, str], str, str]] = []
        for snapshot in _snapshot_order(repo_dir):
            for model in _model_sets(snapshot.rglob("*.gguf")):
                relative = model[0].relative_to(snapshot).as_posix()
                if relative not in seen:
                    seen.add(relative)
                    found.append((model, snapshot.name, relative))
        tags = _tags([relative for _, _, relative in found])
        for (model, revision, _), tag in zip(found, tags, strict=True):
            yield _candidate("hf", f"hf.co/{_part(org)}/{_part(repo)}:{tag}", model, f"{org}/{repo}@{revision[:12]}")


def _candidate(layout: str, name: str, model: tuple[Path, ...] | tuple[Path, str], origin: str) -> Candidate:
    if len(model) == 2 and isinstance(model[1], str):
        return Candidate(layout, name, (model[0],), origin, problem=model[1])
    files = tuple(p for p in model if isinstance(p, Path))
    problem = next(
        (f"{p.name} points at a file that is missing (an unfinished download?)" for p in files if not p.is_file()), ""
    )
    return Candidate(layout, name, files, origin, tuple(_hex_name(p) for p in files), problem)


def scan_lmstudio(root: Path) -> Iterator[Candidate]:
    """Every GGUF model under LM Studio's <publisher>/<repo>/ folders."""
    if not root.is_dir():
        return
    for repo_dir in sorted(p for p in root.glob("*/*") if p.is_dir() and not p.name.startswith(".")):
        models = list(_model_sets(repo_dir.rglob("*.gguf")))
        tags = _tags([m[0].relative_to(repo_dir).as_posix() for m in models])
        publisher, repo = repo_dir.parent.name, repo_dir.name
        for model, tag in zip(models, tags, strict=True):
            yield _candidate("lmstudio", f"{_part(publisher)}/{_part(repo)}:{tag}", model, f"{publisher}/{repo}")


def _llamacpp_repos(root: Path) -> list[tuple[str, str]]:
    """(org, repo) pairs named by llama.cpp's manifest=<org>=<repo>=<tag>.json files, longest first."""
    pairs = set()
    for path in root.glob("manifest=*=*=*.json"):
        parts = path.name.removesuffix(".json").split("=")
        if len(parts) >= 4:
            pairs.add((parts[1], "=".join(parts[2:-1])))
    return sorted(pairs, key=lambda p: -len(p[0] + p[1]))


def split_llamacpp_name(stem: str, known: list[tuple[str, str]]) -> tuple[str, str, str] | None:
    """<org>_<repo>_<file> into its parts.

    By llama.cpp's manifests where they name it, else at '-GGUF_' or the first two '_'.
    """
    for org, repo in known:
        if stem.startswith(f"{org}_{repo}_"):
            return org, repo, stem[len(org) + len(repo) + 2 :]
    org, sep, rest = stem.partition("_")
    if not sep:
        return None
    marker = rest.upper().find("-GGUF_")
    if marker > 0:
        return org, rest[: marker + 5], rest[marker + 6 :]
    repo, sep, file = rest.partition("_")
    return (org, repo, file) if sep and repo and file else None


def scan_llamacpp(root: Path) -> Iterator[Candidate]:
    """Every GGUF model llama.cpp's -hf option downloaded into its cache."""
    if not root.is_dir():
        return
    known = _llamacpp_repos(root)
    models = list(_model_sets(p for p in root.glob("*.gguf") if p.is_file()))
    by_repo: dict[tuple[str, str], list[tuple[tuple[Path, ...] | tuple[Path, str], str]]] = {}
    loose = []
    for model in models:
        parts = split_llamacpp_name(model[0].name.removesuffix(".gguf"), known)
        if parts is None:
            loose.append(model)
        else:
            by_repo.setdefault((parts[0], parts[1]), []).append((model, parts[2] + ".gguf"))
    for (org, repo), entries in sorted(by_repo.items()):
        tags = _tags([file for _, file in entries])
        for (model, _file), tag in zip(entries, tags, strict=True):
            yield _candidate("llamacpp", f"hf.co/{_part(org)}/{_part(repo)}:{tag}", model, f"{org}/{repo}")
    for model in loose:
        yield _candidate("llamacpp", f"{sanitize_tag(_stem(model[0].name).lower())}:latest", model, model[0].name)


SCANNERS = {"ollama": scan_ollama, "hf": scan_hf, "lmstudio": scan_lmstudio, "llamacpp": scan_llamacpp}


def scan(
    layouts: Iterable[str] = LAYOUTS, environ: Mapping[str, str] | None = None
) -> tuple[list[Candidate], dict[str, list[Path]]]:
    """Every model found in the chosen tools' stores, in LAYOUTS order, and the folders looked at."""
    roots = store_roots(environ)
    chosen = [layout for layout in LAYOUTS if layout in set(layouts)]
    found: list[Candidate] = []
    seen: set[Path] = set()
    for layout in chosen:
        for root in roots[layout]:
            try:
                key = root.resolve()
            except OSError:
                continue
            if key in seen:
                continue
            seen.add(key)
            found.extend(SCANNERS[layout](root))
    return found, {layout: roots[layout] for layout in chosen}


# -- registering -----------------------------------------------------------------------------


class _Index:
    """What the store already holds, by in-place path and by digest."""

    def __init__(self, store: Store) -> None:
        self.by_path: dict[str, str] = {}
        self.by_digest: dict[str, str] = {}
        for manifest in store.list():
            self.add(manifest)

    def add(self, manifest: Manifest) -> None:
        """Remember a manifest's files (in-place paths, digests, and the originals it was adopted from)."""
        for model_file in manifest.files:
            if model_file.path:
                self._add_path(model_file.path, manifest.name)
            if model_file.digest:
                self.by_digest.setdefault(model_file.digest, manifest.name)
        for path in (manifest.extra.get("adopted") or {}).get("paths") or []:
            self._add_path(str(path), manifest.name)

    def _add_path(self, path: str, name: str) -> None:
        self.by_path.setdefault(path, name)
        try:
            self.by_path.setdefault(str(Path(path).resolve()), name)
        except OSError:
            pass

    def holder(self, candidate: Candidate) -> str | None:
        """The name that already holds this candidate's first file, if any."""
        first = candidate.files[0]
        for key in (str(first.absolute()), str(first.resolve())):
            if key in self.by_path:
                return self.by_path[key]
        digests = [d for d in candidate.digests if d]
        if digests and len(digests) == len(candidate.files):
            names = {self.by_digest.get(f"sha256:{d}") for d in digests}
            if len(names) == 1 and None not in names:
                return names.pop()
        return None


def _same_device(path: Path, store: Store) -> bool:
    """Whether a hard link from path into the store's blobs could work."""
    folder = store.blobs_dir if store.blobs_dir.exists() else store.home
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return path.resolve().stat().st_dev == folder.stat().st_dev
    except OSError:
        return False


def _stage_links(candidate: Candidate, staging: Path, reporter: PullReporter) -> list[tuple[Path, str, int]] | None:
    """Hard-link every file into the store's staging folder and hash it; None when the file system refuses a link."""
    linked: list[tuple[Path, str, int]] = []
    for index, path in enumerate(candidate.files):
        link = staging / path.name  # progress shows the file's own name
        link.unlink(missing_ok=True)
        try:
            os.link(path.resolve(), link)
        except OSError:
            return None  # another file system, a protected or foreign file, no link support
        sha = sha256_file(link, reporter, "verifying")
        claimed = candidate.digests[index] if index < len(candidate.digests) else None
        if claimed and sha != claimed:
            raise StoreError(
                f"{path} does not match the sha256 its store names it by ({claimed[:12]}…, read {sha[:12]}…)",
                "the file is damaged: download it again with its own tool",
            )
        linked.append((link, sha, link.stat().st_size))
    return linked


def _place_links(candidate: Candidate, store: Store, linked: list[tuple[Path, str, int]]) -> list[ModelFile]:
    """Move staged links into blobs/ (call with the gc lock held); a blob already there is kept."""
    store.blobs_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for (link, sha, size), path in zip(linked, candidate.files, strict=True):
        target = store.blob_path(f"sha256:{sha}")
        if target.exists() and target.stat().st_size == size:
            link.unlink()
        else:
            os.replace(link, target)
        files.append(ModelFile(filename=path.name, size=size, digest=f"sha256:{sha}"))
    return files


def _in_place(candidate: Candidate) -> list[ModelFile]:
    """Reference the files where they are, recording size and mtime to notice changes later."""
    files = []
    for path in candidate.files:
        stat = path.stat()
        files.append(
            ModelFile(filename=path.name, size=stat.st_size, path=str(path.absolute()), mtime_ns=stat.st_mtime_ns)
        )
    return files


def _check(
    candidate: Candidate, store: Store, index: _Index, claimed: dict[str, str]
) -> tuple[ModelName | None, Outcome | None]:
    """The name to adopt a candidate under, or the outcome that says why not."""

    def skip(reason: str) -> tuple[None, Outcome]:
        return None, Outcome(candidate, "skipped", candidate.name, reason=reason)

    if candidate.problem:
        return skip(candidate.problem)
    try:
        name = parse_name(candidate.name)
    except InvalidReference:
        return skip(f"'{candidate.name}' is not a valid sovereign name")
    holder = index.holder(candidate)
    if holder is not None:
        held = store.get(parse_name(holder))
        if held is not None and (store.file_status(held) == "ok" or holder != str(name)):
            return None, Outcome(
                candidate,
                "present",
                holder,
                reason="already in the store" if holder == str(name) else f"already in the store as {holder}",
            )
    if str(name) in claimed:
        return skip(f"{name} was already found in the {LAYOUT_LABELS[claimed[str(name)]]}")
    try:
        existing = store.get(name)
    except StoreError as exc:
        return skip(exc.message)
    if (
        existing is not None
        and holder != str(name)
        and not (existing.source.kind == "adopt" and store.file_status(existing) != "ok")
    ):
        return skip(
            f"{name} already names another model "
            f"(register this one with `sovereign pull {candidate.files[0]} --name OTHER`)"
        )
    for path in candidate.files:
        if not has_gguf_magic(path):
            return skip(f"{path.name} is not a GGUF file")
    return name, None


def adopt(
    store: Store,
    layouts: Iterable[str] = LAYOUTS,
    *,
    dry_run: bool = False,
    reporter: PullReporter | None = None,
    environ: Mapping[str, str] | None = None,
) -> AdoptReport:
    """Find the models of other tools' stores and register each one (hard link, else in place); never copies."""
    reporter = reporter or NullReporter()
    candidates, scanned = scan(layouts, environ)
    index = _Index(store)
    claimed: dict[str, str] = {}
    outcomes: list[Outcome] = []
    with store.pulling():
        for candidate in candidates:
            try:
                outcome = _adopt_one(candidate, store, index, claimed, dry_run, reporter)
            except (PullError, StoreError) as exc:
                outcome = Outcome(candidate, "skipped", candidate.name, reason=exc.message)
            except OSError as exc:
                outcome = Outcome(
                    candidate,
                    "skipped",
                    candidate.name,
                    reason=f"{exc.strerror or exc} ({exc.filename or candidate.files[0]})",
                )
            if outcome.action in ("adopted", "would adopt"):
                claimed[outcome.name] = candidate.layout
            outcomes.append(outcome)
    return AdoptReport(outcomes, scanned)


def _adopt_one(
    candidate: Candidate, store: Store, index: _Index, claimed: dict[str, str], dry_run: bool, reporter: PullReporter
) -> Outcome:
    name, outcome = _check(candidate, store, index, claimed)
    if outcome is not None or name is None:
        return outcome or Outcome(candidate, "skipped", candidate.name, reason="no name")
    info = read_gguf_info([p.resolve() for p in candidate.files])
    notes = [NO_TEMPLATE_NOTE] if candidate.layout == "ollama" and not info.has_chat_template else []
    if dry_run:
        how = "hard link" if all(_same_device(p, store) for p in candidate.files) else "in place"
        return Outcome(candidate, "would adopt", str(name), how=how, notes=notes)
    staging = store.partial_path(f"adopt:{candidate.files[0].absolute()}")
    try:
        with store.lock(f"pull:{name}"):
            linked = _stage_links(candidate, staging, reporter)
            how = "hard link" if linked is not None else "in place"
            verified = linked is not None and len(candidate.digests) == len(candidate.files) and all(candidate.digests)
            with (
                store.gc_lock()
            ):  # blobs placed and the manifest naming them published under one lock, so prune cannot race
                files = _place_links(candidate, store, linked) if linked is not None else _in_place(candidate)
                manifest = Manifest(
                    name=str(name),
                    files=tuple(files),
                    source=SourceRecord(
                        kind="adopt",
                        reference=str(candidate.files[0].absolute()),
                        detail=f"{LAYOUT_LABELS[candidate.layout]} {candidate.origin}, {how}",
                    ),
                    gguf=info.to_json(),
                    pulled_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    license=info.license,
                    sha256_verified=verified,
                    extra={
                        "adopted": {
                            "layout": candidate.layout,
                            "origin": candidate.origin,
                            "paths": [str(p.absolute()) for p in candidate.files],
                        }
                    },
                )
                store.save(name, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    index.add(manifest)
    return Outcome(candidate, "adopted", str(name), how=how, notes=notes, manifest=manifest)
