"""The process boundary holds: the HTTP server never loads llama.cpp, and sovereign's imports form no circle."""

from __future__ import annotations

import json
import subprocess
import sys

from scripts import check_imports


def loaded_after(statement: str) -> list[str]:
    """The modules a fresh interpreter holds after running `statement`."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules: list[str] = json.loads(done.stdout.splitlines()[-1])
    return modules


def test_the_server_process_loads_neither_llama_cpp_nor_the_model_process_code() -> None:
    modules = loaded_after("import sovereign.server.app, sovereign.engine.engine, sovereign.engine.pool")
    assert "sovereign.engine.engine" in modules  # the check itself saw the engine load
    assert [m for m in modules if m.startswith(("llama_cpp", "sovereign.engine.runtime"))] == []


def test_a_model_process_does_not_load_the_http_server() -> None:
    modules = loaded_after("import sovereign.engine.runtime.worker")
    assert "sovereign.engine.runtime.backend" in modules
    assert [
        m
        for m in modules
        if m.startswith(("fastapi", "uvicorn", "sovereign.server", "sovereign.engine.engine", "jinja2"))
    ] == []


def test_the_static_check_passes_on_the_code() -> None:
    graph = check_imports.import_graph()
    assert "sovereign.engine.runtime.backend" in graph["sovereign.engine.runtime.worker"]
    assert check_imports.cycles(graph) == []
    assert check_imports.server_reaches_decoding(graph) == []


def test_the_static_check_finds_circles_and_paths_to_llama_cpp() -> None:
    graph = {
        "sovereign.server.app": {"sovereign.engine.pool", "fastapi"},
        "sovereign.engine.pool": {"sovereign.engine.helpers"},
        "sovereign.engine.helpers": {"sovereign.engine.runtime.backend", "sovereign.engine.pool"},
        "sovereign.engine.runtime.backend": {"llama_cpp"},
        "sovereign.cli": {"sovereign.cli"},
    }
    assert check_imports.cycles(graph) == [["sovereign.cli"], ["sovereign.engine.helpers", "sovereign.engine.pool"]]
    assert check_imports.server_reaches_decoding(graph) == [
        "sovereign.engine.helpers -> sovereign.engine.runtime.backend"
    ]
