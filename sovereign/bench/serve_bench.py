"""`sovereign bench --url`: load any OpenAI-compatible server and report what `vllm bench serve` reports.

Per concurrency level, a fixed number of streamed /v1/completions requests go out with at most
`concurrency` in flight. The definitions follow vLLM's: TTFT is the time to the first streamed
text; ITL is the gap between streamed chunks; TPOT is a request's (latency - TTFT) / (tokens - 1);
E2EL is a request's whole latency; throughputs divide by the level's wall time. Output tokens are
the server's usage figures (one per chunk where it gives none). Failed requests are counted and
their errors kept, never dropped.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sovereign.errors import BenchError

PERCENTILES = (50, 90, 99)
# Built-in prompts: varied openings, so no server can answer them all from one cached prefix.
PROMPTS = (
    (
        "The history of the sea is long. Long before there were ships, sailors or maps, the water covered "
        "almost all of the world, and in its warm shallows"
    ),
    (
        "Write a short report on the harbour town of Kessel, whose fishing fleet, salt works and old "
        "lighthouse have drawn visitors for three hundred years. The town"
    ),
    (
        "Explain to a new engineer how a hash map stores keys and values, why collisions happen, and what a "
        "good hash function must do to keep lookups fast. First,"
    ),
    (
        "On the morning the expedition left the mountain village, the guide counted the mules twice, checked "
        "the ropes, and told the travellers a story about"
    ),
    (
        "A recipe for a simple bread: flour, water, salt and yeast are mixed, left to rise through the night, "
        "shaped by hand in the morning and then baked until"
    ),
    (
        "The committee met on Tuesday to discuss the new library budget, the repairs to the roof, and a "
        "proposal to open the reading rooms on Sunday afternoons. The chair"
    ),
    (
        "In the spring of that year the river flooded the lower fields, and the farmers who had planted early "
        "lost most of their seed, so the village council decided"
    ),
    (
        "Dear Maria, thank you for your letter about the garden. The roses you planted along the fence last "
        "autumn are blooming now, and the apple tree by the well"
    ),
    (
        "The small robot woke up in the empty warehouse, checked its battery, and rolled slowly between the "
        "tall shelves, looking for the door it remembered from"
    ),
    (
        "Astronomers watching a faint star in the northern sky noticed that its light dimmed every nineteen "
        "days, which suggested that a planet was passing in front"
    ),
    (
        "Here is a plan for learning to play the violin as an adult: practise a little every day, find a "
        "patient teacher, record yourself often, and above all"
    ),
    (
        "The old clockmaker kept a notebook of every clock he had ever repaired, with the owner's name, the "
        "fault he found, and a small drawing of the dial. One entry"
    ),
)


@dataclass
class Sample:
    """One streamed request: when its text arrived and how much of it."""

    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int | None = None
    e2e_s: float = 0.0
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT); None for fewer than two tokens."""
        if self.ttft_s is None or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)


@dataclass(frozen=True)
class LevelReport:
    """One concurrency level's figures."""

    concurrency: int
    requests: int
    completed: int
    failed: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens per second
    latency: dict[
        str, dict[str, float | None]
    ]  # {"ttft"|"tpot"|"itl"|"e2el": {"mean", "p50", "p90", "p99"}} in seconds
    errors: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation, as numpy's default; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q / 100 * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def describe(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and the report's percentiles of a list of seconds."""
    summary: dict[str, float | None] = {"mean": statistics.fmean(values) if values else None}
    summary.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    return summary


def summarize(concurrency: int, samples: list[Sample], duration_s: float) -> LevelReport:
    """A level's report from its samples (latencies over successful requests only, as vLLM does)."""
    good = [s for s in samples if s.error is None]
    output_tokens = sum(s.tokens for s in good)
    return LevelReport(
        concurrency=concurrency,
        requests=len(samples),
        completed=len(good),
        failed=len(samples) - len(good),
        duration_s=duration_s,
        prompt_tokens=sum(s.prompt_tokens or 0 for s in good),
        output_tokens=output_tokens,
        request_throughput=len(good) / duration_s if duration_s > 0 else 0.0,
        output_throughput=output_tokens / duration_s if duration_s > 0 else 0.0,
        latency={
            "ttft": describe([s.ttft_s for s in good if s.ttft_s is not None]),
            "tpot": describe([t for s in good if (t := s.tpot_s) is not None]),
            "itl": describe([gap for s in good for gap in s.gaps_s]),
            "e2el": describe([s.e2e_s for s in good]),
        },
        errors=sorted({s.error for s in samples if s.error is not None}),
    )


def stream_event(line: str) -> dict[str, Any] | None:
    """The JSON of one server-sent `data:` line, or None for other lines and the final [DONE]."""
    if not line.startswith("data:") or line.strip() == "data: [DONE]":
        return None
    return json.loads(line[5:])


def event_text(event: dict[str, Any]) -> str:
    """The text a streamed completion chunk carries ('' for usage-only and empty chunks)."""
    choices = event.get("choices") or []
    return (choices[0].get("text") or "") if choices else ""


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Sample:
    """Stream one completion and time its pieces; errors are recorded, not raised."""
    sample, start = Sample(), time.perf_counter()
    last, chunks, usage_tokens = start, 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {(await response.aread())[:200].decode(errors='replace')}"
                return sample
            async for line in response.aiter_lines():
                event = stream_event(line)
                if event is None:
                    continue
                if usage := event.get("usage"):
                    usage_tokens = usage.get("completion_tokens", usage_tokens)
                    sample.prompt_tokens = usage.get("prompt_tokens", sample.prompt_tokens)
                if event_text(event):
                    now = time.perf_counter()
                    if chunks:
                        sample.gaps_s.append(now - last)
                    else:
                        sample.ttft_s = now - start
                    last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        sample.error = f"{type(error).__name__}: {error}"
    sample.e2e_s = last - start if chunks else time.perf_counter() - start
    # usage counts tokens exactly where the server reports it; otherwise one streamed chunk is one token
    sample.tokens = usage_tokens if usage_tokens is not None else chunks
    if sample.error is None and not chunks:
        sample.error = "no text streamed"
    return sample


async def run_level(
    url: str,
    bodies: list[dict[str, Any]],
    concurrency: int,
    *,
    headers: dict[str, str] | None = None,
    on_done: Callable[[Sample], None] | None = None,
) -> tuple[list[Sample], float]:
    """Send every body with at most `concurrency` in flight; the samples and the level's wall time."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def gated(client: httpx.AsyncClient, body: dict[str, Any]) -> Sample:
        async with gate:
            sample = await one_request(client, url, body)
        if on_done:
            on_done(sample)
        return sample

    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits, headers=headers) as client:
        start = time.perf_counter()
        samples = await asyncio.gather(*(gated(client, body) for body in bodies))
        return list(samples), time.perf_counter() - start


def load_prompts(path: Path | None) -> list[str]:
    """Prompts from a file (one per line, blank lines skipped), or the built-in set."""
    if path is None:
        return list(PROMPTS)
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(
            f"cannot read prompts from {path}: {exc}", "give a UTF-8 text file with one prompt per line"
        ) from None
    if not prompts:
        raise BenchError(f"{path} holds no prompts", "give a UTF-8 text file with one prompt per line")
    return prompts


def sized_prompt(prompt: str, words: int | None) -> str:
    """A prompt cut or extended (by repeating itself) to about `words` words; unchanged when words is None."""
    if not words:
        return prompt
    pieces = prompt.split()
    while len(pieces) < words:
        pieces += prompt.split()
    return " ".join(pieces[:words])


def request_bodies(
    model: str, prompts: list[str], count: int, output_tokens: int, prompt_words: int | None, tag: str
) -> list[dict[str, Any]]:
    """`count` streamed completion bodies, each with its own prompt (numbered, so no two share a cache entry)."""
    return [
        {
            "model": model,
            "prompt": f"{tag}.{i}. " + sized_prompt(prompts[i % len(prompts)], prompt_words),
            "max_tokens": output_tokens,
            "temperature": 0,
            "ignore_eos": True,  # every request decodes exactly output_tokens, where the server honours it
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(count)
    ]


def pick_model(url: str, headers: dict[str, str] | None) -> str:
    """The first model the server lists at /v1/models."""
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise BenchError(
            f"no answer from {url}: {exc}", "start the server first (sovereign serve MODEL), or check --url"
        ) from None
    if response.status_code in (401, 403):
        raise BenchError(
            f"{url} refused the API key (HTTP {response.status_code})", "pass --api-key, or set OPENAI_API_KEY"
        )
    try:
        models = response.json()["data"]
        return str(models[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(
            f"{url}/v1/models listed no model (HTTP {response.status_code})", "name one with --model"
        ) from None
