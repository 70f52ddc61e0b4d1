"""Benchmark runs kept under $SOVEREIGN_HOME/bench/history.jsonl, one JSON object per run.

Each run carries its machine's hardware report and fingerprint, so runs compare over time on one
machine and across machines. JSON lines: appending never rewrites earlier runs, and a line
damaged by a crash is skipped rather than losing the file.
"""

from __future__ import annotations

import json
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sovereign.bench.hardware import Hardware

FILE_NAME = "history.jsonl"


def history_path(home: Path) -> Path:
    return home / "bench" / FILE_NAME


def save(home: Path, kind: str, hardware: Hardware, results: list[dict[str, Any]], target: str | None = None) -> Path:
    """Append one run ("hardware", "model" or "serve") and return the file."""
    path = history_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "kind": kind,
        "target": target,
        "fingerprint": hardware.fingerprint,
        "hardware": hardware.to_json(),
        "results": results,
    }
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    return path


def load(home: Path) -> list[dict[str, Any]]:
    """Every readable run, oldest first."""
    path = history_path(home)
    if not path.exists():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "kind" in record:
            runs.append(record)
    return runs


def measured_efficiency(runs: list[dict[str, Any]], fingerprint: str) -> float | None:
    """The mean share of the bandwidth ceiling that generation tests reached on this machine, if any ran."""
    shares = [
        result["share_of_bandwidth_ceiling"]
        for run in runs
        if run.get("kind") == "model" and run.get("fingerprint") == fingerprint
        for result in run.get("results", [])
        if isinstance(result, dict) and result.get("share_of_bandwidth_ceiling")
    ]
    return statistics.fmean(shares) if shares else None


def latest_hardware(runs: list[dict[str, Any]], fingerprint: str | None = None) -> Hardware | None:
    """The most recent hardware report with a measured bandwidth (of this machine, if a fingerprint is given)."""
    for run in reversed(runs):
        data = run.get("hardware") or {}
        if data.get("bandwidth") and (fingerprint is None or run.get("fingerprint") == fingerprint):
            try:
                return Hardware.from_json(data)
            except TypeError:
                continue
    return None
