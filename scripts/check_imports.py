"""Check sovereign's import graph: no circles, and nothing the HTTP server may import reaches llama.cpp.

Reads the source with `ast` (nothing is imported), so it sees imports inside functions too: a
server's route that imports a module on its first request loads it as surely as one at the top.
Imports under `if TYPE_CHECKING:` are left out; they never run.

    python scripts/check_imports.py     # exit 1 and one line per problem, or "imports: ok ..."
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sovereign"
# The code that only a model's own process (or a benchmark's) may load.
DECODING = ("sovereign.engine.runtime", "llama_cpp")
# Where the HTTP server's process starts: everything these reach, at import or later, must stay clear of DECODING.
# (Not all of sovereign.cli: `bench` and `fit` run llama.cpp in the CLI's own process, by design.)
SERVER_ROOTS = (
    "sovereign.server",
    "sovereign.gateway",
    "sovereign.engine",
    "sovereign.cli.serve",
    "sovereign.cli.launch",
    "sovereign.cli.common",
)
# Modules allowed to load code by a computed name: their lazy tables (`_LAZY`) are read as imports below.
DYNAMIC_LOADERS = {
    "sovereign.engine.json_grammar": "reads llama-cpp-python's llama_grammar.py, plain Python, by its path",
}


def module_name(path: Path) -> str:
    """sovereign/engine/wire.py -> sovereign.engine.wire; a package's __init__.py is the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement except those inside `if TYPE_CHECKING:` blocks."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _dynamic_imports(tree: ast.Module) -> tuple[set[str], int]:
    """Modules named by `importlib.import_module("…")`, `__import__("…")` or a lazy table's values.

    Also how many such calls name their module by a computed value (which this check cannot follow).
    """
    named: set[str] = set()
    computed = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            if isinstance(node.value, ast.Dict):  # a PEP 562 table: name -> the module that defines it
                named.update(
                    v.value for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
                )
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
        if called in ("import_module", "__import__", "spec_from_file_location") and node.args:
            argument = node.args[0]
            if (
                isinstance(argument, ast.Constant)
                and isinstance(argument.value, str)
                and called != "spec_from_file_location"
            ):
                named.add(argument.value)
            else:
                computed += 1
    return named, computed


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The modules a file imports: ours resolved to the module or package named, foreign ones by their top name."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    named, _ = _dynamic_imports(tree)
    for target in named:
        found.add(target if target.startswith("sovereign") else target.split(".")[0])
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import module` names a module; `from module import name` names the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            found.add(target if target.startswith("sovereign") else target.split(".")[0])
    return found


def import_graph() -> dict[str, set[str]]:
    """Each of sovereign's modules and what it imports."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of sovereign's modules (Tarjan's algorithm): each one is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _is_decoding(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in DECODING)


def server_reaches_decoding(graph: dict[str, set[str]]) -> list[str]:
    """Chains of imports from the server's side to llama.cpp or the model process's code, one per offending module."""
    starts = [m for m in graph if any(m == r or m.startswith(r + ".") for r in SERVER_ROOTS) and not _is_decoding(m)]
    came_from: dict[str, str | None] = {start: None for start in starts}
    queue = list(starts)
    problems = []
    while queue:
        module = queue.pop(0)
        for target in sorted(graph.get(module, ())):
            if target in came_from:
                continue
            came_from[target] = module
            if _is_decoding(target):
                chain = [target]
                while (previous := came_from[chain[-1]]) is not None:
                    chain.append(previous)
                problems.append(" -> ".join(reversed(chain)))
            elif target in graph:
                queue.append(target)
    return problems


def computed_imports() -> list[str]:
    """Modules on the server's side that load code by a computed name, outside DYNAMIC_LOADERS and lazy tables."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        on_server_side = any(name == r or name.startswith(r + ".") for r in SERVER_ROOTS) and not _is_decoding(name)
        if not on_server_side or name in DYNAMIC_LOADERS:
            continue
        tree = ast.parse(path.read_text(), str(path))
        lazy_table = any(
            isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
            for node in tree.body
        )
        if _dynamic_imports(tree)[1] and not lazy_table:
            found.append(name)
    return found


def main() -> int:
    """Print every problem and exit 1, or one line saying all is well."""
    graph = import_graph()
    problems = [f"import circle: {' <-> '.join(group)}" for group in cycles(graph)]
    problems += [f"{name} imports a module by a computed name this check cannot follow" for name in computed_imports()]
    problems += [f"the server's process would load decoding code: {chain}" for chain in server_reaches_decoding(graph)]
    for problem in problems:
        print(problem)
    if problems:
        return 1
    edges = sum(len(targets & graph.keys()) for targets in graph.values())
    print(
        f"imports: ok ({len(graph)} modules, {edges} internal imports, no circles, the server never reaches llama.cpp)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
