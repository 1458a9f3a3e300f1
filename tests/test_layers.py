"""The package's layering, read from the source: the library part of ``remedi/`` never imports
the Lightning glue (only the training command does), and no module of ``remedi`` imports one
that imports it back, lazily or not."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLUE = ("lightning_modules", "datamodules", "lightning")
ON_TOP = {"remedi.train"}
"""Entry points allowed to sit on both the library and the Lightning glue."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "remedi").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imported(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every module ``path`` imports anywhere in it (lazy imports included), as dotted names;
    ``from package import submodule`` counts as the submodule only."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            names.update(sub for sub in subs if sub in modules)
            if any(sub not in modules for sub in subs):
                names.add(node.module)
    return {n for n in names if n != name}


def test_the_library_never_imports_the_lightning_glue() -> None:
    modules = _modules()
    offenders = {
        name: sorted(n for n in _imported(path, name, modules) if n.split(".")[0] in GLUE)
        for name, path in modules.items()
        if name not in ON_TOP
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_module_of_remedi_imports_one_that_imports_it_back() -> None:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imported(path, name, modules):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(graph[current])
        return False

    circles = sorted(
        (a, b) for a, targets in graph.items() for b in targets if a < b and reaches(b, a)
    )
    assert circles == []
