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
    modules = loaded_after(
        "import sovereign.server.app, sovereign.engine.engine, sovereign.engine.pool, sovereign.engine.json_grammar,"
        " sovereign.engine.call_grammar, sovereign.gateway.proxy, sovereign.cli.serve, sovereign.cli.launch"
    )
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


def test_the_static_check_reads_lazy_tables_and_import_module() -> None:
    import ast

    tree = ast.parse(
        "import importlib\n"
        "_LAZY = {'Engine': 'sovereign.engine.engine'}\n"
        "def f(name):\n"
        "    importlib.import_module('llama_cpp')\n"
        "    return importlib.import_module(name)\n"
    )
    named, computed = check_imports._dynamic_imports(tree)
    assert named == {"sovereign.engine.engine", "llama_cpp"} and computed == 1
    assert check_imports.computed_imports() == []


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


def _drawn_tree() -> dict[str, str]:
    """Each class in errors.py's drawing, mapped to the class it is drawn under."""
    import sovereign.errors

    parents: dict[str, str] = {}
    stack = ["SovereignError"]
    for line in (sovereign.errors.__doc__ or "").splitlines():
        if "── " not in line:
            continue
        depth = line.index("── ") // 4  # each level of the drawing is four characters wide
        name = line.split("── ", 1)[1].split()[0]
        del stack[depth:]
        parents[name] = stack[-1]
        stack.append(name)
    return parents


def test_the_exception_tree_drawing_names_every_class_under_its_parent() -> None:
    import importlib
    import pkgutil

    import sovereign
    from sovereign.errors import SovereignError

    for info in pkgutil.walk_packages(sovereign.__path__, "sovereign."):
        if info.name != "sovereign.__main__":  # that one runs the command line
            importlib.import_module(info.name)
    classes: dict[str, str] = {}
    pending = [SovereignError]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass.__module__.startswith("sovereign"):
                classes[subclass.__name__] = subclass.__bases__[0].__name__
                pending.append(subclass)
    assert _drawn_tree() == classes


def test_every_environment_variable_is_described_and_in_the_readme() -> None:
    import re
    from pathlib import Path

    from sovereign.config import Settings

    root = Path(__file__).resolve().parent.parent
    described = {variable.name for variable in Settings.describe()}
    used = {
        name
        for path in (root / "sovereign").rglob("*.py")
        for name in re.findall(r"SOVEREIGN_[A-Z_]+", path.read_text())
        if not name.startswith("SOVEREIGN_TEST_")  # hooks for the test suite only
    }
    for name in used:  # SOVEREIGN_UPSTREAM_KEY_ is a prefix: one variable per kind of upstream
        assert name in described or (name.endswith("_") and any(d.startswith(name) for d in described)), name
    readme = (root / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| `")]
    assert [name for name in sorted(described) if not any(f"`{name}`" in row for row in rows)] == []
