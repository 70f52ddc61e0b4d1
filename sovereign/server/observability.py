"""Prometheus metrics at /metrics and one log line per request, both fed by one ASGI middleware."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sovereign.engine.api import EngineAPI
from sovereign.engine.stats import RequestStats, request_stats

request_log = logging.getLogger("sovereign.requests")
QUIET_PATHS = frozenset({"/health", "/metrics"})  # polled by machines: logged at debug level only
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's Prometheus registry: request counters here, slot and queue gauges read from the engine."""

    def __init__(self, engine: EngineAPI) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sovereign_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.duration = Histogram(
            "sovereign_request_duration_seconds",
            "HTTP request time, to the last byte.",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "sovereign_prompt_tokens", "Prompt tokens of finished generations.", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "sovereign_prompt_tokens_cached", "Prompt tokens reused from the KV cache.", ["model"], registry=r
        )
        self.generated_tokens = Counter("sovereign_generated_tokens", "Tokens generated.", ["model"], registry=r)
        self.drafted_tokens = Counter(
            "sovereign_speculative_drafted_tokens", "Tokens guessed by speculative decoding.", ["model"], registry=r
        )
        self.accepted_tokens = Counter(
            "sovereign_speculative_accepted_tokens",
            "Guessed tokens the model drew itself (kept: each saved a decode step).",
            ["model"],
            registry=r,
        )
        self.ttft = Histogram(
            "sovereign_time_to_first_token_seconds",
            "From submission to the first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "sovereign_inter_token_latency_seconds",
            "Between consecutive tokens of a generation.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_SchedulerGauges(engine))

    def observe_request(self, endpoint: str, status: int, seconds: float, generations: list[RequestStats]) -> None:
        """Count one finished HTTP request and the generations it ran."""
        self.requests.labels(endpoint, str(status)).inc()
        self.duration.labels(endpoint).observe(seconds)
        for stats in generations:
            self.prompt_tokens.labels(stats.model).inc(stats.prompt_tokens)
            self.cached_tokens.labels(stats.model).inc(stats.cached_tokens)
            self.generated_tokens.labels(stats.model).inc(stats.generated_tokens)
            self.drafted_tokens.labels(stats.model).inc(stats.drafted_tokens)
            self.accepted_tokens.labels(stats.model).inc(stats.accepted_tokens)
            if (ttft := stats.ttft_seconds) is not None:
                self.ttft.labels(stats.model).observe(ttft)
            itl = self.itl.labels(stats.model)
            for gap in stats.token_gaps:
                itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerGauges:
    """Queue depth, busy slots and decode speed of each loaded model, read at scrape time."""

    def __init__(self, engine: EngineAPI) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily("sovereign_queue_depth", "Requests waiting for a free slot.", labels=["model"])
        busy = GaugeMetricFamily("sovereign_slots_busy", "Slots serving a request.", labels=["model"])
        slots = GaugeMetricFamily("sovereign_slots", "Slots (requests served at once).", labels=["model"])
        rate = GaugeMetricFamily(
            "sovereign_decode_tokens_per_second",
            "Tokens generated per second of decoding, last 10 s.",
            labels=["model"],
        )
        cache = _CacheFamilies()
        for load in self._engine.loads():
            queued.add_metric([load.name], load.queued)
            busy.add_metric([load.name], load.busy_slots)
            slots.add_metric([load.name], load.slots)
            rate.add_metric([load.name], load.decode_rate)
            cache.add(load.name, load.cache)
        yield from (queued, busy, slots, rate)
        yield from cache.families()


class _CacheFamilies:
    """The prompt cache's figures, by model and tier (slot, ram, disk), as each model's process last reported."""

    def __init__(self) -> None:
        tier = ["model", "tier"]
        self.hits = CounterMetricFamily(
            "sovereign_prompt_cache_hits", "Requests whose prompt started from a cached prefix.", labels=tier
        )
        self.misses = CounterMetricFamily(
            "sovereign_prompt_cache_misses", "Requests that found no cached prefix.", labels=["model"]
        )
        self.restored = CounterMetricFamily(
            "sovereign_prompt_cache_restored_bytes", "Bytes of saved state put back.", labels=tier
        )
        self.saved = CounterMetricFamily("sovereign_prompt_cache_saved_bytes", "Bytes of state saved.", labels=tier)
        self.held = GaugeMetricFamily("sovereign_prompt_cache_bytes", "Bytes the cache holds now.", labels=tier)

    def add(self, model: str, figures: dict[str, int]) -> None:
        """One model's figures."""
        if not figures:
            return
        self.misses.add_metric([model], figures.get("misses", 0))
        for tier in ("slot", "ram", "disk"):
            self.hits.add_metric([model, tier], figures.get(f"{tier}_hits", 0))
            self.restored.add_metric([model, tier], figures.get(f"{tier}_restored_bytes", 0))
        for tier in ("ram", "disk"):
            self.saved.add_metric([model, tier], figures.get(f"{tier}_saved_bytes", 0))
            self.held.add_metric([model, tier], figures.get(f"{tier}_bytes", 0))

    def families(self) -> Iterator[Metric]:
        yield from (self.hits, self.misses, self.restored, self.saved, self.held)


class RequestObserver:
    """ASGI middleware: times each request to its last byte, then logs it and feeds the metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # what the client sees if the app fails before starting a response
        generations: list[RequestStats] = []
        token = request_stats.set(generations)

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            request_stats.reset(token)
            seconds = time.monotonic() - started
            endpoint = _endpoint(scope)
            self.metrics.observe_request(endpoint, status, seconds, generations)
            level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
            if request_log.isEnabledFor(level):
                detail = "; ".join(stats.describe() for stats in generations)
                request_log.log(
                    level,
                    "%s %s %d %.3fs%s",
                    scope["method"],
                    scope["path"],
                    status,
                    seconds,
                    f" {detail}" if detail else "",
                )


def _endpoint(scope: Scope) -> str:
    """The route's path template (bounded label values), or 'unmatched' for 404s."""
    route: Any = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
