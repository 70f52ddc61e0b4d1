"""`sovereign run` and `sovereign serve` as a user runs them."""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sovereign.refs import parse_name
from sovereign.store import PullOptions, Store
from sovereign.store.serving import ServingRecord, servers_serving
from tests.conftest import GEMMA, assert_clean_error, pull_in_process, run_cli
from tests.servers import ServerProcess, sovereign_command


def test_run_prints_a_streamed_answer_repeatably(real_model_home: Path) -> None:
    env = {"SOVEREIGN_HOME": str(real_model_home)}
    first = run_cli("run", GEMMA, "Tell me about the sea.", "--max-tokens", "12", "--seed", "5", env=env)
    again = run_cli("run", GEMMA, "Tell me about the sea.", "--max-tokens", "12", "--seed", "5", env=env)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr and first.stdout.strip()
    assert first.stdout == again.stdout


def test_run_reads_a_piped_prompt(real_model_home: Path) -> None:
    environment = {**os.environ, "SOVEREIGN_HOME": str(real_model_home)}
    result = subprocess.run(
        [*sovereign_command(), "run", GEMMA, "--max-tokens", "4"],
        input="Hello",
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_run_unknown_model_is_one_clean_line() -> None:
    assert_clean_error(run_cli("run", "nosuch:model", "hi"), "nosuch:model", "pull")


def _read_until(fd: int, marker: bytes, timeout: float = 60) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"waited for {marker!r}, got {seen!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_interactive_chat_keeps_history_and_obeys_commands(real_model_home: Path) -> None:
    controller, terminal = pty.openpty()
    environment = {**os.environ, "SOVEREIGN_HOME": str(real_model_home), "TERM": "dumb"}
    process = subprocess.Popen(
        [*sovereign_command(), "run", GEMMA, "--max-tokens", "6", "--seed", "1"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=environment,
    )
    os.close(terminal)
    try:
        banner = _read_until(controller, b">>> ")
        assert b"/bye" in banner
        os.write(controller, b"Hello there\n")
        _read_until(controller, b">>> ")
        os.write(controller, b"/clear\n")
        assert b"cleared" in _read_until(controller, b">>> ")
        os.write(controller, b"/nonsense\n")
        assert b"unknown command" in _read_until(controller, b">>> ")
        os.write(controller, b"/bye\n")
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)


def test_serve_refuses_a_port_in_use_and_bad_options(real_model_home: Path) -> None:
    env = {"SOVEREIGN_HOME": str(real_model_home)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_clean_error(run_cli("serve", GEMMA, "--port", port, env=env), "cannot listen", "--port")
    assert_clean_error(run_cli("serve", GEMMA, "--keep-alive", "soon", env=env), "--keep-alive")
    assert_clean_error(run_cli("serve", GEMMA, "--ctx", "0", env=env), "--ctx")
    assert_clean_error(run_cli("serve", GEMMA, "--parallel", "0", env=env), "--parallel")
    assert_clean_error(run_cli("serve", GEMMA, "--max-queue", "-1", env=env), "--max-queue")
    assert_clean_error(run_cli("serve", GEMMA, "--timeout", "-5", env=env), "--timeout")
    assert_clean_error(run_cli("serve", "nosuch:model", env=env), "nosuch:model")


def test_serve_without_a_model_pulls_the_default_first(real_model_home: Path, isolated_home: Path) -> None:
    # A user catalog whose default comes from a local file stands in for the network.
    store = Store(real_model_home)
    source = store.model_path(store.require(parse_name(GEMMA)))
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text(
        f'default = "mine:latest"\n\n[models."mine:latest"]\nsources = ["{source}"]\ntemplate = "gemma3"\n'
    )
    with ServerProcess(isolated_home) as running:
        assert "pulling it first" in running.log()
        health = httpx.get(f"{running.url}/health").json()
        assert health["models"] == ["mine:latest"]
        reply = httpx.post(
            f"{running.base_url}/chat/completions",
            json={"model": "mine:latest", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=60,
        )
        assert reply.status_code == 200


def test_rm_warns_while_a_server_serves_the_model_and_health_lists_it_unavailable(
    real_model_home: Path, isolated_home: Path
) -> None:
    real = Store(real_model_home)
    source = real.model_path(real.require(parse_name(GEMMA)))
    pull_in_process(str(source), options=PullOptions(name="mine:1"))  # in place: rm leaves the file itself alone
    with ServerProcess(isolated_home, "mine:1") as running:
        assert httpx.get(f"{running.url}/health").json()["unavailable"] == []
        removed = run_cli("rm", "mine:1")
        assert removed.returncode == 0 and "removed mine:1" in removed.stderr, removed.stderr
        warnings = [line for line in removed.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "mine:1" in warnings[0] and running.url in warnings[0], removed.stderr
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 200  # still answering: a load balancer keeps it
        assert health.json()["status"] == "degraded"
        assert health.json()["unavailable"] == [{"model": "mine:1", "reason": "removed from the store"}]
        reply = httpx.post(  # the loaded copy still answers, as the warning says
            f"{running.base_url}/chat/completions",
            json={"model": "mine:1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=60,
        )
        assert reply.status_code == 200
    assert list((isolated_home / "servers").iterdir()) == []  # the server took its record with it


def test_a_server_record_counts_while_its_process_runs(isolated_home: Path) -> None:
    record = ServingRecord(isolated_home, "http://127.0.0.1:1")
    record.write(["a:1", "b:1"])
    assert [s.url for s in servers_serving(isolated_home, "a:1")] == ["http://127.0.0.1:1"]
    assert servers_serving(isolated_home, "c:1") == []
    record.close()
    assert servers_serving(isolated_home, "a:1") == []
    # A server killed without cleaning up leaves its record; its lock died with it, so the record is ignored.
    killed = "import os, sys, pathlib; from sovereign.store.serving import ServingRecord as R; "
    killed += "R(pathlib.Path(sys.argv[1]), 'http://127.0.0.1:2').write(['a:1']); os._exit(9)"
    subprocess.run([sys.executable, "-c", killed, str(isolated_home)], check=False)
    assert len(list((isolated_home / "servers").iterdir())) == 2
    assert servers_serving(isolated_home, "a:1") == []
    assert list((isolated_home / "servers").iterdir()) == []  # and deleted
