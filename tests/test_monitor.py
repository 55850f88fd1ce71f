"""Rerun monitoring: PSI on known distributions, then two real scheduled reruns with shifted data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import pipeline_project
from workbench import monitor, schedule, tracking
from workbench.cli import app


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    before, again = rng.normal(size=5000), rng.normal(size=5000)
    assert monitor.psi(before, again) < 0.02
    assert monitor.psi(before, rng.normal(loc=1.0, size=5000)) > monitor.PSI_DRIFT
    assert monitor.psi(before, before) == pytest.approx(0.0, abs=1e-12)


def test_psi_bins_discrete_values_one_by_one_and_survives_empty_bins():
    rng = np.random.default_rng(1)
    rare, common = (rng.random(4000) < 0.05).astype(float), (rng.random(4000) < 0.30).astype(float)
    # Deciles of a 5% flag are all 0: without a bin per distinct value this shift would be invisible.
    assert monitor.psi(rare, common) > monitor.PSI_DRIFT
    assert monitor.psi(rare, (rng.random(4000) < 0.05).astype(float)) < 0.02
    constant = np.full(100, 2.0)
    assert np.isfinite(monitor.psi(constant, constant + 5)) and monitor.psi(constant, constant + 5) > 1
    assert monitor.psi([1.0, np.nan, 2.0, 3.0], [1.0, 2.0, 3.0, np.nan]) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(monitor.psi([], [1.0]))


def test_metric_keys_are_mlflow_legal():
    assert monitor.metric_key("LAB//bilirubin/last") == "LAB_bilirubin_last"
    assert monitor.metric_key("static/age_years") == "static_age_years"
    assert monitor.metric_key("DX//I10 (htn)/count") == "DX_I10_htn_count"


# A cohort notebook that reads the "data" of the day (data.json in the project home), builds
# SequenceTensors standardized with its own statistics, as a real cohort step refits them, and
# logs the metrics a training step would.
COHORT_PARAMS = "output_dir = 'scratch'\nmlflow_run_id = None\n"
COHORT_CELL = """\
import json
import mlflow
import numpy as np
from workbench.features import FeatureSpec, SequenceTensors

data = json.load(open("data.json"))
rng = np.random.default_rng(data["seed"])
n, t = 400, 5
names = ["LAB//a/last", "LAB//b/last", "LAB//c/last", "step/observed"]
raw = rng.normal(size=(n, t, 4))
raw[..., 1] += data["shift"]
raw[..., 3] = 1.0
observed = np.ones((n, t), dtype=bool)
observed[::2, 0] = False  # left padding: half the samples have one step less
mean = list(raw[observed].mean(axis=0)[:3]) + [0.0]
std = list(raw[observed].std(axis=0)[:3]) + [1.0]
X = ((raw - np.array(mean)) / np.array(std)).astype(np.float32)
X[~observed] = 0.0
y = (rng.random(n) < data["prevalence"]).astype(np.float32)
spec = FeatureSpec(numeric_codes=["LAB//a", "LAB//b", "LAB//c"], feature_names=names, median=[0.0] * 4, mean=mean, std=std)
stamp = np.datetime64("2024-01-01T00:00:00", "us")
SequenceTensors(
    X=X, y=y, subject_id=np.arange(n), prediction_time=np.full(n, stamp), step_end_time=np.full((n, t), stamp),
    observed=observed, split=np.array(["train", "held_out"] * (n // 2)), feature_names=names, spec=spec,
).save(f"{output_dir}/tensors")
with mlflow.start_run(run_id=mlflow_run_id):
    mlflow.log_metrics({"held_out_auroc": data["auroc"], "held_out_ece": data["ece"],
                        "cohort_labels": float(n), "cohort_prevalence": float(y.mean())})
"""
PIPELINE = """\
name: drift
steps:
  cohort: {notebook: ../nb/cohort.ipynb}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    return pipeline_project(tmp_path, monkeypatch, {"cohort.ipynb": (COHORT_PARAMS, [COHORT_CELL])}, "drift", PIPELINE)


@pytest.mark.slow
def test_scheduled_rerun_on_shifted_data_logs_drift_and_flags_auroc_drop(project):
    """Two real scheduled reruns (two child processes and kernels, 20-80 s by load): only the shifted feature drifts."""
    home = project.parent.parent
    schedule.add_schedule(project, "0 3 1 1 *", name="yearly")
    (home / "data.json").write_text(json.dumps({"seed": 1, "shift": 0.0, "prevalence": 0.2, "auroc": 0.80, "ece": 0.03}))
    assert schedule.run_scheduled(str(project), {}, "yearly") == "finished"
    (home / "data.json").write_text(json.dumps({"seed": 2, "shift": 1.0, "prevalence": 0.4, "auroc": 0.70, "ece": 0.08}))
    assert schedule.run_scheduled(str(project), {}, "yearly") == "finished"

    first, second = schedule.history("yearly")
    tracking.setup()
    client = MlflowClient()
    assert not any(k.startswith("monitor.") for k in client.get_run(first.parent_run_id).data.metrics), "nothing to compare with"
    rerun = client.get_run(second.parent_run_id)
    metrics = rerun.data.metrics
    assert rerun.data.tags["workbench.monitor.previous_run_id"] == first.parent_run_id
    assert metrics["monitor.psi.LAB_b_last"] > monitor.PSI_DRIFT, metrics
    for other in ("LAB_a_last", "LAB_c_last", "step_observed"):
        assert metrics[f"monitor.psi.{other}"] < 0.1, (other, metrics)
    assert metrics["monitor.psi_max"] == metrics["monitor.psi.LAB_b_last"]
    assert metrics["monitor.auroc_change"] == pytest.approx(-0.10)
    assert metrics["monitor.ece_change"] == pytest.approx(0.05)
    assert metrics["monitor.n_labels_change"] == 0.0
    assert 0.1 < metrics["monitor.prevalence_change"] < 0.3
    assert second.auroc_change == pytest.approx(-0.10)

    assert [s.auroc_dropped for s in schedule.list_schedules(auroc_drop=0.05)] == [True]
    assert [s.auroc_dropped for s in schedule.list_schedules(auroc_drop=0.2)] == [False]
    out = CliRunner().invoke(app, ["schedule", "list", "--auroc-drop", "0.05"])
    assert out.exit_code == 0 and "AUROC fell > 0.05" in out.output
    out = CliRunner().invoke(app, ["schedule", "list", "--auroc-drop", "0.2"])
    assert out.exit_code == 0 and "AUROC fell" not in out.output

    # Explicit tensor directories override the ones found in the runs: the same tensors twice, no drift.
    run_dir = home / "runs" / "drift" / rerun.data.tags["workbench.pipeline_run_id"]
    same = run_dir / "cohort" / "tensors"
    out = monitor.compare_runs(first.parent_run_id, second.parent_run_id, tensors=(same, same))
    assert out["monitor.auroc_change"] == pytest.approx(-0.10) and out["monitor.psi_max"] == pytest.approx(0.0, abs=1e-12)
