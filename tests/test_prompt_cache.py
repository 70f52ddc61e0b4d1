"""The prompt cache beyond the slots: saved conversations put back from memory and from disk, and the disk tier's care.

The disk tier's file handling is tested directly (made-up states, no model): round trip, damaged,
truncated and foreign files, the budget, a full disk. The tiers themselves run on real servers with
the real model: a conversation saved when its slot is taken comes back from memory, and one saved
before a restart comes back from disk.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from sovereign.engine.runtime import disk_cache
from sovereign.engine.runtime.disk_cache import DiskTier
from sovereign.engine.runtime.kv_state import State
from sovereign.engine.runtime.prompt_cache import CacheEntry, Checkpoint, PromptCache, usable
from sovereign.refs import parse_name
from sovereign.store import PullOptions, Store
from tests.conftest import GEMMA, pull_in_process
from tests.servers import ServerProcess

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def state(size: int, seed: int) -> ctypes.Array[ctypes.c_uint8]:
    """A made-up saved state: `size` bytes of noise."""
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    return (ctypes.c_uint8 * size).from_buffer_copy(data)


def entry(tokens: int, seed: int = 0, checkpoints: tuple[int, ...] = ()) -> CacheEntry:
    """An entry of `tokens` tokens with a 64 KiB state and 4 KiB checkpoints."""
    marks = tuple(Checkpoint(p, state(4096, seed + p)) for p in checkpoints)
    size = 65536 + 4096 * len(marks)
    return CacheEntry(np.arange(seed, seed + tokens, dtype=np.int32), state(65536, seed), marks, size)


def written(tier: DiskTier, count: int, timeout: float = 10.0) -> list[CacheEntry]:
    """The tier's entries once `count` of them are on disk."""
    deadline = time.monotonic() + timeout
    while len(tier.entries()) < count:
        assert time.monotonic() < deadline, f"{len(tier.entries())} of {count} entries written"
        time.sleep(0.02)
    return tier.entries()


# --- the disk tier, on made-up states ---------------------------------------------------------------------


def test_an_entry_written_is_read_back_whole_by_a_later_process(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "key1", budget=1 << 30)
    tier.open()
    original = entry(2000, seed=3, checkpoints=(500, 1500))
    tier.submit(original)
    tier.submit(entry(100))  # too short for the disk tier
    written(tier, 1)
    tier.close()
    later = DiskTier(tmp_path, "key1", budget=1 << 30)
    later.open()
    [indexed] = later.entries()
    assert indexed.state is None and [c.position for c in indexed.checkpoints] == [500, 1500]
    loaded = later.load(indexed)
    assert loaded is not None and loaded.tier == "disk"
    assert np.array_equal(loaded.tokens, original.tokens)
    assert bytes(loaded.state or b"") == bytes(original.state or b"")
    assert [bytes(c.state or b"") for c in loaded.checkpoints] == [bytes(c.state or b"") for c in original.checkpoints]
    later.close()


def test_damaged_truncated_and_foreign_files_are_deleted_with_one_line_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tier = DiskTier(tmp_path, "key1", budget=1 << 30)
    tier.open()
    for seed in (1, 2):
        tier.submit(entry(1500 + seed, seed=seed))
        written(tier, seed)
    tier.close()
    damaged, truncated = sorted((tmp_path / "key1").glob("*.kv"))
    other = DiskTier(tmp_path, "key2", budget=1 << 30)  # another model (or llama.cpp build)
    other.open()
    other.submit(entry(1600, seed=7))
    [foreign] = written(other, 1)
    other.close()
    shutil.copy(tmp_path / "key2" / str(foreign.disk_name), tmp_path / "key1" / "foreign.kv")
    with damaged.open("r+b") as file:  # a flipped byte in the state: only the checksum can tell
        file.seek(-100, os.SEEK_END)
        byte = file.read(1)
        file.seek(-100, os.SEEK_END)
        file.write(bytes([byte[0] ^ 0xFF]))
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    (tmp_path / "key1" / "junk.kv").write_bytes(b"not a cache file at all")

    later = DiskTier(tmp_path, "key1", budget=1 << 30)
    later.open()  # the index sees the truncated, foreign and junk files
    assert {e.disk_name for e in later.entries()} == {damaged.name}
    [candidate] = later.entries()
    assert later.load(candidate) is None  # the checksum catches the flipped byte
    assert later.entries() == [] and sorted(p.name for p in (tmp_path / "key1").iterdir()) == []
    later.close()
    messages = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(messages) == 4, messages
    assert any("another model" in m for m in messages) and any("checksum" in m for m in messages)


def test_the_budget_evicts_the_least_recently_used_files_of_every_model(tmp_path: Path) -> None:
    other = DiskTier(tmp_path, "other", budget=1 << 30)
    other.open()
    other.submit(entry(1200, seed=9))
    written(other, 1)
    other.close()
    old = next((tmp_path / "other").glob("*.kv"))
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    size = old.stat().st_size
    tier = DiskTier(tmp_path, "key1", budget=2 * size + size // 2)
    tier.open()
    tier.submit(entry(1200, seed=1))
    written(tier, 1)
    tier.submit(entry(1200, seed=2))
    written(tier, 2)
    tier.close()
    assert not old.exists(), "the oldest file, of another model, went first"
    assert len(list((tmp_path / "key1").glob("*.kv"))) == 2


def test_a_full_disk_turns_the_tier_off_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tier = DiskTier(tmp_path, "key1", budget=1 << 30)
    tier.open()

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_cache, "_commit", no_space)
    for seed in (1, 2, 3):
        tier.submit(entry(1100, seed=seed))
        time.sleep(0.3)
    tier.close()
    assert not tier.enabled
    assert [r.getMessage() for r in caplog.records if "disk tier is off" in r.getMessage()] != []
    assert len([r for r in caplog.records if "disk tier is off" in r.getMessage()]) == 1
    assert list((tmp_path / "key1").iterdir()) == [], "no temporary file is left behind"


def test_a_home_that_cannot_take_the_folder_turns_the_tier_off(tmp_path: Path) -> None:
    (tmp_path / "prompts").write_text("a file where the folder should be")
    tier = DiskTier(tmp_path / "prompts", "key1", budget=1 << 30)
    tier.open()
    assert not tier.enabled
    tier.submit(entry(2000))  # a no-op, not an error
    tier.close()


def test_how_much_of_an_entry_a_prompt_can_use() -> None:
    saved = entry(1000, checkpoints=(200, 600))
    assert usable(saved, 1000, 1500, windowed=False) == 1000
    assert usable(saved, 700, 1500, windowed=False) == 700
    assert usable(saved, 1000, 1000, windowed=True) == 999, "the prompt's last token is read again"
    assert usable(saved, 999, 1500, windowed=True) == 999, "one token short of the whole entry is fine"
    assert usable(saved, 700, 1500, windowed=True) == 600, "cut short: only at a checkpoint"
    assert usable(saved, 150, 1500, windowed=True) == 0


def test_the_memory_tier_keeps_to_its_budget_and_drops_what_a_longer_entry_extends() -> None:
    cache = PromptCache(budget=3 * 65536, windowed=False)
    short, longer = entry(500), entry(800)  # the longer one starts with the same tokens
    cache.save(short)
    cache.save(longer)
    assert cache.entries == [longer]
    for seed in (1000, 2000, 3000):
        cache.save(entry(500, seed=seed))
    assert cache.bytes <= cache.budget and len(cache.entries) == 3
    assert longer not in cache.entries, "the least recently used went first"
    found, served = cache.best(list(range(2000, 2300)) + [7, 7])
    assert found is not None and served == 300


# --- the tiers on real servers --------------------------------------------------------------------------


@pytest.fixture
def cache_home(tmp_path: Path, real_model_home: Path) -> Path:
    """A store of its own (its own prompt cache) holding the real model, registered in place."""
    home = tmp_path / "cache-home"
    store = Store(real_model_home)
    path = store.model_path(store.require(parse_name(GEMMA)))
    pull_in_process(str(path), options=PullOptions(name=GEMMA), environ={"SOVEREIGN_HOME": str(home)})
    return home


SYSTEM = README[:9000]  # about 2,300 tokens: long enough for the disk tier and for checkpoints


def chat(server: ServerProcess, system: str, question: str) -> tuple[str, int]:
    """A greedy answer and how many prompt tokens came from a cache."""
    body = {
        "model": GEMMA,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 12,
        "temperature": 0,
    }
    answer = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=600).json()
    return answer["choices"][0]["message"]["content"], answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def sources(server: ServerProcess, at_least: int = 1) -> list[str]:
    """Where each logged request's cached prefix came from ('-' for none), in order.

    A request's line is logged as it ends, which may be just after its client has the answer: wait for it.
    """
    deadline = time.monotonic() + 30
    while True:
        found = [m.group(2) or "-" for m in re.finditer(r"cached=(\d+)(?: \((\w+)\))?", server.log())]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}{{[^}}]*{wanted}[^}}]*}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_conversation_comes_back_from_memory_after_its_slot_was_taken(cache_home: Path) -> None:
    with ServerProcess(cache_home, GEMMA, "--parallel", "1", "--cache-disk", "0") as server:
        _, cold = chat(server, SYSTEM, "What is sovereign?")
        chat(server, README[20000:26000], "Something else entirely.")  # takes the only slot
        answer, cached = chat(server, SYSTEM, "How do I pull a model?")
        assert cold == 0 and answer
        assert cached > 2000, "the system prompt came back from the RAM tier (to the checkpoint where they part)"
        assert sources(server, at_least=3)[-1] == "ram"
        assert metric(server, "sovereign_prompt_cache_hits_total", tier="ram") >= 1
        assert metric(server, "sovereign_prompt_cache_bytes", tier="ram") > 0


def test_a_conversation_comes_back_from_disk_after_a_restart(cache_home: Path) -> None:
    with ServerProcess(cache_home, GEMMA, "--parallel", "1") as server:
        chat(server, SYSTEM, "What is sovereign?")
        deadline = time.monotonic() + 60  # the idle slot is saved in the background
        while metric(server, "sovereign_prompt_cache_bytes", tier="disk") == 0:
            assert time.monotonic() < deadline, "nothing reached the disk tier"
            time.sleep(0.2)
    files = list((cache_home / "cache" / "prompts").glob("*/*.kv"))
    assert files
    with ServerProcess(cache_home, GEMMA, "--parallel", "1") as server:
        answer, cached = chat(server, SYSTEM, "How do I pull a model?")
        assert answer and cached > 2000
        assert sources(server)[-1] == "disk"
        assert metric(server, "sovereign_prompt_cache_hits_total", tier="disk") == 1


def test_a_damaged_cache_file_is_ignored_and_deleted(cache_home: Path) -> None:
    with ServerProcess(cache_home, GEMMA, "--parallel", "1") as server:
        chat(server, SYSTEM, "What is sovereign?")
        deadline = time.monotonic() + 60
        while metric(server, "sovereign_prompt_cache_bytes", tier="disk") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    [file] = list((cache_home / "cache" / "prompts").glob("*/*.kv"))
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with ServerProcess(cache_home, GEMMA, "--parallel", "1") as server:
        answer, cached = chat(server, SYSTEM, "How do I pull a model?")
        assert answer and cached == 0
        assert "is damaged" in server.log() and "Traceback" not in server.log()
    assert not file.exists()


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (mounting needs root; the disk tier's full-disk logic is also tested without one)."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def test_a_full_disk_and_a_read_only_home_leave_the_server_serving(cache_home: Path, tiny_filesystem: Path) -> None:
    cache = cache_home / "cache"
    cache.mkdir(parents=True)
    (cache / "prompts").symlink_to(tiny_filesystem)  # the cache's folder on a disk with 1 MiB free
    with ServerProcess(cache_home, GEMMA, "--parallel", "1") as server:
        first, _ = chat(server, SYSTEM, "What is sovereign?")
        deadline = time.monotonic() + 30
        while "disk tier is off" not in server.log():
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.2)
        second, _ = chat(server, README[20000:26000], "And this?")
        assert first and second
        assert server.log().count("disk tier is off") == 1 and "Traceback" not in server.log()
    assert [p for p in tiny_filesystem.iterdir()] == [] or all(".tmp" not in p.name for p in tiny_filesystem.iterdir())
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_filesystem)], check=True)
    with ServerProcess(cache_home, GEMMA, "--parallel", "1") as server:
        answer, _ = chat(server, SYSTEM, "How do I pull a model?")
        assert answer and "disk tier is off" in server.log()


def test_prune_clears_the_disk_tier(cache_home: Path) -> None:
    folder = cache_home / "cache" / "prompts" / "0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "x.kv").write_bytes(b"\0" * 5000)
    from tests.conftest import run_cli

    result = run_cli("prune", "--cache", env={"SOVEREIGN_HOME": str(cache_home)})
    assert result.returncode == 0, result.stderr
    assert "deleted the prompt cache: 1 file(s)" in result.stderr
    assert not (folder / "x.kv").exists()


def test_a_checkpoint_makes_a_cut_sliding_window_state_exact(real_model_home: Path, use_extra_bufts: bool) -> None:
    """Gemma 3's sliding-window layers: a saved state cut short needs the checkpoint taken at the cut.

    A state saved after 2,848 tokens holds only the last window of those layers; cut back to 2,048
    tokens (where another conversation parts from it) it has none of the window there. With the
    checkpoint taken when the first 2,048 tokens had been read put back, the next tokens' logits are
    exactly those of the slot cut in place; the slot itself can be cut there only while it still holds
    the window's cells, which llama.cpp hands to new tokens once they fall out of the window.
    """
    from sovereign.engine.runtime.backend import BatchEntry, LlamaBackend
    from sovereign.engine.wire import LoadOptions

    path = Store(real_model_home).model_path(Store(real_model_home).require(parse_name(GEMMA)))
    backend = LlamaBackend(path, LoadOptions(n_ctx=4096, n_parallel=1, use_extra_bufts=use_extra_bufts))
    states = backend.states
    assert states is not None and states.windowed
    conversation = backend.with_bos(backend.tokenize(SYSTEM, special=False))[:2048]
    conversation += backend.tokenize(README[30000:34000], special=False)[:800]
    question = backend.tokenize("Alpha: what is sovereign?", special=False)

    def read(tokens: list[int], start: int = 0) -> np.ndarray:
        for at in range(0, len(tokens), 512):
            chunk = tokens[at : at + 512]
            last = at + len(chunk) == len(tokens)
            backend.decode(
                [BatchEntry(t, start + at + i, 0, last and i == len(chunk) - 1) for i, t in enumerate(chunk)]
            )
        return backend.logprob_row((len(tokens) - 1) % 512).copy()

    def fresh() -> State | None:
        """Read the conversation afresh; the checkpoint after its first 2,048 tokens."""
        backend.clear_memory()
        read(conversation[:2048])
        checkpoint = states.save(0, partial=True)
        read(conversation[2048:], 2048)
        return checkpoint

    try:
        fresh()
        assert states.window_kept(0, 2048), "the cells are all still here: the slot itself can be cut"
        states.cut(0, 2048)
        in_place = read(question, 2048)
        checkpoint = fresh()
        whole = states.save(0)
        assert whole is not None and checkpoint is not None
        backend.forget(0)
        assert states.restore(0, whole) and states.cut(0, 2048) and states.restore(0, checkpoint, partial=True)
        assert np.array_equal(read(question, 2048), in_place)
        backend.forget(0)
        assert states.restore(0, whole) and not states.window_kept(0, 2048), "a saved state keeps the last window only"
        assert states.cut(0, 2048)
        without = read(question, 2048)
        assert np.max(np.abs(without - in_place)) > 1.0, "without the checkpoint the window is missing"
    finally:
        backend.close()


def test_conversations_put_back_from_memory_and_disk_predict_as_in_their_slot(
    real_model_home: Path, use_extra_bufts: bool, tmp_path: Path
) -> None:
    """From memory or disk, whole or through a checkpoint, the next token's distribution is the slot's.

    Each path is compared with the slot reading the rest of the prompt in a batch of the same shape:
    llama.cpp's arithmetic differs with a batch's shape, and with the layout of the cells a single
    token's attention runs over (a few hundredths of a log-probability, which is also why a long greedy
    answer may part on a near tie); a missing window moves them by whole units (the test above).
    """
    import threading
    from collections import deque

    from sovereign.engine.requests import SamplingParams
    from sovereign.engine.runtime.backend import LlamaBackend
    from sovereign.engine.runtime.cache_setup import open_prompt_cache
    from sovereign.engine.runtime.scheduler import BatchScheduler
    from sovereign.engine.stats import RequestStats
    from sovereign.engine.wire import LoadOptions, Step

    path = Store(real_model_home).model_path(Store(real_model_home).require(parse_name(GEMMA)))
    options = LoadOptions(
        n_ctx=8192,
        n_parallel=1,
        use_extra_bufts=use_extra_bufts,
        cache_ram=1 << 30,
        cache_disk=1 << 30,
        cache_dir=str(tmp_path / "prompts"),
        model_id="test",
    )
    Answer = tuple[int, dict[str, float], str | None]

    class Collect:
        def __init__(self, prompt: list[int]) -> None:
            self.stats = RequestStats(GEMMA, len(prompt))
            self.cancelled = False
            self.forced: deque[int] = deque()
            self.steps: list[Step] = []
            self.done = threading.Event()

        def push(self, step: Step) -> None:
            self.steps.append(step)

        def end(self, error: BaseException | None = None) -> None:
            self.done.set()

    def scheduler() -> BatchScheduler:
        backend = LlamaBackend(path, options)
        return BatchScheduler(backend, cache=open_prompt_cache(backend, options))

    def ask(running: BatchScheduler, prompt: list[int]) -> Answer:
        """The first token, its top-5 log-probabilities, and where the prompt's prefix came from."""
        sink = Collect(prompt)
        params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
        running.enqueue(prompt, params, sink, (len(system),))
        assert sink.done.wait(300)
        first = sink.steps[0].logprob
        assert first is not None
        return sink.steps[0].token, {text: value for text, _, value in first.top}, sink.stats.cache_source

    def same(a: Answer, b: Answer) -> None:
        """The same token, and top-5 log-probabilities within rounding; near the fifth, two may trade places."""
        assert a[0] == b[0], (a, b)
        for ours, theirs in ((a[1], b[1]), (b[1], a[1])):
            edge = min(theirs.values())
            for text, value in ours.items():
                if text in theirs:
                    assert abs(value - theirs[text]) < 0.3, (a[1], b[1])
                else:  # in one top five only: it was at the other's edge
                    assert value < edge + 0.3, (a[1], b[1])

    first = scheduler()
    backend = first.backend
    system = backend.with_bos(backend.tokenize(SYSTEM, special=False))[:2048]
    one = system + backend.tokenize("Alpha: what is sovereign?", special=False)
    two = system + backend.tokenize("Beta: how do I pull?", special=False)
    other = backend.with_bos(backend.tokenize(README[20000:24000], special=False))
    assert ask(first, two)[2] is None
    after_system = ask(first, one)  # the slot cut back to the system prompt, the question read in one batch
    assert after_system[2] == "slot"
    ask(first, two)
    ask(first, other)  # takes the slot: `two` goes to the cache, with a checkpoint where it parts from `one`
    through_checkpoint = ask(first, one)
    assert through_checkpoint[2] == "ram"
    same(through_checkpoint, after_system)
    last_token_only = ask(first, one)  # the slot cut back to the prompt's last token
    assert last_token_only[2] == "slot"
    ask(first, other)
    whole = ask(first, one)
    assert whole[2] == "ram"
    same(whole, last_token_only)
    first.stop()
    backend.close()

    second = scheduler()  # another process, the same files: the disk tier
    from_disk = ask(second, one)
    assert from_disk[2] == "disk"
    same(from_disk, last_token_only)
    second.stop()
    second.backend.close()
