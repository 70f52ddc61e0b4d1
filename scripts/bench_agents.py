"""An agent replay: conversations sharing a long prefix, more of them than slots, against sovereign and llama-server.

    python scripts/bench_agents.py --model gemma3:270m --llama-server /path/to/llama-server \\
        [--prefix-tokens 20000 --conversations 6 --turns 3 --parallel 2] [--json out.json]

What agents do to a server: every session sends the same system prompt and tools (Claude Code's
are ~20k tokens), then its own first message, then turn after turn. Here --conversations such
sessions share a ~--prefix-tokens system prompt; each has its own first message and --turns turns
(each turn adds the answer and a follow-up). They run turn by turn, --parallel at a time, on a
server with --parallel slots: more conversations than slots, interleaved, so a slot is always
taken from another conversation. Both servers get the same GGUF, threads, slots and context;
llama-server runs with its host-memory prompt cache (--cache-ram, on by default). The servers run
one after the other, never at once.

Then a restart: sovereign is stopped and started again on the same home, and the first request of
a session that shares the prefix is timed against the replay's very first (cold) request.
llama-server is restarted too, for comparison (it keeps no cache across restarts).

With --cache-ram SIZE, sovereign's memory tier gets that budget (small enough and the replay
overflows it); the model process's resident memory is sampled throughout and its peak reported, to
show the tier stays within its budget.

Targets (TARGETS below): sovereign's TTFT p50 at most half of llama-server's, its total time at
most 0.7 of it, and the first request after a restart at most 0.1 of a cold one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _servers import llama_server_command, model_file, running, sovereign_command

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"ttft_p50_ratio": 0.5, "total_ratio": 0.7, "restart_ratio": 0.1}
QUESTIONS = (
    "Look at the failing test in tests/test_store.py and tell me why it fails.",
    "Add a --verbose flag to the pull command.",
    "Explain how the model pool decides which model to unload.",
    "Write a short summary of the README for a new contributor.",
    "Find where the request log line is written and add the queue time to it.",
    "Which environment variables does the server read? List them.",
    "Refactor the download retry loop into its own function.",
    "What does the gateway do when the upstream returns 429?",
)


@dataclass
class Turn:
    """One request of the replay, as the client saw it."""

    conversation: int
    turn: int
    ttft: float
    seconds: float
    text: str


@dataclass
class Run:
    """One server's replay."""

    server: str
    turns: list[Turn] = field(default_factory=list)
    total_seconds: float = 0.0
    cold_ttft: float = 0.0
    restart_ttft: float | None = None
    peak_rss: int | None = None  # bytes: the model process's (sovereign only)
    start_rss: int | None = None
    end_rss: int | None = None
    cache_ram_bytes: int | None = None  # what the memory tier held at the end, as /metrics says

    def ttft_p50(self) -> float:
        return statistics.median(t.ttft for t in self.turns)

    def ttft_p90(self) -> float:
        values = sorted(t.ttft for t in self.turns)
        return values[min(len(values) - 1, int(0.9 * len(values)))]


def shared_prefix(tokens: int) -> str:
    """A system prompt of about `tokens` tokens (four characters a token), from this repository's docs."""
    text = (ROOT / "README.md").read_text() + (ROOT / "ARCHITECTURE.md").read_text()
    wanted = tokens * 4
    return ("You are a coding agent. The project's documentation follows.\n\n" + text * (wanted // len(text) + 1))[
        :wanted
    ]


async def ask(
    client: httpx.AsyncClient, url: str, model: str, messages: list[dict[str, str]], tokens: int
) -> tuple[float, float, str]:
    """Stream one chat completion: (time to first token, total seconds, text)."""
    body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            delta = choices[0].get("delta", {}) if choices else {}
            piece = delta.get("content") or delta.get("reasoning_content") or ""
            if piece and first is None:
                first = time.perf_counter() - started
            pieces.append(piece)
    total = time.perf_counter() - started
    return (first if first is not None else total), total, "".join(pieces)


async def replay(url: str, name: str, args: argparse.Namespace, system: str) -> Run:
    """The conversations, turn by turn, --parallel at a time."""
    run = Run(name)
    histories = [
        [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        for i in range(args.conversations)
    ]
    limit = asyncio.Semaphore(args.parallel)
    started = time.perf_counter()
    # No kept-alive connections: llama-server closes them between requests, and a reused one fails.
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as client:

        async def one(index: int, turn: int) -> None:
            async with limit:
                ttft, seconds, text = await ask(client, url, args.model, histories[index], args.answer_tokens)
            run.turns.append(Turn(index, turn, ttft, seconds, text))
            print(f"  {name} conversation {index + 1} turn {turn + 1}: TTFT {ttft:.2f}s, {seconds:.2f}s", flush=True)
            histories[index] += [
                {"role": "assistant", "content": text or "…"},
                {"role": "user", "content": f"Good. Now go on with step {turn + 2}."},
            ]

        for turn in range(args.turns):
            await asyncio.gather(*(one(index, turn) for index in range(args.conversations)))
    run.total_seconds = time.perf_counter() - started
    run.cold_ttft = min(run.turns, key=lambda t: (t.turn, t.conversation)).ttft
    return run


async def restarted(url: str, args: argparse.Namespace, system: str) -> float:
    """TTFT of a new session sharing the prefix, on a server that has just started."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "A new session: where do I start?"}]
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        ttft, _, _ = await ask(client, url, args.model, messages, args.answer_tokens)
    return ttft


def sovereign_home(model: str) -> Path:
    """A fresh SOVEREIGN_HOME holding the model (registered in place): its prompt cache starts empty."""
    from sovereign.config import Settings
    from sovereign.store import NullReporter, PullOptions, Store, pull

    home = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    settings = Settings.from_env({"SOVEREIGN_HOME": str(home)})
    from sovereign.catalog import load_catalog

    pull(
        str(model_file(model)),
        settings=settings,
        catalog=load_catalog(settings),
        store=Store(home),
        reporter=NullReporter(),
        options=PullOptions(name=model),
    )
    return home


def cache_bytes(url: str) -> int | None:
    """What sovereign's prompt cache holds in memory now, from /metrics (None for a server without it)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("sovereign_prompt_cache_bytes{") and 'tier="ram"' in line:
            return int(float(line.split()[-1]))
    return None


class RssSampler:
    """The resident memory of sovereign's model process (found by its command line), sampled twice a second."""

    def __init__(self) -> None:
        import threading

        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    if b"sovereign.engine.runtime.worker" not in (proc / "cmdline").read_bytes():
                        continue
                    for line in (proc / "status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.samples.append(int(line.split()[1]) * 1024)
                except OSError:
                    continue


def measure(
    name: str, command: list[str], args: argparse.Namespace, system: str, logs: Path, env: dict[str, str] | None = None
) -> Run:
    """Replay on a fresh server, then time the first request after a restart."""
    import os

    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        with running(name, command, logs) as url, RssSampler() as rss:
            deadline = time.monotonic() + 10
            while not rss.samples and time.monotonic() < deadline:
                time.sleep(0.2)
            start = rss.samples[0] if rss.samples else None
            run = asyncio.run(replay(url, name, args, system))
            time.sleep(1.0)
            run.cache_ram_bytes = cache_bytes(url)
        if rss.samples:
            run.start_rss, run.peak_rss, run.end_rss = start, max(rss.samples), rss.samples[-1]
        with running(f"{name}-restarted", command, logs) as url:
            run.restart_ttft = asyncio.run(restarted(url, args, system))
        print(f"  {name} after a restart: TTFT {run.restart_ttft:.2f}s (cold was {run.cold_ttft:.2f}s)", flush=True)
        return run
    finally:
        os.environ.clear()
        os.environ.update(saved)


def extra_args(command: list[str], extra: list[str]) -> list[str]:
    """A server command with more options."""
    return [*command, *extra]


def report(runs: dict[str, Run]) -> dict[str, Any]:
    """Print the figures and the targets; return them for --json."""
    print(f"\n{'server':14}{'TTFT p50':>10}{'TTFT p90':>10}{'total':>9}{'cold TTFT':>11}{'restart TTFT':>14}")
    for run in runs.values():
        restart = f"{run.restart_ttft:.2f}s" if run.restart_ttft is not None else "-"
        print(
            f"{run.server:14}{run.ttft_p50():9.2f}s{run.ttft_p90():9.2f}s{run.total_seconds:8.1f}s{run.cold_ttft:10.2f}s{restart:>14}"
        )
    for run in runs.values():
        if run.peak_rss is not None:
            print(
                f"{run.server}: model process resident memory {(run.start_rss or 0) >> 20} MiB at start, "
                f"{run.peak_rss >> 20} MiB at its peak, {(run.end_rss or 0) >> 20} MiB at the end, when the "
                f"memory tier held {(run.cache_ram_bytes or 0) >> 20} MiB"
            )
    verdicts: dict[str, Any] = {}
    ours = runs.get("sovereign")
    peer = runs.get("llama-server")
    if ours and peer:
        verdicts["ttft_p50_ratio"] = ours.ttft_p50() / peer.ttft_p50()
        verdicts["total_ratio"] = ours.total_seconds / peer.total_seconds
    if ours and ours.restart_ttft is not None:
        verdicts["restart_ratio"] = ours.restart_ttft / ours.cold_ttft
    for key, value in verdicts.items():
        print(f"{'PASS' if value <= TARGETS[key] else 'MISS'}  {key} {value:.3f} <= {TARGETS[key]}")
    return {"runs": {k: asdict(v) for k, v in runs.items()}, "ratios": verdicts, "targets": TARGETS}


def main() -> int:
    """Run the replay on each server, one after the other."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary (skipped if absent)")
    parser.add_argument("--skip-sovereign", action="store_true")
    parser.add_argument("--prefix-tokens", type=int, default=20000)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=32768, help="context tokens per slot")
    parser.add_argument(
        "--repack", type=int, choices=(0, 1), default=1, help="0: llama.cpp's safe kernels (some Xeons)"
    )
    parser.add_argument("--cache-ram", help="sovereign's --cache-ram (e.g. 256MiB, to watch it stay within it)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    system = shared_prefix(args.prefix_tokens)
    logs = Path(tempfile.mkdtemp(prefix="bench-agents-logs-"))
    print(
        f"{args.model}: {args.conversations} conversations x {args.turns} turns, ~{args.prefix_tokens} shared tokens, "
        f"{args.parallel} slots of {args.ctx}, {args.threads} threads; logs in {logs}",
        file=sys.stderr,
    )
    runs: dict[str, Run] = {}
    with ExitStack():
        if not args.skip_sovereign:
            home = sovereign_home(args.model)
            extra = ["--cache-ram", args.cache_ram] if args.cache_ram else []
            command = sovereign_command(
                args.model, args.threads, args.ctx, args.parallel, extra_buffers="auto" if args.repack else "off"
            )
            command = extra_args(command, extra)
            runs["sovereign"] = measure("sovereign", command, args, system, logs, {"SOVEREIGN_HOME": str(home)})
        if args.llama_server:
            command = llama_server_command(
                args.llama_server,
                model_file(args.model),
                args.model,
                args.threads,
                args.ctx,
                args.parallel,
                repack=bool(args.repack),
            )
            runs["llama-server"] = measure("llama-server", command, args, system, logs)
    figures = report(runs)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
