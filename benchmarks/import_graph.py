"""The static import graph of our three packages: which module imports which, read with `ast`.

Every import statement counts, at module level or inside a function, so a deferred import cannot hide an arrow.
Run as a script it prints each package's imports from the others (`mechslice -> hooks: 12`) and any import loop;
tests/test_layout.py asserts the layout rules on the same graph.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("hooks", "mechslice", "analyses")
ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted module name of a source file under `root` (a package's `__init__.py` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path = ROOT) -> Iterator[Path]:
    """Every Python file of the three packages."""
    for package in PACKAGES:
        yield from sorted((root / package).rglob("*.py"))


def _imported(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]
) -> set[str]:
    """The modules of ours one import statement needs.

    `from a.b import c` needs `a.b.c` when c is a module, and `a.b` (its `__init__`) when c is a name defined there.
    """
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    base = node.module or ""
    if node.level:
        parent = module.split(".")
        drop = node.level - 1 if is_package else node.level
        parent = parent[: len(parent) - drop]
        base = ".".join([*parent, base] if base else parent)
    needed = {f"{base}.{alias.name}" for alias in node.names} & modules
    if len(needed) < len(node.names) and base in modules:
        needed.add(base)
    return needed


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of the import statements under `if TYPE_CHECKING:`, which never run."""
    guarded = (
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        and "TYPE_CHECKING"
        in {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
        | {n.attr for n in ast.walk(node.test) if isinstance(n, ast.Attribute)}
    )
    return {id(inner) for node in guarded for stmt in node.body for inner in ast.walk(stmt)}


def import_graph(root: Path = ROOT, type_checking: bool = True) -> dict[str, set[str]]:
    """Module -> the modules of our packages it imports, at module level or inside a function.

    `type_checking=False` leaves out the imports under `if TYPE_CHECKING:`: they name a type for an annotation
    and never run, so they are arrows of the design but cannot make an import-time loop.
    """
    files = {module_name(path, root): path for path in source_files(root)}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = set() if type_checking else _type_checking_only(tree)
        is_package = path.name == "__init__.py"
        graph[module] = {
            name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skip
            for name in _imported(node, module, is_package, modules)
            if name != module
        }
    return graph


def package_of(module: str) -> str:
    """The top-level package a dotted module name belongs to."""
    return module.split(".", 1)[0]


def package_arrows(graph: dict[str, set[str]]) -> Counter[tuple[str, str]]:
    """(importing package, imported package) -> how many module-to-module imports cross that way."""
    return Counter(
        (package_of(module), package_of(target))
        for module, targets in graph.items()
        for target in targets
        if package_of(module) != package_of(target)
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as its modules in order (the first repeated at the end), or None when there is none."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def main() -> int:
    """Print each package's imports from the others, and the first import loop found, if any: among the imports
    that run, and among all written ones (`if TYPE_CHECKING:` included)."""
    graph = import_graph()
    for (source, target), count in sorted(package_arrows(graph).items()):
        print(f"{source} -> {target}: {count}")
    for label, g in (("run-time", import_graph(type_checking=False)), ("with TYPE_CHECKING", graph)):
        cycle = find_cycle(g)
        print(f"import loop ({label}): " + (" -> ".join(cycle) if cycle else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
