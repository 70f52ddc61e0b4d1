"""`sovereign worker`: lend this machine's devices to a head (`serve --rpc`) over llama.cpp's RPC backend."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from sovereign.cli.common import err, friendly_errors, out
from sovereign.engine.rpc_workers import DEFAULT_PORT, build_name, build_supports_rpc, no_rpc_error
from sovereign.errors import SovereignError

STOP_GRACE_SECONDS = 5.0
EXPOSED_WARNING = (
    "warning: llama.cpp's RPC has no authentication and no encryption: anyone who can reach {address} can use "
    "this machine and read what it computes. Keep it on a trusted network or behind a tunnel (WireGuard, or "
    "`ssh -L 50052:127.0.0.1:50052` from the head to a worker bound to 127.0.0.1)."
)


@friendly_errors
def worker(
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but loopback exposes an unauthenticated service.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads (default: the number of physical cores).")
    ] = None,
    device: Annotated[
        list[str],
        typer.Option("--device", help="A device to lend, e.g. CUDA0 (repeatable; default: every GPU, else the CPU)."),
    ] = [],  # noqa: B006
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="Keep received weights in this folder, so a head's next start sends less."),
    ] = None,
) -> None:
    """Lend this machine's CPU (or GPUs) to a head running `sovereign serve MODEL --rpc HOST:PORT`."""
    from sovereign.cli.launch import check_port_free
    from sovereign.machine import physical_cores
    from sovereign.server.guards import is_loopback_bind  # the rule serve's --host follows

    if not build_supports_rpc():
        raise no_rpc_error()
    if threads is not None and threads < 1:
        raise SovereignError(f"--threads must be at least 1, got {threads}", None)
    address = f"{host}:{port}"
    if not is_loopback_bind(host):
        err.print(EXPOSED_WARNING.format(address=address), style="bold yellow", highlight=False, soft_wrap=True)
    check_port_free(host, port)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    out.print(
        f"worker on {address} ({build_name()}): use it with `sovereign serve MODEL --rpc {address}`; Ctrl-C stops it",
        highlight=False,
        soft_wrap=True,
    )
    command = [sys.executable, "-m", "sovereign.engine.runtime.rpc_worker", address]
    command += [str(threads or physical_cores()), str(cache) if cache else "-", *device]
    _run(command)


def _run(command: list[str]) -> None:
    """Run the worker's process until it ends, Ctrl-C (which reaches it too: same process group) or SIGTERM."""
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:  # a service manager's stop: pass it on, then end as for Ctrl-C
        stopping.append(signum)
        child.terminate()

    signal.signal(signal.SIGTERM, stop)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        stopping.append(signal.SIGINT)
        try:
            code = child.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
    if stopping:
        err.print("worker stopped", highlight=False)
    elif code != 0:
        raise SovereignError(f"the worker stopped (exit status {code})", "see the lines above")
