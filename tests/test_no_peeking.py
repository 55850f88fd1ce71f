"""Selection without peeking: the held-out split is read only by the final evaluation. Shuffling the
held-out labels changes the held-out numbers and nothing else: not the epochs kept, the
recalibration maps, the thresholds, any tuning-split number, the champion or the model explained."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from workbench import tracking
from workbench.cohort import prepare_cohort
from workbench.experiment import run_model
from workbench.models import ModelConfig
from workbench.training import TrainConfig

pytestmark = pytest.mark.slow
KINDS = ("lstm", "gru", "logistic", "gbt", "mayo")


def sweep(home, monkeypatch, tensors, cohort):
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = {kind: run_model(kind, tensors, task=cohort.task, data_root=cohort.data_root, model_config=ModelConfig(units=16),
                            train_config=TrainConfig(epochs=6, progress=False)) for kind in KINDS}
    uri = tracking.setup()
    champion = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(cohort.task.name, "champion")
    return runs, champion.tags["model_kind"]


def test_shuffled_held_out_labels_change_nothing_but_held_out_numbers(tmp_path, monkeypatch, one_torch_thread):
    cohort = prepare_cohort("pbc_mortality", "pbc")
    tensors = cohort.tensors
    held = np.flatnonzero(tensors.split == "held_out")
    y = tensors.y.copy()
    y[held] = np.random.default_rng(0).permutation(y[held])
    assert (y != tensors.y).any()
    shuffled = dataclasses.replace(tensors, y=y)

    real, champion = sweep(tmp_path / "real", monkeypatch, tensors, cohort)
    fake, champion_fake = sweep(tmp_path / "shuffled", monkeypatch, shuffled, cohort)
    assert champion == champion_fake
    for kind in KINDS:
        a, b = real[kind], fake[kind]
        assert a.tuning.to_flat_dict() == b.tuning.to_flat_dict(), kind
        assert a.fitted.recalibration == b.fitted.recalibration, kind
        assert a.fitted.best_epoch == b.fitted.best_epoch and a.evaluation.threshold == b.evaluation.threshold, kind
        np.testing.assert_array_equal(a.risk, b.risk)  # the same model, so the same held-out risks
        assert a.evaluation.metrics["auroc"]["value"] != b.evaluation.metrics["auroc"]["value"], kind
