"""The store: shared blobs, rm and garbage collection, GGUF facts, disk-space refusal."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from sovereign.errors import InsufficientDisk, ModelNotFound, NotGGUF, StoreError
from sovereign.refs import parse_name
from sovereign.store import PullOptions, Store
from sovereign.store.gguf_header import read_gguf_info
from tests.conftest import pull_in_process, write_gguf
from tests.fakehub import FakeHubServer, FakeRepo


def test_two_names_share_one_blob_and_rm_frees_it_only_when_unused(tiny_gguf: Path, isolated_home: Path) -> None:
    store = Store(isolated_home)
    first = pull_in_process(str(tiny_gguf), options=PullOptions(copy_local=True, name="a:one")).manifest
    second = pull_in_process(str(tiny_gguf), options=PullOptions(copy_local=True, name="b:two")).manifest
    assert first.files[0].digest == second.files[0].digest
    assert len(list((isolated_home / "blobs").iterdir())) == 1
    _, freed = store.remove(parse_name("a:one"))
    assert freed == [] and store.blob_path(second.files[0].digest or "").exists()
    _, freed = store.remove(parse_name("b:two"))
    assert freed == [second.files[0].digest] and not any((isolated_home / "blobs").iterdir())
    assert store.list() == [] and not any((isolated_home / "manifests").iterdir())
    with pytest.raises(ModelNotFound, match="sovereign pull"):
        store.remove(parse_name("b:two"))


def test_gguf_header_facts(tiny_gguf: Path) -> None:
    info = read_gguf_info([tiny_gguf])
    assert (info.architecture, info.context_length, info.quantization, info.license) == ("llama", 2048, "ALL_F32", "apache-2.0")
    assert info.parameters == 256 * 1024 and not info.has_chat_template


def test_truncated_gguf_is_reported(tiny_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:40])
    with pytest.raises(NotGGUF, match="truncated"):
        read_gguf_info([cut])


def test_refuses_a_download_that_does_not_fit(hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path) -> None:
    data = write_gguf(tmp_path / "m.gguf", megabytes=2).read_bytes()
    hub.hub.repos["acme/m-GGUF"] = FakeRepo(files={"m-Q4_K_M.gguf": data})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9 - 1_000_000, 1_000_000))
    with pytest.raises(InsufficientDisk, match="not enough disk space"):
        pull_in_process("hf.co/acme/m-GGUF:Q4_K_M")
    assert hub.hub.downloads("m-Q4_K_M.gguf") == [], "nothing is downloaded when it cannot fit"
    assert Store(isolated_home).list() == []


def test_damaged_or_newer_manifests_never_lose_blobs_or_reach_outside(tiny_gguf: Path, tmp_path: Path, isolated_home: Path) -> None:
    store = Store(isolated_home)
    one = pull_in_process(str(tiny_gguf), options=PullOptions(copy_local=True, name="one:a")).manifest
    pull_in_process(str(tiny_gguf), options=PullOptions(copy_local=True, name="two:a"))
    # A newer sovereign wrote "two" with a schema this one cannot read: its blob must survive `rm one:a`.
    two_path = isolated_home / "manifests" / "two" / "a.json"
    two_path.write_text(two_path.read_text().replace('"schema": 1', '"schema": 2'))
    (isolated_home / "manifests" / "zz").mkdir()
    (isolated_home / "manifests" / "zz" / "x.json").write_text("[]")
    assert [m.name for m in store.list()] == ["one:a"]
    _, freed = store.remove(parse_name("one:a"))
    assert freed == [] and store.blob_path(one.files[0].digest or "").exists()
    # A manifest whose digest is a path elsewhere is treated as damaged, never followed.
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    evil = isolated_home / "manifests" / "ev" / "a.json"
    evil.parent.mkdir()
    evil.write_text(two_path.read_text().replace('"schema": 2', '"schema": 1').replace(one.files[0].digest or "", str(victim)))
    with pytest.raises(StoreError, match="damaged"):
        store.remove(parse_name("ev:a"))
    assert victim.read_text() == "keep me"
