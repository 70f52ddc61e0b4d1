"""Pulls from Hugging Face through huggingface-hub, against the fake hub on loopback."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sovereign.errors import AccessDenied, IntegrityError, SourceUnavailable
from sovereign.refs import parse_name
from sovereign.store import PullOptions, Store
from sovereign.store.files import SIDECAR_SUFFIX
from tests.conftest import assert_clean_error, pull_in_process, run_cli, sovereign_command, write_gguf
from tests.fakehub import FakeHubServer, FakeRepo

REPO = "acme/tiny-GGUF"
MIB = 1024 * 1024


def _serve(hub: FakeHubServer, tmp_path: Path, megabytes: float = 1.0, **knobs: object) -> bytes:
    data = write_gguf(tmp_path / "src" / "tiny-Q4_K_M.gguf", megabytes=megabytes).read_bytes()
    hub.hub.repos[REPO] = FakeRepo(
        files={"tiny-Q4_K_M.gguf": data, "tiny-Q8_0.gguf": data[:-1] + b"\0", "README.md": b"hi"}, **knobs
    )
    return data


def _settled_partial_size(home: Path, quiet: float = 1.0, limit: float = 60.0) -> int:
    """The size of the one partial download under home, once it has stopped growing for `quiet` seconds."""
    deadline, size, since = time.monotonic() + limit, -1, time.monotonic()
    while time.monotonic() < deadline:
        partials = [p.with_name(p.name.removesuffix(SIDECAR_SUFFIX)) for p in home.rglob(f"*{SIDECAR_SUFFIX}")]
        now = sum(p.stat().st_size for p in partials if p.exists())
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return size
        time.sleep(0.1)
    return size


def _dead_endpoint() -> str:
    """A loopback URL where nothing listens: a blocked route."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_pull_by_quant_tag_picks_the_file_and_verifies_it(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    data = _serve(hub, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = pull_in_process(f"hf.co/{REPO}:Q4_K_M")
    assert result.manifest.name == f"hf.co/{REPO}:Q4_K_M"
    assert result.manifest.sha256_verified
    blob = Store(isolated_home).file_paths(result.manifest)[0]
    assert blob.read_bytes() == data
    assert blob.name == f"sha256-{hashlib.sha256(data).hexdigest()}"
    assert result.manifest.gguf["architecture"] == "llama" and result.manifest.gguf["context_length"] == 2048
    assert not any((isolated_home / "partial").iterdir()), "staging must be cleaned after a commit"


def test_pull_names_a_file_directly_and_default_quant_is_q4_k_m(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(hub, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert pull_in_process(f"hf.co/{REPO}/tiny-Q8_0.gguf").manifest.files[0].filename == "tiny-Q8_0.gguf"
    assert pull_in_process(f"hf.co/{REPO}").manifest.files[0].filename == "tiny-Q4_K_M.gguf"


def test_a_transfer_cut_midway_resumes_with_a_range_request(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _serve(hub, tmp_path, megabytes=24, cut_after=13 * MIB, cuts=1)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = pull_in_process(f"hf.co/{REPO}:Q4_K_M")
    assert result.manifest.sha256_verified
    gets = hub.hub.downloads("tiny-Q4_K_M.gguf")
    assert len(gets) == 2
    assert gets[0].body_bytes == 13 * MIB
    resumed_at = int(gets[1].range.split("=")[1].split("-")[0]) if gets[1].range else 0
    assert resumed_at == 13 * MIB
    assert gets[1].body_bytes == len(data) - resumed_at, "nothing may be downloaded twice"


def test_hash_mismatch_discards_the_file_and_registers_nothing(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    _serve(hub, tmp_path, corrupt=True)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        pull_in_process(f"hf.co/{REPO}:Q4_K_M")
    assert Store(isolated_home).list() == []
    assert not list((isolated_home / "blobs").glob("*")) if (isolated_home / "blobs").exists() else True
    assert not list((isolated_home / "partial").rglob("*.gguf"))


def test_falls_back_to_the_next_mirror_when_one_is_blocked(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(hub, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", _dead_endpoint())
    monkeypatch.setenv("SOVEREIGN_HF_MIRRORS", f"{_dead_endpoint()},{hub.url}")
    result = pull_in_process(f"hf.co/{REPO}:Q4_K_M")
    assert result.manifest.source.detail == f"from {hub.url}"


def test_mirror_option_is_tried_first_and_never_sees_the_token(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(hub, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", _dead_endpoint())
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    result = pull_in_process(f"hf.co/{REPO}:Q4_K_M", options=PullOptions(mirrors=(hub.url,)))
    assert result.manifest.source.detail == f"from {hub.url}"
    assert hub.hub.log and all(r.authorization is None for r in hub.hub.log)


def test_plain_http_mirror_beyond_loopback_is_skipped_and_a_broken_hub_falls_through(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(hub, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1")  # TEST-NET-1: refused before any connection
    # A "mirror" answering HTML-ish garbage for the listing (a captive portal) must not stop the pull.
    portal = f"{hub.url}/portal"
    monkeypatch.setenv("SOVEREIGN_HF_MIRRORS", f"{portal},{hub.url}")
    result = pull_in_process(f"hf.co/{REPO}:Q4_K_M")
    assert result.manifest.source.detail == f"from {hub.url}"


def test_every_mirror_blocked_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", _dead_endpoint())
    monkeypatch.setenv("SOVEREIGN_HF_MIRRORS", _dead_endpoint())
    with pytest.raises(SourceUnavailable, match="cannot reach"):
        pull_in_process(f"hf.co/{REPO}:Q4_K_M")


def test_gated_repository_without_a_token_says_to_set_hf_token(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(hub, tmp_path, gated_token="hf_secret")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(AccessDenied) as caught:
        pull_in_process(f"hf.co/{REPO}:Q4_K_M")
    assert "gated" in caught.value.message and "HF_TOKEN" in (caught.value.hint or "")
    result = run_cli("pull", f"hf.co/{REPO}:Q4_K_M", env={"HF_ENDPOINT": hub.url})
    assert_clean_error(result, "gated")
    # With the token, the same pull goes through.
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert pull_in_process(f"hf.co/{REPO}:Q4_K_M").manifest.sha256_verified


def test_missing_quantization_lists_what_the_repository_has(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(hub, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(SourceUnavailable, match="no IQ2_XS GGUF.*tiny-Q8_0.gguf"):
        pull_in_process(f"hf.co/{REPO}:IQ2_XS")


def test_sharded_gguf_is_pulled_whole_and_linked_under_its_names(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    shards = {
        f"Q4_K_M/big-Q4_K_M-0000{i}-of-00002.gguf": write_gguf(
            tmp_path / f"s{i}.gguf", split=(i, 2), seed=i
        ).read_bytes()
        for i in (1, 2)
    }
    hub.hub.repos["acme/big-GGUF"] = FakeRepo(files=shards)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    manifest = pull_in_process("hf.co/acme/big-GGUF:Q4_K_M").manifest
    assert [f.filename for f in manifest.files] == ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"]
    assert manifest.gguf["split_count"] == 2
    assert manifest.gguf["parameters"] == 2 * 256 * 1024
    first = Store(isolated_home).model_path(manifest)
    assert first.name == "big-Q4_K_M-00001-of-00002.gguf"
    assert (first.parent / "big-Q4_K_M-00002-of-00002.gguf").read_bytes() == shards[
        "Q4_K_M/big-Q4_K_M-00002-of-00002.gguf"
    ]


def test_two_concurrent_pulls_of_one_model_do_not_corrupt_each_other(
    hub: FakeHubServer, tmp_path: Path, isolated_home: Path
) -> None:
    data = _serve(hub, tmp_path, megabytes=4, bytes_per_second=8_000_000)
    env = {"HF_ENDPOINT": hub.url}
    command = [*sovereign_command(), "pull", f"hf.co/{REPO}:Q4_K_M"]
    import os

    processes = [
        subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert any("already pulled" in err for _, err in outputs), "the second pull should wait and find the model in place"
    manifests = Store(isolated_home).list()
    assert len(manifests) == 1
    assert Store(isolated_home).file_paths(manifests[0])[0].read_bytes() == data
    assert sum(g.body_bytes for g in hub.hub.downloads("tiny-Q4_K_M.gguf")) == len(data)


def test_ctrl_c_during_a_pull_leaves_state_the_next_pull_resumes(
    hub: FakeHubServer, tmp_path: Path, isolated_home: Path
) -> None:
    import os

    # the hub stops every transfer after 13 MiB (whatever the connections), until the pull was interrupted
    data = _serve(hub, tmp_path, megabytes=24, hold_after=13 * MIB)
    repo = hub.hub.repos[REPO]
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    process = subprocess.Popen(
        [*sovereign_command(), "pull", f"hf.co/{REPO}:Q4_K_M"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell runs a background job with SIGINT ignored, and the pull would inherit that (a suite started
        # with `&` saw the pull finish through its Ctrl-C): the pull gets Ctrl-C as a terminal would give it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert repo.held.wait(120), "the pull never got 13 MiB in"
    # What the hub has sent may still sit in the sockets' buffers (several MiB on a busy machine): interrupt
    # once the pull has written what reached it, so the test measures what an interrupt keeps.
    on_disk = _settled_partial_size(isolated_home)
    assert on_disk >= 4 * MIB, f"the pull wrote only {on_disk:,} of the 13 MiB it was sent"
    process.send_signal(signal.SIGINT)
    # The pull's threads must get their reads back to wind down, so the hub lets the transfers go on, but at a
    # trickle: the interrupted pull stops long before the 11 MiB left could arrive.
    repo.bytes_per_second = 256 * 1024
    repo.hold_after = None
    repo.release.set()
    _, stderr = process.communicate(timeout=60)
    first_bytes = repo.sent_bytes  # what the interrupted pull can have received, at most
    repo.bytes_per_second = None
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "resume" in stderr
    assert Store(isolated_home).list() == [], "an interrupted pull must not look usable"

    earlier = len(hub.hub.downloads("tiny-Q4_K_M.gguf"))
    result = run_cli("pull", f"hf.co/{REPO}:Q4_K_M", env={"HF_ENDPOINT": hub.url})
    assert result.returncode == 0, result.stderr
    resumed = hub.hub.downloads("tiny-Q4_K_M.gguf")[earlier:]
    assert resumed and all(r.range and int(r.range.split("=")[1].split("-")[0]) > 0 for r in resumed)
    # Every byte written before the interrupt is kept: the resumed pull asks only for the rest.
    resumed_bytes = sum(r.body_bytes for r in resumed)
    assert resumed_bytes <= len(data) - on_disk, "the resumed pull must not fetch again what it held"
    assert resumed_bytes >= len(data) - first_bytes, "it cannot have had more than the hub sent"
    listed = json.loads(run_cli("list", "--json").stdout)
    assert [m["name"] for m in listed] == [f"hf.co/{REPO}:Q4_K_M"] and listed[0]["sha256_verified"]
    assert parse_name(listed[0]["name"]).tag == "Q4_K_M"
