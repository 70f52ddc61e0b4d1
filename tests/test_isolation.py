"""One process per loaded model: a crash costs only that model's requests, and unloading frees its memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from sovereign.engine import CompletionRequest, Engine, SamplingParams, TextDelta
from sovereign.errors import ModelCrashed
from sovereign.machine import proc_kib
from tests.conftest import GEMMA
from tests.servers import ServerProcess
from tests.test_batching import metric
from tests.test_engine import collect, make_pool, register_copy

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


def model_processes(server_pid: int) -> list[int]:
    """The server's child processes (one per loaded model)."""
    children: list[int] = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        with (task / "children").open() as handle:
            children += [int(pid) for pid in handle.read().split()]
    return children


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    return proc_kib(f"/proc/{pid}/status", "VmRSS") or 0


def test_a_killed_model_fails_only_its_requests_and_comes_back(server: ServerProcess) -> None:
    assert server.process is not None
    (child,) = model_processes(server.process.pid)
    received: list[str] = []
    first_token = threading.Event()

    def stream() -> None:
        body = {"model": GEMMA, "prompt": "Once upon a time", "stream": True, **LONG}
        with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received.append(line[6:])
                    first_token.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_token.wait(60)
    waiting = {}

    def plain() -> None:  # a second request in flight on the same model, not streamed
        waiting["response"] = httpx.post(
            f"{server.base_url}/completions", json={"model": GEMMA, "prompt": "Hello", **LONG}, timeout=60
        )

    other = threading.Thread(target=plain)
    other.start()
    # The kill must find both requests in the model's process: wait until the second holds a slot too (a fixed
    # sleep raced a loaded machine, where the request could reach the server after the crash and run in full).
    deadline = time.monotonic() + 60
    while metric(server, "sovereign_slots_busy", model=GEMMA) < 2:
        assert time.monotonic() < deadline, "the second request never started"
        time.sleep(0.02)
    os.kill(child, signal.SIGSEGV)
    reader.join(30)
    other.join(30)
    errors = [json.loads(data)["error"] for data in received if data.startswith('{"error"')]
    assert errors and errors[0]["code"] == "model_crashed" and "SIGSEGV" in errors[0]["message"]
    assert received[-1] == "[DONE]"
    response = waiting["response"]
    assert response.status_code == 500 and response.json()["error"]["code"] == "model_crashed"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    again = httpx.post(
        f"{server.base_url}/completions", json={"model": GEMMA, "prompt": "Hello", "max_tokens": 3}, timeout=60
    )
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] >= 1
    assert model_processes(server.process.pid) != [child]
    assert "gemma3:270m's process died (SIGSEGV)" in server.log()


def test_other_models_keep_serving_through_a_crash(real_model_home: Path) -> None:
    register_copy(real_model_home, "plain:copy")

    async def main() -> tuple[BaseException | None, str]:
        pool = make_pool(real_model_home, max_models=2)
        engine = Engine(pool)
        try:
            # Long enough to still be running once the second model has loaded (a 32k context takes a while to set up).
            doomed = await engine.submit(
                CompletionRequest(GEMMA, "Once", SamplingParams(max_tokens=3000, ignore_eos=True))
            )
            survivor = await engine.submit(
                CompletionRequest("plain:copy", "Once", SamplingParams(max_tokens=40, ignore_eos=True, temperature=0))
            )
            async for event in doomed:
                if isinstance(event, TextDelta):
                    break
            os.kill(pool.loaded[GEMMA].facts.pid, signal.SIGKILL)
            failure = None
            try:
                async for _event in doomed:
                    pass
            except ModelCrashed as exc:
                failure = exc
            text = "".join([event.text async for event in survivor if isinstance(event, TextDelta)])
            assert set(pool.loaded) == {"plain:copy"}, "the crashed model left the pool"
            reloaded, _ = await collect(engine, CompletionRequest(GEMMA, "Hi", SamplingParams(max_tokens=2)))
            assert reloaded
            return failure, text
        finally:
            await pool.close()

    failure, text = asyncio.run(main())
    assert isinstance(failure, ModelCrashed) and failure.signal == "SIGKILL"
    assert len(text) > 20


def test_unloading_returns_memory_to_the_baseline(real_model_home: Path) -> None:
    async def main() -> tuple[int, int, int, int]:
        pool = make_pool(real_model_home)
        engine = Engine(pool)
        try:
            baseline = rss(os.getpid())
            await collect(engine, CompletionRequest(GEMMA, "Hi", SamplingParams(max_tokens=8)))
            child = pool.loaded[GEMMA].facts.pid
            loaded_parent, loaded_child = rss(os.getpid()), rss(child)
            await pool.unload(GEMMA)
            assert not Path(f"/proc/{child}").exists(), "the model's process has exited"
            return baseline, loaded_parent, loaded_child, rss(os.getpid())
        finally:
            await pool.close()

    baseline, loaded_parent, loaded_child, after = asyncio.run(main())
    model_bytes = 241 * 1024 * 1024
    assert loaded_child > model_bytes / 2, "the weights live in the model's process"
    assert loaded_parent - baseline < 64 * 1024 * 1024, "the server itself holds no model"
    assert after - baseline < 64 * 1024 * 1024


@pytest.mark.parametrize("kill", [signal.SIGSEGV, signal.SIGABRT])
def test_a_crash_between_requests_is_noticed(real_model_home: Path, kill: signal.Signals) -> None:
    async def main() -> str:
        pool = make_pool(real_model_home)
        engine = Engine(pool)
        try:
            await collect(engine, CompletionRequest(GEMMA, "Hi", SamplingParams(max_tokens=2)))
            os.kill(pool.loaded[GEMMA].facts.pid, kill)
            deadline = time.monotonic() + 10
            while GEMMA in pool.loaded and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert GEMMA not in pool.loaded
            text, _ = await collect(engine, CompletionRequest(GEMMA, "Hi", SamplingParams(max_tokens=2)))
            return text
        finally:
            await pool.close()

    assert asyncio.run(main())


def test_a_sigill_while_serving_turns_the_fast_kernels_off(real_model_home: Path, tmp_path: Path) -> None:
    """The probe proves the kernels its model used; a later SIGILL from any model is remembered too.

    The verdict starts as "fast" (as if the probe had passed). Where the fast kernels really crash (AMX on
    some Xeons), the first request dies by SIGILL by itself; elsewhere the test sends the signal.
    """
    from sovereign.engine.kernels import Verdict, current_machine, read_verdict, verdict_path, write_verdict

    kernels = tmp_path / "kernels-home"
    machine = current_machine()
    passed = Verdict(True, None, None, None, machine.build, machine.cpu, "gemma", 0.0, time.time())
    write_verdict(verdict_path(kernels, machine), passed)

    async def main() -> tuple[bool, bool]:
        pool = make_pool(real_model_home, kernel_home=kernels)
        engine = Engine(pool)
        try:
            loaded = await pool.get(GEMMA)  # loading decodes nothing: no kernel has run yet
            before = loaded.process.options.use_extra_bufts
            generation = await engine.submit(
                CompletionRequest(GEMMA, "Hi", SamplingParams(max_tokens=200, ignore_eos=True))
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(loaded.facts.pid, signal.SIGILL)
            with pytest.raises(ModelCrashed):
                async for _event in generation:
                    pass
            deadline = time.monotonic() + 10
            while GEMMA in pool.loaded and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await collect(engine, CompletionRequest(GEMMA, "Hi", SamplingParams(max_tokens=2)))
            return before, pool.loaded[GEMMA].process.options.use_extra_bufts
        finally:
            await pool.close()

    before, after = asyncio.run(main())
    verdict = read_verdict(verdict_path(kernels, machine))
    assert before is True and after is False
    assert verdict is not None and not verdict.fast_ok and verdict.signal == "SIGILL"
