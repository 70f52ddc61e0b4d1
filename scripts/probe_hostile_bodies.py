"""Send bodies that are legal but costly to parse, and measure how the server bears them.

For each body: its answer and how long it took, the slowest /health meanwhile (polled every 20 ms), and
the server process's RSS (now, and its peak so far). Start a server first, then for example:

    sovereign serve smollm2:135m --port 11800 &
    python scripts/probe_hostile_bodies.py --url http://127.0.0.1:11800 --pid $!
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

MODEL = "smollm2:135m"


def _chat(extra: dict[str, object]) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra}


def _zeros(count: int) -> bytes:
    """Finding 1's body: a chat request whose chat_template_kwargs hold `count` zeros (23 MiB for 12M)."""
    head = json.dumps(_chat({}))[:-1].encode()
    return head + b', "chat_template_kwargs": {"x": [' + b"0," * (count - 1) + b"0]}}"


BODIES: dict[str, Callable[[], tuple[str, bytes]]] = {
    "12M zeros in chat_template_kwargs": lambda: ("/v1/chat/completions", _zeros(12_000_000)),
    "3M zeros in chat_template_kwargs": lambda: ("/v1/chat/completions", _zeros(3_000_000)),
    "300k messages": lambda: (
        "/v1/chat/completions",
        json.dumps({**_chat({}), "messages": [{"role": "user", "content": "hi"}] * 300_000}).encode(),
    ),
    "9,999 messages of 99 content parts": lambda: (
        "/v1/chat/completions",
        json.dumps(
            {**_chat({}), "messages": [{"role": "user", "content": [{"type": "text", "text": "h"}] * 99}] * 9_999}
        ).encode(),
    ),
    "9,999 Anthropic messages of 30 blocks": lambda: (
        "/v1/messages",
        json.dumps(
            {
                "model": MODEL,
                "max_tokens": 1,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "h"}] * 30}] * 9_999,
            }
        ).encode(),
    ),
    "5,000 Anthropic messages of 30 blocks (just under the value cap)": lambda: (
        "/v1/messages",
        json.dumps(
            {
                "model": MODEL,
                "max_tokens": 1,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "h"}] * 30}] * 5_000,
            }
        ).encode(),
    ),
    "a 24 MiB string full of commas": lambda: (
        "/v1/chat/completions",
        json.dumps({**_chat({}), "messages": [{"role": "user", "content": "a," * 12_000_000}]}).encode(),
    ),
}


def _rss(pid: int) -> tuple[float, float]:
    """The process's resident memory now and at its peak, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def probe(url: str, pid: int | None, name: str, path: str, body: bytes) -> None:
    """Send one body while /health is polled; print what it cost."""
    slowest = 0.0
    done = threading.Event()

    def poll() -> None:
        nonlocal slowest
        with httpx.Client(timeout=120) as client:
            while not done.is_set():
                started = time.perf_counter()
                client.get(f"{url}/health")
                slowest = max(slowest, time.perf_counter() - started)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.perf_counter()
    response = httpx.post(f"{url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=600)
    took = time.perf_counter() - started
    time.sleep(0.2)
    done.set()
    poller.join()
    memory = ""
    if pid is not None:
        now, peak = _rss(pid)
        memory = f"  RSS {now:,.0f} MiB (peak so far {peak:,.0f} MiB)"
    print(
        f"{name} ({len(body) / 2**20:.1f} MiB): HTTP {response.status_code} in {took:.2f} s; "
        f"slowest /health {slowest * 1000:.0f} ms{memory}"
    )
    if response.status_code >= 400:
        print(f"    {response.text[:200]}")


def main() -> None:
    """Probe every body (or those named) against a running server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, help="the server's process id, to report its memory")
    parser.add_argument("--only", action="append", help="probe only bodies whose name contains this")
    args = parser.parse_args()
    for name, make in BODIES.items():
        if args.only and not any(part in name for part in args.only):
            continue
        path, body = make()
        probe(args.url, args.pid, name, path, body)


if __name__ == "__main__":
    main()
