"""Issue 4 end to end on the bundled PBC task: train, evaluate, log to a real MLflow SQLite store,
read everything back through the MLflow client, promote a champion, score with `workbench predict`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from workbench import record, tracking
from workbench.data.datasets import load
from workbench.experiment import run_model
from workbench.features import FeatureConfig, fit_transform
from workbench.models import ModelConfig
from workbench.tasks import make_labels
from workbench.training import TrainConfig

pytestmark = pytest.mark.slow
TASK = "pbc_mortality"


@pytest.fixture(scope="module")
def pbc_runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    old = {k: os.environ.get(k) for k in ("WORKBENCH_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["WORKBENCH_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = load("pbc")
    labels = make_labels(root, TASK)
    _, tensors = fit_transform(root, labels.labels, FeatureConfig(bin_width="90d", n_steps=16))
    train = TrainConfig(epochs=4, patience=4, progress=False, seed=1)
    runs = {
        kind: run_model(kind, tensors, task=TASK, model_config=ModelConfig(units=16), train_config=train,
                        cohort_report=labels.report, data_root=str(root))
        for kind in ("lstm", "gru", "rnn", "logistic", "gbt", "mayo")
    }
    yield home, root, tensors, runs
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_runs_read_back_through_the_client(pbc_runs):
    home, _, tensors, runs = pbc_runs
    assert tracking.tracking_uri() == f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(TASK)
    assert exp.artifact_location.startswith((home / "mlruns" / "artifacts").as_uri())
    for kind, model_run in runs.items():
        run = client.get_run(model_run.run_id)
        assert run.info.status == "FINISHED" and run.info.experiment_id == exp.experiment_id
        assert run.data.tags["workbench.model"] == kind and run.data.tags["workbench.task"] == TASK
        assert run.data.tags["mlflow.source.git.commit"]
        assert run.data.params["model_kind"] == kind
        assert run.data.params["config.features.bin_width"] == "90d"
        metrics = run.data.metrics
        for name in ("auroc", "auprc", "brier", "ece", "sensitivity", "specificity", "ppv", "npv"):
            low, value, high = (metrics[f"held_out_{name}{s}"] for s in ("_ci_low", "", "_ci_high"))
            assert low <= value <= high, (kind, name)
        assert metrics["held_out_auroc"] == pytest.approx(model_run.evaluation.metrics["auroc"]["value"])
        assert metrics["cohort_labels"] == tensors.X.shape[0]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"plots", "feature_spec.json", "cohort", "evaluation", "predictions"} <= artifacts, artifacts
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/roc.png", "plots/pr.png", "plots/calibration.png"} <= plots
        dataset = run.inputs.dataset_inputs[0].dataset
        assert dataset.digest == tensors.spec.fitted_on.data_fingerprint[:40]
        if kind in ("lstm", "gru", "rnn"):
            assert run.data.params["config.model.kind"] == kind
            history = client.get_metric_history(run.info.run_id, "tune_auroc")
            assert [m.step for m in history] == list(range(1, len(history) + 1)) and len(history) >= 2
            assert "plots/training_curves.png" in plots
        assert model_run.registry is not None
        assert client.get_logged_model(run.outputs.model_outputs[0].model_id).name == "model"
        for metric in ("calibration_slope", "calibration_intercept"):
            assert metrics[f"held_out_{metric}_ci_low"] <= metrics[f"held_out_{metric}"] <= metrics[f"held_out_{metric}_ci_high"]
        assert {"evaluation/thresholds.csv", "evaluation/decision_curve.csv"} <= {
            a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}


def test_every_kind_scores_raw_events_like_its_logged_held_out_predictions(pbc_runs):
    """The pyfunc of each kind (sequence, tabular references, Mayo), loaded the standard way, gives the
    risks the run evaluated: the calibrated ones (the recalibration travels with the model)."""
    import mlflow

    home, root, tensors, runs = pbc_runs
    held = tensors.by_split("held_out")
    times = pl.DataFrame({"subject_id": held.subject_id, "prediction_time": held.prediction_time})
    events = pl.concat([pl.read_parquet(root / "data" / "*.parquet"), times], how="diagonal_relaxed")  # request rows
    for kind, model_run in runs.items():
        model = mlflow.pyfunc.load_model(f"runs:/{model_run.run_id}/model")
        scored = pl.from_pandas(model.predict(events.to_pandas())).sort("subject_id", "prediction_time")
        expected = pl.DataFrame({"subject_id": held.subject_id, "prediction_time": held.prediction_time,
                                 "risk": model_run.risk}).sort("subject_id", "prediction_time")
        assert scored.height == expected.height, kind
        np.testing.assert_allclose(scored["risk"].to_numpy(), expected["risk"].to_numpy(), rtol=2e-5, atol=1e-6, err_msg=kind)


def test_champion_is_the_best_registered_version(pbc_runs):
    _, _, _, runs = pbc_runs
    client = MlflowClient(tracking.tracking_uri())
    versions = client.search_model_versions(f"name='{TASK}'")
    assert len(versions) == 6  # every kind is registered, references included
    by_auroc = {float(v.tags[record.AUROC_TAG]): int(v.version) for v in versions}  # tuning AUROC
    champion = client.get_model_version_by_alias(TASK, record.CHAMPION)
    assert int(champion.version) == by_auroc[max(by_auroc)]
    # A new version that does not beat the champion leaves the alias where it is ...
    worse = tracking.register_and_maybe_promote(f"runs:/{runs['gru'].run_id}/model", TASK, min(by_auroc) - 0.01)
    assert not worse["promoted"]
    assert int(client.get_model_version_by_alias(TASK, record.CHAMPION).version) == int(champion.version)
    # ... and one that beats it takes the alias.
    better = tracking.register_and_maybe_promote(f"runs:/{runs['gru'].run_id}/model", TASK, max(by_auroc) + 0.01)
    assert better["promoted"]
    assert int(client.get_model_version_by_alias(TASK, record.CHAMPION).version) == better["version"]


def test_predict_in_a_new_process_matches_in_process_predictions(pbc_runs, tmp_path):
    home, root, tensors, runs = pbc_runs
    held_out = tensors.by_split("held_out")
    times = tmp_path / "times.parquet"
    pl.DataFrame({"subject_id": held_out.subject_id, "prediction_time": held_out.prediction_time}).write_parquet(times)
    out = tmp_path / "preds.parquet"
    client = MlflowClient(tracking.tracking_uri())
    version = client.get_model_version_by_alias(TASK, record.CHAMPION)
    uri = f"models:/{TASK}/{version.version}"
    expected = next(r for r in runs.values() if r.run_id == version.run_id).risk
    proc = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "predict", "--model", uri, "--data", str(root), "--out", str(out),
         "--times", str(times)],
        capture_output=True, text=True, env={**os.environ, "WORKBENCH_HOME": str(home)}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    preds = pl.read_parquet(out)
    assert preds.columns == ["subject_id", "prediction_time", "risk"]
    assert preds["subject_id"].to_list() == held_out.subject_id.tolist()
    np.testing.assert_allclose(preds["risk"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_predict_without_times_scores_the_tasks_moments_never_at_an_end_of_record(pbc_runs, tmp_path):
    """The default is every visit the task predicts at, before death / end of follow-up / transplant;
    a time given at a death is refused, and the CLI says so with exit 2."""
    from typer.testing import CliRunner

    from workbench.cli import app
    from workbench.experiment import score

    home, root, _, _ = pbc_runs
    uri = f"models:/{TASK}@{record.CHAMPION}"
    preds = score(uri, root)
    events = pl.read_parquet(root / "data")
    ends = (events.filter(pl.col("code").is_in(["MEDS_DEATH", "END_OF_FOLLOWUP", "PBC//TRANSPLANT"]))
            .group_by("subject_id").agg(end=pl.col("time").min()))
    visits = events.filter(pl.col("code") == "VISIT").select("subject_id", pl.col("time").alias("prediction_time")).unique()
    expected = visits.join(ends, on="subject_id", how="left").filter(
        pl.col("end").is_null() | (pl.col("prediction_time") < pl.col("end")))
    assert preds.height == expected.height > 1000  # every visit, not one row per subject at its death
    assert preds.join(ends, on="subject_id").filter(pl.col("prediction_time") >= pl.col("end")).height == 0
    # the moments a task predicts at on new data, the same through the plain-MLflow pyfunc
    import mlflow

    pyfunc = pl.from_pandas(mlflow.pyfunc.load_model(uri).predict(events.filter(pl.col("subject_id") <= 10).to_pandas()))
    assert pyfunc.select("subject_id", "prediction_time").sort("subject_id", "prediction_time").equals(
        preds.filter(pl.col("subject_id") <= 10).select("subject_id", "prediction_time").sort("subject_id", "prediction_time"))
    died = events.filter(pl.col("code") == "MEDS_DEATH").head(1)
    times = tmp_path / "at_death.parquet"
    died.select("subject_id", pl.col("time").alias("prediction_time")).write_parquet(times)
    result = CliRunner().invoke(app, ["predict", "--model", uri, "--data", str(root), "--times", str(times),
                                      "--out", str(tmp_path / "p.parquet")])
    assert result.exit_code == 2, result.output
    assert "at_death.parquet: column 'prediction_time': 1 prediction time(s) at or after" in " ".join(result.output.split())
    assert f"subject_id={died['subject_id'][0]}" in result.output and "MEDS_DEATH" in result.output
    assert not (tmp_path / "p.parquet").exists()
    stranger = tmp_path / "stranger.parquet"
    pl.DataFrame({"subject_id": [10**9], "prediction_time": [died["time"][0]]}).write_parquet(stranger)
    result = CliRunner().invoke(app, ["predict", "--model", uri, "--data", str(root), "--times", str(stranger),
                                      "--out", str(tmp_path / "p.parquet")])
    assert result.exit_code == 2 and f"{stranger}: column 'subject_id'" in " ".join(result.output.split()), result.output


def test_predict_reports_an_unknown_model(pbc_runs, tmp_path):
    home, root, _, _ = pbc_runs
    proc = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "predict", "--model", "models:/nope@champion", "--data", str(root),
         "--out", str(tmp_path / "p.parquet")],
        capture_output=True, text=True, env={**os.environ, "WORKBENCH_HOME": str(home)}, timeout=120,
    )
    assert proc.returncode == 2 and "models:/nope@champion" in proc.stderr + proc.stdout
    assert not (tmp_path / "p.parquet").exists()


def test_pbc_explanations_are_logged_and_read_back(pbc_runs):
    from workbench.explanations import explain_run
    from workbench.explain import ExplainConfig

    _, _, tensors, runs = pbc_runs
    run_id = runs["lstm"].run_id
    result = explain_run(run_id, tensors, ExplainConfig(reference_samples=4, deletion_samples=20, progress=False))
    held_out = tensors.by_split("held_out")
    frame = pl.read_parquet(tracking.download_artifact(run_id, "explanations/explanations.parquet"))
    assert frame.columns[:7] == ["subject_id", "prediction_time", "step", "step_end_time", "feature", "value", "shap"]
    assert frame.select("subject_id", "prediction_time").n_unique() == len(held_out)  # every held-out visit
    assert frame.equals(result.frame)
    assert set(frame["feature"].unique()) == set(tensors.feature_names)
    metrics = MlflowClient(tracking.tracking_uri()).get_run(run_id).data.metrics
    assert metrics["explain_reference_additivity_max_rel_error"] < 1e-6
    assert metrics["explain_additivity_mean_rel_error"] == pytest.approx(result.checks["additivity_mean_rel_error"])
    plots = {a.path for a in MlflowClient(tracking.tracking_uri()).list_artifacts(run_id, "plots")}
    assert "plots/explain_global_importance.png" in plots
    assert any(p.startswith("plots/explain_timeline_subject") for p in plots)
    assert any(p.startswith("plots/explain_heatmap_subject") for p in plots)
    # A model can be explained again with other settings (nothing write-once is in the way).
    again = explain_run(run_id, tensors, ExplainConfig(n_background=8, reference_samples=2, deletion_samples=10,
                                                       progress=False), max_samples=20)
    assert again.frame.select("subject_id", "prediction_time").n_unique() == 20
    logged = json.loads(tracking.download_artifact(run_id, "explanations/config.json").read_text())
    assert logged["n_background"] == 8


def test_explain_reports_an_unknown_run(pbc_runs):
    home, _, _, _ = pbc_runs
    proc = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "explain", "--run", "0123456789abcdef"],
        capture_output=True, text=True, env={**os.environ, "WORKBENCH_HOME": str(home)}, timeout=120,
    )
    assert proc.returncode == 2 and "run 0123456789abcdef: not found" in proc.stderr + proc.stdout


def test_nothing_leaves_the_machine_mlflow_telemetry_is_off():
    """MLflow 3 reports usage to mlflow-telemetry.io unless told not to; importing workbench tells it
    (for this process and the kernels, servers and models it starts). Checked against a plain
    process, so the check cannot pass because of the test environment."""
    import subprocess
    import sys

    quiet = ("PYTEST_CURRENT_TEST", "CI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "GITHUB_ACTIONS", "BUILD_ID")
    env = {k: v for k, v in os.environ.items() if k not in quiet}
    check = "from mlflow.telemetry.utils import is_telemetry_disabled; print(is_telemetry_disabled())"

    def disabled(prefix: str) -> str:
        return subprocess.run([sys.executable, "-c", prefix + check], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert disabled("") == "False", "a plain MLflow process would report telemetry (the test would be vacuous otherwise)"
    assert disabled("import workbench.tracking; ") == "True"
