"""Download throughput: `sovereign pull` from a loopback fake hub against `curl` on the same file.

Both fetch the same bytes from the same loopback server, side by side in one run, alternating,
so the ratio is meaningful on a noisy machine. `sovereign pull` does more than curl: it lists the
repository, checks free space, hashes the file (sha256), reads the GGUF header and commits the
blob, so the "pull" figure is end to end. The target is a pull at least half as fast as curl.

    python scripts/bench_pull.py [--megabytes 256] [--rounds 3] [--model PATH.gguf]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import sovereign_command, write_gguf  # noqa: E402
from tests.fakehub import FakeHubServer, FakeRepo  # noqa: E402

TARGET_RATIO = 0.5  # pull throughput / curl throughput


def _time(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    """Run the comparison and print MB/s for each tool and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, help="serve this GGUF instead of a generated one")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        print("curl is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = (args.model or write_gguf(work / "bench.gguf", megabytes=args.megabytes)).read_bytes()
        size_mb = len(data) / 1e6
        with FakeHubServer() as hub:
            hub.hub.repos["bench/model-GGUF"] = FakeRepo(files={"model-Q4_K_M.gguf": data})
            url = f"{hub.url}/bench/model-GGUF/resolve/main/model-Q4_K_M.gguf"
            curl_times, pull_times = [], []
            for round_number in range(args.rounds):
                home = work / f"home{round_number}"
                env = {**os.environ, "SOVEREIGN_HOME": str(home), "HF_ENDPOINT": hub.url}
                curl_times.append(_time(["curl", "-sf", "-o", str(work / "curl.gguf"), url], env))
                pull_times.append(_time([*sovereign_command(), "pull", "hf.co/bench/model-GGUF:Q4_K_M"], env))
                shutil.rmtree(home)
                (work / "curl.gguf").unlink()
    curl_rate, pull_rate = size_mb / min(curl_times), size_mb / min(pull_times)
    ratio = pull_rate / curl_rate
    print(f"file: {size_mb:.1f} MB, best of {args.rounds} rounds")
    print(f"curl            : {curl_rate:8.1f} MB/s  ({min(curl_times):.2f} s)")
    print(f"sovereign pull  : {pull_rate:8.1f} MB/s  ({min(pull_times):.2f} s, includes listing, sha256, header read, commit)")
    print(f"ratio pull/curl : {ratio:.2f}  (target >= {TARGET_RATIO})")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
