"""`--plot FILE.png`: tokens/s against threads (model runs) or against concurrency (server runs).

matplotlib is an optional extra (`pip install 'sovereign[plot]'`): a picture is worth having, but
not worth 30 MB in every install of a tool meant to be fetched through a narrow pipe.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from sovereign.bench.model_bench import ModelBenchResult
from sovereign.bench.serve_bench import LevelReport
from sovereign.errors import BenchError


def require_matplotlib() -> None:
    """Fail now, with the fix, when --plot cannot be honoured."""
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, none opened
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise BenchError("--plot needs matplotlib, which is not installed", "pip install 'sovereign[plot]'") from None
    return pyplot


def plot_model(results: list[ModelBenchResult], path: Path) -> None:
    """One line per test (and batch size / GPU layers where those were swept): tokens/s against threads, with ± sd."""
    pyplot = _pyplot()
    series: dict[str, list[ModelBenchResult]] = defaultdict(list)
    swept_batch = len({r.n_batch for r in results}) > 1
    swept_ngl = len({r.n_gpu_layers for r in results}) > 1
    for result in results:
        label = (
            result.test
            + (f" -b {result.n_batch}" if swept_batch else "")
            + (f" -ngl {result.n_gpu_layers}" if swept_ngl else "")
        )
        series[label].append(result)
    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points.sort(key=lambda r: r.threads)
        axis.errorbar(
            [r.threads for r in points],
            [r.tokens_per_second for r in points],
            yerr=[r.stddev for r in points],
            marker="o",
            capsize=3,
            label=label,
        )
    ceilings = {r.bandwidth_ceiling for r in results if r.bandwidth_ceiling}
    if ceilings:
        axis.axhline(max(ceilings), linestyle="--", color="grey", label="bandwidth ceiling (tg)")
    axis.set_xlabel("threads")
    axis.set_ylabel("tokens/s")
    axis.set_xticks(sorted({r.threads for r in results}))
    axis.set_title(results[0].description if results else "")
    axis.grid(alpha=0.3)
    axis.legend()
    _save(pyplot, figure, path)


def plot_serving(reports: list[LevelReport], title: str, path: Path) -> None:
    """Output tokens/s against concurrency, with time to first token (p50) on a second axis."""
    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    levels = [r.concurrency for r in reports]
    axis.plot(levels, [r.output_throughput for r in reports], marker="o", label="output tokens/s")
    axis.set_xlabel("concurrent requests")
    axis.set_ylabel("output tokens/s")
    axis.set_xticks(levels)
    latency = axis.twinx()
    latency.plot(
        levels,
        [(r.latency["ttft"]["p50"] or 0) * 1000 for r in reports],
        marker="s",
        color="tab:red",
        linestyle="--",
        label="TTFT p50 (ms)",
    )
    latency.set_ylabel("time to first token, p50 (ms)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    handles = axis.get_legend_handles_labels()[0] + latency.get_legend_handles_labels()[0]
    axis.legend(handles, [h.get_label() for h in handles], loc="upper left")
    _save(pyplot, figure, path)


def _save(pyplot: Any, figure: Any, path: Path) -> None:
    try:
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    except (OSError, ValueError) as exc:
        raise BenchError(
            f"cannot write the plot to {path}: {exc}", "give a writable path ending in .png, .svg or .pdf"
        ) from None
    finally:
        pyplot.close(figure)
