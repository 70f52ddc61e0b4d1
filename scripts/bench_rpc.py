"""One model over RPC workers against the same model served whole: head memory, decode speed, greedy agreement.

Starts WORKERS `sovereign worker` processes on loopback, then serves MODEL twice (whole, and with
`--rpc` over the workers), asks both the same prompts greedily, and prints per setup: the model
process's RSS after loading and its peak, the decode rate the server logged, and how many leading
tokens of each answer the split model shares with the whole one.

    python scripts/bench_rpc.py [--model gemma3:270m] [--workers 2] [--threads 1] [--tokens 128]

Loopback measures the protocol's overhead, not a network's: on a LAN every decode step adds a
round trip per worker.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

PROMPTS = (
    "Name three colours of the rainbow.",
    "Write a short poem about the sea.",
    "Explain in two sentences what a CPU does.",
    "List five fruits, one per line.",
)
SOVEREIGN = [str(Path(sys.executable).parent / "sovereign")]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def model_process(server: int) -> int:
    """The pid of the server's model process (its child running the model)."""
    for _ in range(100):
        children = Path(f"/proc/{server}/task/{server}/children").read_text().split()
        for child in children:
            if "sovereign.engine.runtime.worker" in Path(f"/proc/{child}/cmdline").read_text():
                return int(child)
        time.sleep(0.1)
    raise SystemExit("no model process found")


def memory_mib(pid: int) -> tuple[int, int]:
    """(RSS, peak RSS) in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = [re.search(rf"{key}:\s+(\d+)", status) for key in ("VmRSS", "VmHWM")]
    rss, peak = (int(match.group(1)) // 1024 if match else 0 for match in found)
    return rss, peak


@contextmanager
def started(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process writing to `log`, stopped on exit."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            process.wait(15)


@contextmanager
def serve(model: str, extra: list[str], threads: int, log: Path) -> Iterator[tuple[str, int]]:
    """Serve the model; yields (url, model process pid) once /health says ok."""
    port = free_port()
    command = [*SOVEREIGN, "serve", model, "--port", str(port), "--parallel", "1", "--ctx", "4096"]
    with started([*command, "--threads", str(threads), "--speculate", "off", *extra], log) as server:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok":
                    break
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        yield url, model_process(server.pid)


def answer(url: str, model: str, prompt: str, tokens: int) -> list[str]:
    """The greedy answer's tokens."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": tokens,
        "logprobs": True,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()
    return [entry["token"] for entry in reply["choices"][0]["logprobs"]["content"]]


def run(model: str, extra: list[str], threads: int, tokens: int, log: Path) -> tuple[list[list[str]], str]:
    """One setup's answers and its figures line."""
    with serve(model, extra, threads, log) as (url, pid):
        loaded, _ = memory_mib(pid)
        answers = [answer(url, model, prompt, tokens) for prompt in PROMPTS]
        rss, peak = memory_mib(pid)
    rates = [float(rate) for rate in re.findall(r"decode=([\d.]+)tok/s", log.read_text())]
    rate = sum(rates) / len(rates) if rates else 0.0
    return answers, f"model process RSS {loaded} MiB loaded, {rss} MiB after, peak {peak} MiB; decode {rate:.1f} tok/s"


def main() -> None:
    """Run both setups and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads of each worker and of the whole model")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-rpc-"))
    ports = [free_port() for _ in range(args.workers)]
    with ExitStack() as stack:
        for index, port in enumerate(ports):
            command = [*SOVEREIGN, "worker", "--port", str(port), "--threads", str(args.threads)]
            stack.enter_context(started(command, logs / f"worker{index}.log"))
        time.sleep(2)
        whole, whole_line = run(args.model, [], args.threads, args.tokens, logs / "whole.log")
        rpc = ",".join(f"127.0.0.1:{port}" for port in ports)
        split, split_line = run(args.model, ["--rpc", rpc], args.threads, args.tokens, logs / "split.log")
    print(f"whole: {whole_line}")
    print(f"split over {args.workers} workers: {split_line}")
    for prompt, a, b in zip(PROMPTS, whole, split, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        print(f"{same:4d}/{len(a)} leading greedy tokens identical: {prompt}")
    print(f"logs: {logs}")


if __name__ == "__main__":
    main()
