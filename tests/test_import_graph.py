"""The package's modules import each other in layers: no cycles, and ``kernels`` at the bottom.

Every ``import`` statement counts, including those inside functions (a lazy import is still an
arrow) and the package ``__init__`` that importing a submodule runs; only imports under
``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_lowmem

ROOT = Path(lightning_lowmem.__file__).parent
PACKAGE = "lightning_lowmem"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, modules: set[str], here: str, is_package: bool) -> set[str]:
    """The package's modules ``tree`` imports (a name imported from a module counts as the module)."""
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in modules:  # `from pkg import name`: name may be an attribute
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
            parent = name.rpartition(".")[0]
            while parent:  # importing a submodule runs its packages' __init__
                found.add(parent)
                parent = parent.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here if is_package else here.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".rstrip(".")
            for alias in node.names:
                add(f"{base}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(here)
    return found


def import_graph() -> dict[str, set[str]]:
    """``module -> the package's modules it imports``, read from the source."""
    paths = {(_module_name(p)): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(ast.parse(path.read_text()), modules, name, path.name == "__init__.py")
            for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or ``None``. A package's ``__init__`` importing its own submodules is the
    way a package is built, not a cycle: the arrow from a submodule up to its package is left out."""
    edges = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_is_the_bottom_layer():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith(f"{PACKAGE}.kernels"):
            outside = {t for t in targets if not t.startswith(f"{PACKAGE}.kernels") and t != PACKAGE}
            assert not outside, f"{module} imports {sorted(outside)}: kernels/ must not import the rest of the package"


def test_the_walker_sees_lazy_imports_and_cycles():
    """The checks above would catch a cycle made of a lazy import."""
    modules = {"p", "p.a", "p.b"}
    lazy = ast.parse("def f():\n    from p.b import g\n")
    assert _imports(lazy, modules, "p.a", False) == {"p", "p.b"}
    assert _cycle({"p": set(), "p.a": {"p", "p.b"}, "p.b": {"p", "p.a"}}) in (["p.a", "p.b", "p.a"], ["p.b", "p.a", "p.b"])
    hidden = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.b import g\n")
    assert _imports(hidden, modules, "p.a", False) == set()
