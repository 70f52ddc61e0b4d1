"""One model over several machines: `sovereign worker` and `serve --rpc`, on loopback.

Two workers and a head serve gemma3:270m split in two; its greedy answer is compared with the same
model served whole. Killing a worker gives 503 worker_unavailable naming it, and its return brings
the model back. Fake workers stand in for another llama.cpp build (another HELLO answer).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from sovereign.engine import rpc_workers
from sovereign.engine.rpc_workers import Endpoint, hello, parse_endpoints
from sovereign.errors import SovereignError, WorkerUnavailable
from tests.conftest import GEMMA
from tests.servers import ServerProcess, free_port, sovereign_command

PROMPT = "Write a short poem about the sea."
MATCH_TOKENS = 48  # greedy tokens that must be identical, split and whole (all 48 were in scripts/bench_rpc.py)


class Worker:
    """`sovereign worker` on a loopback port, in a session of its own so that a kill takes its llama.cpp child too."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.port = port or free_port()
        self.host = host
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> Worker:
        command = [*sovereign_command(), "worker", "--host", self.host, "--port", str(self.port), "--threads", "1"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()
            try:
                hello(Endpoint("127.0.0.1", self.port), connect_timeout=1, timeout=5)
                return self
            except WorkerUnavailable:
                time.sleep(0.2)
        raise RuntimeError(f"worker on {self.port} did not start")

    def kill(self) -> None:
        """Die as a crashed machine would: no goodbye to the head."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.communicate()

    def interrupt(self) -> tuple[int, str, str]:
        """Ctrl-C, as a terminal sends it to the whole process group."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGINT)
        out, err = self.process.communicate(timeout=30)
        return self.process.returncode, out, err


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started = [Worker().start(), Worker().start()]
    yield started
    for worker in started:  # the two, and any a test started again
        worker.kill()


def greedy(url: str, tokens: int = MATCH_TOKENS) -> tuple[int, dict[str, object]]:
    body = {
        "model": GEMMA,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": tokens,
        "logprobs": True,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    return reply.status_code, reply.json()


def tokens_of(reply: dict[str, object]) -> list[str]:
    choice = reply["choices"][0]  # type: ignore[index]
    return [entry["token"] for entry in choice["logprobs"]["content"]]


# The reference is served whole with the plain CPU kernels: a worker's CPU backend does not repack weights,
# and the repacked kernels round differently (with them the answers part after 8-12 tokens).
PLAIN_KERNELS = {"SOVEREIGN_EXTRA_BUFFERS": "off"}
SAME_BATCHES = ("--parallel", "1", "--ctx", "2048", "--speculate", "off")


def test_a_model_split_over_two_workers_answers_as_the_whole_model_and_survives_a_worker(
    real_model_home: Path, workers: list[Worker]
) -> None:
    first, second = workers
    rpc = f"{first.address},{second.address}"
    with ServerProcess(real_model_home, GEMMA, *SAME_BATCHES, env=PLAIN_KERNELS) as whole:
        status, reply = greedy(whole.url)
        assert status == 200, reply
        expected = tokens_of(reply)
    with ServerProcess(real_model_home, GEMMA, "--rpc", rpc, *SAME_BATCHES, env=PLAIN_KERNELS) as head:
        status, reply = greedy(head.url)
        assert status == 200, reply
        assert tokens_of(reply) == expected  # every one of the greedy tokens
        # The start-up log names each worker, its device and memory, and the layers it holds (18 + output).
        log = head.log()
        assert f"worker {first.address} (RPC0, " in log and "holds layers 0-9 of 19" in log, log
        assert f"worker {second.address} (RPC1, " in log and "holds layers 10-18 of 19" in log, log
        assert "19/19 layers on the RPC workers" in log
        health = httpx.get(f"{head.url}/health").json()
        assert health["status"] == "ok"
        assert health["workers"] == [
            {"worker": first.address, "state": "connected"},
            {"worker": second.address, "state": "connected"},
        ]

        second.kill()
        status, reply = greedy(head.url)
        assert status == 503, reply
        error = reply["error"]  # type: ignore[index]
        assert error["code"] == "worker_unavailable" and second.address in error["message"], error
        health = httpx.get(f"{head.url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert {"worker": first.address, "state": "reachable"} in health.json()["workers"]
        started = time.monotonic()
        status, reply = greedy(head.url)  # fails fast while the worker is away: no load is tried
        assert status == 503 and reply["error"]["code"] == "worker_unavailable"  # type: ignore[index]
        assert time.monotonic() - started < 5

        workers.append(Worker(second.port).start())
        status, reply = greedy(head.url)  # the next request reloads the model over both workers
        assert status == 200, reply
        assert tokens_of(reply) == expected
        assert httpx.get(f"{head.url}/health").json()["status"] == "ok"


def test_a_worker_that_dies_mid_stream_ends_the_stream_with_the_error(
    real_model_home: Path, workers: list[Worker]
) -> None:
    first, second = workers
    rpc = f"{first.address},{second.address}"
    with ServerProcess(real_model_home, GEMMA, "--rpc", rpc, "--parallel", "1", "--ctx", "2048") as head:
        body = {"model": GEMMA, "messages": [{"role": "user", "content": "Tell a long story."}], "stream": True}
        events: list[str] = []
        with httpx.stream("POST", f"{head.url}/v1/chat/completions", json={**body, "max_tokens": 2000}) as stream:
            for line in stream.iter_lines():
                events.append(line)
                if len(events) == 10:
                    first.kill()
        assert any("worker_unavailable" in line and first.address in line for line in events), events[-3:]
        assert [line for line in events if line][-1] == "data: [DONE]"
        assert f"the RPC worker {first.address}" in head.log() and "1 requests failed" in head.log()


def test_bench_measures_the_split_model(real_model_home: Path, workers: list[Worker]) -> None:
    import json

    from tests.conftest import run_cli

    rpc = ",".join(worker.address for worker in workers)
    args = ("bench", GEMMA, "--rpc", rpc, "-p", "16", "-n", "4", "-r", "1", "-t", "1", "--json")
    result = run_cli(*args, env={"SOVEREIGN_HOME": str(real_model_home), **PLAIN_KERNELS})
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["test"] for row in rows] == ["pp16", "tg4"] and all(row["n_gpu_layers"] == 99 for row in rows)
    assert all(row["tokens_per_second"] > 0 for row in rows)


def test_worker_on_a_non_loopback_address_warns_and_stops_cleanly_on_ctrl_c() -> None:
    worker = Worker(host="0.0.0.0").start()
    code, out, err = worker.interrupt()
    assert "no authentication" in err and "0.0.0.0" in err and "ssh -L" in err, err
    assert code == 0 and "worker stopped" in err and "Traceback" not in err, (code, err)
    assert "sovereign serve MODEL --rpc 0.0.0.0:" in out


def test_worker_on_loopback_does_not_warn() -> None:
    worker = Worker().start()
    code, _out, err = worker.interrupt()
    assert code == 0 and "no authentication" not in err, err


def _fake_worker(answer: bytes | None) -> tuple[int, threading.Thread]:
    """A server that answers every HELLO with `answer` (a version), or closes at once when None."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with server:
            while True:
                connection, _ = server.accept()
                with connection:
                    connection.recv(64)
                    if answer is not None:
                        connection.sendall(len(answer).to_bytes(8, "little") + answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname()[1], thread


def test_a_worker_of_another_build_is_refused_in_one_line_naming_both() -> None:
    port, _thread = _fake_worker(bytes([6, 1, 0, 0]) + bytes(24))
    with pytest.raises(WorkerUnavailable) as caught:
        hello(Endpoint("127.0.0.1", port))
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "RPC protocol 6.1.0" in message
    assert rpc_workers.build_name() in message and "llama-cpp-python" in message
    port, _thread = _fake_worker(None)  # an older server closes on a HELLO of another size
    with pytest.raises(WorkerUnavailable, match="another llama.cpp build"):
        hello(Endpoint("127.0.0.1", port))


def test_serve_fails_a_request_fast_when_its_worker_is_of_another_build(real_model_home: Path) -> None:
    port, _thread = _fake_worker(bytes([6, 0, 0, 0]) + bytes(24))
    with ServerProcess(real_model_home, GEMMA, "--rpc", f"127.0.0.1:{port}") as head:
        status, reply = greedy(head.url, 4)
        log = head.log()
    assert "RPC protocol 6.0.0" in log and "could not load" in log, log  # the start-up load said so too
    assert status == 503, reply
    error = reply["error"]  # type: ignore[index]
    assert error["code"] == "worker_unavailable" and "RPC protocol 6.0.0" in error["message"], error


def test_a_build_without_rpc_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from sovereign.cli import app

    monkeypatch.setattr(rpc_workers, "build_supports_rpc", lambda: False)
    monkeypatch.setattr("sovereign.cli.worker.build_supports_rpc", lambda: False)
    for args in (["worker"], ["serve", GEMMA, "--rpc", "127.0.0.1:50052"], ["run", GEMMA, "hi", "--rpc", "h:1"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: this llama.cpp build has no RPC support"), lines
        assert 'CMAKE_ARGS="-DGGML_RPC=on" pip install --no-cache-dir --force-reinstall' in lines[0]


def test_the_model_process_refuses_workers_without_rpc_with_the_rebuild_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sovereign.engine.runtime import rpc
    from sovereign.errors import ModelLoadError

    monkeypatch.setattr(rpc, "supports_rpc", lambda: False)
    with pytest.raises(ModelLoadError, match="no RPC support") as caught:
        rpc.WorkerDevices(["127.0.0.1:1"])
    assert "-DGGML_RPC=on" in (caught.value.hint or "")


def test_rpc_addresses_are_checked_before_anything_loads() -> None:
    assert parse_endpoints("10.0.0.2:50052, box") == (Endpoint("10.0.0.2", 50052), Endpoint("box", 50052))
    for bad in ("h:x", "h:0", ":1", "[::1]:5", "a:1,a:1"):
        with pytest.raises(SovereignError):
            parse_endpoints(bad)


def test_layers_split_as_llama_cpp_assigns_them() -> None:
    from sovereign.engine.runtime.rpc import split_layers

    # gemma3:270m, 18 layers + output, two equal workers: llama.cpp's own log says 0-9 and 10-18.
    assert split_layers(18, 19, [1.0, 1.0]) == [list(range(10)), list(range(10, 19))]
    assert split_layers(18, 19, [3.0, 1.0]) == [list(range(15)), list(range(15, 19))]
    assert split_layers(18, 4, [1.0, 1.0]) == [[15, 16], [17, 18]]  # --gpu-layers 4: the last four only


def test_the_bench_table_says_where_offloaded_generation_ran() -> None:
    """A generation test with no bandwidth ceiling ran off the CPU: the table names where."""
    from rich.console import Console

    from sovereign.bench.model_bench import ModelBenchResult
    from sovereign.cli.bench import model_table

    result = ModelBenchResult(
        "gemma3:270m",
        "gemma3 270M",
        "tg4",
        0,
        4,
        1,
        512,
        512,
        99,
        75.0,
        0.0,
        [75.0],
        250_000_000,
        270_000_000,
        1.0,
        None,
    )
    console = Console(width=200, record=True)
    console.print(model_table([result], offloaded_to="RPC workers"))
    assert "RPC workers (not measured)" in console.export_text()
    console.print(model_table([result]))
    assert "GPU (not measured)" in console.export_text()
