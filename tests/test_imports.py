"""Import boundaries, read from the source (every import statement, at module level or inside a function).

A subprocess that imports a module and looks at ``sys.modules`` only sees what is imported at load; an import
inside a function escapes it until the function runs. These tests parse every file of the library instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "laser_core"

#: what the library never imports: the orchestration layer (ZenML and the packages built on it)
NOT_IN_LIBRARY = ("zenml", "steps", "pipelines", "laser_cli")
#: modules that serving, the registry commands and config reading load: none imports torch or transformers,
#: even inside a function (``laser_core.collate`` builds torch tensors only for the training side, below)
TORCH_FREE = (
    "laser_core.ann",
    "laser_core.artifact",
    "laser_core.bundle",
    "laser_core.config",
    "laser_core.configbase",
    "laser_core.configuration",
    "laser_core.errors",
    "laser_core.metrics",
    "laser_core.paths",
    "laser_core.promotion",
    "laser_core.ranking",
    "laser_core.reporting",
    "laser_core.service",
    "laser_core.serving",
)
HEAVY = ("torch", "transformers", "bitsandbytes", "accelerate")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (``from a.b import c`` gives ``a.b.c`` when that is a
    module of the library, else ``a.b``); relative imports resolved."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            out.update(submodules)
            if len(submodules) < len(node.names):
                out.add(base)
    return out


GRAPH = {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_the_parser_sees_imports_inside_functions(tmp_path):
    pkg = ROOT / "laser_core"
    probe = pkg / "_probe_for_test.py"
    try:
        probe.write_text(
            "def f():\n    from zenml.client import Client\n    import torch.nn\n    from . import ranking\n"
        )
        assert imports_of(probe) == {"zenml.client", "torch.nn", "laser_core.ranking"}
    finally:
        probe.unlink(missing_ok=True)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_the_library_never_imports_the_orchestration_layer(name):
    bad = sorted(m for m in imports_of(MODULES[name]) if m.split(".")[0] in NOT_IN_LIBRARY)
    assert not bad, f"{MODULES[name].relative_to(ROOT)} imports {bad}: laser_core must not depend on ZenML"


@pytest.mark.parametrize("name", TORCH_FREE)
def test_torch_free_modules_import_no_torch_even_inside_functions(name):
    assert name in MODULES, name
    bad = sorted(m for m in imports_of(MODULES[name]) if m.split(".")[0] in HEAVY)
    assert not bad, f"{MODULES[name].relative_to(ROOT)} imports {bad}"


def test_no_import_cycles_in_the_library():
    """Tarjan's strongly connected components over every import (lazy ones too): none has two modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
