"""`sovereign bench` and `sovereign fit`: check options, run sovereign.bench, render tables, JSON or CSV."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from sovereign.bench import fit as fitting
from sovereign.bench import history
from sovereign.bench.hardware import Hardware, detect
from sovereign.bench.model_bench import ModelBenchResult, Sweep, run_sweep
from sovereign.bench.serve_bench import (
    LevelReport,
    Sample,
    load_prompts,
    pick_model,
    request_bodies,
    run_level,
    summarize,
)
from sovereign.catalog import Catalog
from sovereign.cli.render import dump_json, format_params
from sovereign.config import Settings
from sovereign.engine.kernels import kernel_choice, kernel_status
from sovereign.engine.wire import GpuSplit
from sovereign.errors import BenchError, ModelNotFound
from sovereign.machine import physical_cores
from sovereign.refs import parse_name
from sovereign.store import Store
from sovereign.store.files import human_bytes
from sovereign.store.gguf_header import has_gguf_magic


@dataclass(frozen=True)
class BenchOptions:
    """`sovereign bench`'s command line, as given."""

    model: str | None
    url: str | None
    threads: str | None
    n_prompt: str
    n_gen: str
    batch_size: str
    gpu_layers: str | None
    repetitions: int
    concurrency: str
    requests: int | None
    output_tokens: int
    prompt_words: int | None
    prompts: Path | None
    served_model: str | None
    api_key: str | None
    as_json: bool
    as_csv: bool
    show_history: bool
    save: bool
    plot: Path | None
    gpu_split: GpuSplit = GpuSplit()  # parsed by cli.device_options, as serve and run parse it
    rpc_servers: tuple[str, ...] = ()  # --rpc: workers that hold the layers offloaded (all by default)


def bench(
    options: BenchOptions, settings: Settings, store: Store, catalog: Catalog, out: Console, err: Console
) -> None:
    """Run the mode the options ask for: history, a server load test, a model sweep, or the hardware report."""
    if options.as_json and options.as_csv:
        raise BenchError("--json and --csv cannot be used together", "pick one output format")
    if options.model and options.url:
        raise BenchError(
            "give either a MODEL to benchmark or --url of a server, not both",
            "sovereign bench MODEL, or sovereign bench --url URL",
        )
    # Every list is checked up front, whichever mode runs, so a typo never passes silently.
    sweep_lists = {
        "threads": int_list(options.threads, "-t", minimum=1) if options.threads else (physical_cores(),),
        "n_prompt": int_list(options.n_prompt, "-p"),
        "n_gen": int_list(options.n_gen, "-n"),
        "n_batch": int_list(options.batch_size, "-b", minimum=1),
    }
    levels = int_list(options.concurrency, "--concurrency", minimum=1)
    if options.plot:
        from sovereign.bench.plot import require_matplotlib

        require_matplotlib()  # before a long run, not after it
    if options.show_history:
        _show_history(settings.home, options, out, err)
    elif options.url:
        _bench_server(options, levels, settings.home, out, err)
    elif options.model is None:
        with err.status("measuring memory bandwidth"):
            hardware = detect(home=settings.home, extra_buffers=settings.extra_buffers)
        if options.save:
            history.save(settings.home, "hardware", hardware, [])
        _emit(out, options, hardware.to_json(), [hardware.to_json()], lambda: hardware_table(hardware))
    else:
        path, label = model_path(options.model, store, catalog)
        # The same kernels the server would use: proven in a child process first (once per build and CPU).
        # No spinner: the verdict's warning is a log line, which a live spinner would garble.
        if kernel_status(settings.home, settings.extra_buffers) == "not yet probed":
            err.print(
                "[dim]checking llama.cpp's CPU kernels on this machine (once per llama.cpp build)[/]", highlight=False
            )
        kernels = kernel_choice(settings.home, path, settings.extra_buffers)
        with err.status("measuring memory bandwidth"):
            hardware = detect(home=settings.home, extra_buffers=settings.extra_buffers)
        default_ngl = "99" if hardware.gpu_offload or options.rpc_servers else "0"
        sweep = Sweep(
            **sweep_lists,
            n_gpu_layers=int_list(options.gpu_layers or default_ngl, "-ngl"),
            repetitions=options.repetitions,
            gpu_split=options.gpu_split,
            rpc_servers=options.rpc_servers,
        )
        if options.rpc_servers:  # ggml aborts this very process on a missing worker: check them first
            from sovereign.engine.rpc_workers import check_workers

            check_workers(list(options.rpc_servers))
        if not sweep.specs():
            raise BenchError("nothing to run: -p and -n are both 0", "give -p 512 and/or -n 128")
        results = run_model_bench(path, label, sweep, hardware, err, kernels.use_extra_bufts)
        rows = [r.to_json() for r in results]
        if options.plot:
            from sovereign.bench.plot import plot_model

            plot_model(results, options.plot)
        if options.save:
            history.save(settings.home, "model", hardware, rows, target=label)
        _emit(
            out,
            options,
            rows,
            [{k: v for k, v in row.items() if k != "samples"} for row in rows],
            lambda: model_table(results, offloaded_to="RPC workers" if options.rpc_servers else "GPU"),
        )
        if not (options.as_json or options.as_csv):
            for result in results:
                if sentence := bandwidth_sentence(result, hardware):
                    out.print(sentence, highlight=False)


def _emit(out: Console, options: BenchOptions, data: Any, csv_rows: list[dict[str, Any]], table: Any) -> None:
    """JSON, CSV or the Rich table (built only when shown)."""
    if options.as_json:
        out.print_json(data=data)
    elif options.as_csv:
        sys.stdout.write(to_csv(csv_rows))
    else:
        out.print(table())


def _show_history(home: Path, options: BenchOptions, out: Console, err: Console) -> None:
    runs = history.load(home)
    if not runs and not (options.as_json or options.as_csv):
        err.print(f"no benchmark runs saved yet in {history.history_path(home)}", highlight=False)
        return
    csv_rows = [{k: v for k, v in run.items() if k != "hardware"} for run in runs]
    _emit(out, options, runs, csv_rows, lambda: history_table(runs, detect(measure=False).fingerprint))


def _bench_server(options: BenchOptions, levels: tuple[int, ...], home: Path, out: Console, err: Console) -> None:
    assert options.url is not None
    hardware = detect(measure=False)
    served, reports = run_serve_bench(
        options.url,
        options.served_model,
        levels,
        options.requests,
        options.output_tokens,
        options.prompt_words,
        options.prompts,
        options.api_key,
        err,
    )
    rows = [r.to_json() for r in reports]
    if options.plot:
        from sovereign.bench.plot import plot_serving

        plot_serving(reports, f"{served} at {options.url}", options.plot)
    if options.save:
        history.save(home, "serve", hardware, rows, target=f"{served} at {options.url}")
    data = {"url": options.url, "model": served, "levels": rows}
    _emit(out, options, data, [flat_level(r) for r in reports], lambda: serve_table(options.url or "", served, reports))


def fit(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    out: Console,
    err: Console,
    *,
    ctx: int | None,
    memory: str | None,
    gpu_memory: str | None,
    bandwidth: float | None,
    remote: bool,
    as_json: bool,
) -> None:
    """Place every catalog model on this machine (or the one described) and recommend one."""
    budget, measured_here = fitting.machine_budget(
        settings.home,
        memory=parse_bytes(memory, "--memory") if memory else None,
        gpu_memory=parse_bytes(gpu_memory, "--gpu-memory") if gpu_memory else None,
        bandwidth=bandwidth * 1e9 if bandwidth else None,
        measuring=lambda: err.status("measuring memory bandwidth"),
    )
    found, unknown = fitting.candidates(catalog, store, ctx, settings=settings, remote=remote)
    verdicts = [fitting.assess(c, budget) for c in found]
    best = fitting.recommend(verdicts)
    if as_json:
        out.print_json(
            data={
                "budget": {
                    "memory_bytes": budget.memory,
                    "gpu_memory_bytes": budget.gpu_memory,
                    "bandwidth_bytes_per_s": budget.bandwidth,
                    "efficiency": budget.efficiency,
                },
                "models": [verdict_json(v) for v in verdicts],
                "unknown": unknown,
                "recommended": best.candidate.name if best else None,
            }
        )
        return
    out.print(fit_table(verdicts, budget, best))
    source = "measured on this machine" if measured_here else "typical; run `sovereign bench MODEL` to measure it"
    out.print(
        (
            f"[dim]expected tok/s = bandwidth / weights x {budget.efficiency:.0%} ({source}); ≈ marks sizes "
            "estimated from parameters[/]"
        ),
        highlight=False,
    )
    if unknown:
        out.print(f"[dim]no size or shape known for: {', '.join(unknown)}[/]", highlight=False)
    if best:
        speed_text = "on the GPU" if best.where == "GPU" else f"at about {best.expected_tok_s:.0f} tok/s"
        out.print(
            (
                f"[bold green]recommended:[/] {best.candidate.name}, the largest model this machine runs "
                f"interactively ({speed_text}): sovereign pull {best.candidate.name}"
            ),
            highlight=False,
        )
    else:
        out.print(
            (
                f"[yellow]no catalog model reaches {fitting.INTERACTIVE_TOK_S:.0f} tok/s here[/]: the "
                "smallest that fits will be slow"
            ),
            highlight=False,
        )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)


def int_list(text: str, option: str, minimum: int = 0) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4), as llama-bench takes its sweeps."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BenchError(
            f"{option} takes whole numbers separated by commas, not '{text}'", f"for example {option} 1,2,4"
        ) from None
    if not values or any(v < minimum for v in values):
        raise BenchError(
            f"{option} needs numbers of at least {minimum}, got '{text}'",
            f"for example {option} {max(minimum, 1)},{max(minimum, 1) * 2}",
        )
    return values


def parse_bytes(text: str, option: str) -> int:
    """'16GB', '16G', '16GiB' -> bytes (binary units: memory is sold in GiB whatever the label says)."""
    match = _SIZE.match(text)
    if not match:
        raise BenchError(f"{option} takes a size such as 16GB or 512MB, not '{text}'", f"for example {option} 16GB")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit or "_"))


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


# --- hardware -------------------------------------------------------------------------------


def hardware_table(hardware: Hardware) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("machine", f"{hardware.system} (fingerprint {hardware.fingerprint})")
    table.add_row("CPU", f"{hardware.cpu}: {hardware.physical_cores} physical cores, {hardware.logical_cores} logical")
    table.add_row("CPU features", " ".join(hardware.cpu_features) or "-")
    table.add_row("llama.cpp uses", " ".join(hardware.build_features) or "-")
    if hardware.kernels:
        table.add_row("kernels", hardware.kernels)
    available = human_bytes(hardware.memory_available) if hardware.memory_available else "?"
    table.add_row("memory", f"{human_bytes(hardware.memory_total)} total, {available} available")
    if hardware.gpus:
        for gpu in hardware.gpus:
            table.add_row(
                "GPU",
                f"{gpu.description or gpu.name}: {human_bytes(gpu.memory_total)} ({human_bytes(gpu.memory_free)} free)",
            )
    else:
        table.add_row("GPU", "none that this llama.cpp build can use")
    table.add_row("GPU offload", "yes" if hardware.gpu_offload else "no (a CPU-only llama.cpp build)")
    if hardware.bandwidth:
        table.add_row(
            "memory bandwidth",
            f"{hardware.bandwidth / 1e9:.1f} GB/s measured (reads, {hardware.physical_cores} threads)",
        )
    return table


# --- model bench ------------------------------------------------------------------------------


def model_path(reference: str, store: Store, catalog: Catalog) -> tuple[Path, str]:
    """The GGUF to benchmark: a file path as given, or a pulled model's file."""
    as_path = Path(reference).expanduser()
    if as_path.is_file() and has_gguf_magic(as_path):
        return as_path, as_path.name
    name = parse_name(reference)
    manifest = store.get_first(name, catalog.canonical(name))
    if manifest is None:
        raise ModelNotFound(f"{reference} is not pulled", f"pull it first: sovereign pull {reference}")
    return store.model_path(manifest), str(manifest.name)


def run_model_bench(
    path: Path, label: str, sweep: Sweep, hardware: Hardware, console: Console, use_extra_bufts: bool = True
) -> list[ModelBenchResult]:
    with _progress(console) as progress:
        task = progress.add_task(f"benchmarking {label}", total=sweep.count)
        results = []
        for result in run_sweep(
            path,
            label,
            sweep,
            bandwidth=hardware.bandwidth,
            gpu_offload=hardware.gpu_offload,
            use_extra_bufts=use_extra_bufts,
            on_start=lambda text: progress.update(task, description=text),
        ):
            results.append(result)
            progress.advance(task)
    return results


def model_table(results: list[ModelBenchResult], offloaded_to: str = "GPU") -> Table:
    table = Table(
        title=(
            f"{results[0].model}: {results[0].description}, {human_bytes(results[0].model_bytes)}, "
            f"{format_params(results[0].model_params)} parameters"
        )
        if results
        else None
    )
    for column in ("test", "threads", "batch", "GPU layers", "t/s", "vs. bandwidth", "load", "peak memory"):
        table.add_column(column, justify="left" if column in ("test", "vs. bandwidth") else "right")
    for r in results:
        if r.bandwidth_ceiling:
            versus = f"{r.share_of_ceiling:.0%} of the {r.bandwidth_ceiling:.0f} tok/s ceiling"
        else:
            versus = "compute-bound" if r.n_prompt else f"{offloaded_to} (not measured)"
        table.add_row(
            r.test,
            str(r.threads),
            str(r.n_batch),
            str(r.n_gpu_layers),
            f"{r.tokens_per_second:.2f} ± {r.stddev:.2f}",
            versus,
            f"{r.load_seconds:.2f}s",
            human_bytes(r.peak_memory) if r.peak_memory else "-",
        )
    return table


def bandwidth_sentence(result: ModelBenchResult, hardware: Hardware) -> str | None:
    """'71 tok/s = 74% of the 96 tok/s that 23 GB/s allows for 235 MiB of weights'."""
    if not result.bandwidth_ceiling or not hardware.bandwidth:
        return None
    return (
        f"{result.test} -t {result.threads}: {result.tokens_per_second:.0f} tok/s = "
        f"{result.share_of_ceiling:.0%} of the {result.bandwidth_ceiling:.0f} tok/s "
        f"that {hardware.bandwidth / 1e9:.0f} GB/s allows for {human_bytes(result.model_bytes)} of weights"
    )


# --- serving load test ------------------------------------------------------------------------


def run_serve_bench(
    url: str,
    model: str | None,
    concurrency: tuple[int, ...],
    requests: int | None,
    output_tokens: int,
    prompt_words: int | None,
    prompts_file: Path | None,
    api_key: str | None,
    console: Console,
) -> tuple[str, list[LevelReport]]:
    url = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    prompts = load_prompts(prompts_file)
    model = model or pick_model(url, headers)
    reports = []
    with _progress(console) as progress:
        # One warm-up request first: the model may still be loading, which belongs to no level.
        warm = progress.add_task("warming up", total=1)
        (sample,), _ = asyncio.run(
            run_level(url, request_bodies(model, prompts, 1, 8, None, "warm-up"), 1, headers=headers)
        )
        if sample.error:
            raise BenchError(
                f"the warm-up request to {url} failed: {sample.error}", "check --url, --model and --api-key"
            )
        progress.remove_task(warm)
        for level in concurrency:
            count = requests or max(8, 4 * level)
            task = progress.add_task(f"concurrency {level}", total=count)
            bodies = request_bodies(model, prompts, count, output_tokens, prompt_words, f"c{level}")

            def advance(_sample: Sample, task: TaskID = task) -> None:
                progress.advance(task)

            samples, duration = asyncio.run(run_level(url, bodies, level, headers=headers, on_done=advance))
            reports.append(summarize(level, samples, duration))
            progress.remove_task(task)
    return model, reports


def serve_table(url: str, model: str, reports: list[LevelReport]) -> Table:
    """vllm bench serve's figures, one column per concurrency level."""
    table = Table(title=f"{model} at {url}")
    table.add_column("concurrency", style="bold")
    for report in reports:
        table.add_column(str(report.concurrency), justify="right")
    table.add_row(
        "requests (failed)", *(f"{r.requests} ({r.failed})" if r.failed else str(r.requests) for r in reports)
    )
    table.add_row("request throughput", *(f"{r.request_throughput:.2f} req/s" for r in reports))
    table.add_row("output throughput", *(f"{r.output_throughput:.1f} tok/s" for r in reports))
    labels = {
        "ttft": "time to first token",
        "tpot": "time per output token",
        "itl": "inter-token latency",
        "e2el": "end-to-end latency",
    }
    for metric, label in labels.items():
        for q in ("p50", "p90", "p99"):
            table.add_row(f"{label} {q}", *(_ms(r.latency[metric][q]) for r in reports))
    return table


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


# --- fit ------------------------------------------------------------------------------------


def fit_table(verdicts: list[fitting.Verdict], budget: fitting.Budget, best: fitting.Verdict | None) -> Table:
    gpu = f", {human_bytes(budget.gpu_memory)} GPU" if budget.gpu_memory else ""
    bandwidth = f", {budget.bandwidth / 1e9:.1f} GB/s" if budget.bandwidth else ""
    table = Table(title=f"{human_bytes(budget.memory)} RAM available{gpu}{bandwidth}")
    for column in ("model", "quant", "params", "weights", "ctx", "needs", "runs on", "expected tok/s"):
        table.add_column(column, justify="left" if column in ("model", "quant", "runs on") else "right")
    for v in sorted(verdicts, key=lambda v: v.needed):
        c = v.candidate
        expected = "-" if v.expected_tok_s is None else f"{v.expected_tok_s:.1f}"
        where = v.where or "does not fit"
        style = "bold green" if v is best else ("dim" if not v.fits else None)
        table.add_row(
            c.name,
            c.quantization or "-",
            format_params(c.params),
            ("" if c.size_exact else "≈") + human_bytes(c.size),
            str(c.context),
            human_bytes(v.needed),
            where,
            expected,
            style=style,
        )
    return table


def verdict_json(v: fitting.Verdict) -> dict[str, Any]:
    c = v.candidate
    return {
        "model": c.name,
        "quantization": c.quantization,
        "params": c.params,
        "weights_bytes": c.size,
        "weights_exact": c.size_exact,
        "context": c.context,
        "kv_bytes_per_token": c.kv_bytes_per_token,
        "source": c.source,
        "needed_bytes": v.needed,
        "fits": v.fits,
        "runs_on": v.where,
        "ceiling_tok_s": v.ceiling_tok_s,
        "expected_tok_s": v.expected_tok_s,
        "interactive": v.fits and v.interactive,
    }


# --- shared output ----------------------------------------------------------------------------


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Rows of flat figures as CSV (nested values are written as JSON)."""
    buffer = io.StringIO()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: dump_json(v).strip() if isinstance(v, (dict, list, tuple)) else v for k, v in row.items()})
    return buffer.getvalue()


def flat_level(report: LevelReport) -> dict[str, Any]:
    """A level report with its latency figures spread into columns (ttft_p50_s, ...)."""
    row = {k: v for k, v in report.to_json().items() if k not in ("latency", "errors")}
    for metric, figures in report.latency.items():
        row.update({f"{metric}_{q}_s": value for q, value in figures.items()})
    row["errors"] = "; ".join(report.errors)
    return row


def history_table(runs: list[dict[str, Any]], current: str) -> Table:
    table = Table(title="benchmark history (this machine in bold)")
    for column in ("when", "machine", "CPU", "kind", "target", "figures"):
        table.add_column(column)
    for run in runs:
        hardware = run.get("hardware") or {}
        figures = []
        for result in run.get("results", []):
            if run["kind"] == "model":
                figures.append(
                    f"{result.get('test')} t{result.get('threads')}: {result.get('tokens_per_second', 0):.1f}"
                )
            elif run["kind"] == "serve":
                figures.append(f"c{result.get('concurrency')}: {result.get('output_throughput', 0):.1f} tok/s")
        if run["kind"] == "hardware" and hardware.get("bandwidth_gb_s"):
            figures.append(f"{hardware['bandwidth_gb_s']} GB/s")
        style = "bold" if run.get("fingerprint") == current else None
        table.add_row(
            run.get("time", "?"),
            run.get("fingerprint", "?"),
            hardware.get("cpu", "?"),
            run["kind"],
            run.get("target") or "-",
            ", ".join(figures),
            style=style,
        )
    return table
