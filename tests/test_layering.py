"""The package boundaries the architecture promises (docs/architecture.md), checked on the source:
the library never imports the server, and only its command line reads the environment. The command
line is where both meet: `sedd serve` imports the server inside the command, never at import time."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY_MODULES = sorted((Path(__file__).resolve().parents[1] / "sedd_core").rglob("*.py"))


def _imports(tree: ast.AST, top_level_only: bool = False) -> set[str]:
    names = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _reads_environment(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                alias.name in ("environ", "getenv") for alias in node.names):
            return True
    return False


@pytest.mark.parametrize("path", LIBRARY_MODULES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_library_module_keeps_to_its_layer(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    command_line = path.name == "cli.py" and path.parent.name == "sedd_core"
    imported = _imports(tree, top_level_only=command_line)
    assert not {name for name in imported if name == "app" or name.startswith("app.")}, \
        f"{path.name} imports the server package"
    if not command_line:  # the command line turns SEDD_* variables into arguments
        assert not _reads_environment(tree), f"{path.name} reads the environment; take an argument instead"
