"""The kernel probe's child.

It loads a model with llama.cpp's fast CPU kernels and decodes, to see whether this CPU survives them.

Run by engine/kernels.py as `python -m sovereign.engine.runtime.kernel_probe MODEL_PATH`, which
reads only how this process ends: exit 0 when the kernels ran, a signal when they crashed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from pathlib import Path
from types import ModuleType

from sovereign.engine.kernels import EXIT_LOAD_FAILED, TEST_CRASH_ENV
from sovereign.engine.runtime.backend import route_llama_logs
from sovereign.errors import EngineError, ModelLoadError
from sovereign.machine import physical_cores

log = logging.getLogger(__name__)

PROBE_PROMPT_TOKENS = 64  # one batch in one llama_decode: prompt processing's matrix-matrix kernels
PROBE_SINGLE_TOKENS = 4  # then one token per decode: generation's matrix-vector kernels


def exercise(model_path: Path, threads: int) -> None:
    """Load a model with the extra buffer types on (the default) and decode a prompt batch, then single tokens."""
    import llama_cpp

    route_llama_logs()  # llama.cpp's warnings and errors only (through logging), for the parent's debug log
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0  # the CPU's kernels are on trial, whatever a GPU would take over
    params.use_mmap = True
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load {model_path.name}")
    try:
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = 2 * PROBE_PROMPT_TOKENS
        context_params.n_batch = context_params.n_ubatch = PROBE_PROMPT_TOKENS
        context_params.n_threads = context_params.n_threads_batch = threads
        context_params.no_perf = True
        context = llama_cpp.llama_init_from_model(model, context_params)
        if not context:
            raise ModelLoadError(f"llama.cpp could not create a context for {model_path.name}")
        try:
            n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
            # Any token ids will do: the kernels run the same arithmetic whatever the ids are.
            prompt = [(7919 * i + 1) % n_vocab for i in range(PROBE_PROMPT_TOKENS)]
            _decode(llama_cpp, context, prompt)
            for token in prompt[:PROBE_SINGLE_TOKENS]:
                _decode(llama_cpp, context, [token])
            llama_cpp.llama_synchronize(context)
        finally:
            llama_cpp.llama_free(context)
    finally:
        llama_cpp.llama_model_free(model)


def _decode(llama_cpp: ModuleType, context: ctypes.c_void_p, tokens: list[int]) -> None:
    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    status = llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(array, len(tokens)))
    if status != 0:
        raise EngineError(f"llama.cpp failed to decode the probe batch (status {status})")


def main(argv: list[str] | None = None) -> int:
    """The probe child: exit 0 when the fast kernels ran, EXIT_LOAD_FAILED when the model did not load."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if len(args) != 1:
        log.error("usage: python -m sovereign.engine.runtime.kernel_probe MODEL_PATH")
        return 2
    if crash := os.environ.get(TEST_CRASH_ENV):
        os.kill(os.getpid(), signal.Signals[crash])
    try:
        exercise(Path(args[0]), physical_cores())
    except ModelLoadError as exc:
        log.error("%s", exc)
        return EXIT_LOAD_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
