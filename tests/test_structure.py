"""The shape of the package: no import circles inside ``workbench/``, and no module reaching into
another module's private names. Imports inside functions count: a lazy import that closes a
circle is still a circle a maintainer has to keep in their head.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_graph(found: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Import edges between the package's modules, and every use of another module's private name."""
    edges: dict[str, set[str]] = {name: set() for name in found}
    private: list[str] = []
    for name, path in found.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        aliases: dict[str, str] = {}  # local name -> workbench module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in found:
                        edges[name].add(alias.name)
                        if alias.asname:
                            aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base != "workbench" and not base.startswith("workbench."):
                    continue
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in found:
                        edges[name].add(target)
                        aliases[alias.asname or alias.name] = target
                    elif base in found:
                        edges[name].add(base)
                        if _private(alias.name):
                            private.append(f"{name}: from {base} import {alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and aliases[node.value.id] != name and _private(node.attr)):
                private.append(f"{name}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
        edges[name].discard(name)
    return edges, private


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    try:
        list(graphlib.TopologicalSorter(edges).static_order())
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_no_import_circle_in_the_package():
    edges, _ = import_graph(modules())
    assert cycle(edges) is None, f"import circle: {' -> '.join(cycle(edges))}"


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph(modules())
    assert not private, "private names used across modules:\n" + "\n".join(private)


@pytest.mark.parametrize("sources, circle, private", [
    ({"a": "from workbench import b", "b": "def f():\n    from workbench.a import g"}, True, False),
    ({"a": "from workbench.b import _hidden", "b": "_hidden = 1"}, False, True),
    ({"a": "from workbench import b\nb._hidden()", "b": "def _hidden(): pass"}, False, True),
    ({"a": "import workbench.b as bee\nbee._x", "b": "_x = 1"}, False, True),
    ({"a": "from workbench import b\nb.public()", "b": "def public(): pass\nfrom workbench import __version__"}, False, False),
])
def test_the_checker_finds_what_it_should(tmp_path, sources, circle, private):
    """The checks above cannot pass vacuously: on small packages they find planted circles and private uses."""
    root = tmp_path / "workbench"
    root.mkdir()
    (root / "__init__.py").write_text("__version__ = '0'\n")
    for module, source in sources.items():
        (root / f"{module}.py").write_text(source + "\n")
    edges, found_private = import_graph(modules(root))
    assert (cycle(edges) is not None) == circle
    assert bool(found_private) == private


def test_what_a_reference_step_and_load_pipeline_import_needs_no_torch():
    """The configs, the model kinds, a reference's model run, cohort, compare and pipeline loading
    import without torch or keras: each kernel that fits no network skips their start-up cost."""
    import subprocess
    import sys

    code = ("import sys, workbench.settings, workbench.experiment, workbench.cohort, workbench.comparison, "
            "workbench.pipelines, workbench.references, workbench.config; "
            "print(sorted(m for m in ('torch', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"imported {out}"


def test_parallel_kernels_get_their_share_of_the_cores(monkeypatch):
    """Kernels side by side each get OMP_NUM_THREADS = their share; a value the user set is kept."""
    import os

    from workbench.pipelines import kernel_environment

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with kernel_environment("sqlite:///x.db", threads=1):
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with kernel_environment("sqlite:///x.db", threads=1):
        assert os.environ["OMP_NUM_THREADS"] == "7"
