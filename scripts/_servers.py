"""Shared helpers for the serving benchmarks.

They start sovereign, llama-cpp-python's server and llama.cpp's llama-server on one GGUF.

Every command builder leaves out the port: `running()` picks a free one and appends `--port P`,
which all three servers spell the same way.
"""

from __future__ import annotations

import ctypes
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from sovereign.catalog import load_catalog
from sovereign.config import Settings
from sovereign.refs import parse_name
from sovereign.store import Store

_quiet_logs: Any = None  # the ctypes callback must outlive the call that installs it


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Block until the server answers /v1/models, or exit if it dies or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server at {url} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"server at {url} not ready in {timeout}s")


@contextmanager
def running(name: str, command: Sequence[str], logs: Path) -> Iterator[str]:
    """Start one server on a free port, yield its base URL once it answers, stop it on exit."""
    port = free_port()
    with open(logs / f"{name}.log", "wb") as log:
        process = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, process)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def model_file(name: str) -> Path:
    """The GGUF file behind a store name (SOVEREIGN_HOME picks the store)."""
    settings = Settings.from_env()
    store = Store(settings.home)
    manifest = store.get(parse_name(name)) or store.require(load_catalog(settings).canonical(parse_name(name)))
    return store.model_path(manifest)


def end_of_generation_tokens(path: Path) -> list[int]:
    """Every token llama.cpp treats as end-of-generation in this GGUF (vocabulary only, no weights loaded)."""
    global _quiet_logs
    import llama_cpp

    if _quiet_logs is None:  # llama.cpp prints the whole vocabulary summary to stderr otherwise
        _quiet_logs = llama_cpp.llama_log_callback(lambda _level, _text, _user: None)
        llama_cpp.llama_log_set(_quiet_logs, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise SystemExit(f"llama.cpp could not read the vocabulary of {path}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    finally:
        llama_cpp.llama_model_free(model)


def completion_body(model: str, prompt: str, tokens: int, banned: Sequence[int]) -> dict[str, Any]:
    """A greedy streamed /v1/completions body that decodes exactly `tokens` tokens on every server.

    sovereign and llama-server honour ignore_eos; llama-cpp-python's server silently drops it, so the
    end-of-generation tokens are also banned through logit_bias, which all three accept.
    """
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "logit_bias": {str(t): -100 for t in banned},
    }


def sovereign_command(
    model: str,
    threads: int,
    ctx: int,
    parallel: int | None = None,
    *,
    checkout: Path | None = None,
    extra_buffers: str = "auto",
    gpu_layers: int = 0,
) -> list[str]:
    """`sovereign serve` (on the CPU unless `gpu_layers`); --parallel only when asked, since older builds lack it.

    `checkout` runs the package from another source tree (an earlier commit, to compare against);
    `extra_buffers` sets SOVEREIGN_EXTRA_BUFFERS (off = llama.cpp's safe kernels, llama-server's --no-repack).
    """
    environment = [f"SOVEREIGN_EXTRA_BUFFERS={extra_buffers}"] + ([f"PYTHONPATH={checkout}"] if checkout else [])
    command = [
        "env",
        *environment,
        sys.executable,
        "-m",
        "sovereign",
        "serve",
        model,
        "--threads",
        str(threads),
        "--ctx",
        str(ctx),
        "--gpu-layers",
        str(gpu_layers),
    ]
    return [*command, "--parallel", str(parallel)] if parallel is not None else command


def llama_cpp_python_command(python: str, path: Path, alias: str, threads: int, ctx: int) -> list[str]:
    """llama-cpp-python's own server (one request at a time, by design) on the CPU.

    By default it aborts the stream in progress whenever a new request arrives; --interrupt_requests
    False makes later requests wait their turn instead, so concurrent load measures queueing, not aborts.
    """
    return [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(path),
        "--model_alias",
        alias,
        "--interrupt_requests",
        "False",
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--n_ctx",
        str(ctx),
        "--n_gpu_layers",
        "0",
    ]


def llama_server_command(
    binary: str,
    path: Path,
    alias: str,
    threads: int,
    ctx: int,
    parallel: int,
    *,
    repack: bool = True,
    gpu_layers: int = 0,
) -> list[str]:
    """llama.cpp's llama-server with `parallel` slots of `ctx` tokens each (its -c is split across slots)."""
    return [
        binary,
        "-m",
        str(path),
        "--alias",
        alias,
        "--host",
        "127.0.0.1",
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-c",
        str(ctx * parallel),
        "-np",
        str(parallel),
        "-ngl",
        str(gpu_layers),
        "--no-webui",
        *([] if repack else ["--no-repack"]),
    ]
