"""The model pool with a stand-in for each model's process.

Loading once, eviction, keep-alive and crashes, in milliseconds.

The real processes are covered by tests/test_engine.py and tests/test_isolation.py; here the pool's
own rules are checked through its injected process factory, as Ollama's scheduler tests do.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest

from sovereign.catalog import load_catalog
from sovereign.config import Settings
from sovereign.engine.kernels import Verdict, current_machine, read_verdict, verdict_path, write_verdict
from sovereign.engine.pool import LoadedModel, ModelPool, PoolOptions
from sovereign.engine.process import ModelFacts, ModelProcess
from sovereign.engine.wire import LoadOptions
from sovereign.errors import BadChatTemplate, ModelLoadError
from sovereign.store import PullOptions, Store
from tests.conftest import pull_in_process, write_gguf

CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


class FakeProcess:
    """What the pool sees of a model's process: facts, activity, an exit hook and close()."""

    def __init__(self, name: str, path: Path, options: LoadOptions, template: str | None) -> None:
        self.name, self.path, self.options = name, path, options
        metadata = {"tokenizer.chat_template": template} if template is not None else {}
        self.facts = ModelFacts(
            pid=0,
            n_ctx=4096,
            n_ctx_train=8192,
            n_vocab=100,
            n_parallel=2,
            n_layers=2,
            n_gpu_layers=0,
            n_threads=1,
            bos=1,
            eos=2,
            add_bos=True,
            bos_text="<s>",
            eos_text="</s>",
            metadata=metadata,
        )
        self.on_exit: Callable[[Any, str | None], None] | None = None
        self.last_used = time.monotonic()
        self.active = 0
        self.alive = True
        self.closed = False

    async def close(self) -> None:
        """Unloading ends the process."""
        self.closed = True
        self.alive = False

    def crash(self, signal: str) -> None:
        """Die as llama.cpp would by a signal: the pool hears it through on_exit."""
        self.alive = False
        assert self.on_exit is not None
        self.on_exit(self, signal)


class Starter:
    """The pool's process factory: records each start, can be slowed or made to fail."""

    def __init__(self, template: str | None = CHATML) -> None:
        self.template = template
        self.started: list[FakeProcess] = []
        self.delay = 0.0
        self.error: Exception | None = None
        self.fail: set[str] = set()  # names whose start fails with ModelLoadError
        self.in_flight = 0
        self.peak = 0  # the most processes resident at once: starts under way (memory being filled) and alive ones

    async def __call__(
        self, name: str, path: Path, options: LoadOptions, *, max_queue: int, timeout: float | None
    ) -> ModelProcess:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight + self.resident())
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if self.error is not None:
            raise self.error
        if name in self.fail:
            raise ModelLoadError(f"llama.cpp could not load {name}")
        process = FakeProcess(name, path, options, self.template)
        self.started.append(process)
        self.peak = max(self.peak, self.in_flight + self.resident())
        return cast(ModelProcess, process)

    def resident(self) -> int:
        """Processes started and not yet ended."""
        return sum(p.alive for p in self.started)

    def names(self) -> list[str]:
        return [p.name for p in self.started]


@pytest.fixture
def store(tmp_path: Path, isolated_home: Path) -> Store:
    """A store with three tiny models registered in place: a:1, b:1 and c:1."""
    for index, name in enumerate(("a:1", "b:1", "c:1")):
        pull_in_process(
            str(write_gguf(tmp_path / "files" / f"{name[0]}.gguf", megabytes=0.1, seed=index)),
            options=PullOptions(name=name),
        )
    return Store(isolated_home)


def make_pool(store: Store, starter: Starter, **options: Any) -> ModelPool:
    """A pool over the test store whose processes come from `starter`."""
    return ModelPool(store, load_catalog(Settings.from_env()), PoolOptions(**options), starter)


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def fake(pool: ModelPool, name: str) -> FakeProcess:
    return cast(FakeProcess, pool.loaded[name].process)


@in_loop
async def test_concurrent_requests_for_one_model_start_one_process(store: Store) -> None:
    starter = Starter()
    starter.delay = 0.05
    pool = make_pool(store, starter)
    models = await asyncio.gather(*(pool.get("a:1") for _ in range(5)))
    assert starter.names() == ["a:1"]
    assert len({id(m.process) for m in models}) == 1
    assert pool.loading == []


@in_loop
async def test_the_least_recently_used_idle_model_makes_room(store: Store) -> None:
    starter = Starter()
    pool = make_pool(store, starter, max_models=2)
    await pool.get("a:1")
    await pool.get("b:1")
    fake(pool, "a:1").last_used = time.monotonic()  # a was used after b
    fake(pool, "b:1").last_used = time.monotonic() - 10
    b = fake(pool, "b:1")
    await pool.get("c:1")
    assert sorted(pool.loaded) == ["a:1", "c:1"]
    assert b.closed


@in_loop
async def test_a_busy_model_is_not_evicted_and_one_more_loads(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    starter = Starter()
    pool = make_pool(store, starter, max_models=1)
    await pool.get("a:1")
    fake(pool, "a:1").active = 1
    await pool.get("b:1")
    assert sorted(pool.loaded) == ["a:1", "b:1"]
    assert "busy" in caplog.text
    fake(pool, "a:1").active = 0
    await pool.get("c:1")  # now both idle: the two oldest go until one more fits
    assert sorted(pool.loaded) == ["c:1"]


@in_loop
async def test_keep_alive_unloads_idle_models_but_not_pinned_or_busy_ones(store: Store) -> None:
    starter = Starter()
    pool = make_pool(store, starter, max_models=3, keep_alive=0.2)
    await pool.get("a:1", pin=True)
    await pool.get("b:1")
    await pool.get("c:1")
    fake(pool, "c:1").active = 1
    await asyncio.sleep(0.7)
    assert sorted(pool.loaded) == ["a:1", "c:1"]
    fake(pool, "c:1").active = 0
    fake(pool, "c:1").last_used = time.monotonic() - 1
    await asyncio.sleep(0.4)
    assert sorted(pool.loaded) == ["a:1"]
    await pool.close()
    assert pool.loaded == {} and all(p.closed for p in starter.started)


@in_loop
async def test_a_crashed_model_leaves_the_pool_and_the_next_request_reloads_it_pinned(store: Store) -> None:
    starter = Starter()
    pool = make_pool(store, starter, max_models=2)
    await pool.get("a:1", pin=True)
    first = fake(pool, "a:1")
    first.crash("SIGSEGV")
    assert "a:1" not in pool.loaded
    reloaded = await pool.get("a:1")
    assert reloaded.process is not cast(ModelProcess, first)
    assert reloaded.pinned  # it was named on the command line: it stays pinned across the crash
    assert starter.names() == ["a:1", "a:1"]


@in_loop
async def test_a_dead_process_still_in_the_pool_is_not_handed_out(store: Store) -> None:
    starter = Starter()
    pool = make_pool(store, starter)
    await pool.get("a:1")
    fake(pool, "a:1").alive = False  # died, and the pool has not heard yet
    model = await pool.get("a:1")
    assert cast(FakeProcess, model.process).alive
    assert len(starter.started) == 2


@in_loop
async def test_a_sigill_under_the_fast_kernels_is_remembered_and_the_next_load_takes_the_safe_ones(
    store: Store, isolated_home: Path
) -> None:
    path = verdict_path(isolated_home, current_machine())
    machine = current_machine()
    write_verdict(path, Verdict(True, None, "AVX2", "AVX", machine.build, machine.cpu, "a.gguf", 0.1, time.time()))
    starter = Starter()
    pool = make_pool(store, starter, kernel_home=isolated_home)
    await pool.get("a:1")
    assert fake(pool, "a:1").options.use_extra_bufts
    fake(pool, "a:1").crash("SIGILL")
    verdict = read_verdict(path)
    assert verdict is not None and not verdict.fast_ok and verdict.signal == "SIGILL"
    await pool.get("a:1")
    assert not fake(pool, "a:1").options.use_extra_bufts


@in_loop
async def test_a_failed_start_leaves_nothing_behind(store: Store) -> None:
    starter = Starter()
    starter.error = ModelLoadError("llama.cpp could not load a.gguf")
    pool = make_pool(store, starter)
    with pytest.raises(ModelLoadError, match="could not load"):
        await pool.get("a:1")
    assert pool.loaded == {} and pool.loading == []
    starter.error = None
    assert (await pool.get("a:1")).name == "a:1"


@in_loop
async def test_a_template_that_does_not_compile_unloads_the_model(store: Store) -> None:
    starter = Starter(template="{% for m in messages %}")
    pool = make_pool(store, starter)
    with pytest.raises(BadChatTemplate):
        await pool.get("a:1")
    assert pool.loaded == {}
    assert starter.started[0].closed


@in_loop
async def test_closing_the_pool_stops_a_load_under_way(store: Store) -> None:
    starter = Starter()
    starter.delay = 3600.0  # a start that never ends by itself: only a cancel can end this load
    pool = make_pool(store, starter)
    load = asyncio.ensure_future(pool.get("a:1"))
    await asyncio.sleep(0.05)
    assert pool.loading == ["a:1"]
    # A hang guard, not a speed test: cancelling takes microseconds; a close that waited for the load would wait
    # the hour (the cancel itself is shown by the CancelledError and by the start that never finished).
    await asyncio.wait_for(pool.close(), timeout=30)
    with pytest.raises(asyncio.CancelledError):
        await load
    assert starter.started == [] and pool.loading == []
    assert pool.loaded == {}


@in_loop
async def test_concurrent_first_requests_for_different_models_never_exceed_max_models(store: Store) -> None:
    starter = Starter()
    starter.delay = 0.05  # long enough for all three loads to overlap if the pool let them
    pool = make_pool(store, starter, max_models=1)
    models = await asyncio.gather(pool.get("a:1"), pool.get("b:1"), pool.get("c:1"))
    assert [m.name for m in models] == ["a:1", "b:1", "c:1"]  # every request answered, with its own model
    assert starter.peak == 1
    assert sorted(starter.names()) == ["a:1", "b:1", "c:1"]
    assert len(pool.loaded) == 1 and pool.loading == []
    await pool.close()


async def hold_for(pool: ModelPool, name: str, seconds: float) -> str:
    """A request as the engine makes one: it takes hold of the model as soon as get() returns, and works a while."""
    process = fake_of(await pool.get(name))
    assert process.alive, f"{name} was unloaded before its request could use it"
    process.active += 1
    await asyncio.sleep(seconds)
    process.active -= 1
    return name


def fake_of(model: Any) -> FakeProcess:
    return cast(FakeProcess, model.process)


@in_loop
async def test_a_model_just_loaded_reaches_its_request_before_a_queued_load_may_evict_it(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    starter = Starter()
    starter.delay = 0.05
    pool = make_pool(store, starter, max_models=1)
    assert await asyncio.gather(hold_for(pool, "a:1", 0.1), hold_for(pool, "b:1", 0.1)) == ["a:1", "b:1"]
    assert starter.peak == 2  # a was busy by the time b had room to look: one more, as the warning says
    assert "busy: loading b:1, one more than --max-models" in caplog.text
    await pool.close()


@in_loop
async def test_with_every_model_busy_only_one_more_loads_and_the_rest_wait(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sovereign.engine.pool.ROOM_RECHECK_SECONDS", 0.02)
    starter = Starter()
    pool = make_pool(store, starter, max_models=1)
    await pool.get("a:1")
    fake(pool, "a:1").active = 1  # a long generation
    await asyncio.gather(hold_for(pool, "b:1", 0.2), hold_for(pool, "c:1", 0.01))
    assert starter.names() == ["a:1", "b:1", "c:1"]
    assert starter.peak == 2  # c waited for b to finish, then took its place
    assert sorted(pool.loaded) == ["a:1", "c:1"]
    await pool.close()


@in_loop
async def test_a_request_that_leaves_while_queued_for_room_loads_nothing(store: Store) -> None:
    starter = Starter()
    starter.delay = 0.1
    pool = make_pool(store, starter, max_models=1)
    a = asyncio.ensure_future(pool.get("a:1"))
    await asyncio.sleep(0.01)
    b = asyncio.ensure_future(pool.get("b:1"))
    await asyncio.sleep(0.01)
    assert sorted(pool.loading) == ["a:1", "b:1"]
    b.cancel()  # its client hung up
    with pytest.raises(asyncio.CancelledError):
        await b
    assert (await a).name == "a:1"
    await asyncio.sleep(0.2)  # time enough for b to have loaded, had its load gone on
    assert starter.names() == ["a:1"] and pool.loading == [] and sorted(pool.loaded) == ["a:1"]
    assert (await pool.get("b:1")).name == "b:1"  # the queue moves on
    assert starter.peak == 1
    await pool.close()


@in_loop
async def test_a_failed_load_frees_its_place(store: Store) -> None:
    starter = Starter()
    starter.delay = 0.05
    starter.fail = {"a:1"}
    pool = make_pool(store, starter, max_models=1)
    a, b = await asyncio.gather(pool.get("a:1"), pool.get("b:1"), return_exceptions=True)
    assert isinstance(a, ModelLoadError)
    assert isinstance(b, LoadedModel) and b.name == "b:1"
    assert (await pool.get("c:1")).name == "c:1"
    assert sorted(pool.loaded) == ["c:1"] and pool.loading == [] and starter.peak == 1
    await pool.close()


@in_loop
async def test_closing_the_pool_stops_loads_waiting_for_room(store: Store) -> None:
    starter = Starter()
    starter.delay = 3600.0
    pool = make_pool(store, starter, max_models=1)
    loads = [asyncio.ensure_future(pool.get(name)) for name in ("a:1", "b:1", "c:1")]
    await asyncio.sleep(0.05)
    assert sorted(pool.loading) == ["a:1", "b:1", "c:1"]
    await asyncio.wait_for(pool.close(), timeout=30)  # a hang guard, as above
    for load in loads:
        with pytest.raises(asyncio.CancelledError):
            await load
    assert starter.started == [] and pool.loading == [] and pool.loaded == {}


@in_loop
async def test_on_change_hears_every_load_unload_and_crash(store: Store) -> None:
    starter = Starter()
    pool = make_pool(store, starter, max_models=1)
    heard: list[list[str]] = []
    pool.on_change = heard.append
    await pool.get("a:1")
    await pool.get("b:1")  # a makes room for b
    fake(pool, "b:1").crash("SIGSEGV")
    assert heard == [["a:1"], [], ["b:1"], []]
