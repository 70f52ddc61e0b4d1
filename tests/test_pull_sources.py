"""Pulls from direct URLs, local files and folders, and catalog fallback across sources."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sovereign.errors import (
    AllSourcesFailed,
    InsecureSource,
    IntegrityError,
    InvalidReference,
    NotGGUF,
    SourceUnavailable,
)
from sovereign.refs import parse_name
from sovereign.store import PullOptions, Store
from tests.conftest import pull_in_process, write_gguf
from tests.fakehub import FakeHubServer, FakeRepo


def _url(hub: FakeHubServer, tmp_path: Path, **knobs: object) -> tuple[str, bytes]:
    data = write_gguf(tmp_path / "src.gguf", megabytes=2).read_bytes()
    hub.hub.repos["web/files"] = FakeRepo(
        files={"My-Model-Q4_K_M.gguf": data, "notes.gguf": b"<html>not a model</html>" * 10}, **knobs
    )
    return f"{hub.url}/web/files/resolve/main/My-Model-Q4_K_M.gguf", data


def test_direct_url_on_loopback(hub: FakeHubServer, tmp_path: Path, isolated_home: Path) -> None:
    url, data = _url(hub, tmp_path)
    manifest = pull_in_process(url).manifest
    assert manifest.name == "my-model-q4_k_m:latest"
    assert Store(isolated_home).file_paths(manifest)[0].read_bytes() == data
    assert manifest.source.kind == "url" and not manifest.sha256_verified


def test_direct_url_resumes_after_a_cut(hub: FakeHubServer, tmp_path: Path) -> None:
    url, data = _url(hub, tmp_path, cut_after=500_000, cuts=1)
    pull_in_process(url)
    gets = hub.hub.downloads("My-Model-Q4_K_M.gguf")
    assert [g.range for g in gets] == [None, "bytes=500000-"]
    assert sum(g.body_bytes for g in gets) == len(data)


def test_plain_http_beyond_loopback_is_refused() -> None:
    with pytest.raises(InsecureSource, match="refusing plain http to models.example.com"):
        pull_in_process("http://models.example.com/x.gguf")


def test_a_redirect_to_plain_http_beyond_loopback_is_refused(
    hub: FakeHubServer, tmp_path: Path, isolated_home: Path
) -> None:
    _url(hub, tmp_path)
    hub.hub.redirects["/web/files/resolve/main/moved.gguf"] = "http://192.0.2.1/x.gguf"  # TEST-NET-1: never contacted
    with pytest.raises(InsecureSource, match="192.0.2.1"):
        pull_in_process(f"{hub.url}/web/files/resolve/main/moved.gguf")
    assert Store(isolated_home).list() == []


def test_url_that_is_not_gguf_is_refused_early(hub: FakeHubServer, tmp_path: Path, isolated_home: Path) -> None:
    _url(hub, tmp_path)
    with pytest.raises(NotGGUF):
        pull_in_process(f"{hub.url}/web/files/resolve/main/notes.gguf")
    assert not list((isolated_home / "partial").rglob("*.gguf"))


def test_local_file_registers_in_place_and_rm_never_deletes_it(tiny_gguf: Path, isolated_home: Path) -> None:
    manifest = pull_in_process(str(tiny_gguf)).manifest
    assert manifest.files[0].in_place and manifest.files[0].path == str(tiny_gguf)
    assert not (isolated_home / "blobs").exists() or not any((isolated_home / "blobs").iterdir())
    Store(isolated_home).remove(parse_name(manifest.name))
    assert tiny_gguf.exists()


def test_local_file_copy_goes_into_a_blob(tiny_gguf: Path, isolated_home: Path) -> None:
    manifest = pull_in_process(str(tiny_gguf), options=PullOptions(copy_local=True, name="mine:v1")).manifest
    assert manifest.name == "mine:v1"
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert manifest.files[0].digest == f"sha256:{digest}" and (isolated_home / "blobs" / f"sha256-{digest}").exists()


def test_local_folder_with_one_model(tiny_gguf: Path) -> None:
    assert pull_in_process(str(tiny_gguf.parent)).manifest.files[0].filename == tiny_gguf.name


def test_local_folder_with_two_models_asks_which(tmp_path: Path) -> None:
    write_gguf(tmp_path / "two" / "a.gguf")
    write_gguf(tmp_path / "two" / "b.gguf")
    with pytest.raises(InvalidReference, match="holds 2 models"):
        pull_in_process(str(tmp_path / "two"))


def test_local_file_that_is_not_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(NotGGUF):
        pull_in_process(str(fake))


def _user_catalog(home: Path, body: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(body)


def test_catalog_entry_falls_back_to_its_second_source_and_says_which(
    hub: FakeHubServer, tmp_path: Path, isolated_home: Path
) -> None:
    url, data = _url(hub, tmp_path)
    sha = hashlib.sha256(data).hexdigest()
    _user_catalog(
        isolated_home,
        f'''
[models."test:fallback"]
sha256 = "{sha}"
sources = ["{hub.url}/web/files/resolve/main/missing.gguf", "{url}"]
''',
    )
    result = pull_in_process("test:fallback")
    assert result.source == url
    assert result.manifest.sha256_verified
    assert len(result.failures) == 1 and isinstance(result.failures[0][1], SourceUnavailable)


def test_catalog_sha256_mismatch_across_all_sources(hub: FakeHubServer, tmp_path: Path, isolated_home: Path) -> None:
    url, _ = _url(hub, tmp_path)
    _user_catalog(isolated_home, f'[models."test:bad"]\nsha256 = "{"0" * 64}"\nsources = ["{url}"]\n')
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        pull_in_process("test:bad")
    assert Store(isolated_home).list() == []


def test_all_sources_failing_lists_each(hub: FakeHubServer, isolated_home: Path) -> None:
    _user_catalog(
        isolated_home,
        f'[models."test:gone"]\nsources = ["{hub.url}/a/b/resolve/main/x.gguf", "{hub.url}/c/d/resolve/main/y.gguf"]\n',
    )
    with pytest.raises(AllSourcesFailed) as caught:
        pull_in_process("test:gone")
    assert len(caught.value.failures) == 2


def test_a_name_holding_another_source_is_not_silently_reused(tmp_path: Path) -> None:
    first = write_gguf(tmp_path / "q4" / "model.gguf")
    second = write_gguf(tmp_path / "q8" / "model.gguf", seed=1)
    pull_in_process(str(first))
    with pytest.raises(InvalidReference, match="already holds a model from"):
        pull_in_process(str(second))
    assert pull_in_process(str(second), options=PullOptions(name="model:q8")).manifest.name == "model:q8"


def test_catalog_sha256_applies_to_local_sources_in_place(tiny_gguf: Path, isolated_home: Path) -> None:
    _user_catalog(isolated_home, f'[models."loc:v1"]\nsha256 = "{"0" * 64}"\nsources = ["{tiny_gguf}"]\n')
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        pull_in_process("loc:v1")
    assert tiny_gguf.exists(), "a user's own file is never deleted"


def test_refused_downloads_leave_nothing_in_partial(hub: FakeHubServer, tmp_path: Path, isolated_home: Path) -> None:
    """Not GGUF, or not the promised bytes: the file, its .http.json and its staging folder all go."""
    _url(hub, tmp_path)
    with pytest.raises(NotGGUF):
        pull_in_process(f"{hub.url}/web/files/resolve/main/notes.gguf")
    assert list((isolated_home / "partial").rglob("*")) == []
    hub.hub.repos["web/files"].corrupt = True
    with pytest.raises(IntegrityError):
        pull_in_process("hf.co/web/files/My-Model-Q4_K_M.gguf", environ={"HF_ENDPOINT": hub.url})
    assert list((isolated_home / "partial").rglob("*")) == []
