"""What keeping a sliding-window model's window layers whole (swa_full) costs at depth, against llama-bench.

    python scripts/bench_swa.py --model gemma3:270m --depth 20480 [--llama-bench /path/to/llama-bench]

sovereign loads models with llama.cpp's `swa_full` on: the sliding-window layers (5 of Gemma 3's 6)
keep room for every token's keys and values, not only the last window. A prefix held by one slot can
then be shared into another (`llama_memory_seq_cp`): with a windowed cache, shared cells cannot be
handed to new tokens and decoding soon fails for want of cells. The cost is memory and some attention
work at depth. This reads DEPTH tokens
of text, then times TOKENS single-token decode steps, with swa_full on and off, in turns (--rounds),
through sovereign's own backend; with --llama-bench, llama.cpp's llama-bench on the same GGUF at the
same depth (it keeps the window only; give --repack 0 on a CPU whose repacked kernels crash).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sovereign.config import Settings
from sovereign.engine.runtime.backend import BatchEntry, LlamaBackend
from sovereign.engine.wire import LoadOptions
from sovereign.refs import parse_name
from sovereign.store import Store

README = Path(__file__).resolve().parent.parent / "README.md"


def decode_speed(path: Path, depth: int, tokens: int, threads: int, swa_full: bool) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s at `depth`) with swa_full on or off."""
    backend = LlamaBackend(
        path, LoadOptions(n_ctx=depth + tokens + 64, n_parallel=1, n_threads=threads, swa_full=swa_full)
    )
    try:
        text = backend.tokenize(README.read_text() * 20, special=False)
        prompt = backend.with_bos(text)[:depth]
        started = time.perf_counter()
        for at in range(0, depth, backend.n_batch):
            chunk = prompt[at : at + backend.n_batch]
            backend.decode([BatchEntry(t, at + i, 0, at + i == depth - 1) for i, t in enumerate(chunk)])
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for step in range(tokens):
            backend.decode([BatchEntry(prompt[step], depth + step, 0, True)])
        decode = time.perf_counter() - started
        return depth / prefill, tokens / decode
    finally:
        backend.close()


def llama_bench(binary: str, path: Path, depth: int, tokens: int, threads: int, repack: bool) -> float | None:
    """llama-bench's tgN tokens/s at depth (it keeps the sliding window only)."""
    command = [binary, "-m", str(path), "-p", "0", "-n", str(tokens), "-d", str(depth), "-t", str(threads)]
    command += ["-r", "1", "-o", "json"] + ([] if repack else ["--repack", "0"])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return float(json.loads(done.stdout)[0]["avg_ts"])


def main() -> int:
    """Run the comparison and print one line per configuration."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3:270m")
    parser.add_argument("--depth", type=int, default=20480)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary (skipped if absent)")
    parser.add_argument("--repack", type=int, choices=(0, 1), default=1, help="llama-bench --repack (0 on some Xeons)")
    args = parser.parse_args()
    settings = Settings.from_env()
    store = Store(settings.home)
    path = store.model_path(store.require(parse_name(args.model)))
    results: dict[str, list[float]] = {"sovereign swa_full=on": [], "sovereign swa_full=off": [], "llama-bench": []}
    prefill: dict[str, list[float]] = {"sovereign swa_full=on": [], "sovereign swa_full=off": []}
    for _ in range(args.rounds):
        for swa_full in (True, False):
            name = f"sovereign swa_full={'on' if swa_full else 'off'}"
            pp, tg = decode_speed(path, args.depth, args.tokens, args.threads, swa_full)
            results[name].append(tg)
            prefill[name].append(pp)
        if args.llama_bench and (
            tg := llama_bench(args.llama_bench, path, args.depth, args.tokens, args.threads, bool(args.repack))
        ):
            results["llama-bench"].append(tg)
    print(f"{args.model}, depth {args.depth}, {args.threads} threads, {args.rounds} rounds (median)")
    for name, values in results.items():
        if values:
            pp = f", prefill {statistics.median(prefill[name]):.0f} t/s" if name in prefill else ""
            print(f"  {name:26} decode {statistics.median(values):6.1f} t/s{pp}")
    on, off = (statistics.median(results[f"sovereign swa_full={k}"]) for k in ("on", "off"))
    print(f"  swa_full costs {100 * (1 - on / off):.1f}% of decode speed at this depth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
