"""The store: shared blobs, rm, prune and garbage collection, GGUF facts, disk-space refusal."""

from __future__ import annotations

import errno
import shutil
import threading
from collections import namedtuple
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFWriter

from sovereign.errors import InsufficientDisk, ModelNotFound, NotGGUF, StoreError
from sovereign.refs import parse_name
from sovereign.store import PullOptions, Store
from sovereign.store.gguf_header import read_gguf_info
from sovereign.store.http import single
from sovereign.store.store import PruneResult
from tests.conftest import assert_clean_error, pull_in_process, run_cli, write_gguf
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
    assert (info.architecture, info.context_length, info.quantization, info.license) == (
        "llama",
        2048,
        "ALL_F32",
        "apache-2.0",
    )
    assert info.parameters == 256 * 1024 and not info.has_chat_template


def test_truncated_gguf_is_reported(tiny_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:40])
    with pytest.raises(NotGGUF, match="truncated"):
        read_gguf_info([cut])


def test_refuses_a_download_that_does_not_fit(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    data = write_gguf(tmp_path / "m.gguf", megabytes=2).read_bytes()
    hub.hub.repos["acme/m-GGUF"] = FakeRepo(files={"m-Q4_K_M.gguf": data})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9 - 1_000_000, 1_000_000))
    with pytest.raises(InsufficientDisk, match="not enough disk space"):
        pull_in_process("hf.co/acme/m-GGUF:Q4_K_M")
    assert hub.hub.downloads("m-Q4_K_M.gguf") == [], "nothing is downloaded when it cannot fit"
    assert Store(isolated_home).list() == []


def test_damaged_or_newer_manifests_never_lose_blobs_or_reach_outside(
    tiny_gguf: Path, tmp_path: Path, isolated_home: Path
) -> None:
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
    evil.write_text(
        two_path.read_text().replace('"schema": 2', '"schema": 1').replace(one.files[0].digest or "", str(victim))
    )
    with pytest.raises(StoreError, match="damaged"):
        store.remove(parse_name("ev:a"))
    assert victim.read_text() == "keep me"


# --- disk space, partial downloads and prune (issue 12) ------------------------------------


class _NoLengthHandler(BaseHTTPRequestHandler):
    """Serves `payload` as HTTP/1.0 with no Content-Length: the size is known only at the end."""

    payload = b""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        for offset in range(0, len(self.payload), 256 * 1024):
            self.wfile.write(self.payload[offset : offset + 256 * 1024])


@pytest.fixture
def no_length_server(tmp_path: Path) -> Iterator[str]:
    """A loopback URL for a 4 MiB GGUF sent without Content-Length."""
    handler = type(
        "Handler", (_NoLengthHandler,), {"payload": write_gguf(tmp_path / "src.gguf", megabytes=4).read_bytes()}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/files/big-model.gguf"
    server.shutdown()
    server.server_close()


def _disk_that_fills_with(partial: Path, monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """A disk with `free` bytes before the download, losing what the partial files take."""
    usage = namedtuple("usage", "total used free")

    def disk_usage(_path: object) -> object:
        held = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file()) if partial.is_dir() else 0
        return usage(10**12, 10**12 - free + held, free - held)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_free_space_is_checked_as_bytes_arrive_without_content_length(
    no_length_server: str, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    monkeypatch.setattr(single, "SPACE_CHECK_INTERVAL", 1024 * 1024)
    monkeypatch.setenv("SOVEREIGN_MIN_FREE_BYTES", str(2 * 1024 * 1024))
    _disk_that_fills_with(
        isolated_home / "partial", monkeypatch, free=5 * 1024 * 1024
    )  # room for ~2 MiB of a 4 MiB file
    with pytest.raises(InsufficientDisk) as error:
        pull_in_process(no_length_server)
    held = sum(p.stat().st_size for p in (isolated_home / "partial").rglob("*.gguf"))
    assert 1024 * 1024 <= held < 4 * 1024 * 1024, "stopped part-way, keeping what arrived for a resume"
    # The hint says what the partial download holds and both ways out.
    assert "partial downloads keep" in (error.value.hint or "") and str(isolated_home / "partial") in (
        error.value.hint or ""
    )
    assert f"sovereign pull {no_length_server}" in (error.value.hint or "") and "sovereign prune" in (
        error.value.hint or ""
    )
    assert Store(isolated_home).list() == []


def test_disk_full_hint_names_the_partial_download_and_prune_frees_it(
    no_length_server: str, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    monkeypatch.setattr(single, "SPACE_CHECK_INTERVAL", 1024 * 1024)
    with monkeypatch.context() as disk:
        _disk_that_fills_with(isolated_home / "partial", disk, free=256 * 1024 * 1024 + 3 * 1024 * 1024)
        with pytest.raises(InsufficientDisk):
            pull_in_process(no_length_server)
    assert list((isolated_home / "partial").rglob("*.gguf"))
    # The CLI (its own process: a real disk, but a reserve no disk has) says it in one line.
    result = run_cli("pull", no_length_server, env={"SOVEREIGN_MIN_FREE_BYTES": str(10**18)})
    assert_clean_error(result, "not enough disk space", "partial downloads keep", "sovereign prune")
    pruned = run_cli("prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted partial downloads" in pruned.stderr and "freed" in pruned.stderr
    assert not (isolated_home / "partial").exists()


def test_prune_deletes_unused_blobs_and_keeps_used_ones_and_running_pulls(tiny_gguf: Path, isolated_home: Path) -> None:
    store = Store(isolated_home)
    kept = pull_in_process(str(tiny_gguf), options=PullOptions(copy_local=True, name="kept:a")).manifest
    orphan = isolated_home / "blobs" / ("sha256-" + "ab" * 32)
    orphan.write_bytes(b"x" * 1000)
    (isolated_home / "shards" / orphan.name).mkdir(parents=True)
    leftover = store.partial_path("url:https://example.com/x.gguf") / "x.gguf"
    leftover.write_bytes(b"GGUF" + b"\0" * 500)
    with store.pulling():  # another pull is writing: its partial download must survive
        during = store.prune()
    assert during.kept_running and during.partial_bytes == 0 and leftover.exists()
    assert (
        during.blobs == 1
        and during.blob_bytes == 1000
        and not orphan.exists()
        and not (isolated_home / "shards" / orphan.name).exists()
    )
    assert store.blob_path(kept.files[0].digest or "").exists(), "a blob a manifest uses is never pruned"
    after = store.prune()
    assert not after.kept_running and after.partial_files == 1 and after.partial_bytes == 504 and not leftover.exists()
    assert store.require(parse_name("kept:a")) and store.prune() == PruneResult()


def test_prune_with_nothing_to_do(isolated_home: Path) -> None:
    result = run_cli("prune")
    assert result.returncode == 0 and "nothing to prune" in result.stderr


# --- header-only GGUFs ------------------------------------------------------------------------


def _header_only(path: Path, *, tensors: bool) -> Path:
    """A GGUF whose header is valid but whose weights are missing (tensor infos without data, or no tensors at all)."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(2048)
    if tensors:
        writer.add_tensor("blk.0.weight", np.ones((256, 1024), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    if tensors:
        writer.write_ti_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("tensors", "padding", "message"),
    [(True, 0, "truncated"), (True, 4096, "truncated"), (False, 0, "no weights"), (False, 64, "no weights")],
)
def test_a_gguf_header_without_weights_is_not_a_model(
    tensors: bool, padding: int, message: str, tmp_path: Path, isolated_home: Path
) -> None:
    path = _header_only(tmp_path / "hollow.gguf", tensors=tensors)
    path.write_bytes(path.read_bytes() + b"\0" * padding)
    with pytest.raises(NotGGUF, match=message):
        read_gguf_info([path])
    for options in (PullOptions(), PullOptions(copy_local=True)):
        with pytest.raises(NotGGUF, match=message):
            pull_in_process(str(path), options=options)
    assert Store(isolated_home).list() == []
    assert not [p for p in (isolated_home / "partial").rglob("*") if p.is_file()], "the refused copy is not left behind"


class _FillingFile:
    """A file handle on a disk that fills up after `room` bytes."""

    def __init__(self, handle: Any, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def test_a_disk_that_fills_mid_download_is_insufficient_disk_not_a_crash(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    data = write_gguf(tmp_path / "m.gguf", megabytes=2).read_bytes()
    hub.hub.repos["acme/m-GGUF"] = FakeRepo(files={"m-Q4_K_M.gguf": data})
    real_open = Path.open

    def open_on_small_disk(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(self, mode, *args, **kwargs)
        return _FillingFile(handle, 1024 * 1024) if mode in ("wb", "r+b") and "partial" in self.parts else handle

    monkeypatch.setattr(Path, "open", open_on_small_disk)
    with pytest.raises(InsufficientDisk, match="disk filled up") as error:
        pull_in_process("hf.co/acme/m-GGUF:Q4_K_M", environ={"HF_ENDPOINT": hub.url})
    assert "sovereign prune" in (error.value.hint or "") and "sovereign pull hf.co/acme/m-GGUF:Q4_K_M" in (
        error.value.hint or ""
    )
