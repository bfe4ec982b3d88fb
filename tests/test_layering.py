"""The package boundaries that docs/architecture.md promises, checked on the source of every module:

    sedd_cli  (the `sedd` command)   ->  app, benchmarks, sedd_core
    app       (the HTTP server)      ->  sedd_core
    benchmarks                       ->  sedd_core
    sedd_core (the library)          ->  nothing of ours above it; reads no environment variable

Every import counts, at the top of a module or inside a function; and the import graph of the four
packages has no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sedd_core", "app", "benchmarks", "sedd_cli")
# what each package may import of ours (besides itself)
ALLOWED = {"sedd_core": set(), "app": {"sedd_core"}, "benchmarks": {"sedd_core"},
           "sedd_cli": {"app", "benchmarks", "sedd_core"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """Our modules that `name` imports anywhere in its source, relative imports resolved; `from P import x`
    counts as P.x where that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def reads_environment(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                alias.name in ("environ", "getenv") for alias in node.names):
            return True
    return False


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports_only_the_layers_below_it(name):
    package = name.split(".")[0]
    upward = {target for target in GRAPH[name] if target.split(".")[0] not in ALLOWED[package] | {package}}
    assert not upward, f"{name} imports {sorted(upward)}, above or beside its layer"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("sedd_core")))
def test_library_module_reads_no_environment(name):
    tree = ast.parse(MODULES[name].read_text())
    assert not reads_environment(tree), f"{name} reads the environment; take an argument instead"


def test_the_import_graph_has_no_cycle():
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(GRAPH[node]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_check_sees_imports_inside_functions():
    """The graph is built from every import statement, not only those at the top (the rule the last layout
    broke: the library's command line imported the server inside `sedd serve`)."""
    assert "app.main" in GRAPH["sedd_cli.serve"]  # imported inside cmd_serve only
    assert "sedd_core.generation" in GRAPH["sedd_cli.generate"]
