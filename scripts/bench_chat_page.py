"""The chat page under a long stream: a 2,000-token answer must not slow the page down.

Serves the page on loopback with the test suite's fake engine, paced to a given rate, opens it in Debian's
Chromium (headless, through Playwright), sends one message whose echo is a 2,000-token markdown answer
(prose, lists and code blocks), and measures, while it streams:
- frame intervals (requestAnimationFrame): median, p95 and the longest;
- main-thread long tasks (over 50 ms, PerformanceObserver 'longtask'): how many and their total;
- the page's script time per token (Chrome's own metrics: ScriptDuration + LayoutDuration + RecalcStyleDuration).

Targets (printed PASS/FAIL): p95 frame interval under 50 ms, long tasks under 10 % of the stream's time.
Run: python scripts/bench_chat_page.py [--tokens 2000] [--rate 100]   (--rate 0: every token at once)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from playwright.sync_api import sync_playwright

from sovereign.engine import ChatRequest, CompletionRequest
from sovereign.engine.requests import Event
from sovereign.server.app import ServerOptions, create_app
from tests.browser import chromium_path
from tests.fake_engine import FakeEngine
from tests.servers import InProcessServer

MEASURE = """
window.__frames = [];
window.__longtasks = [];
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) window.__longtasks.push(entry.duration);
}).observe({ entryTypes: ["longtask"] });
window.__last = performance.now();
const tick = (now) => { window.__frames.push(now - window.__last); window.__last = now; requestAnimationFrame(tick); };
requestAnimationFrame(tick);
"""


class PacedEngine(FakeEngine):
    """The fake engine, one token every 1/rate seconds (rate 0: as fast as it can)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    async def _events(
        self, request: ChatRequest | CompletionRequest, stopped: asyncio.Event
    ) -> AsyncGenerator[Event, None]:
        async for event in super()._events(request, stopped):
            if self.rate:
                await asyncio.sleep(1 / self.rate)
            yield event


def answer_text(tokens: int) -> str:
    """About `tokens` words of markdown: paragraphs, a list and a code block in turn."""
    blocks = []
    words = 0
    index = 0
    while words < tokens:
        index += 1
        blocks.append(f"## Part {index}\n\n" + " ".join(f"word{index}_{i}" for i in range(40)))
        blocks.append("\n".join(f"- item {i} of part {index}" for i in range(6)))
        blocks.append("```python\n" + "\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(5)) + "\n```")
        words = sum(len(block.split()) for block in blocks)
    return "\n\n".join(blocks)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=100.0, help="tokens a second (0: all at once)")
    args = parser.parse_args()
    executable = chromium_path()
    if executable is None:
        print("no Chromium here (Debian: apt-get install chromium)")
        return 1
    engine = PacedEngine(args.rate)
    text = answer_text(args.tokens)
    with InProcessServer(create_app(engine, ServerOptions())) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        page = browser.new_page()
        page.add_init_script(MEASURE)
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        client = page.context.new_cdp_session(page)
        client.send("Performance.enable")
        before = {m["name"]: m["value"] for m in client.send("Performance.getMetrics")["metrics"]}
        page.fill("#input", text)  # typing 10 KB into the box is not the stream: measure from the send
        page.evaluate("window.__frames.length = 0; window.__longtasks.length = 0; window.__last = performance.now()")
        started = time.monotonic()
        page.press("#input", "Enter")
        page.wait_for_selector(".message.assistant .stats:not(:empty)", timeout=600_000)
        elapsed = time.monotonic() - started
        after = {m["name"]: m["value"] for m in client.send("Performance.getMetrics")["metrics"]}
        frames = page.evaluate("window.__frames")
        longtasks = page.evaluate("window.__longtasks")
        stats = page.inner_text(".message.assistant .stats")
        browser.close()
    busy = sum(after[k] - before[k] for k in ("ScriptDuration", "LayoutDuration", "RecalcStyleDuration"))
    tokens = int(stats.split(" tokens")[0])
    p95 = percentile(frames, 0.95)
    long_share = sum(longtasks) / 1000 / elapsed
    print(f"answer: {stats}")
    print(f"stream: {elapsed:.1f} s for {tokens} tokens at a set rate of {args.rate or 'unpaced'} tokens/s")
    print(
        f"frames: {len(frames)}, interval median {statistics.median(frames):.1f} ms, p95 {p95:.1f} ms, "
        f"longest {max(frames):.1f} ms"
    )
    print(f"long tasks: {len(longtasks)}, {sum(longtasks):.0f} ms in all ({100 * long_share:.1f} % of the stream)")
    print(
        f"main thread: {busy * 1000:.0f} ms of script, layout and style ({busy * 1e6 / max(tokens, 1):.0f} µs a token)"
    )
    ok = p95 < 50 and long_share < 0.10
    print(f"{'PASS' if ok else 'FAIL'}: p95 frame interval < 50 ms and long tasks < 10 % of the stream")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
