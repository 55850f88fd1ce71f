"""Risks are probabilities: recalibration maps fitted on tuning, folded into the network or applied
after it, and, end to end on a low-prevalence synthetic task, the mean predicted risk on held-out
close to the observed rate (and far from it with the old class-weighted, unrecalibrated training)."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.calibration import Recalibration, fit_recalibration, logit


def test_platt_recovers_a_known_distortion():
    rng = np.random.default_rng(0)
    true = rng.uniform(0.01, 0.6, 5000)
    y = rng.uniform(size=5000) < true
    distorted = 1 / (1 + np.exp(-(0.5 * logit(true) + 1.0)))  # underconfident and too high
    platt = fit_recalibration(distorted, y, "platt")
    assert platt.a == pytest.approx(2.0, rel=0.1) and platt.b == pytest.approx(-2.0, abs=0.25)
    assert abs(platt.apply(distorted).mean() - y.mean()) < 0.01
    assert distorted.mean() - y.mean() > 0.15


def test_isotonic_is_monotone_and_clipped():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 2000)
    y = rng.uniform(size=2000) < p ** 2
    iso = fit_recalibration(p, y, "isotonic")
    grid = np.linspace(-0.5, 1.5, 101)
    out = iso.apply(grid)
    assert (np.diff(out) >= 0).all() and out.min() >= 0 and out.max() <= 1
    assert Recalibration.model_validate_json(iso.model_dump_json()).apply(grid).tolist() == out.tolist()


def test_platt_folded_into_the_network_equals_the_map_applied_after(one_torch_thread):
    from workbench.models import ModelConfig, build_model, fold_platt
    from workbench.training import predict_risk

    X = np.random.default_rng(2).normal(size=(64, 6, 4)).astype(np.float32)
    model = build_model(ModelConfig(units=8), 6, 4, seed=0)
    before = predict_risk(model, X)
    fold_platt(model, 1.7, -0.6)
    np.testing.assert_allclose(predict_risk(model, X), Recalibration(method="platt", a=1.7, b=-0.6).apply(before),
                               rtol=2e-4, atol=1e-6)


def test_none_and_folded_maps_are_the_identity():
    p = np.array([0.1, 0.5, 0.9])
    assert Recalibration().apply(p).tolist() == p.tolist()
    assert Recalibration(method="platt", a=3, b=1, folded=True).apply(p).tolist() == p.tolist()


@pytest.mark.slow
def test_low_prevalence_risks_match_the_observed_rate_on_held_out(tmp_path, monkeypatch, one_torch_thread):
    """Synthetic task with about 5% prevalence: the default (unweighted + Platt on tuning) LSTM's mean
    held-out risk is within 20% of the observed rate; class-weighted without recalibration is not."""
    from workbench.cohort import prepare_cohort
    from workbench.data.synth import generate, make_config
    from workbench.evaluation import EvalConfig
    from workbench.experiment import run_model
    from workbench.models import ModelConfig
    from workbench.training import TrainConfig

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = make_config(n_subjects=20_000, seed=11, planted_fraction=0.05, outcome_prob_planted=0.6,
                         outcome_prob_baseline=0.02, mean_events_per_subject=30)
    generate(tmp_path / "synth", config, progress=False)
    cohort = prepare_cohort("synth_planted", tmp_path / "synth")
    held = cohort.tensors.by_split("held_out")
    assert 0.035 < held.y.mean() < 0.07 and len(held) > 1500
    common = dict(task=cohort.task, data_root=cohort.data_root, model_config=ModelConfig(units=16), register=False)
    train = TrainConfig(epochs=8, batch_size=256, progress=False)
    calibrated = run_model("lstm", cohort.tensors, train_config=train, **common)
    observed = held.y.mean()
    assert abs(calibrated.risk.mean() - observed) < 0.2 * observed, (calibrated.risk.mean(), observed)
    assert calibrated.evaluation.metrics["auroc"]["value"] > 0.75
    weighted = run_model("lstm", cohort.tensors, train_config=train.model_copy(update={"class_weight": "balanced"}),
                         eval_config=EvalConfig(recalibration="none"), **common)
    assert weighted.risk.mean() > 2 * observed  # the inflation the default removes
