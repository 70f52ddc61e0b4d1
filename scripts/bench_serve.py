"""Single-stream decode speed: `sovereign serve` against llama-cpp-python's own server, side by side.

    python scripts/bench_serve.py --peer-python /path/to/venv/bin/python [--model gemma3:270m] [--threads 2]

The peer venv needs `pip install 'llama-cpp-python[server]'` (never committed, never built here).
Both servers load the same GGUF with the same threads and context, and get the same raw
completion prompt with end-of-sequence tokens banned, so both decode exactly --tokens tokens.
Requests alternate between the servers, run after run, so machine noise hits both alike.
Decode tok/s is measured on the stream: tokens after the first, over the time after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from _servers import (
    completion_body,
    end_of_generation_tokens,
    llama_cpp_python_command,
    model_file,
    running,
    sovereign_command,
)

from sovereign.bench.serve_bench import event_text, stream_event

TARGET_RATIO = 0.95  # sovereign must decode at least this fast relative to llama-cpp-python's server
PROMPT = "The history of the sea is long. In the beginning,"


def one_stream(url: str, model: str, tokens: int, banned: list[int]) -> dict[str, float]:
    """One streamed completion: time to first token, decode tok/s after it, chunks seen."""
    start = time.perf_counter()
    stamps: list[float] = []
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=completion_body(model, PROMPT, tokens, banned), timeout=300
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            event = stream_event(line)
            if event is not None and event_text(event):
                stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise SystemExit(f"{url} streamed {len(stamps)} pieces; expected {tokens}")
    return {
        "ttft_s": stamps[0] - start,
        "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "pieces": len(stamps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", required=True, help="python of a venv with llama-cpp-python[server]")
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    path = model_file(args.model)
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    commands = {
        "sovereign": sovereign_command(args.model, args.threads, args.ctx),
        "llama-cpp-python": llama_cpp_python_command(args.peer_python, path, args.model, args.threads, args.ctx),
    }
    banned = end_of_generation_tokens(path)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    with ExitStack() as stack:  # both servers up at once: requests alternate between them
        servers = {name: stack.enter_context(running(name, command, logs)) for name, command in commands.items()}
        for url in servers.values():  # warm-up: first-request costs stay out of the figures
            one_stream(url, args.model, 8, banned)
        for _ in range(args.runs):
            for name, url in servers.items():
                results[name].append(one_stream(url, args.model, args.tokens, banned))
    summary = {
        name: {
            "decode_tok_s_median": round(statistics.median(r["decode_tok_s"] for r in runs), 1),
            "decode_tok_s_best": round(max(r["decode_tok_s"] for r in runs), 1),
            "ttft_s_median": round(statistics.median(r["ttft_s"] for r in runs), 3),
            "pieces": runs[0]["pieces"],
        }
        for name, runs in results.items()
    }
    ratio = summary["sovereign"]["decode_tok_s_median"] / summary["llama-cpp-python"]["decode_tok_s_median"]
    report = {
        "model": args.model,
        "file": path.name,
        "threads": args.threads,
        "ctx": args.ctx,
        "tokens": args.tokens,
        "runs": args.runs,
        **summary,
        "ratio": round(ratio, 3),
        "target": TARGET_RATIO,
        "pass": ratio >= TARGET_RATIO,
    }
    print(json.dumps(report, indent=1))
    sys.exit(0 if report["pass"] else 1)


if __name__ == "__main__":
    main()
