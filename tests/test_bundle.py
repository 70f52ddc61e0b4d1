"""`sovereign export` / `sovereign import`: offline bundles, verified before anything is registered."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sovereign.catalog import load_catalog
from sovereign.config import Settings
from sovereign.errors import SovereignError
from sovereign.refs import parse_name
from sovereign.store import PullOptions, Store, bundle, spec_from_manifest
from sovereign.store.bundle import FAT32_MAX, BundleError, export_bundle, import_bundle, parse_split
from tests.conftest import GEMMA, assert_clean_error, pull_in_process, write_gguf

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"


def cli(
    home: Path, *args: str, stdin: bytes | None = None, stdout: int | io.BufferedWriter | None = None
) -> subprocess.CompletedProcess[str]:
    """Run sovereign's export/import with SOVEREIGN_HOME=home."""
    env = {**os.environ, "SOVEREIGN_HOME": str(home), "COLUMNS": "200"}
    if stdin is not None or stdout is not None:
        done = subprocess.run(
            [sys.executable, "-m", "sovereign", *args],
            env=env,
            input=stdin,
            stdout=stdout or subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=120,
        )
        return subprocess.CompletedProcess(
            done.args,
            done.returncode,
            (done.stdout or b"").decode(errors="replace") if stdout is None else "",
            done.stderr.decode(),
        )
    return subprocess.run(
        [sys.executable, "-m", "sovereign", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def source_home(isolated_home: Path, tmp_path: Path) -> Path:
    """A store with tiny:1 (in place, with catalog settings from the user's models.toml) and other:2 (a copied blob)."""
    model = write_gguf(tmp_path / "files" / "tiny-Q4_K_M.gguf", megabytes=1.0, seed=1)
    (isolated_home).mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text(
        f'[models."tiny:1"]\nsources = ["{model}"]\nchat_template = {json.dumps(TEMPLATE)}\nstop = ["<|end|>"]\n'
        'context_length = 1024\nlicense = "mit"\n'
    )
    pull_in_process(str(model), options=PullOptions(name="tiny:1"))
    pull_in_process(
        str(write_gguf(tmp_path / "files" / "other.gguf", megabytes=0.5, seed=2)),
        options=PullOptions(name="other:2", copy_local=True),
    )
    return isolated_home


def export(home: Path, target: Path | str, *names: str, split: int | None = None) -> bundle.ExportResult:
    settings = Settings.from_env({**os.environ, "SOVEREIGN_HOME": str(home)})
    return export_bundle(
        Store(home),
        load_catalog(settings),
        [parse_name(n) for n in names or ("tiny:1", "other:2")],
        str(target),
        split=split,
    )


def assert_nothing_registered(home: Path) -> None:
    assert Store(home).list() == []
    assert not (home / "blobs").exists() or not any((home / "blobs").iterdir())


def assert_same_models(a: Path, b: Path, *names: str) -> None:
    first, second = Store(a), Store(b)
    for name in names:
        before, after = first.require(parse_name(name)), second.require(parse_name(name))
        assert [p.read_bytes() for p in first.file_paths(before)] == [p.read_bytes() for p in second.file_paths(after)]
        assert all(f.digest and not f.in_place for f in after.files)
        assert (after.source, after.gguf, after.license, after.pulled_at, after.sha256_verified) == (
            before.source,
            before.gguf,
            before.license,
            before.pulled_at,
            before.sha256_verified,
        )
        assert [f.filename for f in after.files] == [f.filename for f in before.files]


def test_folder_round_trip_keeps_bytes_source_and_catalog_settings(source_home: Path, tmp_path: Path) -> None:
    result = export(source_home, tmp_path / "stick")
    stick = tmp_path / "stick"
    assert sorted(p.relative_to(stick).as_posix() for p in stick.rglob("*") if p.is_file()) == [
        "README.txt",
        "SHA256SUMS",
        "models/other.gguf",
        "models/tiny-Q4_K_M.gguf",
        "sovereign-bundle.json",
    ]
    assert result.models == ["tiny:1", "other:2"]
    assert "sovereign import ." in (stick / "README.txt").read_text()
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=stick, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    data = json.loads((stick / "sovereign-bundle.json").read_text())
    assert data["format"] == "sovereign-bundle" and data["version"] == 1
    tiny = next(m for m in data["models"] if m["name"] == "tiny:1")
    assert tiny["source"]["kind"] == "local" and tiny["catalog"]["stop"] == ["<|end|>"]

    other = tmp_path / "other-home"
    imported = import_bundle(Store(other), stick)
    assert sorted(imported.imported) == ["other:2", "tiny:1"] and imported.already == []
    assert_same_models(source_home, other, "tiny:1", "other:2")
    manifest = Store(other).require(parse_name("tiny:1"))
    spec = spec_from_manifest(manifest)  # no models.toml on this side: the settings travel in the manifest
    assert (
        spec is not None
        and spec.chat_template == TEMPLATE
        and spec.stop == ("<|end|>",)
        and spec.context_length == 1024
    )
    assert not any((other / "partial").iterdir())
    # Exported again from the new home, the settings are passed on.
    again = json.loads((Path(export(other, tmp_path / "again", "tiny:1").target) / "sovereign-bundle.json").read_text())
    assert again["models"][0]["catalog"]["chat_template"] == TEMPLATE


def test_cli_tar_file_and_stdout_stdin_round_trip_and_second_import_is_a_no_op(
    source_home: Path, tmp_path: Path
) -> None:
    tar_path = tmp_path / "bundle.tar"
    done = cli(source_home, "export", "tiny:1", "--to", str(tar_path))
    assert done.returncode == 0, done.stderr
    with tarfile.open(tar_path) as tar:
        assert all(m.isreg() for m in tar.getmembers()) and tar.getnames()[-1] == "SHA256SUMS"
    first = tmp_path / "home-a"
    done = cli(first, "import", str(tar_path))
    assert done.returncode == 0 and "imported tiny:1" in done.stderr, done.stderr
    assert_same_models(source_home, first, "tiny:1")
    again = cli(first, "import", str(tar_path))
    assert again.returncode == 0 and "nothing to do" in again.stderr and "already imported" in again.stderr, (
        again.stderr
    )

    streamed = tmp_path / "streamed.tar"
    with streamed.open("wb") as sink:
        done = cli(source_home, "export", "tiny:1", "other:2", "--to", "-", stdout=sink)
    assert done.returncode == 0, done.stderr
    second = tmp_path / "home-b"
    done = cli(second, "import", "-", stdin=streamed.read_bytes())
    assert done.returncode == 0 and "imported" in done.stderr, done.stderr
    assert_same_models(source_home, second, "tiny:1", "other:2")
    assert not any((second / "partial").iterdir())


def test_split_pieces_reassemble(source_home: Path, tmp_path: Path) -> None:
    done = cli(source_home, "export", "tiny:1", "--to", str(tmp_path / "stick"), "--split", "256K")
    assert done.returncode == 0, done.stderr
    pieces = sorted((tmp_path / "stick" / "models").iterdir())
    assert [p.name for p in pieces][:2] == ["tiny-Q4_K_M.gguf.part001", "tiny-Q4_K_M.gguf.part002"] and len(pieces) == 5
    assert all(p.stat().st_size <= 256 * 1024 for p in pieces)
    entry = json.loads((tmp_path / "stick" / "sovereign-bundle.json").read_text())["models"][0]["files"][0]
    assert len(entry["pieces"]) == 5 and len(entry["sha256"]) == 64  # the whole file's and every piece's
    done = cli(tmp_path / "dest", "import", str(tmp_path / "stick"))
    assert done.returncode == 0, done.stderr
    assert_same_models(source_home, tmp_path / "dest", "tiny:1")


def test_split_sizes() -> None:
    assert parse_split("4G") == parse_split("4GiB") == FAT32_MAX  # what a FAT32 stick can hold
    assert parse_split("500M") == 500 * 1024**2 and parse_split("1.5G") == int(1.5 * 1024**3)
    with pytest.raises(BundleError, match="--split"):
        parse_split("lots")


@pytest.mark.parametrize("damage", ["tamper", "truncate", "truncate-piece", "missing-sums"])
def test_damaged_bundle_is_refused_by_name_and_nothing_registered(
    source_home: Path, tmp_path: Path, damage: str
) -> None:
    stick = tmp_path / "stick"
    export(source_home, stick, split=300 * 1024 if damage == "truncate-piece" else None)
    target = stick / "models" / ("tiny-Q4_K_M.gguf.part002" if damage == "truncate-piece" else "tiny-Q4_K_M.gguf")
    if damage == "tamper":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "missing-sums":
        (stick / "SHA256SUMS").unlink()
    else:
        with target.open("r+b") as handle:
            handle.truncate(1000)
    home = tmp_path / "dest"
    done = cli(home, "import", str(stick))
    expected = {
        "tamper": ("models/tiny-Q4_K_M.gguf", "damaged"),
        "truncate": ("models/tiny-Q4_K_M.gguf", "truncated"),
        "truncate-piece": ("models/tiny-Q4_K_M.gguf.part002", "truncated"),
        "missing-sums": ("SHA256SUMS",),
    }[damage]
    assert_clean_error(done, *expected)
    assert_nothing_registered(home)


def _evil_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w") as tar:
        if member.isreg():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_unsafe_tar_members_are_refused(tmp_path: Path, kind: str) -> None:
    member = tarfile.TarInfo(
        {
            "dotdot": "../escaped",
            "absolute": "/tmp/escaped-abs",
            "symlink": "models/x.gguf",
            "hardlink": "models/x.gguf",
            "device": "models/x.gguf",
        }[kind]
    )
    if kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        member.type, member.linkname = tarfile.LNKTYPE, "/etc/passwd"
    elif kind == "device":
        member.type = tarfile.CHRTYPE
    tar_path = _evil_tar(tmp_path / "evil.tar", member)
    home = tmp_path / "dest"
    done = cli(home, "import", str(tar_path))
    assert_clean_error(
        done, "link" if kind in ("symlink", "hardlink") else "device" if kind == "device" else "unsafe path"
    )
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped-abs").exists()
    assert Store(home).list() == []


def test_symlink_inside_a_bundle_folder_is_refused(source_home: Path, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    export(source_home, stick, "other:2")
    real = stick / "models" / "other.gguf"
    moved = tmp_path / "elsewhere.gguf"
    real.rename(moved)
    real.symlink_to(moved)
    with pytest.raises(BundleError, match="link"):
        import_bundle(Store(tmp_path / "dest"), stick)


def test_interrupted_import_registers_nothing_and_the_next_one_resumes(
    source_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stick = tmp_path / "stick"
    export(source_home, stick)
    home = tmp_path / "dest"
    real_stage = bundle._stage_file
    calls: list[str] = []

    def pulled_out(tree, entry, staging, reporter):  # type: ignore[no-untyped-def]
        calls.append(entry["filename"])
        if len(calls) == 2:
            raise OSError(5, "Input/output error", str(stick / "models" / "other.gguf"))
        return real_stage(tree, entry, staging, reporter)

    monkeypatch.setattr(bundle, "_stage_file", pulled_out)
    with pytest.raises(OSError):
        import_bundle(Store(home), stick)
    assert_nothing_registered(home)
    monkeypatch.setattr(bundle, "_stage_file", real_stage)
    result = import_bundle(Store(home), stick)
    assert sorted(result.imported) == ["other:2", "tiny:1"]
    assert_same_models(source_home, home, "tiny:1", "other:2")
    assert not any((home / "partial").iterdir())


def test_a_name_holding_a_different_model_is_not_overwritten(
    source_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stick = tmp_path / "stick"
    export(source_home, stick, "tiny:1")
    home = tmp_path / "dest"
    monkeypatch.setenv("SOVEREIGN_HOME", str(home))
    pull_in_process(str(write_gguf(tmp_path / "different.gguf", seed=9)), options=PullOptions(name="tiny:1"))
    with pytest.raises(BundleError, match="already holds a different model"):
        import_bundle(Store(home), stick)


def test_runtime_for_another_platform_is_refused_but_models_import(
    source_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_runtime(folder: Path, reporter: object) -> dict[str, object]:
        (folder / "sovereign-0.1.0-py3-none-any.whl").write_bytes(b"wheel")
        (folder / "llama_cpp_python-0.3.36-cp27-cp27m-win32.whl").write_bytes(b"wheel")
        return {
            "python": "2.7.18",
            "abi": "cp27m",
            "platform_tag": "win32",
            "platform": "win32",
            "wheels": sorted(p.name for p in folder.glob("*.whl")),
        }

    monkeypatch.setattr(bundle, "build_runtime", fake_runtime)
    settings = Settings.from_env()
    stick = tmp_path / "stick"
    export_bundle(Store(source_home), load_catalog(settings), [parse_name("tiny:1")], str(stick), with_runtime=True)
    assert "pip install --no-index --find-links wheels sovereign" in (stick / "README.txt").read_text()
    assert (stick / "runtime.json").is_file() and len(list((stick / "wheels").iterdir())) == 2
    done = cli(tmp_path / "dest", "import", str(stick))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "Python 2.7.18" in warnings[0] and "only the models were imported" in warnings[0]
    assert "imported tiny:1" in done.stderr


def test_export_of_an_unknown_model_is_one_clean_line(isolated_home: Path, tmp_path: Path) -> None:
    assert_clean_error(cli(isolated_home, "export", "nope:1", "--to", str(tmp_path / "x")), "nope:1")
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(
    not os.environ.get("SOVEREIGN_TEST_RUNTIME_BUNDLE"),
    reason="builds wheels of every dependency (slow); set SOVEREIGN_TEST_RUNTIME_BUNDLE=1",
)
def test_runtime_bundle_for_this_machine(source_home: Path, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    done = cli(source_home, "export", "tiny:1", "--to", str(stick), "--with-runtime")
    assert done.returncode == 0, done.stderr
    runtime = json.loads((stick / "runtime.json").read_text())
    assert any(w.startswith("llama_cpp_python-") for w in runtime["wheels"]) and any(
        w.startswith("sovereign-") for w in runtime["wheels"]
    )
    done = cli(tmp_path / "dest", "import", str(stick))
    assert done.returncode == 0 and "warning" not in done.stderr and "fit this machine" in done.stderr, done.stderr


def test_real_model_round_trip(real_model_home: Path, tmp_path: Path) -> None:
    stick = tmp_path / "bundle.tar"
    done = cli(real_model_home, "export", GEMMA, "--to", str(stick))
    assert done.returncode == 0, done.stderr
    done = cli(tmp_path / "dest", "import", str(stick))
    assert done.returncode == 0, done.stderr
    manifest = Store(tmp_path / "dest").require(parse_name(GEMMA))
    assert manifest.files[0].digest == f"sha256:{'a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818'}"
    spec = spec_from_manifest(manifest)
    assert spec is not None and spec.chat_template and "<start_of_turn>" in spec.chat_template


def test_errors_are_sovereign_errors() -> None:
    assert issubclass(BundleError, SovereignError)
