"""Notebooks stay reviewable: each .ipynb is paired with a py:percent file, in sync, without outputs,
with a `parameters` cell, and with no function or class defined in a cell (logic lives in workbench/)."""

from __future__ import annotations

import ast
from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_cohort", "02_train", "03_explain", "04_compare"]


def cells(nb):
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in nb.cells]


@pytest.mark.parametrize("name", NAMES)
def test_pair_in_sync_and_without_outputs(name):
    ipynb, py = NOTEBOOKS / f"{name}.ipynb", NOTEBOOKS / f"{name}.py"
    assert ipynb.exists() and py.exists(), f"{name}: both {ipynb.name} and {py.name} must exist"
    nb, script = jupytext.read(ipynb), jupytext.read(py)
    assert cells(nb) == cells(script), f"{name}: .ipynb and .py differ; run `jupytext --sync notebooks/{name}.ipynb`"
    assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{name}: outputs in git"


@pytest.mark.parametrize("name", NAMES)
def test_parameters_cell_and_no_definitions(name):
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert nb.cells[0].cell_type == "markdown", "each notebook opens by saying what it does"
    for cell in code:
        tree = ast.parse(cell.source)
        defined = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))
                   and hasattr(n, "name")]
        assert not defined, f"{name}: define {defined} in workbench/, not in a notebook cell"
