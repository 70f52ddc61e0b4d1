"""Downloads over several range requests at once, against the fake hub on loopback.

The thresholds are lowered so that files of a few MiB take the parallel path in 1 MiB segments.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from sovereign.errors import InsufficientDisk, IntegrityError, NotGGUF
from sovereign.store import Store
from sovereign.store.files import sidecar_path
from sovereign.store.http import segmented
from sovereign.store.http.download import download
from sovereign.store.progress import NullReporter
from tests.conftest import pull_in_process, write_gguf
from tests.fakehub import FakeHubServer, FakeRepo

MIB = 1024 * 1024
REPO = "acme/par-GGUF"
NAME = "par-Q4_K_M.gguf"


@pytest.fixture(autouse=True)
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segmented, "PARALLEL_MIN_SIZE", 2 * MIB)
    monkeypatch.setattr(segmented, "SEGMENT_MIN", MIB)
    monkeypatch.setattr(segmented, "SEGMENT_MAX", MIB)
    monkeypatch.setattr(segmented, "STATE_SAVE_INTERVAL", 0.05)


def _serve(
    hub: FakeHubServer, tmp_path: Path, megabytes: float = 6, seed: int = 0, **knobs: object
) -> tuple[str, bytes]:
    data = write_gguf(tmp_path / "src" / f"{seed}.gguf", megabytes=megabytes, seed=seed).read_bytes()
    hub.hub.repos[REPO] = FakeRepo(files={NAME: data}, **knobs)
    return f"{hub.url}/{REPO}/resolve/main/{NAME}", data


def _ranges(hub: FakeHubServer) -> list[str | None]:
    return [r.range for r in hub.hub.downloads(NAME)]


def _cap_connections(hub: FakeHubServer) -> None:
    """Slow each connection (as a CDN edge does) so the download adds connections.

    Otherwise one fast stream carries the whole file.
    """
    hub.hub.per_connection_bytes_per_second = 6 * MIB


class _Counting(NullReporter):
    def __init__(self) -> None:
        self.total = 0
        self.begun: list[tuple[str, int | None, int]] = []
        self.statuses: list[str] = []

    def begin(self, label: str, total: int | None, completed: int = 0) -> None:
        self.begun.append((label, total, completed))
        self.total = completed

    def advance(self, nbytes: int) -> None:
        self.total += nbytes

    def status(self, message: str) -> None:
        self.statuses.append(message)


class _InterruptAfter(_Counting):
    """Ctrl-C (in the main thread, where it lands) once this many bytes have arrived."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        if self.total >= self.limit:
            raise KeyboardInterrupt


def test_a_multi_range_download_is_byte_identical_and_its_sha256_correct(hub: FakeHubServer, tmp_path: Path) -> None:
    url, data = _serve(hub, tmp_path)
    _cap_connections(hub)
    dest = tmp_path / "partial" / NAME
    dest.parent.mkdir()
    reporter = _Counting()
    sha = download(url, dest, reporter, connections=4)
    assert dest.read_bytes() == data
    assert sha == hashlib.sha256(data).hexdigest()
    assert reporter.total == len(data)
    ranges = _ranges(hub)
    assert ranges[0] is None, (
        "the first request asks for the whole file (and serves segments until another connection takes the next)"
    )
    assert len(ranges) > 1 and all(r and r.startswith("bytes=") for r in ranges[1:])
    starts = [int(r.split("=")[1].split("-")[0]) for r in ranges[1:]]
    assert len(set(starts)) == len(starts) and set(starts) <= set(range(MIB, len(data), MIB)), (
        "each other segment once, whole"
    )


def test_a_cut_in_a_segment_the_first_stream_carried_on_into_resumes_there(hub: FakeHubServer, tmp_path: Path) -> None:
    cut = 2 * MIB + MIB // 2  # inside segment 2, which the whole-file answer reached after segments 0 and 1
    url, data = _serve(hub, tmp_path, cut_after=cut, cuts=1)
    dest = tmp_path / "partial" / NAME
    dest.parent.mkdir()
    sha = download(url, dest, NullReporter(), connections=4)
    assert dest.read_bytes() == data and sha == hashlib.sha256(data).hexdigest()
    ranges = _ranges(hub)
    assert ranges[0] is None
    starts = [int(r.split("=")[1].split("-")[0]) for r in ranges[1:] if r]
    assert cut in starts, "the cut segment resumes where the bytes stopped"
    assert min(starts) >= cut, "segments the first stream completed are not fetched again"


def test_a_pull_takes_the_parallel_path_and_verifies(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    _, data = _serve(hub, tmp_path)
    _cap_connections(hub)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = pull_in_process(f"hf.co/{REPO}:Q4_K_M")
    assert result.manifest.sha256_verified
    assert Store(isolated_home).file_paths(result.manifest)[0].read_bytes() == data
    assert len(_ranges(hub)) > 1
    assert not any((isolated_home / "partial").iterdir()), "staging (sidecar included) must be cleaned after a commit"


def test_a_server_without_ranges_gets_one_connection(hub: FakeHubServer, tmp_path: Path) -> None:
    url, data = _serve(hub, tmp_path, accept_ranges=False)
    dest = tmp_path / NAME
    sha = download(url, dest, NullReporter(), connections=8)
    assert dest.read_bytes() == data and sha == hashlib.sha256(data).hexdigest()
    assert _ranges(hub) == [None]
    assert hub.hub.served(NAME) == len(data)


def test_a_server_that_advertises_ranges_but_ignores_them_falls_back_to_one_connection(
    hub: FakeHubServer, tmp_path: Path
) -> None:
    url, data = _serve(hub, tmp_path, accept_ranges=False, advertise_ranges=True)
    dest = tmp_path / NAME
    assert download(url, dest, NullReporter(), connections=4) == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data
    assert _ranges(hub)[-1] is None, "the last attempt is one plain stream"


def test_ranges_ignored_by_an_added_connection_make_the_next_attempt_one_stream(
    hub: FakeHubServer, tmp_path: Path
) -> None:
    """The whole-file answer carries the first segments; the range request of a second connection comes back whole."""
    url, data = _serve(hub, tmp_path, megabytes=8, accept_ranges=False, advertise_ranges=True)
    _cap_connections(hub)  # so the download adds a connection, whose range request is ignored
    reporter = _Counting()
    dest = tmp_path / NAME
    assert download(url, dest, reporter, connections=4) == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data
    assert reporter.statuses == ["transfer interrupted (RemoteProtocolError); resuming"], "one restart, no more"
    assert _ranges(hub)[0] is None and _ranges(hub)[-1] is None and any(_ranges(hub)), "whole, a range, then one stream"


def test_a_small_file_gets_one_connection(hub: FakeHubServer, tmp_path: Path) -> None:
    url, data = _serve(hub, tmp_path, megabytes=1.5)
    dest = tmp_path / NAME
    assert download(url, dest, NullReporter(), connections=8) == hashlib.sha256(data).hexdigest()
    assert _ranges(hub) == [None]


def test_cut_ranges_resume_where_they_broke_and_nothing_is_fetched_twice(hub: FakeHubServer, tmp_path: Path) -> None:
    url, data = _serve(hub, tmp_path, cut_after=300_000, cuts=3)
    dest = tmp_path / NAME
    sha = download(url, dest, NullReporter(), connections=4)
    assert dest.read_bytes() == data and sha == hashlib.sha256(data).hexdigest()
    assert hub.hub.served(NAME) == len(data), "every byte served exactly once"
    resumed = [r for r in _ranges(hub) if r and int(r.split("=")[1].split("-")[0]) % MIB]
    assert len(resumed) == 3, "each cut resumes mid-segment, where it broke"


def test_an_interrupted_multi_range_download_resumes_only_the_missing_ranges(
    hub: FakeHubServer, tmp_path: Path
) -> None:
    url, data = _serve(hub, tmp_path, megabytes=8)
    hub.hub.per_connection_bytes_per_second = 4_000_000
    dest = tmp_path / NAME
    with pytest.raises(KeyboardInterrupt):
        download(url, dest, _InterruptAfter(3 * MIB), connections=4)
    state = json.loads(sidecar_path(dest).read_text())
    held = sum(state["done"])
    assert 3 * MIB <= held < len(data)
    assert dest.stat().st_size == len(data), "the partial file is preallocated"
    assert any(0 < d < MIB for d in state["done"]) or held % MIB == 0
    first_round = len(hub.hub.log)

    hub.hub.per_connection_bytes_per_second = None
    reporter = _Counting()
    sha = download(url, dest, reporter, connections=4)
    assert dest.read_bytes() == data and sha == hashlib.sha256(data).hexdigest()
    second = hub.hub.log[first_round:]
    assert sum(r.body_bytes for r in second) == len(data) - held, "only the missing bytes of each range are fetched"
    assert all(r.range for r in second)
    assert reporter.begun[0][2] == held


def test_a_remote_file_that_changed_since_the_interruption_starts_over(hub: FakeHubServer, tmp_path: Path) -> None:
    url, _ = _serve(hub, tmp_path, megabytes=8)
    hub.hub.per_connection_bytes_per_second = 4_000_000
    dest = tmp_path / NAME
    with pytest.raises(KeyboardInterrupt):
        download(url, dest, _InterruptAfter(2 * MIB), connections=4)
    _, changed = _serve(hub, tmp_path, megabytes=8, seed=1)
    sha = download(url, dest, NullReporter(), connections=4)
    assert dest.read_bytes() == changed and sha == hashlib.sha256(changed).hexdigest()


def test_a_corrupted_range_is_caught_by_the_sha256_check(
    hub: FakeHubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    _serve(hub, tmp_path, corrupt=True)
    _cap_connections(hub)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        pull_in_process(f"hf.co/{REPO}:Q4_K_M")
    assert len(_ranges(hub)) > 1, "the parallel path was taken"
    assert Store(isolated_home).list() == []
    assert not list((isolated_home / "partial").rglob("*.gguf")) and not list(
        (isolated_home / "partial").rglob("*.json")
    )


def test_a_large_file_that_is_not_gguf_is_refused_before_other_ranges(hub: FakeHubServer, tmp_path: Path) -> None:
    hub.hub.repos[REPO] = FakeRepo(files={NAME: b"<html>" + bytes(4 * MIB)})
    dest = tmp_path / "staging" / NAME
    dest.parent.mkdir()
    with pytest.raises(NotGGUF):
        download(f"{hub.url}/{REPO}/resolve/main/{NAME}", dest, NullReporter(), connections=4)
    assert _ranges(hub) == [None]
    assert not dest.exists() and not sidecar_path(dest).exists()


def test_the_fake_hub_throttle_caps_each_connection(tmp_path: Path) -> None:
    data = b"x" * 1_000_000
    rate = 1_000_000  # bytes a second: a second per fetch, so the overheads of a loaded machine are small beside it
    with FakeHubServer(per_connection_bytes_per_second=rate) as hub:
        hub.hub.repos[REPO] = FakeRepo(files={NAME: data})
        url = f"{hub.url}/{REPO}/resolve/main/{NAME}"
        start = time.perf_counter()
        assert httpx.get(url).content == data
        single = time.perf_counter() - start
        # The hub sleeps to pace each body, so this is a floor however fast the machine (the last 64 KiB chunk
        # is not waited for).
        assert single >= 0.9 * len(data) / rate, "1 MB at 1 MB/s takes a second"
        times: list[float] = []

        def fetch() -> None:
            began = time.perf_counter()
            httpx.get(url)
            times.append(time.perf_counter() - began)

        threads = [threading.Thread(target=fetch) for _ in range(3)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # A cap for the whole hub could not deliver these 3 MB in under 2.9 s; capped per connection they take about
        # 1 s, so the bound (2.7 s) leaves 1.7 s for a loaded machine's overheads and still fails a hub-wide cap.
        assert time.perf_counter() - start < 0.9 * 3 * len(data) / rate, "the cap is per connection, not the hub's"


def test_a_parallel_download_that_cannot_fit_reserves_nothing(hub: FakeHubServer, tmp_path: Path) -> None:
    url, _ = _serve(hub, tmp_path)
    dest = tmp_path / NAME
    asked: list[int] = []

    def check_space(remaining: int) -> None:
        asked.append(remaining)
        raise InsufficientDisk("no room", "free some space")

    with pytest.raises(InsufficientDisk):
        download(url, dest, NullReporter(), connections=4, check_space=check_space)
    assert asked == [hub.hub.repos[REPO].files[NAME].__len__()]
    assert not dest.exists() or dest.stat().st_size == 0
    assert len(_ranges(hub)) == 1


def test_a_damaged_segment_record_starts_over_instead_of_trusting_the_preallocated_file(
    hub: FakeHubServer, tmp_path: Path
) -> None:
    url, data = _serve(hub, tmp_path, megabytes=8)
    hub.hub.per_connection_bytes_per_second = 4_000_000
    dest = tmp_path / NAME
    with pytest.raises(KeyboardInterrupt):
        download(url, dest, _InterruptAfter(2 * MIB), connections=4)
    state = json.loads(sidecar_path(dest).read_text())
    sidecar_path(dest).write_text(json.dumps({**state, "done": state["done"][:-1]}))  # validator intact, record not
    hub.hub.per_connection_bytes_per_second = None
    assert download(url, dest, NullReporter(), connections=4) == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data
