"""`serve` and `run` on the tiny default model: one line naming a better model for this machine.

The hint is worked out in a child process (sovereign/bench/upgrade_hint.py: it measures the memory
bandwidth once per machine and looks for GPUs through llama.cpp, which the server's process never
loads), on a thread, so that starting up never waits for it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable

HINT_TIMEOUT_SECONDS = 60.0  # a hint that takes longer than this is not worth a line


def hint_in_background(served: list[str], default: str, show: Callable[[str], None]) -> threading.Thread | None:
    """Start working the hint out when the default is served; `show` gets its line. A hint that fails is left out."""
    if default not in served:
        return None

    def work() -> None:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "sovereign.bench.upgrade_hint", *served],
                capture_output=True,
                text=True,
                timeout=HINT_TIMEOUT_SECONDS,
            )
        except (OSError, subprocess.SubprocessError):
            return
        line = done.stdout.strip()
        if done.returncode == 0 and line:
            show(line)

    thread = threading.Thread(target=work, name="upgrade-hint", daemon=True)
    thread.start()
    return thread
