"""The model store on disk: manifests by name, content-addressed blobs, partial downloads, locks.

$SOVEREIGN_HOME/
  manifests/<name parts>/<tag>.json   one per name; written last, atomically
  blobs/sha256-<hex>                  model files, shared by every name that uses them
  partial/<key>/                      downloads in progress (resumed by the next pull)
  shards/<digest>/<original names>    links that give split GGUFs the names llama.cpp expects
  locks/                              file locks (pulls, garbage collection)
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from sovereign.errors import ModelNotFound, StoreError
from sovereign.refs import ModelName
from sovereign.store.manifest import DIGEST, Manifest, ModelFile

_ANY_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class PruneResult:
    """What `prune` deleted, and whether a running pull kept its partial downloads."""

    partial_files: int = 0
    partial_bytes: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    kept_running: bool = False


def _tree_size(path: Path) -> tuple[int, int]:
    """(files, bytes) under a folder, or of one file."""
    if not path.is_dir():
        return (1, path.stat().st_size) if path.exists() else (0, 0)
    sizes = [p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return len(sizes), sum(sizes)


class Store:
    """Manifests and blobs under one home folder."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.manifests_dir = home / "manifests"
        self.blobs_dir = home / "blobs"
        self.partial_dir = home / "partial"
        self.shards_dir = home / "shards"
        self.locks_dir = home / "locks"

    # -- paths and locks ---------------------------------------------------------------------

    def manifest_path(self, name: ModelName) -> Path:
        """The manifest file of a name, guaranteed to lie inside the manifests folder."""
        path = (self.manifests_dir / name.relative_path).resolve()
        if not path.is_relative_to(self.manifests_dir.resolve()):
            raise StoreError(f"'{name}' would escape the store", "use a plain name such as gemma3:270m")
        return path

    def blob_path(self, digest: str) -> Path:
        """Where the blob with this 'sha256:<hex>' digest lives."""
        if not DIGEST.match(digest):
            raise StoreError(f"'{digest}' is not a sha256 digest", "the store is damaged; pull the model again")
        return self.blobs_dir / digest.replace(":", "-")

    def partial_path(self, key: str) -> Path:
        """A stable working folder for one download, kept across interrupted pulls."""
        path = self.partial_dir / hashlib.sha256(key.encode()).hexdigest()[:32]
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lock(self, key: str) -> FileLock:
        """A cross-process lock for key (a model name, a download, or 'gc')."""
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(self.locks_dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock"))

    # -- reading -----------------------------------------------------------------------------

    def get(self, name: ModelName) -> Manifest | None:
        """The manifest of a name, or None if it was never pulled."""
        path = self.manifest_path(name)
        try:
            return Manifest.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(
                f"the manifest of '{name}' is damaged ({exc})", f"run `sovereign rm {name}` and pull it again"
            ) from None

    def get_first(self, *names: ModelName) -> Manifest | None:
        """The manifest of the first of these names that is pulled (a name, then what its alias points at)."""
        for name in names:
            if (manifest := self.get(name)) is not None:
                return manifest
        return None

    def require(self, name: ModelName) -> Manifest:
        """The manifest of a pulled name, or ModelNotFound with the command that fixes it."""
        manifest = self.get(name)
        if manifest is None:
            raise ModelNotFound(f"model '{name}' is not pulled", f"run `sovereign pull {name}` first")
        return manifest

    def list(self) -> list[Manifest]:
        """Every complete model in the store, by name (damaged manifests are skipped)."""
        manifests = []
        for path in sorted(self.manifests_dir.rglob("*.json")) if self.manifests_dir.is_dir() else []:
            try:
                manifests.append(Manifest.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return sorted(manifests, key=lambda m: m.name)

    def file_paths(self, manifest: Manifest) -> builtins.list[Path]:
        """The on-disk paths of a model's files, in order."""
        return [Path(f.path) if f.path else self.blob_path(f.digest or "") for f in manifest.files]

    def file_status(self, manifest: Manifest) -> str:
        """'ok', 'missing' or 'changed'.

        'missing': a file is gone; 'changed': a file's size, or an in-place file's mtime, is not as recorded.

        Only stats the files: cheap enough for `list`. Files registered in place (pulled from a
        local path, or adopted from another tool's store) can be deleted or rewritten behind our back.
        """
        status = "ok"
        for model_file, path in zip(manifest.files, self.file_paths(manifest), strict=True):
            try:
                stat = path.stat()
            except OSError:
                return "missing"
            if stat.st_size != model_file.size or (
                model_file.in_place and model_file.mtime_ns is not None and stat.st_mtime_ns != model_file.mtime_ns
            ):
                status = "changed"
        return status

    def check_files(self, manifest: Manifest) -> None:
        """Raise ModelNotFound, in one line, when a model's file was deleted or changed since it was registered."""
        status = self.file_status(manifest)
        if status == "ok":
            return
        where = next((f.path for f in manifest.files if f.in_place), None)
        what = f"its file {where}" if where else "its file in the store"
        state = "no longer exists" if status == "missing" else "changed since it was registered"
        if where:
            hint = (
                f"run `sovereign adopt` again or `sovereign rm {manifest.name}`"
                if manifest.source.kind == "adopt"
                else f"pull it again, or `sovereign rm {manifest.name}`"
            )
        else:
            hint = f"run `sovereign rm {manifest.name}` and pull it again"
        raise ModelNotFound(f"model '{manifest.name}' cannot be used: {what} {state}", hint)

    def model_path(self, manifest: Manifest) -> Path:
        """The path to hand llama.cpp: the file itself, or the first split under its original name.

        Raises ModelNotFound when a file was deleted or changed since it was registered (see check_files).
        """
        self.check_files(manifest)
        paths = self.file_paths(manifest)
        if len(paths) == 1 or all(f.in_place for f in manifest.files):
            return paths[0]
        # llama.cpp finds split 2..N next to split 1 by name, so give blobs their names back.
        folder = self.shards_dir / (manifest.files[0].digest or "local").replace(":", "-")
        folder.mkdir(parents=True, exist_ok=True)
        for model_file, target in zip(manifest.files, paths, strict=True):
            link = folder / Path(model_file.filename).name
            if not link.exists():
                link.symlink_to(target)
        return folder / Path(manifest.files[0].filename).name

    # -- writing -----------------------------------------------------------------------------

    def place_blob(self, source: Path, sha256: str) -> ModelFile:
        """Move a verified file into the blob store (or drop it if the blob is already there)."""
        digest = f"sha256:{sha256}"
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        size = source.stat().st_size
        if target.exists() and target.stat().st_size == size:
            source.unlink()
        else:
            # The bytes must be on disk before the manifest that points at them is published.
            with source.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(source, target)
        return ModelFile(filename=source.name, size=size, digest=digest)

    def save(self, name: ModelName, manifest: Manifest) -> None:
        """Publish a manifest: from this moment the model appears in `list`."""
        atomic_write_text(self.manifest_path(name), manifest.dumps())

    @contextmanager
    def gc_lock(self) -> Iterator[None]:
        """Held while blobs are committed or collected, so collection never races a commit."""
        with self.lock("gc"):
            yield

    def _referenced_digests(self) -> set[str]:
        """Every digest any manifest mentions, read as text so a damaged or newer manifest still counts."""
        found: set[str] = set()
        for path in self.manifests_dir.rglob("*.json") if self.manifests_dir.is_dir() else []:
            found.update(_ANY_DIGEST.findall(path.read_text(encoding="utf-8", errors="replace")))
        return found

    def remove(self, name: ModelName) -> tuple[Manifest, builtins.list[str]]:
        """Delete a name; free its blobs unless another name still uses them."""
        path = self.manifest_path(name)
        with self.gc_lock():
            try:
                manifest = self.require(name)
            except StoreError:
                path.unlink()  # a damaged manifest can still be removed; its blobs wait for a later rm
                self._prune_empty_dirs(path.parent)
                raise StoreError(
                    f"removed the damaged manifest of '{name}'; its files were kept",
                    "pull the model again if you need it",
                ) from None
            path.unlink()
            self._prune_empty_dirs(path.parent)
            still_used = self._referenced_digests()
            freed = sorted(manifest.digests - still_used)
            for digest in freed:
                self.blob_path(digest).unlink(missing_ok=True)
                shutil.rmtree(self.shards_dir / digest.replace(":", "-"), ignore_errors=True)
        return manifest, freed

    def _prune_empty_dirs(self, folder: Path) -> None:
        root = self.manifests_dir.resolve()
        while folder.resolve() != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent

    # -- partial downloads and pruning ------------------------------------------------------

    def partial_usage(self) -> tuple[int, int]:
        """(files, bytes) that partial downloads hold on disk."""
        return _tree_size(self.partial_dir)

    @contextmanager
    def pulling(self) -> Iterator[None]:
        """Held for a whole pull: while any pull holds it, `prune` keeps every partial download."""
        markers = self.locks_dir / "pulls"
        markers.mkdir(parents=True, exist_ok=True)
        marker = FileLock(markers / f"{os.getpid()}-{secrets.token_hex(4)}.lock")
        with self.lock("prune"):  # so a pull starts either before prune looks, or after it is done
            marker.acquire()
        try:
            yield
        finally:
            marker.release()
            Path(marker.lock_file).unlink(missing_ok=True)

    def _pull_running(self) -> bool:
        """Whether another process (or this one) is pulling; markers left by a crash are removed."""
        running = False
        for path in (self.locks_dir / "pulls").glob("*.lock") if (self.locks_dir / "pulls").is_dir() else []:
            marker = FileLock(path)
            try:
                marker.acquire(timeout=0)
            except Timeout:
                running = True
                continue
            marker.release()
            path.unlink(missing_ok=True)
        return running

    def prune(self) -> PruneResult:
        """Delete partial downloads (unless a pull is running) and blobs no manifest mentions."""
        partial_files = partial_bytes = 0
        with self.lock("prune"), self.gc_lock():
            kept_running = self._pull_running()
            if not kept_running and self.partial_dir.is_dir():
                partial_files, partial_bytes = self.partial_usage()
                shutil.rmtree(self.partial_dir)
            still_used = self._referenced_digests()
            blobs = blob_bytes = 0
            for blob in sorted(self.blobs_dir.glob("sha256-*")) if self.blobs_dir.is_dir() else []:
                digest = blob.name.replace("-", ":", 1)
                if digest in still_used:
                    continue
                blob_bytes += blob.stat().st_size
                blobs += 1
                blob.unlink()
                shutil.rmtree(self.shards_dir / blob.name, ignore_errors=True)
        return PruneResult(partial_files, partial_bytes, blobs, blob_bytes, kept_running)

    def write_partial_meta(self, folder: Path, data: dict[str, object]) -> None:
        """Remember what a partial download is for (shown when resuming)."""
        atomic_write_text(folder / "meta.json", json.dumps(data, indent=2))
