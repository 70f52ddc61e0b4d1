"""Engine speed without HTTP: load time, layers on the GPU, prompt and decode tokens/s.

    python scripts/bench_engine.py MODEL.gguf [--gpu-layers N] [--threads N] [--tokens 128]

Prints one JSON object. Use it to prove the GPU path (auto offload) and to compare CPU and GPU
runs of the same model on one machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import threading
import time
from collections import deque
from pathlib import Path

from sovereign.config import Settings
from sovereign.engine.kernels import kernel_choice
from sovereign.engine.requests import SamplingParams
from sovereign.engine.runtime.backend import LlamaBackend
from sovereign.engine.runtime.scheduler import BatchScheduler
from sovereign.engine.stats import RequestStats
from sovereign.engine.wire import LoadOptions, Step

OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


class _Capture(logging.Handler):
    """Keeps llama.cpp's log lines so we can report what it says it offloaded."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--gpu-layers", type=int, default=None, help="default: automatic")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    capture = _Capture()
    llama_log = logging.getLogger("sovereign.llama_cpp")
    llama_log.setLevel(logging.DEBUG)
    llama_log.addHandler(capture)
    llama_log.propagate = False

    # The kernels `serve` would use here: proven in a child process first (a CPU may refuse the fast ones).
    use_extra_bufts = kernel_choice(Settings.from_env().home, args.model).use_extra_bufts
    started = time.perf_counter()
    options = LoadOptions(
        n_ctx=args.ctx,
        n_gpu_layers=args.gpu_layers,
        n_threads=args.threads,
        n_parallel=1,
        use_extra_bufts=use_extra_bufts,
    )
    backend = LlamaBackend(args.model, options)
    load_s = time.perf_counter() - started
    offloaded = next((m.groups() for line in capture.lines if (m := OFFLOADED.search(line))), None)

    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompt_rates, decode_rates = [], []
    scheduler = BatchScheduler(backend)
    for run in range(args.runs):
        # A different first word each run, so the prefix cache cannot skip the prompt.
        text = f"Run {run}: " + "The history of the sea " * 200
        prompt = backend.with_bos(backend.tokenize(text, special=False))[: args.prompt_tokens]
        stats = _generate(scheduler, prompt, params)
        assert stats.started is not None and stats.first_token is not None and stats.finished is not None
        prompt_rates.append(len(prompt) / (stats.first_token - stats.started))
        decode_rates.append((stats.generated_tokens - 1) / (stats.finished - stats.first_token))
    scheduler.close()
    print(
        json.dumps(
            {
                "model": args.model.name,
                "load_s": round(load_s, 2),
                "gpu_layers_requested": "auto" if args.gpu_layers is None else args.gpu_layers,
                "gpu_layers_used": backend.n_gpu_layers,
                "llama_cpp_offloaded": f"{offloaded[0]}/{offloaded[1]}" if offloaded else None,
                "threads": backend.n_threads,
                "prompt_tokens": args.prompt_tokens,
                "prompt_tok_s": round(max(prompt_rates), 1),
                "decode_tokens": args.tokens,
                "decode_tok_s": round(max(decode_rates), 1),
            }
        )
    )


class _Sink:
    """Waits for one generation's end; the scheduler fills in its timings."""

    cancelled = False

    def __init__(self, prompt: list[int]) -> None:
        self.stats = RequestStats("bench", len(prompt))
        self.done = threading.Event()
        self.forced: deque[int] = deque()  # nothing is forced here

    def push(self, step: Step) -> None:
        pass

    def end(self, error: BaseException | None = None) -> None:
        self.done.set()


def _generate(scheduler: BatchScheduler, prompt: list[int], params: SamplingParams) -> RequestStats:
    """Run one request to its end; its stats hold the timings.

    The scheduler runs in this process, as a model's process runs it.
    """
    sink = _Sink(prompt)
    scheduler.enqueue(prompt, params, sink)
    sink.done.wait()
    return sink.stats


if __name__ == "__main__":
    main()
