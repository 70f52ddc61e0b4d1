"""Local files and folders: registered in place (default) or copied into the store (--copy)."""

from __future__ import annotations

from pathlib import Path

from sovereign.errors import IntegrityError, InvalidReference, NotGGUF, SourceUnavailable
from sovereign.refs import LocalRef
from sovereign.store.files import CHUNK, ensure_free_space, sha256_file, verify_file
from sovereign.store.gguf_header import has_gguf_magic
from sovereign.store.sources.base import SHARD_PATTERN, Expected, FetchContext, Fetched, FetchedFile, shard_siblings


def _model_files(path: Path) -> list[Path]:
    """The files of the one model at path: a file, its split set, or the single model in a folder."""
    if path.is_file():
        names = [p.name for p in path.parent.iterdir()]
        return [path.parent / n for n in shard_siblings(names, path.name)]
    candidates = sorted(p for p in path.glob("*.gguf") if "mmproj" not in p.name.lower())
    firsts = [p for p in candidates if not (shard := SHARD_PATTERN.match(p.name)) or shard["index"] == "00001"]
    if len(firsts) != 1:
        found = ", ".join(p.name for p in firsts) or "no .gguf files"
        raise InvalidReference(f"{path} holds {len(firsts)} models ({found})", "name the .gguf file to use")
    return _model_files(firsts[0])


class LocalSource:
    """A GGUF file or folder on this machine."""

    kind = "local"

    def __init__(self, ref: LocalRef) -> None:
        self.path = ref.path.resolve()

    def describe(self) -> str:
        """The absolute path."""
        return str(self.path)

    def fetch(self, ctx: FetchContext) -> Fetched:
        """Check the files and register them in place, or copy them into staging with --copy."""
        if not self.path.exists():
            raise SourceUnavailable(f"no such file or folder: {self.path}", "check the path")
        files = _model_files(self.path)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SourceUnavailable(
                f"split files missing next to {files[0].name}: {', '.join(missing)}",
                "put every split of the model in one folder",
            )
        for file in files:
            if not has_gguf_magic(file):
                raise NotGGUF(f"{file} is not a GGUF file", "point at a .gguf model file")
        if not ctx.copy_local:
            return Fetched([self._in_place(f, ctx, single=len(files) == 1) for f in files], "registered in place")
        return self._copy(ctx, files)

    def _in_place(self, file: Path, ctx: FetchContext, single: bool) -> FetchedFile:
        """Register a file where it is; check it against the catalog's promises (never deleting it)."""
        size = file.stat().st_size
        expected = ctx.expected if single else Expected()  # a catalog hash describes a single file
        if expected.size is not None and size != expected.size:
            raise IntegrityError(
                f"{file} has {size} bytes, the catalog expects {expected.size}", "point at the right file"
            )
        if expected.sha256:
            actual = sha256_file(file, ctx.reporter)
            if actual != expected.sha256:
                raise IntegrityError(
                    f"sha256 mismatch for {file}: expected {expected.sha256[:12]}…, got {actual[:12]}…",
                    "point at the right file",
                )
            return FetchedFile(file, file.name, size, actual, True, in_place=True)
        return FetchedFile(file, file.name, size, None, False, in_place=True)

    def _copy(self, ctx: FetchContext, files: list[Path]) -> Fetched:
        staging = ctx.store.partial_path(f"local:{self.path}")
        ensure_free_space(staging, sum(f.stat().st_size for f in files), ctx.settings.min_free_bytes)
        fetched = []
        for file in files:
            target = staging / file.name
            ctx.reporter.begin(f"copying {file.name}", file.stat().st_size)
            try:
                with file.open("rb") as src, target.open("wb") as dst:
                    while block := src.read(CHUNK):
                        dst.write(block)
                        ctx.reporter.advance(len(block))
            finally:
                ctx.reporter.end()
            expected = ctx.expected.sha256 if len(files) == 1 else None
            sha = verify_file(target, expected, ctx.expected.size if len(files) == 1 else None, ctx.reporter, str(file))
            fetched.append(FetchedFile(target, file.name, target.stat().st_size, sha, bool(expected)))
        return Fetched(fetched, "copied into the store", cleanup=[staging])
