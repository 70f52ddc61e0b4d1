"""Download throughput: `sovereign pull` from a loopback fake hub against `curl` on the same file.

Both fetch the same bytes from the same loopback server, side by side in one run, alternating,
so the ratio is meaningful on a noisy machine. `sovereign pull` does more than curl: it lists the
repository, checks free space, hashes the file (sha256), reads the GGUF header and commits the
blob, so the "pull" figure is end to end. curl uses one connection; a large pull uses several
range requests at once (SOVEREIGN_DOWNLOAD_CONNECTIONS overrides how many). A third figure times
`download()` alone in a fresh process, without start-up, listing and commit, to separate the
transfer from the fixed costs of a pull.

curl does not verify what it fetched; a pull does (sha256). So a fourth figure times `curl` then
`sha256sum` on its file, the fair equivalent of a verified fetch; it is reported, not a target.

`--throttle MBPS` caps each connection of the fake hub at MBPS megabytes per second, as a CDN edge
does; that is where several connections pay off. Targets (pull / curl):
unthrottled >= 1.0, throttled at 20 MB/s per connection >= 3.0.

    python scripts/bench_pull.py [--megabytes 256] [--rounds 3] [--model PATH.gguf] [--throttle 20]
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

from tests.conftest import sovereign_command, write_gguf
from tests.fakehub import FakeHubServer, FakeRepo

TARGETS = {"unthrottled": 1.0, "throttled_20MBps": 3.0}  # pull throughput / curl throughput, per mode


def mode_name(throttle: float | None) -> str:
    """The TARGETS key for a run: 'unthrottled' or 'throttled_<N>MBps'."""
    return "unthrottled" if not throttle else f"throttled_{throttle:g}MBps"


def _time(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


_TRANSFER = """
import sys, time
from pathlib import Path
from sovereign.store.http.download import download
from sovereign.store.progress import NullReporter
start = time.perf_counter()
download(sys.argv[1], Path(sys.argv[2]), NullReporter())
print(time.perf_counter() - start)
"""


def _time_transfer(url: str, dest: Path, env: dict[str, str]) -> float:
    """The download alone (sha256 included): no interpreter start, imports, listing or commit."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    output = subprocess.run(
        [sys.executable, "-c", _TRANSFER, url, str(dest)], env=env, check=True, capture_output=True, text=True
    ).stdout
    shutil.rmtree(dest.parent)
    return float(output.strip().splitlines()[-1])


def main() -> int:
    """Run the comparison and print MB/s for each tool and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, help="serve this GGUF instead of a generated one")
    parser.add_argument(
        "--throttle",
        type=float,
        metavar="MBPS",
        help="cap each connection of the fake hub at MBPS MB/s (1 MB = 10^6 bytes)",
    )
    args = parser.parse_args()
    mode = mode_name(args.throttle)
    if shutil.which("curl") is None:
        print("curl is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = (args.model or write_gguf(work / "bench.gguf", megabytes=args.megabytes)).read_bytes()
        size_mb = len(data) / 1e6
        with FakeHubServer(per_connection_bytes_per_second=args.throttle * 1e6 if args.throttle else None) as hub:
            hub.hub.repos["bench/model-GGUF"] = FakeRepo(files={"model-Q4_K_M.gguf": data})
            url = f"{hub.url}/bench/model-GGUF/resolve/main/model-Q4_K_M.gguf"
            curl_times, pull_times, transfer_times, verified_times = [], [], [], []
            for round_number in range(args.rounds):
                home = work / f"home{round_number}"
                env = {**os.environ, "SOVEREIGN_HOME": str(home), "HF_ENDPOINT": hub.url}
                curl_times.append(_time(["curl", "-sf", "-o", str(work / "curl.gguf"), url], env))
                (work / "curl.gguf").unlink()
                verified_times.append(
                    _time(
                        ["sh", "-c", 'curl -sf -o "$1" "$2" && sha256sum "$1"', "sh", str(work / "curl.gguf"), url], env
                    )
                )
                pull_times.append(_time([*sovereign_command(), "pull", "hf.co/bench/model-GGUF:Q4_K_M"], env))
                transfer_times.append(
                    _time_transfer(
                        url,
                        work / "transfer" / "model.gguf",
                        {**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                    )
                )
                shutil.rmtree(home)
                (work / "curl.gguf").unlink()
    curl_rate, pull_rate = size_mb / min(curl_times), size_mb / min(pull_times)
    ratio = pull_rate / curl_rate
    target = TARGETS.get(mode)
    print(f"mode: {mode}; file: {size_mb:.1f} MB, best of {args.rounds} rounds; cpu: {_cpu()} ({os.cpu_count()} cores)")
    print(f"curl            : {curl_rate:8.1f} MB/s  ({min(curl_times):.2f} s)")
    verified_rate = size_mb / min(verified_times)
    print(
        f"curl + sha256sum: {verified_rate:8.1f} MB/s  "
        f"({min(verified_times):.2f} s; pull/this = {pull_rate / verified_rate:.2f})"
    )
    print(
        f"sovereign pull  : {pull_rate:8.1f} MB/s  "
        f"({min(pull_times):.2f} s, includes listing, sha256, header read, commit)"
    )
    transfer_rate = size_mb / min(transfer_times)
    print(
        f"download() only : {transfer_rate:8.1f} MB/s  "
        f"({min(transfer_times):.2f} s, {transfer_rate / curl_rate:.2f}x curl; the transfer and sha256 alone)"
    )
    print(
        f"ratio pull/curl : {ratio:.2f}  (target >= {target})"
        if target
        else f"ratio pull/curl : {ratio:.2f}  (no target for {mode})"
    )
    return 0 if target is None or ratio >= target else 1


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
