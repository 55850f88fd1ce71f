"""Subject-level cross-validation: every labelled prediction time is scored exactly once, by a model
that never saw its patient (features, model, recalibration all fitted without that fold), and the
pooled out-of-fold metrics are logged to MLflow."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from workbench.crossval import cross_validate, fold_of_subjects, fold_splits


def test_folds_are_balanced_by_positive_subjects_and_roles_never_overlap():
    labels = pl.DataFrame({"subject_id": np.repeat(np.arange(100), 2),
                           "boolean_value": np.repeat(np.arange(100) < 23, 2)})
    folds = fold_of_subjects(labels, 5, seed=1)
    positives = folds.filter(pl.col("subject_id") < 23).group_by("fold").len()["len"].to_list()
    assert sum(positives) == 23 and max(positives) - min(positives) <= 1
    assert max(folds.group_by("fold").len()["len"]) - min(folds.group_by("fold").len()["len"]) <= 1
    for k in range(5):
        roles = fold_splits(folds, k, 5)
        assert dict(roles.group_by("split").len().rows()).keys() == {"train", "tuning", "held_out"}
        assert roles["subject_id"].n_unique() == 100  # each subject has exactly one role per fold
    with pytest.raises(Exception, match="too few"):
        fold_of_subjects(labels.head(6), 5)


@pytest.mark.slow
def test_cross_validation_scores_every_sample_once_and_logs_pooled_metrics(tmp_path, monkeypatch, one_torch_thread):
    from workbench.cli import app
    from workbench.data.synth import generate, make_config
    from workbench.models import ModelConfig
    from workbench.tasks import make_labels
    from workbench.training import TrainConfig

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    generate(tmp_path / "synth", make_config(n_subjects=900, seed=2, mean_events_per_subject=30), progress=False)
    result = cross_validate("synth_planted", tmp_path / "synth", kinds=("lstm", "logistic", "mayo"), folds=3,
                            model_config=ModelConfig(units=16), train_config=TrainConfig(epochs=30, batch_size=32))
    labels = make_labels(tmp_path / "synth", "synth_planted").labels
    for kind in ("lstm", "logistic"):
        oof = result.predictions[kind]
        assert oof.height == labels.height and oof.select("subject_id", "prediction_time").n_unique() == labels.height
        assert oof.group_by("subject_id").agg(pl.col("fold").n_unique())["fold"].max() == 1
        assert result.evaluations[kind].metrics["auroc"]["value"] > 0.7
        m = result.evaluations[kind].metrics
        assert m["calibration_slope"]["ci_low"] <= m["calibration_slope"]["value"] <= m["calibration_slope"]["ci_high"]
    assert "mayo" not in result.predictions  # no Mayo inputs in synthetic data: skipped, with its reason
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(result.run_ids["lstm"])
    assert run.data.tags["workbench.evaluation"] == "cross-validation" and "cv_ece" in run.data.metrics
    assert "held_out_auroc" not in run.data.metrics  # never mistaken for a held-out model run
    assert "workbench.skipped" in client.get_run(result.run_ids["mayo"]).data.tags
    out = CliRunner().invoke(app, ["crossval", "--task", "synth_planted", "--data", str(tmp_path / "synth"),
                                   "--models", "logistic", "--folds", "3"])
    assert out.exit_code == 0, out.output
    assert "pooled out-of-fold" in out.output and "logistic" in out.output
