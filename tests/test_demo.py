"""The main job end to end: `workbench demo` runs the pbc_mortality pipeline on the bundled data in
a real kernel with a real MLflow store; everything is checked through the MLflow client."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_pipeline(tmp_path):
    env = {**os.environ, "WORKBENCH_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "demo", "-p", "epochs=6", "-p", "n_explain=60"],
        capture_output=True, text=True, env=env, timeout=1500, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "champion model" in proc.stdout and "workbench ui" in proc.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pbc_mortality")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert all(r.info.status == "FINISHED" for r in children)
    models = {r.data.tags.get("workbench.model"): r for r in children if "workbench.model" in r.data.tags}
    assert {"lstm", "gru", "rnn", "logistic", "mayo"} <= set(models)
    for kind, run in models.items():
        assert 0.5 < run.data.metrics["held_out_auroc"] <= 1.0, kind
        assert run.data.metrics["held_out_auroc_ci_low"] <= run.data.metrics["held_out_auroc"]
        notebook = {a.path for a in client.list_artifacts(run.info.run_id, "notebook")}
        assert any(p.endswith(".ipynb") for p in notebook) and any(p.endswith(".html") for p in notebook), kind
    explained = [r for r in models.values() if "explain_additivity_mean_rel_error" in r.data.metrics]
    assert len(explained) == 1 and explained[0].data.tags["workbench.model"] in ("lstm", "gru", "rnn")
    artifacts = {a.path for a in client.list_artifacts(explained[0].info.run_id, "explanations")}
    assert "explanations/explanations.parquet" in artifacts
    champion = client.get_model_version_by_alias("pbc_mortality", "champion")
    assert champion.run_id in {r.info.run_id for r in models.values()}
    steps = {r.data.tags.get("workbench.step") for r in children}
    assert {"cohort", "train", "explain", "compare"} <= steps
    run_dirs = list((tmp_path / "runs" / "pbc_mortality").glob("*/explain.html"))
    assert run_dirs, "executed notebooks are kept under runs/<pipeline>/<timestamp>-<id>/"
