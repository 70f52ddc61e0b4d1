"""What sovereign's gateway adds in front of a closed upstream: time to first token and streaming throughput.

    python scripts/bench_gateway.py [--model gemma3:270m] [--runs 30] [--chunks 1000] [--pace-us 1000] [--json]

Method. A FakeUpstream (tests/fake_upstream.py) runs in a child process, so its event loop does not
share this process's GIL with the timing client. `sovereign serve MODEL --upstream openai=<fake>/v1`
starts on a free port (the local model is only loaded because serving needs one; the upstream is
healthy, so every request is forwarded). Each run is one streamed chat completion of <chunks> content
chunks. Runs alternate direct, gateway, direct, gateway... over kept-alive httpx connections, after a
few unmeasured warm-up runs, so machine noise hits both paths alike. Every gateway answer is checked
to carry exactly the upstream's text, so a fallback to the local model cannot pass for a fast gateway.

Two phases, each with both figures:
- unpaced: the fake sends its chunks as fast as it can (about 15 ms for 1,000). Throughput is
  chunks over the whole request time, gateway p50 / direct p50, target >= 0.95.
- paced: one chunk every --pace-us microseconds (default 1000: 1,000 tokens/s, faster than any
  model streams), as a real upstream sends them.
TTFT is the time from sending the request to the first non-empty content delta; the gateway's added
TTFT (gateway p50 - direct p50) has a target of <= 2 ms in both phases. The unpaced one is the harder:
while the fake floods, the fake, the gateway and this client are three busy processes, and on a
2-core machine the client's wake-up waits for a core.
Exit 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.fake_upstream, when run as `python scripts/bench_gateway.py`

TARGETS = {"added_ttft_p50_ms": 2.0, "throughput_ratio": 0.95}
DEFAULT_MODEL = "gemma3:270m"
WARMUP = 3


def run_upstream(urls: Any, stop: Any) -> None:
    """Child process: serve a FakeUpstream until told to stop."""
    from tests.fake_upstream import FakeUpstream

    with FakeUpstream() as up:
        urls.put(up.url)
        stop.wait()


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sovereign(*args: str, timeout: float = 60) -> str:
    """Run a sovereign CLI command and return its standard output."""
    return subprocess.run(
        [sys.executable, "-m", "sovereign", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    ).stdout


def pick_model(requested: str | None) -> str:
    """The model to serve: the one asked for, else gemma3:270m when the store has it."""
    if requested:
        return requested
    if DEFAULT_MODEL in sovereign("list"):
        return DEFAULT_MODEL
    raise SystemExit(f"{DEFAULT_MODEL} is not pulled; pass --model NAME of a pulled model (see `sovereign list`)")


def wait_health(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    """Block until the gateway answers /health, or exit with its log if it dies or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"sovereign serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"sovereign serve not healthy after {timeout}s; log: {log}")


def one_stream(client: httpx.Client, url: str, chunks: int, pace_us: int) -> dict[str, float]:
    """One streamed chat completion (chunks `pace_us` apart, 0: unpaced), with its text checked.

    Returns TTFT and chunks/s over the whole request.
    """
    model = f"bench-{chunks}-every-{pace_us}" if pace_us else f"bench-{chunks}"
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "bench"}]}
    pieces: list[str] = []
    first = 0.0
    start = time.perf_counter()
    with client.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers={"authorization": "Bearer bench-key"}
    ) as response:
        if response.status_code != 200:
            raise SystemExit(f"{url} answered {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    pieces.append(text)
    total = time.perf_counter() - start
    if "".join(pieces) != "tok " * chunks:
        raise SystemExit(
            f"{url} did not relay the upstream's {chunks} chunks (got {len(pieces)}: {''.join(pieces)[:80]!r}...); "
            "was the request answered by the local model?"
        )
    return {"ttft_s": first - start, "chunks_per_s": chunks / total, "pieces": len(pieces)}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    """p50/p90 TTFT in ms and p50 throughput of one path."""
    ttft = [r["ttft_s"] * 1000 for r in runs]
    rate = [r["chunks_per_s"] for r in runs]
    return {
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p90_ms": percentile(ttft, 90),
        "chunks_per_s_p50": percentile(rate, 50),
        "chunks_per_s_p10": percentile(rate, 10),
    }


def measure(direct_url: str, gateway_url: str, runs: int, chunks: int, pace_us: int) -> dict[str, Any]:
    """Interleaved runs of both paths; each path's summary and the gateway's added TTFT and throughput ratio."""
    results: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
    with httpx.Client(timeout=120, trust_env=False) as direct, httpx.Client(timeout=120, trust_env=False) as through:
        for index in range(WARMUP + runs):
            for name, client, url in (("direct", direct, direct_url), ("gateway", through, gateway_url)):
                run = one_stream(client, url, chunks, pace_us)
                if index >= WARMUP:
                    results[name].append(run)
    direct_s, gateway_s = summary(results["direct"]), summary(results["gateway"])
    return {
        "pace_us": pace_us,
        "direct": direct_s,
        "gateway": gateway_s,
        "added_ttft_p50_ms": gateway_s["ttft_p50_ms"] - direct_s["ttft_p50_ms"],
        "throughput_ratio": gateway_s["chunks_per_s_p50"] / direct_s["chunks_per_s_p50"],
    }


def main() -> None:
    """Start the fake upstream and the gateway, time interleaved streams in both phases, compare against TARGETS."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"local model sovereign serves (default: {DEFAULT_MODEL} when pulled)")
    parser.add_argument("--runs", type=int, default=30, help="measured runs per path and phase (default 30)")
    parser.add_argument("--chunks", type=int, default=1000, help="content chunks per stream (default 1000)")
    parser.add_argument(
        "--pace-us", type=int, default=1000, help="microseconds between chunks in the paced phase (default 1000)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    if "--upstream" not in sovereign("serve", "--help"):
        raise SystemExit(
            "`sovereign serve` has no --upstream flag in this checkout; the gateway is not there to measure yet"
        )
    model = pick_model(args.model)

    context = multiprocessing.get_context("spawn")
    urls, stop = context.Queue(), context.Event()
    upstream = context.Process(target=run_upstream, args=(urls, stop), daemon=True)
    upstream.start()
    log = Path(tempfile.mkdtemp(prefix="bench-gateway-")) / "sovereign.log"
    gateway: subprocess.Popen[bytes] | None = None
    try:
        direct_url = urls.get(timeout=30)
        port = free_port()
        gateway_url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "sovereign",
            "serve",
            model,
            "--port",
            str(port),
            "--upstream",
            f"openai={direct_url}/v1",
        ]
        with open(log, "wb") as out:
            gateway = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_health(gateway_url, gateway, log)
        unpaced = measure(direct_url, gateway_url, args.runs, args.chunks, 0)
        paced = measure(direct_url, gateway_url, args.runs, args.chunks, args.pace_us)
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
        stop.set()
        upstream.join(10)

    verdicts = {
        "added_ttft_p50_ms_unpaced": unpaced["added_ttft_p50_ms"] <= TARGETS["added_ttft_p50_ms"],
        "added_ttft_p50_ms_paced": paced["added_ttft_p50_ms"] <= TARGETS["added_ttft_p50_ms"],
        "throughput_ratio": unpaced["throughput_ratio"] >= TARGETS["throughput_ratio"],
    }
    report = {
        "model": model,
        "runs": args.runs,
        "chunks": args.chunks,
        "cores": os.cpu_count(),
        "unpaced": unpaced,
        "paced": paced,
        "targets": TARGETS,
        "pass": verdicts,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{args.runs} interleaved runs per path and phase, {args.chunks} chunks each, "
            f"local model {model}, {os.cpu_count()} cores"
        )
        print(f"{'phase':13} {'path':8} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'chunks/s p50':>13}")
        for phase in (unpaced, paced):
            name = f"every {phase['pace_us']}us" if phase["pace_us"] else "unpaced"
            for path in ("direct", "gateway"):
                stats = phase[path]
                print(
                    f"{name:13} {path:8} {stats['ttft_p50_ms']:12.2f} {stats['ttft_p90_ms']:12.2f} "
                    f"{stats['chunks_per_s_p50']:13.0f}"
                )
        for phase, key in ((unpaced, "added_ttft_p50_ms_unpaced"), (paced, "added_ttft_p50_ms_paced")):
            name = "paced" if phase["pace_us"] else "unpaced"
            print(
                f"added TTFT p50, {name:8} {phase['added_ttft_p50_ms']:7.2f} ms  "
                f"(target <= {TARGETS['added_ttft_p50_ms']})  "
                f"{'PASS' if verdicts[key] else 'FAIL'}"
            )
        print(
            f"throughput ratio, unpaced {unpaced['throughput_ratio']:6.3f}     "
            f"(target >= {TARGETS['throughput_ratio']})  "
            f"{'PASS' if verdicts['throughput_ratio'] else 'FAIL'}"
        )
    sys.exit(0 if all(verdicts.values()) else 1)


if __name__ == "__main__":
    main()
