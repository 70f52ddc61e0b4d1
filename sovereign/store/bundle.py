"""Offline bundles: `export` writes models (and optionally the runtime) to a folder or tar; `import` lands them.

A bundle, as a folder or as the members of a tar:

    README.txt               the commands to run on the other side
    runtime.json             --with-runtime: the platform, Python and ABI the wheels are for
    wheels/*.whl             --with-runtime: sovereign and every dependency, for `pip install --no-index`
    models/<file>.gguf       each model file once (by content); with --split, <file>.gguf.part001, .part002, …
    sovereign-bundle.json    format version; per model: its manifest, catalog settings, source, files and pieces
    SHA256SUMS               sha256 of every other file (`sha256sum -c SHA256SUMS` checks it); written last

Import verifies every checksum before it registers anything, staging the model files in the store's partial
area (so a stick pulled out halfway leaves nothing registered, and the next import resumes) and committing
blobs and manifests only once every file is proven.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

from sovereign.catalog import Catalog
from sovereign.errors import BundleError, IntegrityError, ModelNotFound, StoreError
from sovereign.refs import ModelName, parse_name
from sovereign.store.files import CHUNK, ensure_free_space
from sovereign.store.gguf_header import has_gguf_magic
from sovereign.store.manifest import Manifest, ModelFile, SourceRecord
from sovereign.store.model_settings import catalog_settings, extra_with_settings
from sovereign.store.progress import NullReporter, PullReporter
from sovereign.store.runtime_wheels import (
    build_runtime,
    installed_version,
    runtime_mismatch,
)
from sovereign.store.store import Store

FORMAT = "sovereign-bundle"
FORMAT_VERSION = 1
BUNDLE_JSON = "sovereign-bundle.json"
SUMS = "SHA256SUMS"
README = "README.txt"
RUNTIME_JSON = "runtime.json"
FAT32_MAX = 4 * 1024**3 - 1  # the largest file a FAT32 stick holds
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
_QUIET = NullReporter()  # the default reporter (it holds no state, so one serves every call)


def parse_split(text: str) -> int:
    """'4G', '4GiB', '500M', '256K' -> bytes (binary units). Exactly 4 GiB becomes FAT32's limit, 4 GiB - 1 byte."""
    match = _SIZE.match(text)
    size = int(float(match[1]) * 1024 ** "_KMGT".index(match[2].upper() or "_")) if match else 0
    if size < 1:
        raise BundleError(
            f"--split takes a size such as 4G, 4GiB or 500M, not '{text}'", "for a FAT32 stick use --split 4G"
        )
    return FAT32_MAX if size == FAT32_MAX + 1 else size


def safe_relpath(name: str) -> str:
    """A bundle member name as a relative POSIX path inside the bundle, or BundleError (absolute, '..', odd)."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise BundleError(
            f"the bundle names an unsafe path: {name!r}", "the bundle was not made by `sovereign export`; refusing it"
        )
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if not parts or any(p == ".." for p in parts):
        raise BundleError(
            f"the bundle names an unsafe path: {name!r}", "the bundle was not made by `sovereign export`; refusing it"
        )
    return "/".join(parts)


# -- writing -----------------------------------------------------------------------------------------


class _HashingReader:
    """Reads `length` bytes of a file from `offset`, feeding every hash (a tar member's body, a piece)."""

    def __init__(self, handle: BinaryIO, length: int, hashes: Iterable[Any], reporter: PullReporter) -> None:
        self.handle, self.left, self.hashes, self.reporter = handle, length, list(hashes), reporter

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        block = self.handle.read(min(size, CHUNK * 4))
        if not block:
            raise BundleError(
                f"{getattr(self.handle, 'name', 'a file')} got shorter while it was exported", "export again"
            )
        self.left -= len(block)
        for h in self.hashes:
            h.update(block)
        self.reporter.advance(len(block))
        return block


class _Sink:
    """Where an export writes: a folder or a tar (file or stream). Returns each file's sha256."""

    def add_stream(self, rel: str, reader: _HashingReader, size: int) -> None:
        raise NotImplementedError

    def add_bytes(self, rel: str, data: bytes) -> str:
        digest = hashlib.sha256()
        self.add_stream(rel, _HashingReader(io.BytesIO(data), len(data), [digest], NullReporter()), len(data))
        return digest.hexdigest()

    def close(self) -> None:
        """Finish the bundle."""

    def abort(self) -> None:
        """Remove what was written."""


class _DirSink(_Sink):
    def __init__(self, root: Path) -> None:
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise BundleError(f"{root} exists and is not an empty folder", "export to a new folder, or a FILE.tar")
        self.created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.written = root, []  # type: ignore[var-annotated]

    def add_stream(self, rel: str, reader: _HashingReader, size: int) -> None:
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        self.written.append(target)
        with target.open("wb") as out:
            while block := reader.read(CHUNK):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())

    def abort(self) -> None:
        if self.created:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            for path in self.written:
                path.unlink(missing_ok=True)


class _TarSink(_Sink):
    def __init__(self, target: Path | None, stream: IO[bytes] | None = None) -> None:
        self.target = target
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            self.tmp: Path | None = Path(tmp)
            self.handle: IO[bytes] = os.fdopen(fd, "wb")
        else:
            self.tmp, self.handle = None, stream  # type: ignore[assignment]
        self.tar = tarfile.open(fileobj=self.handle, mode="w|", format=tarfile.PAX_FORMAT)
        self.mtime = int(time.time())

    def add_stream(self, rel: str, reader: _HashingReader, size: int) -> None:
        info = tarfile.TarInfo(rel)
        info.size, info.mode, info.mtime, info.type = size, 0o644, self.mtime, tarfile.REGTYPE
        self.tar.addfile(info, reader)

    def close(self) -> None:
        self.tar.close()
        self.handle.flush()
        if self.tmp is not None and self.target is not None:
            os.fsync(self.handle.fileno())
            self.handle.close()
            os.replace(self.tmp, self.target)

    def abort(self) -> None:
        if self.tmp is not None:
            self.handle.close()
            self.tmp.unlink(missing_ok=True)


@dataclass
class ExportResult:
    """What an export wrote."""

    models: list[str]
    files: int
    size: int
    target: str
    runtime: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _readme(models: list[Manifest], with_runtime: bool, split: bool) -> str:
    lines = [
        "sovereign model bundle",
        "",
        "Models: " + ", ".join(m.name for m in models),
        "",
        "On the other machine, in this folder (or next to the .tar):",
        "",
    ]
    if with_runtime:
        lines += ["  pip install --no-index --find-links wheels sovereign", ""]
    lines += [
        "  sovereign import .          (or: sovereign import BUNDLE.tar)",
        "",
        (
            "Every file is checked against SHA256SUMS before anything is registered (`sha256sum -c "
            "SHA256SUMS` checks it by hand)."
        ),
    ]
    if split:
        lines.append("Large model files are cut into .partNNN pieces; `sovereign import` puts them back together.")
    return "\n".join(lines) + "\n"


def export_bundle(
    store: Store,
    catalog: Catalog | None,
    names: list[ModelName],
    target: str,
    *,
    split: int | None = None,
    with_runtime: bool = False,
    reporter: PullReporter = _QUIET,
    stdout: IO[bytes] | None = None,
) -> ExportResult:
    """Write a bundle of the named models to a folder, a .tar, or a tar on stdout ('-')."""
    manifests: list[Manifest] = []
    for name in names:
        manifest = store.require(name)
        if manifest.name not in {m.name for m in manifests}:
            manifests.append(manifest)
    if not manifests:
        raise ModelNotFound(
            "no models to export", "name at least one pulled model, e.g. sovereign export gemma3:270m --to DIR"
        )
    for manifest in manifests:
        for path in store.file_paths(manifest):
            if not path.is_file():
                raise StoreError(
                    f"{manifest.name}'s file {path} is missing", f"pull {manifest.name} again before exporting it"
                )
            expected = next(
                f.size for f in manifest.files if (Path(f.path) if f.path else store.blob_path(f.digest or "")) == path
            )
            if path.stat().st_size != expected:
                raise StoreError(
                    (
                        f"{path} changed since {manifest.name} was registered ({path.stat().st_size} bytes, "
                        f"not {expected})"
                    ),
                    f"pull {manifest.name} again before exporting it",
                )
    runtime_dir = Path(tempfile.mkdtemp(prefix="sovereign-wheels-")) if with_runtime else None
    try:
        runtime = build_runtime(runtime_dir, reporter) if runtime_dir else None
        if target == "-":
            sink: _Sink = _TarSink(None, stdout or sys.stdout.buffer)
        elif target.endswith(".tar"):
            sink = _TarSink(Path(target).expanduser())
        else:
            sink = _DirSink(Path(target).expanduser())
        try:
            result = _write(sink, store, catalog, manifests, split, runtime, runtime_dir, reporter)
            sink.close()
        except BaseException:
            sink.abort()
            raise
    finally:
        if runtime_dir:
            shutil.rmtree(runtime_dir, ignore_errors=True)
    result.target = target
    return result


def _write(
    sink: _Sink,
    store: Store,
    catalog: Catalog | None,
    manifests: list[Manifest],
    split: int | None,
    runtime: dict[str, Any] | None,
    runtime_dir: Path | None,
    reporter: PullReporter,
) -> ExportResult:
    sums: dict[str, str] = {}
    total = 0
    sums[README] = sink.add_bytes(README, _readme(manifests, runtime is not None, split is not None).encode())
    if runtime is not None and runtime_dir is not None:
        for wheel in runtime["wheels"]:
            path = runtime_dir / wheel
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                sink.add_stream(
                    f"wheels/{wheel}",
                    _HashingReader(handle, path.stat().st_size, [digest], reporter),
                    path.stat().st_size,
                )
            sums[f"wheels/{wheel}"] = digest.hexdigest()
            total += path.stat().st_size
        sums[RUNTIME_JSON] = sink.add_bytes(RUNTIME_JSON, json.dumps(runtime, indent=2).encode())
    by_origin: dict[str, dict[str, Any]] = {}  # a blob digest or an in-place path -> its entry, so shared files go once
    used_names: set[str] = set()
    entries = []
    for manifest in manifests:
        files = []
        for model_file, path in zip(manifest.files, store.file_paths(manifest), strict=True):
            origin = model_file.digest or f"path:{path}"
            if origin not in by_origin:
                by_origin[origin] = _write_model_file(sink, model_file, path, split, used_names, sums, reporter)
                total += by_origin[origin]["size"]
            files.append({"filename": model_file.filename, **by_origin[origin]})
        spec = catalog.get(parse_name(manifest.name)) if catalog else None
        entries.append(
            {
                "name": manifest.name,
                "manifest": manifest.to_json(),
                "source": manifest.to_json()["source"],
                "catalog": catalog_settings(spec, manifest),
                "files": files,
            }
        )
    bundle = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "created_by": f"sovereign {installed_version('sovereign')}",
        "runtime": RUNTIME_JSON if runtime else None,
        "models": entries,
    }
    sums[BUNDLE_JSON] = sink.add_bytes(BUNDLE_JSON, json.dumps(bundle, indent=2, sort_keys=True).encode())
    sink.add_bytes(SUMS, "".join(f"{sha}  {rel}\n" for rel, sha in sums.items()).encode())
    return ExportResult([m.name for m in manifests], len(sums) + 1, total, "", runtime)


def _write_model_file(
    sink: _Sink,
    model_file: ModelFile,
    path: Path,
    split: int | None,
    used: set[str],
    sums: dict[str, str],
    reporter: PullReporter,
) -> dict[str, Any]:
    """Copy one model file (in pieces with --split) into the bundle; its whole and per-piece sha256."""
    base = Path(model_file.filename).name or "model.gguf"
    stem, suffix, n = Path(base).stem, Path(base).suffix, 1
    while f"models/{base}" in used:
        n += 1
        base = f"{stem}-{n}{suffix}"
    used.add(f"models/{base}")
    size = path.stat().st_size
    count = max(1, -(-size // split)) if split else 1
    width = max(3, len(str(count)))
    whole = hashlib.sha256()
    pieces = []
    reporter.begin(f"exporting {base}", size)
    try:
        with path.open("rb") as handle:
            for index in range(count):
                length = min(split, size - index * split) if split else size
                rel = f"models/{base}" if count == 1 else f"models/{base}.part{index + 1:0{width}d}"
                piece = hashlib.sha256()
                sink.add_stream(rel, _HashingReader(handle, length, [whole, piece], reporter), length)
                sums[rel] = piece.hexdigest()
                pieces.append({"path": rel, "size": length, "sha256": piece.hexdigest()})
    finally:
        reporter.end()
    sha = whole.hexdigest()
    if model_file.digest and model_file.digest != f"sha256:{sha}":
        raise IntegrityError(
            f"the store's copy of {model_file.filename} is damaged (its sha256 is not its name)",
            "pull the model again, then export",
        )
    return {"size": size, "sha256": sha, "pieces": pieces}


# -- reading -------------------------------------------------------------------------------------------


@dataclass
class ImportResult:
    """What an import did."""

    imported: list[str]
    already: list[str]
    runtime_note: str | None = None
    runtime_ok: bool = False


def _sha_file(path: Path, reporter: PullReporter, label: str) -> str:
    digest = hashlib.sha256()
    reporter.begin(f"{label} {path.name}", path.stat().st_size)
    try:
        with path.open("rb") as handle:
            while block := handle.read(CHUNK * 4):
                digest.update(block)
                reporter.advance(len(block))
    finally:
        reporter.end()
    return digest.hexdigest()


class _Tree:
    """A bundle's files: a folder on a stick, or a tar unpacked into the store's partial area (hashed on the way)."""

    def __init__(self, root: Path, known: dict[str, tuple[int, str]] | None = None, owned: bool = False) -> None:
        self.root, self.known, self.owned = root, known or {}, owned

    def path(self, rel: str) -> Path:
        path = self.root / safe_relpath(rel)
        # A folder bundle may not reach outside itself through a link.
        if path.is_symlink() or not path.resolve().is_relative_to(self.root.resolve()):
            raise BundleError(
                f"{rel} in the bundle is a link", "the bundle was not made by `sovereign export`; refusing it"
            )
        return path

    def check(self, rel: str, expected_sha: str, expected_size: int | None, reporter: PullReporter) -> Path:
        """The file, proven to be what SHA256SUMS says (size first, so a truncated file says so)."""
        path = self.path(rel)
        if not path.is_file():
            raise BundleError(f"{rel} is missing from the bundle", "copy the whole bundle again")
        size = path.stat().st_size
        if expected_size is not None and size != expected_size:
            raise IntegrityError(
                f"{rel} is truncated or damaged: {size} bytes, the bundle says {expected_size}; nothing was imported",
                "copy the bundle again",
            )
        actual = (
            self.known[rel][1]
            if rel in self.known and self.known[rel][0] == size
            else _sha_file(path, reporter, "checking")
        )
        if actual != expected_sha:
            raise IntegrityError(
                f"{rel} is damaged: its sha256 does not match SHA256SUMS; nothing was imported", "copy the bundle again"
            )
        return path


def _unpack_tar(
    stream: IO[bytes] | None, path: Path | None, into: Path, reporter: PullReporter
) -> dict[str, tuple[int, str]]:
    """Unpack a bundle tar (file or stream) into `into`, refusing links, devices, absolute paths and '..'."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    known: dict[str, tuple[int, str]] = {}
    try:
        tar = tarfile.open(name=str(path) if path else None, fileobj=stream if path is None else None, mode="r|*")
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(
            f"{path or 'stdin'} is not a tar bundle ({exc})", "give the folder or .tar that `sovereign export` wrote"
        ) from None
    try:
        with tar:
            for member in tar:
                rel = safe_relpath(member.name)
                if member.isdir():
                    continue
                if not member.isreg():
                    kind = "link" if member.issym() or member.islnk() else "device or special file"
                    raise BundleError(
                        f"the bundle's member {member.name} is a {kind}",
                        "the bundle was not made by `sovereign export`; refusing it",
                    )
                target = into / rel
                if rel in known or target.exists():
                    raise BundleError(
                        f"the bundle names {rel} twice", "the bundle was not made by `sovereign export`; refusing it"
                    )
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                except OSError:  # a member named like a folder another member is a file of
                    raise BundleError(
                        f"the bundle's member {member.name} does not fit its layout",
                        "the bundle was not made by `sovereign export`; refusing it",
                    ) from None
                source = tar.extractfile(member)
                assert source is not None
                digest, written = hashlib.sha256(), 0
                reporter.begin(f"unpacking {PurePosixPath(rel).name}", member.size)
                try:
                    with target.open("wb") as out:
                        while block := source.read(CHUNK * 4):
                            digest.update(block)
                            out.write(block)
                            written += len(block)
                            reporter.advance(len(block))
                finally:
                    reporter.end()
                known[rel] = (written, digest.hexdigest())
    except (tarfile.TarError, EOFError) as exc:
        raise IntegrityError(
            f"the tar bundle {path or 'on stdin'} is truncated or damaged ({exc}); nothing was imported",
            "copy or send it again",
        ) from None
    return known


def _read_sums(tree: _Tree) -> dict[str, str]:
    path = tree.path(SUMS)
    if not path.is_file():
        raise BundleError(
            f"{tree.root} is not a complete sovereign bundle: {SUMS} is missing",
            "export it again (SHA256SUMS is written last)",
        )
    sums: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        match = _SUM_LINE.match(line)
        if not match:
            raise BundleError(
                f"{SUMS} has a line that is not `<sha256>  <file>`: {line[:60]!r}", "copy the bundle again"
            )
        sums[safe_relpath(match[2])] = match[1]
    return sums


def _load_bundle(tree: _Tree, sums: dict[str, str], reporter: PullReporter) -> dict[str, Any]:
    if BUNDLE_JSON not in sums:
        raise BundleError(f"{SUMS} does not list {BUNDLE_JSON}", "export the bundle again")
    path = tree.check(BUNDLE_JSON, sums[BUNDLE_JSON], None, reporter)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BundleError(f"{BUNDLE_JSON} is not JSON ({exc})", "export the bundle again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(
            f"{BUNDLE_JSON} is not a sovereign bundle", "give the folder or .tar that `sovereign export` wrote"
        )
    if data.get("version") != FORMAT_VERSION:
        raise BundleError(
            f"the bundle has format version {data.get('version')}; this sovereign reads version {FORMAT_VERSION}",
            "upgrade sovereign on this machine",
        )
    return data


@dataclass
class _Planned:
    name: ModelName
    manifest: Manifest
    files: list[dict[str, Any]]


def _plan(store: Store, bundle: dict[str, Any], sums: dict[str, str]) -> tuple[list[_Planned], list[str]]:
    """The models to register and those already here; refuses a name that holds a different model."""
    todo, already = [], []
    for entry in bundle.get("models") or []:
        try:
            name = parse_name(entry["name"])
            files = list(entry["files"])
            original = entry["manifest"]
            for f in files:
                if not re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) or not f["pieces"]:
                    raise ValueError("bad file entry")
                if sum(p["size"] for p in f["pieces"]) != f["size"]:
                    raise ValueError(f"the pieces of {f['filename']} do not add up")
                for piece in f["pieces"]:
                    rel = safe_relpath(piece["path"])
                    if sums.get(rel) != piece["sha256"]:
                        raise BundleError(
                            f"{rel} is not in {SUMS} with the checksum {BUNDLE_JSON} gives", "copy the bundle again"
                        )
            extra = extra_with_settings(dict(original.get("extra") or {}), entry.get("catalog"))
            manifest = Manifest(
                name=str(name),
                files=tuple(
                    ModelFile(filename=f["filename"], size=int(f["size"]), digest=f"sha256:{f['sha256']}")
                    for f in files
                ),
                source=SourceRecord(**original["source"]),
                gguf=dict(original.get("gguf") or {}),
                pulled_at=str(original.get("pulled_at") or ""),
                license=original.get("license"),
                sha256_verified=bool(original.get("sha256_verified")),
                extra=extra,
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{BUNDLE_JSON} has a damaged model entry ({exc})", "export the bundle again") from None
        existing = store.get(name)
        if existing is not None:
            here = [f.digest for f in existing.files]
            if here == [f.digest for f in manifest.files] and all(p.is_file() for p in store.file_paths(existing)):
                already.append(str(name))
                continue
            if here != [f.digest for f in manifest.files]:
                raise BundleError(
                    (
                        f"'{name}' already holds a different model (from {existing.source.reference}); "
                        "nothing was imported"
                    ),
                    f"run `sovereign rm {name}` first to replace it",
                )
        todo.append(_Planned(name, manifest, files))
    return todo, already


def _stage_file(tree: _Tree, entry: dict[str, Any], staging: Path, reporter: PullReporter) -> Path:
    """Assemble one model file from its pieces into staging, proving each piece and the whole.

    Resumes a finished one.
    """
    sha, size = entry["sha256"], int(entry["size"])
    target = staging / f"sha256-{sha}"
    if target.is_file() and target.stat().st_size == size and _sha_file(target, reporter, "checking staged") == sha:
        return target  # staged by an import that was interrupted later
    pieces = entry["pieces"]
    if len(pieces) == 1 and pieces[0]["sha256"] != sha:
        raise IntegrityError(
            f"{pieces[0]['path']} does not match its sha256 in {BUNDLE_JSON}; nothing was imported",
            "export the bundle again",
        )
    if len(pieces) == 1 and tree.owned:  # unpacked from a tar and already hashed: move, do not copy
        source = tree.check(pieces[0]["path"], sha, size, reporter)
        if not has_gguf_magic(source):
            raise IntegrityError(
                f"{pieces[0]['path']} in the bundle is not a GGUF file; nothing was imported", "export the bundle again"
            )
        os.replace(source, target)
        return target
    whole = hashlib.sha256()
    partial = target.with_name(target.name + ".partial")
    reporter.begin(f"copying {Path(entry['filename']).name}", size)
    try:
        with partial.open("wb") as out:
            for piece in pieces:
                rel = safe_relpath(piece["path"])
                path = tree.path(rel)
                if not path.is_file():
                    raise BundleError(
                        f"{rel} is missing from the bundle; nothing was imported", "copy the whole bundle again"
                    )
                if path.stat().st_size != int(piece["size"]):
                    raise IntegrityError(
                        (
                            f"{rel} is truncated or damaged: {path.stat().st_size} bytes, the bundle says "
                            f"{piece['size']}; nothing was imported"
                        ),
                        "copy the bundle again",
                    )
                digest = hashlib.sha256()
                with path.open("rb") as handle:
                    while block := handle.read(CHUNK * 4):
                        digest.update(block)
                        whole.update(block)
                        out.write(block)
                        reporter.advance(len(block))
                if digest.hexdigest() != piece["sha256"]:
                    raise IntegrityError(
                        f"{rel} is damaged: its sha256 does not match SHA256SUMS; nothing was imported",
                        "copy the bundle again",
                    )
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        reporter.end()
    if whole.hexdigest() != sha:
        partial.unlink(missing_ok=True)
        raise IntegrityError(
            f"{entry['filename']} reassembled from its pieces does not match its sha256; nothing was imported",
            "copy the bundle again",
        )
    if not has_gguf_magic(partial):
        partial.unlink(missing_ok=True)
        raise IntegrityError(
            f"{entry['filename']} in the bundle is not a GGUF file; nothing was imported", "export the bundle again"
        )
    os.replace(partial, target)
    return target


@contextmanager
def _open_tree(store: Store, source: str | Path, stdin: IO[bytes] | None, reporter: PullReporter) -> Iterator[_Tree]:
    text = str(source)
    if text != "-" and Path(text).expanduser().is_dir():
        yield _Tree(Path(text).expanduser().resolve())
        return
    if text != "-" and not Path(text).expanduser().is_file():
        raise BundleError(
            f"no bundle at {text}", "give the folder or .tar that `sovereign export` wrote, or - for a tar on stdin"
        )
    key = "bundle-tar:-" if text == "-" else f"bundle-tar:{Path(text).expanduser().resolve()}"
    folder = store.partial_path(key)
    into = folder / "tree"
    try:  # a tar cannot be resumed: what was unpacked goes either way (staged model files stay, for the next import)
        known = (
            _unpack_tar(stdin or sys.stdin.buffer, None, into, reporter)
            if text == "-"
            else _unpack_tar(None, Path(text).expanduser(), into, reporter)
        )
        yield _Tree(into, known, owned=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def import_bundle(
    store: Store,
    source: str | Path,
    *,
    reporter: PullReporter = _QUIET,
    stdin: IO[bytes] | None = None,
    min_free_bytes: int = 0,
) -> ImportResult:
    """Verify a bundle completely, then register its models (each appears whole or not at all)."""
    with store.pulling(), _open_tree(store, source, stdin, reporter) as tree:
        sums = _read_sums(tree)
        bundle = _load_bundle(tree, sums, reporter)
        todo, already = _plan(store, bundle, sums)
        model_pieces = {safe_relpath(p["path"]) for m in bundle["models"] for f in m["files"] for p in f["pieces"]}
        # Every other listed file (README, runtime.json, wheels) is proven too, before anything is registered.
        for rel, sha in sums.items():
            if rel not in model_pieces and rel != BUNDLE_JSON:
                tree.check(rel, sha, None, reporter)
        result = ImportResult([], already)
        if bundle.get("runtime"):
            runtime = json.loads(tree.path(RUNTIME_JSON).read_text(encoding="utf-8"))
            wheels = [PurePosixPath(rel).name for rel in sums if rel.startswith("wheels/")]
            result.runtime_note = runtime_mismatch(runtime, wheels)
            result.runtime_ok = result.runtime_note is None
        if not todo:
            return result
        staging = store.partial_path("bundle-import:" + hashlib.sha256(tree.path(SUMS).read_bytes()).hexdigest())
        with store.lock(f"import:{staging.name}"):
            needed: dict[str, dict[str, Any]] = {}
            for planned in todo:
                for f in planned.files:
                    if not store.blob_path(f"sha256:{f['sha256']}").is_file():
                        needed.setdefault(f["sha256"], f)
            ensure_free_space(staging, sum(int(f["size"]) for f in needed.values()), min_free_bytes)
            staged = {sha: _stage_file(tree, f, staging, reporter) for sha, f in needed.items()}
            with ExitStack() as held:  # no pull of the same names meanwhile
                for planned in todo:
                    held.enter_context(store.lock(f"pull:{planned.name}"))
                _commit(store, staged, todo, result)
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _commit(store: Store, staged: dict[str, Path], todo: list[_Planned], result: ImportResult) -> None:
    """Every file is proven: move the blobs in, then publish each manifest."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    with store.gc_lock():
        for sha, path in staged.items():
            store.place_blob(path, sha)
        for planned in todo:
            store.save(planned.name, replace(planned.manifest, extra={**planned.manifest.extra, "imported_at": now}))
            result.imported.append(str(planned.name))


__all__ = [
    "BundleError",
    "ExportResult",
    "ImportResult",
    "export_bundle",
    "import_bundle",
    "parse_split",
]
