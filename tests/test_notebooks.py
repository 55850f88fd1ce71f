"""Notebooks stay reviewable and agree with the library: each .ipynb is paired with a py:percent
file, in sync (``jupytext --sync`` changes nothing), without outputs, with one `parameters` cell,
no function or class defined in a cell (logic lives in workbench/), the installed kernel's
metadata (JupyterLab then opens them unmodified), and parameter defaults equal to the fields of
the typed configs they feed."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

from workbench.evaluation import EvalConfig
from workbench.explain import ExplainConfig
from workbench.models import ModelConfig
from workbench.pipelines import KERNEL_DISPLAY_NAME, KERNEL_NAME, notebook_parameters
from workbench.training import TrainConfig

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_cohort", "02_train", "03_explain", "04_compare"]
# The typed configs each notebook's parameters feed, and the fields it may leave out.
CONFIGS = {
    "02_train": ([ModelConfig, TrainConfig, EvalConfig], {"kind", "progress"}),
    "03_explain": ([ExplainConfig], None),  # the main knobs by name, the rest through explain_settings
}


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


def test_jupytext_sync_is_a_no_op(tmp_path):
    copy = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, copy, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    files = sorted(p.name for p in copy.iterdir() if p.suffix in (".py", ".ipynb"))
    before = {f: (copy / f).read_bytes() for f in files}
    jupytext_cli = Path(sys.executable).with_name("jupytext")
    subprocess.run([str(jupytext_cli), "--sync", *[f"{n}.ipynb" for n in NAMES]], cwd=copy, check=True,
                   capture_output=True, timeout=120)
    changed = [f for f in files if (copy / f).read_bytes() != before[f]]
    assert not changed, f"`jupytext --sync` rewrites {changed}: run it in notebooks/ and commit the result"


@pytest.mark.parametrize("name", NAMES)
def test_kernel_metadata_is_the_installed_kernels(name):
    """JupyterLab marks a notebook modified on open when its kernelspec or language_info metadata
    differs from what the running kernel reports (tests/test_lab.py checks it in a browser)."""
    from ipykernel.ipkernel import IPythonKernel

    metadata = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["metadata"]
    assert metadata["kernelspec"] == {"name": KERNEL_NAME, "display_name": KERNEL_DISPLAY_NAME, "language": "python"}
    assert metadata["language_info"] == IPythonKernel.language_info


def definitions(source: str) -> list[str]:
    """What a cell's code defines, "name (line N)" each: functions, classes and lambdas (which have no name)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append(f"{node.name} (line {node.lineno})")
        elif isinstance(node, ast.Lambda):
            found.append(f"lambda (line {node.lineno})")
    return found


@pytest.mark.parametrize(
    "source, expected",
    [
        ("x = 1\nprint(sorted([3, 1]))", []),
        ("def f():\n    pass", ["f (line 1)"]),
        ("async def g():\n    pass", ["g (line 1)"]),
        ("class C:\n    pass", ["C (line 1)"]),
        ("key = lambda row: row[0]", ["lambda (line 1)"]),
        ("rows = sorted(rows,\n             key=lambda r: r.risk)", ["lambda (line 2)"]),
        ("frame.apply(lambda x: (lambda y: y)(x))", ["lambda (line 1)", "lambda (line 1)"]),
    ],
)
def test_definitions_finds_functions_classes_and_lambdas(source, expected):
    assert definitions(source) == expected


@pytest.mark.parametrize("name", NAMES)
def test_parameters_cell_and_no_definitions(name):
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert nb.cells[0].cell_type == "markdown", "each notebook opens by saying what it does"
    for cell in code:
        defined = definitions(cell.source)
        assert not defined, f"{name}: define {defined} in workbench/, not in a notebook cell"


def parameter_defaults(name: str) -> dict:
    return {k: ast.literal_eval(v["default"]) for k, v in notebook_parameters(NOTEBOOKS / f"{name}.ipynb").items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_defaults_are_the_config_defaults(name):
    """One source for each default: a notebook parameter named after a config field has that field's default."""
    defaults = parameter_defaults(name)
    configs, may_omit = CONFIGS[name]
    checked = set()
    for config in configs:
        for field, info in config.model_fields.items():
            if field in defaults:
                assert defaults[field] == info.get_default(call_default_factory=True), (
                    f"{name}: parameter {field} = {defaults[field]!r}, but {config.__name__}.{field} defaults to "
                    f"{info.get_default(call_default_factory=True)!r}")
                checked.add(field)
            elif may_omit is not None:
                assert field in may_omit, f"{name}: {config.__name__}.{field} has no parameter"
    assert checked, f"{name}: no parameter maps onto {[c.__name__ for c in configs]}"


def test_dict_parameters_default_to_the_configs_defaults():
    """`features` and `explain_settings` hold only what a user changes: empty by default."""
    assert parameter_defaults("01_cohort")["features"] == {}
    assert parameter_defaults("02_train")["features"] == {}
    assert parameter_defaults("03_explain")["explain_settings"] == {}


def test_notebooks_default_to_the_same_task_and_data():
    assert {parameter_defaults(n)["task"] for n in NAMES} == {"pbc_mortality"}
    assert parameter_defaults("01_cohort")["data"] == parameter_defaults("02_train")["data"] == "pbc"
