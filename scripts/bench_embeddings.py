"""How embeddings share a model with chat, and whether they stop when their client leaves.

Against a running server: an 8-token chat alone (best of 3), then during an embeddings request of 60
inputs of about 450 tokens; then a client that hangs up after 1 s on such a request, and the CPU the
model's process uses over the next 5 s (about 0 when its inputs stopped). For example:

    sovereign serve smollm2:135m --port 11800 &
    python scripts/bench_embeddings.py --url http://127.0.0.1:11800 --pid $!
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time
from pathlib import Path

import httpx

LONG_INPUT = "The river carried silver stones past the quiet mountain village at dawn. " * 30


def _chat(url: str, model: str) -> float:
    started = time.perf_counter()
    body = {"model": model, "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 8}
    httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).raise_for_status()
    return time.perf_counter() - started


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--pid", type=int, required=True, help="the server's process id")
    args = parser.parse_args()
    body = {"model": args.model, "input": [LONG_INPUT] * 60}
    alone = min(_chat(args.url, args.model) for _ in range(3))
    took: list[float] = []

    def embed() -> None:
        started = time.perf_counter()
        httpx.post(f"{args.url}/v1/embeddings", json=body, timeout=900).raise_for_status()
        took.append(time.perf_counter() - started)

    worker = threading.Thread(target=embed)
    worker.start()
    time.sleep(1.0)
    shared = [_chat(args.url, args.model) for _ in range(3)]
    worker.join()
    print(f"8-token chat: {alone:.2f} s alone; among 60 embedding inputs {', '.join(f'{s:.2f}' for s in shared)} s")
    print(f"60 inputs of ~450 tokens: {took[0]:.1f} s")
    child = int(subprocess.run(["pgrep", "-P", str(args.pid)], capture_output=True, text=True).stdout.split()[0])
    try:
        httpx.post(f"{args.url}/v1/embeddings", json=body, timeout=1.0)
    except httpx.TimeoutException:
        pass
    time.sleep(1.0)
    before = _cpu(child)
    time.sleep(5.0)
    print(
        f"after a client hung up at 1 s: the model's process used {_cpu(child) - before:.1f} s of CPU in the next 5 s"
    )


if __name__ == "__main__":
    main()
