"""`sovereign bench` and `sovereign fit`: real runs on gemma3:270m and a real server, small sizes, sane figures."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter, LlamaFileType

from sovereign.bench.fit import Budget, Candidate, assess, recommend
from sovereign.bench.serve_bench import Sample, summarize
from sovereign.refs import parse_name
from sovereign.store import Store
from tests.conftest import GEMMA, assert_clean_error, run_cli
from tests.fakehub import FakeHubServer, FakeRepo
from tests.servers import ServerProcess

GiB = 2**30


@pytest.fixture(scope="module")
def gemma_file(real_model_home: Path) -> Path:
    """The real model's GGUF (benchmarked by path, so each test's own store keeps the history)."""
    store = Store(real_model_home)
    return store.model_path(store.require(parse_name(GEMMA)))


def sane(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_hardware_report_as_json() -> None:
    result = run_cli("bench", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["physical_cores"] >= 1 and report["logical_cores"] >= report["physical_cores"]
    assert report["memory_total"] >= report["memory_available"] > 0
    assert sane(report["bandwidth"]) and report["bandwidth"] > 1e8  # any machine reads faster than 100 MB/s
    assert len(report["fingerprint"]) == 12 and report["cpu"]
    assert isinstance(report["cpu_features"], list) and isinstance(report["gpus"], list)
    assert report["gpu_offload"] in (True, False)


def test_model_bench_sweeps_threads_and_reports_pp_and_tg(gemma_file: Path) -> None:
    result = run_cli("bench", str(gemma_file), "-t", "1,2", "-p", "32", "-n", "8", "-r", "2", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    # llama-bench's order: per thread count, the prompt test then the generation test.
    assert [(r["test"], r["threads"]) for r in rows] == [("pp32", 1), ("tg8", 1), ("pp32", 2), ("tg8", 2)]
    for row in rows:
        assert row["model"] == gemma_file.name
        assert len(row["samples"]) == 2 and row["n_batch"] == 2048 and row["n_gpu_layers"] == 0
        assert all(sane(rate) for rate in row["samples"])
        # llama-bench's summary of its repetitions. (Not stddev < mean: two runs on a busy machine can differ more.)
        assert row["tokens_per_second"] == pytest.approx(statistics.mean(row["samples"]))
        assert row["stddev"] == pytest.approx(statistics.stdev(row["samples"]))
        assert row["model_bytes"] > 200e6 and row["model_params"] > 250e6
        assert sane(row["load_seconds"]) and row["peak_memory"] > row["model_bytes"] / 2
    for row in rows:
        if row["test"].startswith("tg"):
            # Generation is bounded by memory bandwidth: a share of the ceiling, never wildly above it.
            assert 0 < row["share_of_bandwidth_ceiling"] < 1.5 and sane(row["bandwidth_ceiling"])
        else:
            assert row["bandwidth_ceiling"] is None
        # Prompts are read in parallel, generation token by token: pp is the faster.
    assert rows[0]["tokens_per_second"] > rows[1]["tokens_per_second"]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_model_bench_table_plot_csv_and_history(gemma_file: Path, tmp_path: Path) -> None:
    picture = tmp_path / "threads.png"
    table = run_cli("bench", str(gemma_file), "-p", "16", "-n", "4", "-r", "1", "-t", "1,2", "--plot", str(picture))
    assert table.returncode == 0, table.stderr
    assert picture.read_bytes().startswith(PNG_MAGIC) and picture.stat().st_size > 10_000
    assert "tg4" in table.stdout and "pp16" in table.stdout and "tok/s ceiling" in table.stdout
    assert "of the" in table.stdout and "GB/s allows for" in table.stdout
    result = run_cli("bench", str(gemma_file), "-p", "0", "-n", "4", "-r", "1", "--csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 1 and rows[0]["test"] == "tg4" and float(rows[0]["tokens_per_second"]) > 0
    assert {"threads", "stddev", "model", "n_batch", "share_of_bandwidth_ceiling"} <= set(rows[0])
    history = run_cli("bench", "--history", "--json")
    runs = json.loads(history.stdout)
    assert [run["kind"] for run in runs] == ["model", "model"]
    assert runs[0]["fingerprint"] == runs[1]["fingerprint"] == runs[0]["hardware"]["fingerprint"]
    assert runs[1]["results"][0]["test"] == "tg4" and len(runs[0]["results"]) == 4
    shown = run_cli("bench", "--history")
    assert shown.returncode == 0 and "tg4 t" in shown.stdout


def test_serving_load_test_against_a_real_server(server: ServerProcess, tmp_path: Path) -> None:
    result = run_cli(
        "bench",
        "--url",
        server.url,
        "--model",
        GEMMA,
        "--concurrency",
        "1,2",
        "--requests",
        "4",
        "--output-tokens",
        "8",
        "--json",
        "--no-save",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == GEMMA
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["completed"] == 4 and level["failed"] == 0 and level["errors"] == []
        assert level["output_tokens"] == 32  # ignore_eos: every request decodes exactly 8 tokens
        assert sane(level["request_throughput"]) and sane(level["output_throughput"])
        for metric in ("ttft", "tpot", "itl", "e2el"):
            figures = level["latency"][metric]
            assert sane(figures["p50"]) and figures["p50"] <= figures["p90"] <= figures["p99"]
        assert level["latency"]["ttft"]["p50"] < level["latency"]["e2el"]["p50"]
    picture = tmp_path / "concurrency.png"
    table = run_cli(
        "bench",
        "--url",
        f"{server.base_url}",
        "--model",
        GEMMA,
        "--concurrency",
        "1,2",
        "--requests",
        "2",
        "--output-tokens",
        "4",
        "--no-save",
        "--plot",
        str(picture),
    )
    assert table.returncode == 0, table.stderr
    assert "time to first token p50" in table.stdout and picture.read_bytes().startswith(PNG_MAGIC)


def test_failed_requests_are_counted_never_hidden() -> None:
    good = Sample(ttft_s=0.1, gaps_s=[0.05, 0.05], tokens=3, e2e_s=0.2)
    report = summarize(4, [good, Sample(error="HTTP 503: busy"), Sample(error="HTTP 503: busy")], duration_s=2.0)
    assert (report.requests, report.completed, report.failed) == (3, 1, 2)
    assert report.errors == ["HTTP 503: busy"]
    assert report.output_throughput == 1.5 and report.request_throughput == 0.5
    assert report.latency["tpot"]["p50"] == pytest.approx(0.05)


def test_bench_errors_are_one_clear_line(server: ServerProcess) -> None:
    assert_clean_error(run_cli("bench", "nope:1b"), "not pulled")
    assert_clean_error(run_cli("bench", "-t", "two"), "-t takes whole numbers")
    assert_clean_error(run_cli("bench", "--json", "--csv"), "cannot be used together")
    assert_clean_error(run_cli("bench", "--url", "http://127.0.0.1:9"), "no answer")
    assert_clean_error(
        run_cli("bench", "--url", server.url, "--model", "nope:1b", "--requests", "1"), "warm-up request"
    )
    assert_clean_error(run_cli("fit", "--memory", "lots"), "--memory takes a size")


def test_fit_places_catalog_models_in_the_memory_given() -> None:
    result = run_cli("fit", "--memory", "2GB", "--bandwidth", "20", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    by_name = {model["model"]: model for model in report["models"]}
    assert report["budget"]["memory_bytes"] == 2 * GiB
    assert by_name[GEMMA]["fits"] and by_name[GEMMA]["runs_on"] == "CPU" and by_name[GEMMA]["weights_exact"]
    assert not by_name["qwen3:8b"]["fits"] and by_name["qwen3:8b"]["runs_on"] is None
    # Expected speed is bandwidth over weights, times the typical share reached.
    assert by_name[GEMMA]["expected_tok_s"] == pytest.approx(20e9 / by_name[GEMMA]["weights_bytes"] * 0.7)
    best = by_name[report["recommended"]]
    assert best["fits"] and best["expected_tok_s"] >= 10
    assert all(m["params"] <= best["params"] for m in report["models"] if m["fits"] and m["expected_tok_s"] >= 10)
    table = run_cli("fit", "--memory", "2GB", "--bandwidth", "20")
    assert f"recommended: {report['recommended']}" in table.stdout


def test_fit_prefers_the_gpu_and_recommends_the_biggest_interactive_model() -> None:
    small = Candidate("small:1b", "Q4_K_M", 1_000_000_000, 700 * 2**20, True, 32 * 1024, 4096, "catalog")
    large = Candidate("large:8b", "Q4_K_M", 8_000_000_000, 5 * GiB, False, 128 * 1024, 4096, "catalog")
    cpu_only = Budget(memory=16 * GiB, bandwidth=50e9)
    verdicts = [assess(small, cpu_only), assess(large, cpu_only)]
    assert [v.where for v in verdicts] == ["CPU", "CPU"]
    assert recommend(verdicts) is verdicts[0]  # the 8B fits but would crawl at ~6.5 tok/s
    with_gpu = Budget(memory=16 * GiB, gpu_memory=12 * GiB, bandwidth=50e9)
    on_gpu = [assess(small, with_gpu), assess(large, with_gpu)]
    assert [v.where for v in on_gpu] == ["GPU", "GPU"]
    assert recommend(on_gpu) is on_gpu[1]
    tight = Budget(memory=1 * GiB, bandwidth=50e9)
    assert not assess(large, tight).fits and recommend([assess(large, tight)]) is None


def test_fit_reads_a_remote_header_through_range_requests(
    hub: FakeHubServer, tmp_path: Path, isolated_home: Path
) -> None:
    path = tmp_path / "remote.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(8)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_embedding_length(512)
    writer.add_context_length(4096)
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_token_list([f"token-{i:06d}" for i in range(150_000)])  # a 3 MB header: more than the first read
    writer.add_tensor("blk.0.weight", np.zeros((4096, 1024), dtype=np.float32))  # 16 MiB of weights
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    hub.hub.repos["acme/remote-GGUF"] = FakeRepo(files={"remote.gguf": data})
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text(
        '[models."remote:test"]\nsources = ["hf.co/acme/remote-GGUF/remote.gguf"]\ncontext_length = 2048\n'
    )

    result = run_cli("fit", "--json", "--memory", "8GB", "--bandwidth", "10", env={"HF_ENDPOINT": hub.url})
    assert result.returncode == 0, result.stderr
    (model,) = [m for m in json.loads(result.stdout)["models"] if m["model"] == "remote:test"]
    assert model["source"] == "remote header" and model["weights_exact"]
    assert model["weights_bytes"] == len(data)
    assert model["kv_bytes_per_token"] == 8 * 2 * (64 + 64) * 2 and model["params"] == 4096 * 1024
    fetched = hub.hub.downloads("remote.gguf")
    assert fetched and all(r.range for r in fetched)
    assert sum(r.body_bytes for r in fetched) < len(data) / 2  # the header, not the weights
