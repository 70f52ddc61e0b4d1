"""`sovereign bench` and `sovereign fit`: the commands; sovereign.cli.bench does the work (imported when they run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sovereign.cli.common import Core, err, friendly_errors, out
from sovereign.cli.device_options import (
    MainGpuOption,
    RpcOption,
    SplitModeOption,
    TensorSplitOption,
    gpu_split,
    rpc_servers,
)
from sovereign.engine.wire import SplitMode


@friendly_errors
def bench(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A pulled model (or a .gguf file) to benchmark as llama-bench does; without it, the hardware report."
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option("--url", help="Load-test this OpenAI-compatible server instead (e.g. http://127.0.0.1:11800)."),
    ] = None,
    threads: Annotated[
        str | None,
        typer.Option("-t", "--threads", help="Thread counts, comma-separated (default: the physical cores)."),
    ] = None,
    n_prompt: Annotated[
        str, typer.Option("-p", "--n-prompt", help="Prompt lengths (ppN tests), comma-separated; 0 for none.")
    ] = "512",
    n_gen: Annotated[
        str, typer.Option("-n", "--n-gen", help="Generation lengths (tgN tests), comma-separated; 0 for none.")
    ] = "128",
    batch_size: Annotated[str, typer.Option("-b", "--batch-size", help="Batch sizes, comma-separated.")] = "2048",
    gpu_layers: Annotated[
        str | None,
        typer.Option(
            "-ngl", "--gpu-layers", help="GPU layer counts, comma-separated (default: all on a GPU build, else 0)."
        ),
    ] = None,
    tensor_split: TensorSplitOption = None,
    main_gpu: MainGpuOption = 0,
    split_mode: SplitModeOption = SplitMode.layer,
    rpc: RpcOption = None,
    repetitions: Annotated[
        int, typer.Option("-r", "--repetitions", min=1, help="Runs of each test; t/s is their mean ± sd.")
    ] = 3,
    concurrency: Annotated[
        str, typer.Option("--concurrency", help="--url: concurrency levels, comma-separated.")
    ] = "1,4,8",
    requests: Annotated[
        int | None,
        typer.Option("--requests", min=1, help="--url: requests per level (default: 4 x concurrency, at least 8)."),
    ] = None,
    output_tokens: Annotated[
        int, typer.Option("--output-tokens", min=1, help="--url: tokens each request generates.")
    ] = 128,
    prompt_words: Annotated[
        int | None, typer.Option("--prompt-words", min=1, help="--url: cut or repeat each prompt to this many words.")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help="--url: a text file of prompts, one per line (default: a built-in set)."),
    ] = None,
    served_model: Annotated[
        str | None, typer.Option("--model", help="--url: the model to ask for (default: the first the server lists).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="OPENAI_API_KEY", help="--url: the server's API key.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
    show_history: Annotated[
        bool, typer.Option("--history", help="Show earlier runs, on this machine and others, and exit.")
    ] = False,
    save: Annotated[bool, typer.Option("--save/--no-save", help="Keep the results in the benchmark history.")] = True,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Also draw tokens/s against threads (MODEL) or concurrency (--url) into this .png."
        ),
    ] = None,
) -> None:
    """Benchmark this machine, a model (like llama-bench) or a server (like vllm bench serve)."""
    from sovereign.cli import bench as cli_bench

    options = cli_bench.BenchOptions(
        model=model,
        url=url,
        threads=threads,
        n_prompt=n_prompt,
        n_gen=n_gen,
        batch_size=batch_size,
        gpu_layers=gpu_layers,
        repetitions=repetitions,
        concurrency=concurrency,
        requests=requests,
        output_tokens=output_tokens,
        prompt_words=prompt_words,
        prompts=prompts,
        served_model=served_model,
        api_key=api_key,
        as_json=as_json,
        as_csv=as_csv,
        show_history=show_history,
        save=save,
        plot=plot,
        gpu_split=gpu_split(tensor_split, main_gpu, split_mode),
        rpc_servers=rpc_servers(rpc),
    )
    core = Core()
    if not (url or show_history):  # a benchmark of this machine: say first when it leaves a GPU unused
        _show_gpu_hint()
    cli_bench.bench(options, core.settings, core.store, core.catalog, out, err)


def _show_gpu_hint() -> None:
    """The unused-GPU line, before a benchmark that would otherwise measure the CPU in silence."""
    from rich.markup import escape

    from sovereign.gpu_detect import gpu_hint

    if line := gpu_hint():
        err.print(f"[yellow]tip:[/] {escape(line)}", highlight=False, soft_wrap=True)


@friendly_errors
def fit(
    ctx: Annotated[
        int | None, typer.Option("--ctx", min=256, help="Context to plan for (default: each model's catalog default).")
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option("--memory", help="Plan for this much RAM instead of what is available now (e.g. 16GB)."),
    ] = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option(
            "--gpu-memory", help="Plan for this much GPU memory (e.g. 24GB; default: what the GPUs have free)."
        ),
    ] = None,
    bandwidth: Annotated[
        float | None,
        typer.Option("--bandwidth", min=0.1, help="Memory bandwidth in GB/s (default: this machine's, measured)."),
    ] = None,
    remote: Annotated[
        bool,
        typer.Option(
            "--remote",
            help=(
                "Read exact sizes from the GGUF headers at the models' sources (HTTP Range requests), before "
                "the catalog's figures."
            ),
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Which catalog models this machine can run, how fast, and the best one to chat with."""
    from sovereign.cli import bench as cli_bench

    core = Core()
    cli_bench.fit(
        core.settings,
        core.store,
        core.catalog,
        out,
        err,
        ctx=ctx,
        memory=memory,
        gpu_memory=gpu_memory,
        bandwidth=bandwidth,
        remote=remote,
        as_json=as_json,
    )
