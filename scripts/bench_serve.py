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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from sovereign.catalog import load_catalog
from sovereign.config import Settings
from sovereign.refs import parse_name
from sovereign.store import Store

TARGET_RATIO = 0.95  # sovereign must decode at least this fast relative to llama-cpp-python's server
PROMPT = "The history of the sea is long. In the beginning,"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server at {url} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"server at {url} not ready in {timeout}s")


def one_stream(url: str, model: str, tokens: int, banned: list[int]) -> dict[str, float]:
    """One streamed completion: time to first token, decode tok/s after it, chunks seen."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True, "logit_bias": {str(t): -100 for t in banned}}
    start = time.perf_counter()
    stamps: list[float] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("text"):
                    stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise SystemExit(f"{url} streamed {len(stamps)} pieces; expected {tokens}")
    return {"ttft_s": stamps[0] - start, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "pieces": len(stamps)}


def model_file(name: str) -> Path:
    settings = Settings.from_env()
    store = Store(settings.home)
    manifest = store.get(parse_name(name)) or store.require(load_catalog(settings).canonical(parse_name(name)))
    return store.model_path(manifest)


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
    ours_port, peer_port = free_port(), free_port()
    logs = tempfile.mkdtemp(prefix="bench-serve-")
    ours = subprocess.Popen(
        [sys.executable, "-m", "sovereign", "serve", args.model, "--port", str(ours_port), "--threads", str(args.threads), "--ctx", str(args.ctx), "--gpu-layers", "0"],
        stdout=open(f"{logs}/sovereign.log", "wb"), stderr=subprocess.STDOUT,
    )
    peer = subprocess.Popen(
        [args.peer_python, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", args.model, "--port", str(peer_port),
         "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx), "--n_gpu_layers", "0"],
        stdout=open(f"{logs}/peer.log", "wb"), stderr=subprocess.STDOUT,
    )
    servers = {"sovereign": f"http://127.0.0.1:{ours_port}", "llama-cpp-python": f"http://127.0.0.1:{peer_port}"}
    try:
        for url, process in zip(servers.values(), (ours, peer), strict=True):
            wait_ready(url, process)
        banned = [t["id"] for t in httpx.post(f"{servers['sovereign']}/tokenize", json={"content": "<eos><end_of_turn>", "with_pieces": True}).json()["tokens"]]
        results: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for url in servers.values():  # warm-up: first-request costs stay out of the figures
            one_stream(url, args.model, 8, banned)
        for _ in range(args.runs):
            for name, url in servers.items():
                results[name].append(one_stream(url, args.model, args.tokens, banned))
    finally:
        for process in (ours, peer):
            process.terminate()
            process.wait(30)
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
    report = {"model": args.model, "file": path.name, "threads": args.threads, "ctx": args.ctx, "tokens": args.tokens, "runs": args.runs, **summary, "ratio": round(ratio, 3), "target": TARGET_RATIO, "pass": ratio >= TARGET_RATIO}
    print(json.dumps(report, indent=1))
    sys.exit(0 if report["pass"] else 1)


if __name__ == "__main__":
    main()
