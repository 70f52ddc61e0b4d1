"""llama.cpp's fast CPU kernels are proven in a child process once per build and CPU; a crash turns them off."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sovereign.config import Settings
from sovereign.engine import kernels
from sovereign.engine.kernels import TEST_CRASH_ENV, KernelChoice, Machine, ProbeOutcome, kernel_choice, kernel_status
from sovereign.engine.runtime.backend import BatchEntry, GreedySampler, LlamaBackend
from sovereign.engine.wire import LoadOptions
from sovereign.errors import SovereignError
from sovereign.refs import parse_name
from sovereign.store import Store
from tests.conftest import GEMMA, run_cli


@pytest.fixture
def gemma_file(real_model_home: Path) -> Path:
    store = Store(real_model_home)
    return store.model_path(store.require(parse_name(GEMMA)))


@pytest.fixture(autouse=True)
def fresh_announcements(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a fresh process would: no warning said yet."""
    monkeypatch.setattr(kernels, "_announced", set())


def no_probe(*_args: object, **_kwargs: object) -> ProbeOutcome:
    raise AssertionError("the probe ran again")


def stored_verdicts(home: Path) -> list[dict[str, object]]:
    return [json.loads(path.read_text()) for path in sorted((home / "kernels").glob("*.json"))]


def expected_note() -> str:
    best, fallback = kernels.current_machine().instruction_sets
    if best and fallback:
        return f"{best} kernels crash on this machine; using {fallback} kernels instead"
    return "llama.cpp's fast CPU kernels crash on this machine; using its safe kernels instead"


def greedy_text(backend: LlamaBackend, prompt: str, count: int) -> str:
    """Decode a prompt in one batch, then `count` greedy tokens one at a time."""
    tokens = backend.with_bos(backend.tokenize(prompt, special=False))
    backend.decode([BatchEntry(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
    sampler, out, index = GreedySampler({}), b"", len(tokens) - 1  # the logits are at the batch's last entry
    for position in range(len(tokens), len(tokens) + count):
        token = backend.sample(sampler, index)
        out += backend.piece(token)
        backend.decode([BatchEntry(token, position, 0, True)])
        index = 0
    return out.decode("utf-8", "replace")


def test_a_real_probe_runs_once_and_its_verdict_is_kept(
    gemma_file: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert kernel_status(isolated_home) == "not yet probed"
    first = kernel_choice(isolated_home, gemma_file)
    # A probe still running at its timeout is killed and stores no verdict (checked below), so this one took less.
    assert first.probed_seconds is not None and 0 < first.probed_seconds < kernels.PROBE_TIMEOUT
    (verdict,) = stored_verdicts(isolated_home)
    assert verdict["model"] == gemma_file.name
    # On a machine whose fast kernels crash, the real probe says so; everywhere else they are verified.
    assert first.use_extra_bufts is verdict["fast_ok"]
    if first.use_extra_bufts:
        assert first.note is None and verdict["signal"] is None and kernel_status(isolated_home) == "fast (verified)"
    else:
        assert first.note == expected_note() and verdict["signal"]
    monkeypatch.setattr(kernels, "run_probe", no_probe)
    monkeypatch.setattr(kernels, "_probe_locked", no_probe)  # nor waits on the probe's lock
    started = time.thread_time()
    second = kernel_choice(isolated_home, gemma_file)
    # Against the probe it saves, timed on this machine in this test: reading the kept verdict costs this thread
    # about a millisecond of CPU (no stall of a busy machine counts), the probe's child process 0.7 s or more.
    assert time.thread_time() - started < first.probed_seconds / 10
    assert second == KernelChoice(first.use_extra_bufts, first.note, None)


def test_a_probe_killed_by_sigill_turns_the_fast_kernels_off_and_the_safe_ones_decode(
    gemma_file: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(TEST_CRASH_ENV, "SIGILL")
    with caplog.at_level(logging.WARNING, logger="sovereign.engine.kernels"):
        choice = kernel_choice(isolated_home, gemma_file)
        monkeypatch.setattr(kernels, "run_probe", no_probe)
        again = kernel_choice(isolated_home, gemma_file)
    assert choice.use_extra_bufts is False and choice.note == expected_note() and choice.probed_seconds is not None
    assert again == KernelChoice(False, expected_note(), None)
    assert [r.getMessage() for r in caplog.records] == [expected_note()]  # said once per process, not per load
    (verdict,) = stored_verdicts(isolated_home)
    assert verdict["fast_ok"] is False and verdict["signal"] == "SIGILL"
    best = kernels.current_machine().instruction_sets[0] or "llama.cpp's fast"
    assert kernel_status(isolated_home) == f"safe: {best} kernels crashed (SIGILL) on this machine"

    backend = LlamaBackend(
        gemma_file, LoadOptions(n_ctx=256, n_parallel=1, n_threads=2, use_extra_bufts=choice.use_extra_bufts)
    )
    try:
        assert "2, 3, 5, 7" in greedy_text(backend, "Here is a list of the first ten prime numbers:", 14)
        # piece() from many threads at once gives what it gives alone (each call has its own buffer).
        tokens = list(range(0, backend.n_vocab, 37))
        alone = [backend.piece(t, special=True) for t in tokens]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda t: backend.piece(t, special=True), tokens * 4))
        assert together == alone * 4
    finally:
        backend.close()


def test_the_note_names_the_instruction_set_and_the_one_below() -> None:
    amx = Machine("build", "Intel Xeon", frozenset({"avx2", "avx512f", "amx_tile"}))
    assert amx.instruction_sets == ("AMX", "AVX-512")
    verdict = kernels.Verdict(False, "SIGILL", *amx.instruction_sets, "build", "Intel Xeon", "m.gguf", 1.0, 0.0)
    assert verdict.note() == "AMX kernels crash on this machine; using AVX-512 kernels instead"
    assert verdict.status() == "safe: AMX kernels crashed (SIGILL) on this machine"
    assert Machine("b", "EPYC", frozenset({"avx", "avx2"})).instruction_sets == ("AVX2", "AVX")
    assert Machine("b", "Neoverse", frozenset({"asimd"})).instruction_sets == (None, None)
    assert Machine("b", "x", frozenset({"avx2"})).key != Machine("b", "x", frozenset({"avx2", "amx_tile"})).key


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (ProbeOutcome(None, 120.0, ""), "ran past 120 s"),
        (ProbeOutcome(-9, 3.0, ""), "SIGKILL"),
        (ProbeOutcome(1, 1.0, "Traceback"), "exit status 1"),
    ],
)
def test_an_inconclusive_probe_uses_safe_kernels_for_this_run_only(
    outcome: ProbeOutcome, reason: str, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "run_probe", lambda *_a, **_k: outcome)
    choice = kernel_choice(isolated_home, tmp_path / "model.gguf")
    assert choice.use_extra_bufts is False and reason in (choice.note or "") and "for this run" in (choice.note or "")
    assert stored_verdicts(isolated_home) == [] and kernel_status(isolated_home) == "not yet probed"


def test_a_model_that_does_not_load_proves_nothing_about_the_kernels(tiny_gguf: Path, isolated_home: Path) -> None:
    outcome = kernels.run_probe(tiny_gguf)
    assert outcome.returncode == kernels.EXIT_LOAD_FAILED, outcome.stderr_tail
    choice = kernel_choice(isolated_home, tiny_gguf)
    assert choice.use_extra_bufts is True and choice.note is None and stored_verdicts(isolated_home) == []


def test_two_loads_at_once_run_one_probe(isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def slow_probe(model_path: Path, timeout: float = 0) -> ProbeOutcome:
        calls.append(model_path)
        time.sleep(0.5)
        return ProbeOutcome(0, 0.5, "")

    monkeypatch.setattr(kernels, "run_probe", slow_probe)
    results: list[KernelChoice] = []
    threads = [
        threading.Thread(target=lambda: results.append(kernel_choice(isolated_home, tmp_path / "m.gguf")))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and all(r.use_extra_bufts for r in results)
    assert sorted(r.probed_seconds is None for r in results) == [False, True]


def test_the_override_skips_the_probe(isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env({"SOVEREIGN_EXTRA_BUFFERS": "OFF"}).extra_buffers == "off"
    assert Settings.from_env({}).extra_buffers == "auto"
    with pytest.raises(SovereignError, match="SOVEREIGN_EXTRA_BUFFERS"):
        Settings.from_env({"SOVEREIGN_EXTRA_BUFFERS": "maybe"})
    monkeypatch.setattr(kernels, "run_probe", no_probe)
    assert kernel_choice(isolated_home, tmp_path / "m.gguf", "off") == KernelChoice(False, None, None)
    assert kernel_choice(isolated_home, tmp_path / "m.gguf", "on") == KernelChoice(True, None, None)
    assert kernel_status(isolated_home, "off") == "safe (SOVEREIGN_EXTRA_BUFFERS=off)"
    with pytest.raises(SovereignError):
        kernel_choice(isolated_home, tmp_path / "m.gguf", "maybe")


def test_bench_reports_the_kernels_and_bench_model_takes_the_same_path(gemma_file: Path, isolated_home: Path) -> None:
    report = run_cli("bench", "--json")
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["kernels"] == "not yet probed"
    forced = run_cli("bench", "--json", env={"SOVEREIGN_EXTRA_BUFFERS": "off"})
    assert json.loads(forced.stdout)["kernels"] == "safe (SOVEREIGN_EXTRA_BUFFERS=off)"
    crashed = run_cli(
        "bench",
        str(gemma_file),
        "-t",
        "2",
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "1",
        "--json",
        "--no-save",
        env={TEST_CRASH_ENV: "SIGILL"},
    )
    assert crashed.returncode == 0, crashed.stderr
    assert expected_note() in crashed.stderr
    assert [row["use_extra_bufts"] for row in json.loads(crashed.stdout)] == [False, False]
    after = run_cli("bench", "--json")
    assert json.loads(after.stdout)["kernels"].endswith("kernels crashed (SIGILL) on this machine")
    table = run_cli("bench")
    assert "kernels" in table.stdout and "crashed (SIGILL)" in table.stdout
