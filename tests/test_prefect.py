"""The Prefect engine: same pipeline, same MLflow record, Prefect scheduling the executions.

Runs against a temporary local Prefect server (``prefect_test_harness``) and real kernels.
:func:`mlflow_structure` is what must not depend on the engine: parent and child runs, their
status, params, workbench tags, metrics and notebook artifacts. ``test_pbc_mortality_*`` points
the same comparison at the real ``pipelines/pbc_mortality.yaml`` once it exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import pipeline_project, write_notebook
from test_pipelines import PIPELINE, PREP_CELLS, PREP_PARAMS, REPORT_FIXED, REPORT_PARAMS, REPORT_PLOT, runs_by_label
from workbench import tracking
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.pipelines import PipelineResult, load_pipeline, run_pipeline

REPO = Path(__file__).resolve().parents[1]
PBC_PIPELINE = REPO / "pipelines" / "pbc_mortality.yaml"
#: Overrides for the pbc comparison: every sweep value still runs, each briefly (two full sweeps
#: at the YAML's 40 epochs took 12 minutes on two busy cores).
PBC_OVERRIDES: dict = {"epochs": 2, "n_explain": 50}
#: Tags that name one particular pipeline run, or depend on the order in which parallel matrix
#: children reached the model registry (version numbers, "beat the champion at the time").
PER_RUN_TAGS = {"workbench.pipeline_run_id", "workbench.error", "workbench.registered_version", "workbench.champion",
                "workbench.owner"}


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """A project home with its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary local Prefect server and database (Prefect's own harness), shared by this module's tests."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the server must not phone home
        with prefect_test_harness(server_startup_timeout=120):
            yield


def mlflow_structure(parent_run_id: str, metric_values: bool = True) -> dict:
    """What a pipeline run left in MLflow, minus what names that particular run."""
    client = MlflowClient()

    def describe(run: mlflow.entities.Run) -> dict:
        tags = {k: v for k, v in run.data.tags.items() if k.startswith("workbench.") and k not in PER_RUN_TAGS}
        metrics = run.data.metrics if metric_values else sorted(run.data.metrics)
        artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "notebook"))
        return {"status": run.info.status, "params": run.data.params, "tags": tags, "metrics": metrics, "artifacts": artifacts}

    parent = describe(client.get_run(parent_run_id))
    children = {label: describe(run) for label, run in runs_by_label(client, parent_run_id).items()}
    # Where the registry's champion alias ended up: which execution's model won, not its version number.
    champions = {}
    for model in client.search_registered_models():
        if "champion" in model.aliases:
            version = client.get_model_version(model.name, model.aliases["champion"])
            champions[model.name] = client.get_run(version.run_id).info.run_name
    return {"parent": parent, "children": children, "champions": champions}


#: How a pipeline can run: the local engine one step at a time, the local engine with two
#: kernels at once, and Prefect (matrix children in parallel). The MLflow record must not differ.
ENGINES = {"sequential": {"engine": "local", "workers": 1}, "parallel": {"engine": "local", "workers": 2},
           "prefect": {"engine": "prefect"}}


def compare_engines(
    yaml_path: Path, overrides: dict, root: Path, monkeypatch, metric_values: bool = True, engines=tuple(ENGINES),
) -> dict[str, PipelineResult]:
    """Run the pipeline each way, each in a fresh project home and MLflow store under ``root``, and compare the stores."""
    results, structures = {}, {}
    for name in engines:
        home = root / name
        home.mkdir(exist_ok=True)
        monkeypatch.chdir(home)
        monkeypatch.setenv("WORKBENCH_HOME", str(home))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        results[name] = run_pipeline(yaml_path, overrides, **ENGINES[name])
        assert results[name].ok, results[name].failure
        tracking.setup()
        structures[name] = mlflow_structure(results[name].parent_run_id, metric_values)
    first, *others = engines
    for name in others:
        assert [(r.label, r.status) for r in results[name].executions] == [(r.label, r.status) for r in results[first].executions]
        assert structures[name] == structures[first], f"{name} and {first} runs differ in MLflow"
    assert len(structures[first]["children"]) == len(load_pipeline(yaml_path, overrides).executions)
    return results


def overlapped(home: Path, results: list) -> bool:
    """Whether the MLflow runs of these executions (in the store under ``home``) ran side by side."""
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    a, b = (client.get_run(r.run_id).info for r in results)
    return max(a.start_time, b.start_time) < min(a.end_time, b.end_time)


def eventually(check, timeout: float = 30.0):
    """Retry ``check`` until it passes: Prefect 3 reports task run states as events that the
    server stores a moment after the flow returns."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def prefect_runs() -> tuple[list, dict[str, list]]:
    """Flow runs started directly (not by a deployment's schedule), newest first, and their task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    direct = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(is_null_=True))
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(flow_run_filter=direct, sort=FlowRunSort.START_TIME_DESC)
        tasks = {
            str(fr.id): client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
            for fr in flow_runs
        }
    return flow_runs, tasks


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """The pipeline of test_pipelines (a matrix step and a step that needs it), all notebooks working."""
    notebooks = {"prep.ipynb": (PREP_PARAMS, PREP_CELLS), "report.ipynb": (REPORT_PARAMS, [REPORT_PLOT, REPORT_FIXED])}
    return pipeline_project(tmp_path, monkeypatch, notebooks, "demo", PIPELINE.replace("nb/", "../nb/"))


@pytest.mark.slow
def test_prefect_flow_logs_like_local_engine_runs_matrix_in_parallel_and_stops_on_failure(demo, prefect_server, monkeypatch):
    # 1. One step at a time, two at once, and Prefect: the same MLflow record (parent, a child per
    #    matrix value, params, tags, metric values, artifacts).
    home = demo.parent.parent
    results = compare_engines(demo, {}, home, monkeypatch)
    client = MlflowClient()  # the last store: prefect's
    prefect = results["prefect"]
    assert overlapped(home / "parallel", results["parallel"].step("prep")), "two workers: matrix children side by side"
    assert not overlapped(home / "sequential", results["sequential"].step("prep")), "one worker: one after the other"
    assert overlapped(home / "prefect", prefect.step("prep")), "matrix children ran side by side"
    manifest = json.loads((prefect.run_dir / "run.json").read_text())
    assert manifest["engine"] == "prefect" and manifest["parent_run_id"] == prefect.parent_run_id

    def one_flow_run_three_task_runs():
        flow_runs, tasks = prefect_runs()
        assert [(fr.name, fr.state_type.value) for fr in flow_runs] == [("demo", "COMPLETED")]
        assert sorted((t.name, t.state_type.value) for t in tasks[str(flow_runs[0].id)]) == [
            ("prep-model=ab", "COMPLETED"), ("prep-model=cde", "COMPLETED"), ("report", "COMPLETED"),
        ]

    eventually(one_flow_run_three_task_runs)

    # 2. Through the CLI, unchanged inputs: the shared cache answers, no child run is made.
    out = CliRunner().invoke(app, ["run", str(demo), "--engine", "prefect"])
    assert out.exit_code == 0, out.output
    cached = json.loads(max(home.glob("prefect/runs/demo/*/run.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert [e["status"] for e in cached["executions"]] == ["cached"] * 3
    assert runs_by_label(client, cached["parent_run_id"]) == {}

    # 3. One matrix child fails: its sibling finishes, the step that needs them never starts.
    write_notebook(home / "nb" / "prep.ipynb", PREP_PARAMS, PREP_CELLS + ["assert model != 'cde', 'no cde'"])
    failed = run_pipeline(demo, engine="prefect")
    assert [(r.label, r.status) for r in failed.executions] == [("prep-model=ab", "finished"), ("prep-model=cde", "failed")]
    assert "AssertionError: no cde" in failed.failure.error
    assert client.get_run(failed.parent_run_id).info.status == "FAILED"
    assert set(runs_by_label(client, failed.parent_run_id)) == {"prep-model=ab", "prep-model=cde"}
    def flow_run_and_child_failed():
        flow_runs, tasks = prefect_runs()
        assert flow_runs[0].state_type.value == "FAILED"
        states = {t.name: t.state_type.value for t in tasks[str(flow_runs[0].id)]}
        assert states.get("prep-model=ab") == "COMPLETED" and states.get("prep-model=cde") == "FAILED"
        assert states.get("report") != "COMPLETED"

    eventually(flow_run_and_child_failed)

    # 4. The same failure on the local engine with two workers: the same outcome and record.
    local = run_pipeline(demo, engine="local", workers=2, force=True)
    assert [(r.label, r.status) for r in local.executions] == [("prep-model=ab", "finished"), ("prep-model=cde", "failed")]
    assert "AssertionError: no cde" in local.failure.error
    assert client.get_run(local.parent_run_id).info.status == "FAILED"
    assert set(runs_by_label(client, local.parent_run_id)) == {"prep-model=ab", "prep-model=cde"}


@pytest.mark.slow
def test_deployment_puts_the_pipeline_on_prefects_schedule(demo, prefect_server):
    from prefect.client.orchestration import get_client

    from workbench.pipelines.prefect_engine import FLOW_NAME, deployment

    pipeline = load_pipeline(demo, {"title": "weekly"})
    deployment_id = deployment(pipeline, "0 2 * * 1").apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
        flow = client.read_flow(stored.flow_id)
    assert (flow.name, stored.name) == (FLOW_NAME, "demo")
    assert [s.schedule.cron for s in stored.schedules] == ["0 2 * * 1"]
    assert stored.parameters == {"path": str(demo), "overrides": {"title": "weekly"}, "force": True}
    assert stored.entrypoint.endswith("pipelines/prefect_engine.py:pipeline_flow"), "workers import the flow, not a copy"
    with pytest.raises(WorkbenchError, match="not a valid cron"):
        deployment(pipeline, "every monday")

    # The work-pool variant, through the CLI: workers import the installed flow by module path.
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="workbench", type="process"))
    out = CliRunner().invoke(app, ["deploy", str(demo), "--cron", "0 3 * * *", "--pool", "workbench", "--name", "nightly"])
    assert out.exit_code == 0, out.output
    with get_client(sync_client=True) as client:
        pooled = client.read_deployment_by_name(f"{FLOW_NAME}/nightly")
    assert (pooled.work_pool_name, pooled.entrypoint) == ("workbench", "workbench.pipelines.prefect_engine.pipeline_flow")
    assert [s.schedule.cron for s in pooled.schedules] == ["0 3 * * *"]


@pytest.mark.slow
def test_pbc_mortality_sweep_logs_the_same_runs_under_prefect(isolated_home, prefect_server, monkeypatch):
    # Timings (seconds, train_seconds) differ between any two runs: compare which metrics, not values.
    # The real sweep one step at a time against Prefect's parallel run.
    compare_engines(PBC_PIPELINE, PBC_OVERRIDES, isolated_home, monkeypatch, metric_values=False,
                    engines=("sequential", "prefect"))
