"""The layout card's arrows, read off the source: hooks <- mechslice <- analyses, the CLI the one tie, no loop.

Every rule is checked on the real tree and, so that a rule that can never fail is caught, on a small tree of
fake packages that breaks it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks.import_graph import ROOT, find_cycle, import_graph, module_name, package_of, source_files

CLI = ("mechslice.cli", "mechslice.commands")


def is_cli(module: str) -> bool:
    """The CLI: `mechslice.cli` and every module of `mechslice.commands`."""
    return any(module == cli or module.startswith(cli + ".") for cli in CLI)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import against the layout card, as `module -> imported (rule)`."""
    broken = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            source_pkg, target_pkg = package_of(module), package_of(target)
            if source_pkg == "hooks" and target_pkg in ("mechslice", "analyses"):
                broken.append(f"{module} -> {target} (hooks imports none of our packages)")
            elif source_pkg == "mechslice" and target_pkg == "analyses" and not is_cli(module):
                broken.append(f"{module} -> {target} (only the CLI in mechslice imports analyses)")
            elif source_pkg == "analyses" and is_cli(target):
                broken.append(f"{module} -> {target} (analyses never imports the CLI)")
    return broken


def core_modules(root: Path = ROOT) -> list[str]:
    """Every module of mechslice but the CLI."""
    names = (module_name(path, root) for path in source_files(root))
    return [name for name in names if package_of(name) == "mechslice" and not is_cli(name)]


def analyses_loaded_by(modules: list[str], cwd: Path = ROOT) -> list[str]:
    """The `analyses` modules in sys.modules after a fresh interpreter imports mechslice and then `modules`."""
    probe = textwrap.dedent(
        f"""
        import importlib, json, sys
        import mechslice
        for name in {modules!r}:
            importlib.import_module(name)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "analyses")))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """A tree of fake `hooks`, `mechslice` and `analyses` packages: {relative path: source}."""
    for package in ("hooks", "mechslice", "analyses", "mechslice/commands"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
    for relative, source in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(textwrap.dedent(source))
    return root


def test_no_upward_import_in_the_tree() -> None:
    broken = upward_imports(import_graph())
    assert not broken, "imports against the layout card:\n" + "\n".join(broken)


def test_the_rules_catch_each_upward_import(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "hooks/flow.py": "from mechslice.loaded import LoadedModel\n",
            "mechslice/loaded.py": "def f():\n    import analyses.laws\n",  # a function-level import counts
            "mechslice/commands/fit.py": "from analyses import laws\n",  # the CLI may
            "analyses/laws.py": "from mechslice.commands import fit\nfrom mechslice.cli import main\n",
            "mechslice/cli.py": "main = None\n",
        },
    )
    assert upward_imports(import_graph(root)) == [
        "analyses.laws -> mechslice.cli (analyses never imports the CLI)",
        "analyses.laws -> mechslice.commands.fit (analyses never imports the CLI)",
        "hooks.flow -> mechslice.loaded (hooks imports none of our packages)",
        "mechslice.loaded -> analyses.laws (only the CLI in mechslice imports analyses)",
    ]


@pytest.mark.parametrize("type_checking", [False, True], ids=["run-time", "with-type-checking"])
def test_no_import_loop_in_the_tree(type_checking: bool) -> None:
    """No loop among the imports that run, nor once the `if TYPE_CHECKING:` ones (annotation-only) count too."""
    cycle = find_cycle(import_graph(type_checking=type_checking))
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_a_loop_is_found_and_named(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "mechslice/loading.py": "def load():\n    from mechslice.slicing import io\n",
            "mechslice/slicing/__init__.py": "",
            "mechslice/slicing/io.py": "from mechslice.loading import load\n",
            "mechslice/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mechslice import other\n",
            "mechslice/other.py": "from mechslice import typed\n",
        },
    )
    assert find_cycle(import_graph(root, type_checking=False)) == [
        "mechslice.loading",
        "mechslice.slicing.io",
        "mechslice.loading",
    ]
    assert find_cycle(import_graph(root)) == [
        "mechslice.loading",
        "mechslice.slicing.io",
        "mechslice.loading",
    ]
    (root / "mechslice/slicing/io.py").write_text("")
    assert find_cycle(import_graph(root, type_checking=False)) is None
    assert find_cycle(import_graph(root)) == ["mechslice.other", "mechslice.typed", "mechslice.other"]


def test_the_core_imports_without_analyses() -> None:
    modules = core_modules()
    assert {"mechslice.loading", "mechslice.slicing.slicer", "mechslice.pruning"} <= set(modules)
    assert analyses_loaded_by(modules) == []


def test_the_probe_sees_analyses_when_it_is_imported() -> None:
    """The same probe on the CLI's fit command, which imports analyses: what the core test asserts can fail."""
    assert "analyses.laws" in analyses_loaded_by(["mechslice.commands.fit"])


def test_annotations_are_checked_at_run_time() -> None:
    """The suite runs with tests.typecheck: a tensor of the wrong rank or dtype fails at the call, not later."""
    from jaxtyping import TypeCheckError

    from hooks.stats import gram

    assert gram(torch.ones(5, 3)).shape == (3, 3)
    with pytest.raises(TypeCheckError):
        gram(torch.ones(5))  # "tokens d" wants two dimensions
    with pytest.raises(TypeCheckError):
        gram(torch.ones(5, 3, dtype=torch.long))  # Float wants a floating dtype
