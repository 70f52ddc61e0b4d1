"""`sovereign adopt`: fake Ollama / Hugging Face / LM Studio / llama.cpp stores under a temporary home."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from sovereign.cli.adopt import adopt as adopt_command
from sovereign.cli.render import models_table
from sovereign.errors import ModelNotFound
from sovereign.refs import parse_name
from sovereign.store import PullOptions, Store
from sovereign.store.adopt import NO_TEMPLATE_NOTE, adopt, quant_tag, split_llamacpp_name
from tests.conftest import assert_clean_error, pull_in_process, run_cli, write_gguf

EXPECTED = {
    "qwen3:8b": "ollama",
    "someone/tool:v1": "ollama",
    "hf.co/org/repo:Q4_K_M": "hf",
    "hf.co/org/big:Q8_0": "hf",
    "lmstudio-community/Gemma-GGUF:Q5_K_M": "lmstudio",
    "hf.co/ggml-org/tiny-GGUF:Q2_K": "llamacpp",
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_ollama(root: Path, namespace: str, model: str, tag: str, seed: int) -> Path:
    """A GGUF blob and the Ollama manifest naming it (plus a template layer, as Ollama has)."""
    source = write_gguf(root / "tmp.gguf", megabytes=0.1, seed=seed)
    digest = _sha(source)
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    source.rename(blob)
    manifest = root / "manifests" / "registry.ollama.ai" / namespace / model / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": blob.stat().st_size},
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10},
    ]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return blob


def make_hf(cache: Path, org: str, repo: str, files: dict[str, int]) -> list[Path]:
    """models--org--repo with blobs named by sha256 and snapshot symlinks into them."""
    repo_dir = cache / f"models--{org}--{repo}"
    snapshot = repo_dir / "snapshots" / ("a" * 40)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text("a" * 40)
    links = []
    for name, seed in files.items():
        split = None
        if "-of-" in name:
            index, count = name.removesuffix(".gguf").split("-")[-3], name.removesuffix(".gguf").split("-")[-1]
            split = (int(index), int(count))
        tmp = write_gguf(repo_dir / "tmp.gguf", megabytes=0.1, seed=seed, split=split)
        blob = repo_dir / "blobs" / _sha(tmp)
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        links.append(link)
    return links


@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home holding one store of each kind (HF_HOME comes from the isolated_home fixture)."""
    home = tmp_path / "user"
    monkeypatch.setenv("HOME", str(home))
    for variable in ("OLLAMA_MODELS", "HF_HUB_CACHE", "LLAMA_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    ollama = home / ".ollama" / "models"
    make_ollama(ollama, "library", "qwen3", "8b", seed=1)
    make_ollama(ollama, "someone", "tool", "v1", seed=2)
    hf = Path(os.environ["HF_HOME"]) / "hub"
    make_hf(hf, "org", "repo", {"repo-Q4_K_M.gguf": 3, "mmproj-repo-f16.gguf": 4})
    make_hf(hf, "org", "big", {"big-Q8_0-00001-of-00002.gguf": 5, "big-Q8_0-00002-of-00002.gguf": 6})
    write_gguf(
        home / ".lmstudio" / "models" / "lmstudio-community" / "Gemma-GGUF" / "gemma-Q5_K_M.gguf", megabytes=0.1, seed=7
    )
    write_gguf(home / ".cache" / "llama.cpp" / "ggml-org_tiny-GGUF_tiny-Q2_K.gguf", megabytes=0.1, seed=8)
    return home


def _refuse_link(*_args: object, **_kwargs: object) -> None:
    raise OSError(18, "Invalid cross-device link")


def _cli(*args: str) -> tuple[int, str, str]:
    app = typer.Typer()
    app.command()(adopt_command)
    app.command("noop")(lambda: None)  # two commands, so typer keeps `adopt` as a sub-command
    result = CliRunner().invoke(app, ["adopt", *args], env={"COLUMNS": "300"})
    return result.exit_code, result.stdout, result.stderr


def test_names_are_derived_predictably() -> None:
    assert quant_tag("Qwen3-8B-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_tag("llama-2-7b.q4_0.gguf") == "Q4_0"
    assert quant_tag("model-UD-Q4_K_XL-00001-of-00003.gguf") == "UD-Q4_K_XL"
    assert quant_tag("model-bf16.gguf") == "BF16"
    assert quant_tag("plain.gguf") == "plain"
    assert split_llamacpp_name("ggml-org_gemma-3-1b-it-GGUF_gemma-3-1b-it-Q4_K_M", []) == (
        "ggml-org",
        "gemma-3-1b-it-GGUF",
        "gemma-3-1b-it-Q4_K_M",
    )
    assert split_llamacpp_name("me_my_repo_file", [("me", "my_repo")]) == ("me", "my_repo", "file")


def test_dry_run_lists_every_store_and_registers_nothing(user_home: Path, isolated_home: Path) -> None:
    code, stdout, stderr = _cli("--dry-run")
    assert code == 0, stderr
    rows = [line.split() for line in stdout.splitlines() if line.startswith("would adopt")]
    assert {row[2]: row[3] for row in rows} == EXPECTED
    assert all(row[6] in ("hard", "in") for row in rows)
    assert all(Path(row[-1]).is_absolute() for row in rows)
    assert "mmproj" not in stdout
    assert "would adopt 6 model(s)" in stderr
    assert NO_TEMPLATE_NOTE in stderr  # the test GGUFs carry no template; Ollama's is not translated
    assert Store(isolated_home).list() == []
    code, stdout, _ = _cli("--dry-run", "--from", "ollama", "--from", "llamacpp")
    assert {line.split()[2] for line in stdout.splitlines()} == {
        "qwen3:8b",
        "someone/tool:v1",
        "hf.co/ggml-org/tiny-GGUF:Q2_K",
    }


def test_adopt_hard_links_every_layout_without_copying_and_is_idempotent(user_home: Path, isolated_home: Path) -> None:
    report = adopt(Store(isolated_home))
    assert {o.name: o.candidate.layout for o in report.outcomes if o.action == "adopted"} == EXPECTED
    store = Store(isolated_home)
    manifests = {m.name: m for m in store.list()}
    assert set(manifests) == set(EXPECTED)
    for outcome in report.outcomes:
        assert outcome.how == "hard link"
        manifest = manifests[outcome.name]
        assert manifest.source.kind == "adopt"
        for original, blob in zip(outcome.candidate.files, store.file_paths(manifest), strict=False):
            assert blob.stat().st_ino == original.resolve().stat().st_ino  # the same bytes on disk: no copy
            assert blob.stat().st_nlink == 2
            assert blob.name == "sha256-" + _sha(blob)
        assert store.file_status(manifest) == "ok"
    assert manifests["qwen3:8b"].sha256_verified  # Ollama named the blob by its sha256, and it matched
    assert manifests["hf.co/org/repo:Q4_K_M"].gguf["context_length"] == 2048
    big = manifests["hf.co/org/big:Q8_0"]
    assert [f.filename for f in big.files] == ["big-Q8_0-00001-of-00002.gguf", "big-Q8_0-00002-of-00002.gguf"]
    assert store.model_path(big).name == "big-Q8_0-00001-of-00002.gguf"
    leftovers = list(store.partial_dir.rglob("*")) if store.partial_dir.exists() else []
    assert leftovers == [], "adopting hard-links in place: nothing is staged, and nothing is left half-done"
    # Again: nothing changes.
    before = {p: p.read_text() for p in store.manifests_dir.rglob("*.json")}
    again = adopt(Store(isolated_home))
    assert {o.action for o in again.outcomes} == {"present"}
    assert {p: p.read_text() for p in store.manifests_dir.rglob("*.json")} == before


def test_adopt_references_in_place_when_links_fail_and_notices_missing_or_changed(
    user_home: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "link", _refuse_link)
    code, _, stderr = _cli("--from", "lmstudio", "--from", "hf")
    assert code == 0, stderr
    assert "adopted 3 model(s) (0 hard link(s), 3 in place)" in stderr
    store = Store(isolated_home)
    assert not store.blobs_dir.exists() or not any(store.blobs_dir.iterdir())  # nothing copied in
    lm = store.require(parse_name("lmstudio-community/Gemma-GGUF:Q5_K_M"))
    original = user_home / ".lmstudio" / "models" / "lmstudio-community" / "Gemma-GGUF" / "gemma-Q5_K_M.gguf"
    assert lm.files[0].path == str(original) and lm.files[0].mtime_ns == original.stat().st_mtime_ns
    assert original.stat().st_nlink == 1
    assert store.model_path(lm) == original
    big = store.require(parse_name("hf.co/org/big:Q8_0"))
    assert (
        store.model_path(big).name == "big-Q8_0-00001-of-00002.gguf"
    )  # the snapshot's name: llama.cpp finds split 2 next to it
    assert _cli("--from", "lmstudio")[2].count("is already in the store:") == 1

    # Changed: same size, new mtime.
    os.utime(original, ns=(original.stat().st_atime_ns, original.stat().st_mtime_ns + 5_000_000_000))
    assert store.file_status(lm) == "changed"
    with pytest.raises(ModelNotFound, match="changed since it was registered") as caught:
        store.model_path(lm)
    assert "sovereign adopt" in (caught.value.hint or "")
    # Adopting again registers the changed file afresh.
    code, _, stderr = _cli("--from", "lmstudio")
    assert "adopted lmstudio-community/Gemma-GGUF:Q5_K_M" in stderr
    lm = store.require(parse_name(lm.name))
    assert store.file_status(lm) == "ok"

    # Missing: deleted; list marks it and loading refuses it with one line.
    original.unlink()
    assert store.file_status(lm) == "missing"
    with pytest.raises(ModelNotFound, match="no longer exists"):
        store.model_path(lm)
    console = Console(width=200, record=True)
    console.print(models_table(store.list(), {m.name: store.file_status(m) for m in store.list()}))
    table = console.export_text()
    assert "Gemma-GGUF:Q5_K_M (missing)" in table and "hf.co/org/repo:Q4_K_M (" not in table
    code, _, stderr = _cli("--from", "lmstudio")  # nothing found, nothing crashes
    assert code == 0 and "found no GGUF models" in stderr


def test_cross_device_originals_are_referenced(
    user_home: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == isolated_home.parent.stat().st_dev:
        pytest.skip("no second file system at /dev/shm")
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        monkeypatch.setenv("LLAMA_CACHE", str(other))
        write_gguf(other / "ggml-org_shm-GGUF_shm-Q4_0.gguf", megabytes=0.1, seed=9)
        code, stdout, _ = _cli("--from", "llamacpp", "--dry-run")
        assert "hf.co/ggml-org/shm-GGUF:Q4_0" in stdout and "in place" in stdout
        outcome = adopt(Store(isolated_home), ["llamacpp"]).outcomes[0]
        assert outcome.action == "adopted" and outcome.how == "in place"
        assert outcome.manifest is not None and outcome.manifest.files[0].path == str(
            other / "ggml-org_shm-GGUF_shm-Q4_0.gguf"
        )
    finally:
        shutil.rmtree(other)


def test_a_name_held_by_another_model_is_skipped_with_a_reason(
    user_home: Path, isolated_home: Path, tmp_path: Path
) -> None:
    other = write_gguf(tmp_path / "other.gguf", megabytes=0.1, seed=42)
    pull_in_process(str(other), options=PullOptions(copy_local=True, name="qwen3:8b"))
    code, _, stderr = _cli("--from", "ollama")
    assert code == 0
    assert "qwen3:8b already names another model" in stderr
    assert "adopted someone/tool:v1" in stderr
    assert Store(isolated_home).require(parse_name("qwen3:8b")).source.kind == "local"


def test_a_model_already_pulled_is_not_adopted_twice(user_home: Path, isolated_home: Path) -> None:
    blob = next((user_home / ".ollama" / "models" / "blobs").iterdir())
    pull_in_process(str(blob), options=PullOptions(copy_local=True, name="mine:latest"))
    outcomes = {o.candidate.origin.split(" ")[0]: o for o in adopt(Store(isolated_home), ["ollama"]).outcomes}
    assert any(o.action == "present" and o.name == "mine:latest" for o in outcomes.values())


def test_broken_stores_are_skipped_not_fatal(user_home: Path, isolated_home: Path) -> None:
    ollama = user_home / ".ollama" / "models"
    (ollama / "manifests" / "registry.ollama.ai" / "library" / "broken").mkdir(parents=True)
    (ollama / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest").write_text("{not json")
    gone = ollama / "manifests" / "registry.ollama.ai" / "library" / "gone" / "latest"
    gone.parent.mkdir(parents=True)
    gone.write_text(
        json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "1" * 64}]})
    )
    bad = user_home / ".lmstudio" / "models" / "pub" / "repo" / "fake-Q4_0.gguf"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a gguf at all")
    code, _, stderr = _cli()
    assert code == 0, stderr
    assert "cannot be read" in stderr and "is missing" in stderr and "not a GGUF file" in stderr
    assert "adopted 6 model(s)" in stderr


def test_cli_errors_are_one_line(user_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SOVEREIGN_HOME", str(blocker / "home"))  # cannot be created under a file
    code, stdout, stderr = _cli("--from", "lmstudio")
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stdout + stderr


def test_run_refuses_a_model_whose_original_is_gone_with_one_line(
    user_home: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "link", _refuse_link)
    adopt(Store(isolated_home), ["lmstudio"])
    original = user_home / ".lmstudio" / "models" / "lmstudio-community" / "Gemma-GGUF" / "gemma-Q5_K_M.gguf"
    original.unlink()
    result = run_cli("run", "lmstudio-community/Gemma-GGUF:Q5_K_M", "hi", timeout=120)
    assert_clean_error(result, "no longer exists", "sovereign adopt")


def test_the_real_command(user_home: Path, isolated_home: Path) -> None:
    result = run_cli("adopt", "--dry-run", "--from", "ollama")
    assert result.returncode == 0, result.stderr
    assert "qwen3:8b" in result.stdout and Store(isolated_home).list() == []
