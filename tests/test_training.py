"""Training: reproducibility, per-epoch tuning metrics, early stopping and best-epoch restore."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.metrics import average_precision_score, roc_auc_score

from workbench.errors import WorkbenchError
from workbench.models import ModelConfig
from workbench.training import TrainConfig, balanced_sample_weights, predict_risk, train

T, F = 8, 3
SMALL = ModelConfig(units=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def split(n, seed, signal=True):
    """Sequences whose label depends on feature 0 over the last three steps (or on nothing)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, T, F)).astype(np.float32)
    logit = 1.5 * X[:, -3:, 0].sum(axis=1) - 1.0 if signal else np.zeros(n)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def data():
    return {"train": split(600, 0), "tune": split(200, 1), "held_out": split(200, 2)}


def without_timing(history):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def quick(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 4, "batch_size": 64, "progress": False, **overrides})


@pytest.mark.parametrize(
    "field, value",
    [("epochs", 0), ("batch_size", 0), ("seed", -1), ("early_stopping_metric", "accuracy"),
     ("patience", 0), ("class_weight", "inverse"), ("typo", 1)],
)
def test_train_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValidationError) as err:
        TrainConfig(**{field: value})
    assert field in str(err.value)


def test_same_seed_same_held_out_auroc(data):
    """Done-when: two runs with the same seed give the same held-out AUROC (CPU)."""
    X_held, y_held = data["held_out"]
    runs = [train(SMALL.model_copy(update={"dropout": 0.2}), quick(seed=3), *data["train"], *data["tune"]) for _ in range(2)]
    aurocs = [roc_auc_score(y_held, predict_risk(r.model, X_held)) for r in runs]
    assert aurocs[0] == aurocs[1]
    assert [without_timing(r.history) for r in runs][0] == without_timing(runs[1].history)
    other_seed = train(SMALL, quick(seed=4, epochs=1), *data["train"], *data["tune"])
    assert other_seed.history[0]["loss"] != runs[0].history[0]["loss"]


def test_learns_the_signal_and_reports_every_epoch(data):
    seen = []
    result = train(ModelConfig(units=8, learning_rate=1e-2), quick(epochs=5, patience=5), *data["train"], *data["tune"],
                   on_epoch_end=lambda epoch, metrics: seen.append((epoch, metrics)))
    assert [e for e, _ in seen] == [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    assert [m for _, m in seen] == result.history
    assert set(result.history[0]) >= {"epoch", "loss", "tune_auroc", "tune_auprc", "tune_loss", "seconds"}
    assert result.best_metrics["tune_auroc"] > 0.8
    assert result.seconds > 0


@pytest.mark.parametrize("metric", ["auroc", "auprc"])
def test_early_stopping_restores_the_best_epoch(metric):
    """Labels are noise, so the tuning metric peaks early and training stops `patience` later."""
    train_split, tune_split = split(300, 5, signal=False), split(120, 6, signal=False)
    result = train(ModelConfig(units=8, learning_rate=3e-2), quick(epochs=30, patience=2, early_stopping_metric=metric),
                   *train_split, *tune_split)
    scores = [h[f"tune_{metric}"] for h in result.history]
    assert result.best_epoch == int(np.argmax(scores)) + 1
    assert len(result.history) == result.best_epoch + 2 < 30
    # The returned weights are the best epoch's: scoring again reproduces its metric.
    risk = predict_risk(result.model, tune_split[0])
    score = roc_auc_score if metric == "auroc" else average_precision_score
    assert score(tune_split[1], risk) == pytest.approx(result.best_metrics[f"tune_{metric}"], abs=1e-9)


def test_balanced_weights_give_each_class_equal_total():
    y = np.array([0, 0, 0, 0, 1], dtype=np.float32)
    w = balanced_sample_weights(y)
    assert w[y == 0].sum() == pytest.approx(w[y == 1].sum()) == pytest.approx(len(y) / 2)


def test_bad_splits_fail_naming_the_split(data):
    X, y = data["train"]
    with pytest.raises(WorkbenchError, match="tuning split has only one class"):
        train(SMALL, quick(), X, y, X[:50], np.zeros(50))
    X_nan = X.copy()
    X_nan[0, 0, 0] = np.nan
    with pytest.raises(WorkbenchError, match="train X contains NaN"):
        train(SMALL, quick(), X_nan, y, *data["tune"])


def test_predict_risk_matches_keras_predict(data):
    result = train(SMALL, quick(epochs=1), *data["train"], *data["tune"])
    X = data["held_out"][0]
    risk = predict_risk(result.model, X, batch_size=64)
    assert risk.shape == (len(X),)
    np.testing.assert_allclose(risk, result.model.predict(X, verbose=0)[:, 0], atol=1e-6)
