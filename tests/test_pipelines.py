"""Pipelines: real notebooks in a real Jupyter kernel, logged to a real MLflow SQLite store.

Kernel starts are slow on shared cores, so one scenario test walks the whole life of a
pipeline (fail, fix, rerun from cache, force, -p on a matrix key); the validation tests
never start a kernel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import nbformat
import pytest
from conftest import pipeline_project, write_notebook
from mlflow.tracking import MlflowClient
from nbformat.v4 import new_code_cell, new_notebook
from typer.testing import CliRunner

from workbench import tracking
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.pipelines import (
    KERNEL_NAME,
    cache_key,
    ensure_kernelspec,
    load_pipeline,
    parse_overrides,
    run_pipeline,
)

PREP_PARAMS = 'model = "x"\noutput_dir = "scratch"\nmlflow_run_id = None\n'
PREP_CELLS = [
    'import pathlib\nimport mlflow\npathlib.Path(output_dir, "model.txt").write_text(model)',
    "with mlflow.start_run(run_id=mlflow_run_id):\n    mlflow.log_metric('score', len(model))",
]
REPORT_PARAMS = "upstream = {}\noutput_dir = 'scratch'\nmlflow_run_id = None\nmlflow_parent_run_id = None\ntitle = 'r'\n"
REPORT_PLOT = (
    "import json, pathlib\n"
    "import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\n"
    "pathlib.Path(output_dir, 'upstream.json').write_text(json.dumps({'upstream': upstream, 'parent': mlflow_parent_run_id}))\n"
    "plt.plot([0, 1], [0, 1])\nplt.show()"
)
REPORT_BUG = "raise ValueError('boom: ' + title)"
REPORT_FIXED = "print('report done: ' + title)"


PIPELINE = """\
name: demo
experiment: demo-exp
params:
  title: first
steps:
  prep:
    notebook: nb/prep.ipynb
    matrix: {model: [ab, cde]}
  report:
    notebook: nb/report.ipynb
    needs: [prep]
    params: {title: "${title}"}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project home with its own MLflow store, two notebooks and a pipeline YAML."""
    notebooks = {"prep.ipynb": (PREP_PARAMS, PREP_CELLS), "report.ipynb": (REPORT_PARAMS, [REPORT_PLOT, REPORT_BUG])}
    return pipeline_project(tmp_path, monkeypatch, notebooks, "demo", PIPELINE.replace("nb/", "../nb/"))


def runs_by_label(client: MlflowClient, parent_run_id: str) -> dict[str, mlflow.entities.Run]:
    exp = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.info.run_name: r for r in children}


@pytest.mark.slow
def test_failure_keeps_notebook_fails_runs_and_rerun_skips_succeeded_steps(project):
    home = project.parent.parent
    # 1. The report notebook raises: exit 1, the step, cell and error printed.
    out = CliRunner().invoke(app, ["run", str(project)])
    assert out.exit_code == 1, out.output
    assert "step report, cell" in out.output and "ValueError: boom: first" in out.output

    manifest = json.loads(next((home / "runs" / "demo").glob("*/run.json")).read_text())
    assert not manifest["ok"]
    failed = next(e for e in manifest["executions"] if e["status"] == "failed")
    kept = nbformat.read(failed["notebook"], as_version=4)
    errors = [o for c in kept.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors and errors[0]["ename"] == "ValueError", "the failed notebook keeps the error"
    assert not list(Path(failed["notebook"]).parent.glob("*.partial.ipynb"))

    tracking.setup()
    client = MlflowClient()
    parent = client.get_run(manifest["parent_run_id"])
    assert parent.info.status == "FAILED"
    assert parent.data.tags["workbench.pipeline_run_id"] == manifest["pipeline_run_id"]
    children = runs_by_label(client, parent.info.run_id)
    assert {k: r.info.status for k, r in children.items()} == {
        "prep-model=ab": "FINISHED", "prep-model=cde": "FINISHED", "report": "FAILED",
    }
    assert children["prep-model=cde"].data.metrics["score"] == 3.0, "the notebook logged into its child run"
    assert children["prep-model=cde"].data.params["model"] == "cde"
    assert children["prep-model=cde"].data.tags["workbench.matrix.model"] == "cde"
    assert "ValueError" in children["report"].data.tags["workbench.error"]
    logged = {a.path for a in client.list_artifacts(children["report"].info.run_id, "notebook")}
    assert logged == {"notebook/report.ipynb", "notebook/report.html"}
    html = Path(tracking.download_artifact(children["report"].info.run_id, "notebook/report.html")).read_text()
    assert "data:image/png;base64" in html, "the HTML rendering embeds the notebook's plot"
    assert len(list((home / "runs" / "demo" / ".cache").glob("*.json"))) == 2, "no cache record for a failure"

    # 2. Fix the notebook: the two prep executions are reused, only the report runs.
    write_notebook(home / "nb" / "report.ipynb", REPORT_PARAMS, [REPORT_PLOT, REPORT_FIXED])
    second = run_pipeline(project)
    assert second.ok
    assert [(r.label, r.status) for r in second.executions] == [
        ("prep-model=ab", "cached"), ("prep-model=cde", "cached"), ("report", "finished"),
    ]
    assert {r.run_id for r in second.step("prep")} == {children["prep-model=ab"].info.run_id, children["prep-model=cde"].info.run_id}
    report_out = json.loads((second.step("report")[0].output_dir / "upstream.json").read_text())
    assert report_out["parent"] == second.parent_run_id
    assert sorted(report_out["upstream"]["prep"]) == sorted(str(r.output_dir) for r in second.step("prep"))
    assert all(Path(d, "model.txt").is_file() for d in report_out["upstream"]["prep"])
    assert client.get_run(second.parent_run_id).info.status == "FINISHED"
    assert set(runs_by_label(client, second.parent_run_id)) == {"report"}, "cached steps make no child run"
    assert client.get_run(second.parent_run_id).data.tags["workbench.cached.prep-model:ab"] == children["prep-model=ab"].info.run_id

    # 3. --force with -p on the matrix key: only the ab child (rerun) and the report (its upstream changed).
    third = run_pipeline(project, {"model": "ab"}, force=True)
    assert [(r.label, r.status) for r in third.executions] == [("prep-model=ab", "finished"), ("report", "finished")]
    assert third.step("prep")[0].run_id != children["prep-model=ab"].info.run_id

    # 4. Back to the full matrix: the rerun ab wrote identical output, so everything is cached;
    #    a changed pipeline param reaches the report's params and reruns only the report.
    assert {r.status for r in run_pipeline(project).executions} == {"cached"}
    fourth = run_pipeline(project, parse_overrides(["title=second"]))
    assert [r.status for r in fourth.executions] == ["cached", "cached", "finished"]
    assert client.get_run(fourth.step("report")[0].run_id).data.params["title"] == "second"


def invalid_cases():
    base = PIPELINE
    return {
        "unknown step": (base.replace("needs: [prep]", "needs: [prep, cohort]"), 11, "unknown step 'cohort'"),
        "cycle": (base.replace("matrix: {model: [ab, cde]}", "matrix: {model: [ab, cde]}\n    needs: [report]"), 9, "cycle"),
        "unknown param": (base.replace("{title: \"${title}\"}", "{title: x, epochs: 3}"), 12, "unknown parameter 'epochs'"),
        "missing notebook": (base.replace("nb/report.ipynb", "nb/nope.ipynb"), 10, "notebook not found"),
        "injected param": (base.replace("{title: \"${title}\"}", "{output_dir: /tmp}"), 12, "set by the engine"),
        "unknown reference": (base.replace("${title}", "${titel}"), 12, "unknown pipeline parameter ${titel}"),
        "unknown key": (base.replace("    needs: [prep]", "    need: [prep]"), 11, "Extra inputs are not permitted"),
        "duplicate step": (base + "  prep:\n    notebook: nb/prep.ipynb\n", 13, "duplicate key 'prep'"),
        "bad yaml": (base.replace("matrix: {model: [ab, cde]}", "matrix: {model: [ab, cde]"), 9, "invalid YAML"),
    }


@pytest.mark.parametrize("case", list(invalid_cases()))
def test_invalid_pipeline_refused_before_anything_runs(project, case):
    text, line, message = invalid_cases()[case]
    project.write_text(text.replace("nb/", "../nb/"))
    with pytest.raises(WorkbenchError) as err:
        run_pipeline(project)
    assert f"{project}:{line}:" in str(err.value), str(err.value)
    assert message in str(err.value)
    home = project.parent.parent
    assert not (home / "runs").exists() and not (home / "mlflow.db").exists(), "nothing ran, nothing was created"


def test_unknown_override_refused_and_cli_exits_2(project):
    with pytest.raises(WorkbenchError, match="-p epochs: unknown parameter"):
        load_pipeline(project, {"epochs": 3})
    out = CliRunner().invoke(app, ["run", str(project), "-p", "epochs=3"])
    assert out.exit_code == 2 and "unknown parameter" in out.output
    assert not (project.parent.parent / "runs").exists()


def test_overrides_resolve_into_step_params_and_matrix(project):
    assert parse_overrides(["n=3", "x=0.5", "flag=true", "s=abc"]) == {"n": 3, "x": 0.5, "flag": True, "s": "abc"}
    with pytest.raises(WorkbenchError, match="expected key=value"):
        parse_overrides(["epochs"])
    # a whole ${ref} keeps its type, so an int reaches a parameter whose default is a string: refused up front
    with pytest.raises(WorkbenchError, match=r"demo.yaml: step report: parameter title: expected a string like its "
                       r"default 'r' in report.ipynb \(got 7\)"):
        load_pipeline(project, {"title": 7})
    pipeline = load_pipeline(project, {"title": "seven", "model": "zz"})
    assert [e.label for e in pipeline.executions] == ["prep-model=zz", "report"]
    assert pipeline.steps["report"].executions[0].params == {"title": "seven"}
    assert pipeline.steps["report"].ancestors == ("prep",)
    assert set(pipeline.steps["prep"].executions[0].injectable) == {"output_dir", "mlflow_run_id"}


def test_cache_key_follows_notebook_params_and_upstream(project, tmp_path):
    pipeline = load_pipeline(project)
    prep, report = pipeline.steps["prep"].executions[0], pipeline.steps["report"].executions[0]
    assert cache_key(prep, {}) == cache_key(prep, {})
    assert cache_key(prep, {}) != cache_key(pipeline.steps["prep"].executions[1], {}), "params are in the key"
    upstream_dir = tmp_path / "up"
    upstream_dir.mkdir()
    (upstream_dir / "a.txt").write_text("1")
    from workbench.pipelines import ExecutionResult

    upstream = {"prep": [ExecutionResult("prep", "prep", "finished", "r", upstream_dir, "k")]}
    before = cache_key(report, upstream)
    (upstream_dir / "a.txt").write_text("2")
    assert cache_key(report, upstream) != before, "upstream output contents are in the key"
    key = cache_key(prep, {})
    write_notebook(prep.notebook, PREP_PARAMS, PREP_CELLS + ["print(1)"])
    assert cache_key(prep, {}) != key, "notebook bytes are in the key"


def test_cache_key_follows_data_behind_a_path_parameter(project, tmp_path):
    """New data at the same path is a cache miss (a scheduled rerun on a refreshed dataset)."""
    import dataclasses

    from workbench.files import path_fingerprint

    data = tmp_path / "dataset"
    (data / "data").mkdir(parents=True)
    (data / "data" / "0.parquet").write_bytes(b"old")
    prep = load_pipeline(project).steps["prep"].executions[0]
    with_data = dataclasses.replace(prep, params={**prep.params, "data": str(data)})
    before = cache_key(with_data, {})
    assert cache_key(with_data, {}) == before
    (data / "data" / "1.parquet").write_bytes(b"new shard")
    assert cache_key(with_data, {}) != before
    assert path_fingerprint("not a path") is None and path_fingerprint(7) is None


def test_kernelspec_runs_this_environment():
    from jupyter_client.kernelspec import KernelSpecManager

    assert ensure_kernelspec() == KERNEL_NAME
    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable


def test_parameters_with_union_annotations_are_declared(tmp_path):
    from workbench.pipelines import notebook_parameters

    path = write_notebook(tmp_path / "t.ipynb", "mlflow_run_id: str | None = None\nepochs: int = 3  # help\n", [])
    assert set(notebook_parameters(path)) == {"mlflow_run_id", "epochs"}


def test_parameters_of_a_notebook_without_kernel_metadata(tmp_path):
    from workbench.pipelines import notebook_parameters

    nb = new_notebook(cells=[new_code_cell("epochs = 3\n", metadata={"tags": ["parameters"]}), new_code_cell("x = 1")])
    nbformat.write(nb, str(tmp_path / "bare.ipynb"))
    assert set(notebook_parameters(tmp_path / "bare.ipynb")) == {"epochs"}
