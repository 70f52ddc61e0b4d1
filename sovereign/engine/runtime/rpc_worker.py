"""The process behind `sovereign worker`: ggml's RPC server, lending this machine's devices to a head.

Started as `python -m sovereign.engine.runtime.rpc_worker HOST:PORT THREADS CACHE_DIR|- [DEVICE...]` so that
the CLI's process never loads llama.cpp. ggml's loop blocks in C until the process is stopped: SIGINT and
SIGTERM end it at once (nothing here needs saving; the head sees its connection close).
"""

from __future__ import annotations

import os
import signal
import sys

from sovereign.engine.runtime.rpc import start_server
from sovereign.errors import SovereignError


def main(argv: list[str]) -> int:
    """Serve until stopped; 1 (with one line on stderr) when the server cannot start."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _end_with_parent()
    endpoint, threads, cache, *devices = argv
    try:
        start_server(endpoint, None if cache == "-" else cache, int(threads), devices)
    except SovereignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # ggml returns only when it could not listen (it has printed why).
    return 1


def _end_with_parent() -> None:
    """On Linux, be terminated when `sovereign worker` dies, however it dies: no orphan keeps the port and memory."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before the call: nobody would stop this process
            sys.exit(1)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
