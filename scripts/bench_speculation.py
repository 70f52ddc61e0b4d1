"""Speculative decoding by n-gram lookup: decode speed with and without it, and the same text either way.

    SOVEREIGN_HOME=~/.local/share/sovereign python scripts/bench_speculation.py --model smollm2:135m --threads 2

Two servers load the same model with one slot each: `--speculate off` and `--speculate auto` (the
default). They take turns (--rounds, the order rotating, so both see the same drift of a shared
machine), each answering greedy, streamed chat requests one at a time:
- **code edit**: a file of this repository with one name to change, answered with the whole file (an
  agent's edit: most of the answer is copied from the prompt);
- **prose**: short essays, whose words the prompt does not hold.
Decode speed is a request's streamed tokens after the first over the time they took (tokens/s),
summed per kind over every round. The texts of the two servers are compared (greedy: they must be the
same, but for llama.cpp's rounding, which differs with a batch's shape, on a near tie). Speculation's
own figures come from the auto server's /metrics. Targets (TARGETS): code edit >= 1.5x, prose >= 0.95x.
For load, run scripts/bench_load.py --before on a checkout without speculation (its c8 target is 0.95x).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _servers import running, sovereign_command

ROOT = Path(__file__).resolve().parent.parent
EDITED = ROOT / "sovereign" / "engine" / "runtime" / "kv_state.py"
PROSE = [
    "Write a short essay on why lighthouses were built where they were.",
    "Describe a walk through a market town on a rainy morning.",
    "Explain to a child how bread rises.",
]
TARGETS = {"edit": 1.5, "prose": 0.95}


def edit_prompt() -> str:
    """An agent's kind of request: change one name in a file and give the file back whole."""
    return (
        f"Here is a Python file:\n\n```python\n{EDITED.read_text()}```\n\n"
        "Rename the method `window_kept` to `holds_window` everywhere in it. "
        "Answer with the whole updated file in one code block and nothing else."
    )


def ask(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    """One greedy streamed chat answer: its text, its token count, and the seconds from first to last token."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, tokens, first, last = [], 0, None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if piece := choice.get("delta", {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
                    text.append(piece)
    return "".join(text), tokens, (last - first) if first and last else 0.0


def metric(url: str, name: str) -> float:
    """A counter's value summed over its labels."""
    page = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", page, re.M))


def parting(a: str, b: str) -> int | None:
    """Where two texts first differ (None when they are the same)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--edit-tokens", type=int, default=1500)
    parser.add_argument("--prose-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    work = [("edit", edit_prompt(), args.edit_tokens)] + [("prose", p, args.prose_tokens) for p in PROSE]
    logs = Path(tempfile.mkdtemp(prefix="bench-speculation-"))
    modes = ["off", "auto"]
    tokens = {(m, kind): 0 for m in modes for kind in TARGETS}
    seconds = {(m, kind): 0.0 for m in modes for kind in TARGETS}
    texts: dict[tuple[str, int], str] = {}
    # no disk tier: the two servers share a home, and neither may start from the other's saved prompt
    command = [*sovereign_command(args.model, args.threads, 4096, 1), "--cache-disk", "0", "--speculate"]
    with running("off", [*command, "off"], logs) as off, running("auto", [*command, "auto"], logs) as auto:
        urls = {"off": off, "auto": auto}
        for url in urls.values():
            ask(url, args.model, "Say hello.", 8)  # warm-up: page-ins and buffers belong to no figure
        for round_number in range(args.rounds):
            for mode in modes[round_number % 2 :] + modes[: round_number % 2]:
                for index, (kind, prompt, limit) in enumerate(work):
                    text, count, spent = ask(urls[mode], args.model, prompt, limit)
                    tokens[mode, kind] += max(0, count - 1)
                    seconds[mode, kind] += spent
                    texts.setdefault((mode, index), text)
                print(f"  round {round_number + 1}, {mode}: done", file=sys.stderr)
        drafted = metric(auto, "sovereign_speculative_drafted_tokens_total")
        accepted = metric(auto, "sovereign_speculative_accepted_tokens_total")
    figures: dict[str, Any] = {"model": args.model, "threads": args.threads, "drafted": drafted, "accepted": accepted}
    print(f"\n{args.model}, {args.threads} threads, {args.rounds} rounds, greedy, one request at a time")
    print(f"{'kind':<8}{'off tok/s':>11}{'auto tok/s':>12}{'ratio':>8}  target")
    failed = False
    for kind, bound in TARGETS.items():
        rate = {m: tokens[m, kind] / seconds[m, kind] if seconds[m, kind] else 0.0 for m in modes}
        ratio = rate["auto"] / rate["off"] if rate["off"] else 0.0
        verdict = "PASS" if ratio >= bound else "MISS"
        failed |= verdict == "MISS"
        figures[kind] = {"off_tok_s": rate["off"], "auto_tok_s": rate["auto"], "ratio": ratio, "status": verdict}
        print(f"{kind:<8}{rate['off']:>11.1f}{rate['auto']:>12.1f}{ratio:>7.2f}x  {verdict} (>= {bound}x)")
    print(f"drafted {drafted:.0f}, accepted {accepted:.0f} ({accepted / drafted:.0%})" if drafted else "no drafts")
    for index, (kind, _prompt, _limit) in enumerate(work):
        where = parting(texts["off", index], texts["auto", index])
        same = "the same text" if where is None else f"texts part at character {where}"
        print(f"{kind} {index}: {same} ({len(texts['off', index])} characters)")
        figures.setdefault("texts", []).append({"kind": kind, "parts_at": where})
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
