"""`serve`, `run` and `bench`: one line when this machine has a GPU that this llama.cpp build cannot use.

The check (sovereign/gpu_detect.py) reads files and may run nvidia-smi, which can take a second or
hang on a wedged driver: it runs on a thread, so that starting up never waits for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def gpu_hint_in_background(show: Callable[[str], None]) -> threading.Thread:
    """Start looking for an unused GPU; `show` gets the line if there is one. A check that fails is left out."""

    def work() -> None:
        from sovereign.gpu_detect import gpu_hint

        try:
            line = gpu_hint()
        except (OSError, ValueError) as exc:  # a hint is never worth a failed start
            log.debug("no GPU hint: %s", exc)
            return
        if line:
            show(line)

    thread = threading.Thread(target=work, name="gpu-hint", daemon=True)
    thread.start()
    return thread
