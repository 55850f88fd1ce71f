"""The discrete-time hazard model against data whose true survival curve is known.

Sequences carry one covariate x (constant over the steps, plus a noise channel); event times
are exponential with rate ``lam0 * exp(beta * x)`` per year, censoring uniform and independent.
The true risk by t years is then ``1 - exp(-rate * t)`` (with a competing exponential cause,
``rate1 / (rate1 + rate2) * (1 - exp(-(rate1 + rate2) t))``). Each test trains the real
LSTM hazard network of :mod:`workbench.survival` on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.settings import ModelConfig, TrainConfig
from workbench.survival import (
    HazardCurves,
    HazardGrid,
    HorizonRisk,
    _calibrated,
    cumulative_incidence,
    fit_calibration,
    fold_calibration,
    hazard_targets,
    predict_logits,
    train_hazard,
)

YEAR = 365.25
HORIZONS = np.array([1, 2, 3, 4, 5]) * YEAR
MODEL = ModelConfig(units=16, learning_rate=0.01)
TRAIN = TrainConfig(epochs=30, patience=3, seed=0, batch_size=256, progress=False)


def cohort(n: int, rng, lam0=0.25, beta=0.8, censor_years=8.0, competing=0.0, T=6):
    x = rng.normal(size=n)
    X = np.zeros((n, T, 2), np.float32)
    X[:, :, 0] = x[:, None]
    X[:, :, 1] = rng.normal(size=(n, T))
    rate = lam0 * np.exp(beta * x)
    outcome = rng.exponential(1 / rate) * YEAR
    other = rng.exponential(1 / competing, n) * YEAR if competing else np.full(n, np.inf)
    censor = rng.uniform(0, censor_years, n) * YEAR
    t = np.minimum.reduce([outcome, other, censor])
    e = np.where(t == outcome, 1, np.where(t == other, 2, 0))
    if competing:
        total = rate + competing
        true = rate[:, None] / total[:, None] * (1 - np.exp(-total[:, None] * HORIZONS[None] / YEAR))
    else:
        true = 1 - np.exp(-rate[:, None] * HORIZONS[None] / YEAR)
    return X, t, e, true


def fit(n_causes=1, competing=0.0, seed=0, censor_years=8.0):
    rng = np.random.default_rng(seed)
    train, tune = (cohort(6000, rng, competing=competing, censor_years=censor_years),
                   cohort(2000, rng, competing=competing, censor_years=censor_years))
    test = cohort(10000, rng, competing=competing)
    grid = HazardGrid.regular(5 * YEAR)
    result = train_hazard(MODEL, TRAIN, train[0], train[1], train[2], tune[0], tune[1], tune[2], grid, n_causes)
    calibration = fit_calibration(predict_logits(result.model, tune[0]), hazard_targets(tune[1], tune[2], grid, n_causes))
    fold_calibration(result.model, calibration, n_causes)
    return HazardCurves(result.model, grid, n_causes), train, test


@pytest.fixture(scope="module")
def single_cause():
    return fit()


def test_targets_encode_the_censoring_aware_likelihood():
    grid = HazardGrid((0.0, 100.0, 200.0, 300.0))
    y = hazard_targets([150.0, 150.0, 250.0, 1000.0, 100.0], [1, 0, 2, 1, 1], grid, n_causes=2)
    # event of cause 1 in interval 1: survived interval 0, event in 1, nothing after
    assert y[0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    # censored half-way through interval 1: interval 0 lived through, half of interval 1
    assert y[1].tolist() == [[1, 0, 0], [0.5, 0, 0], [0, 0, 0]]
    assert y[2].tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    # beyond the grid: administratively censored at its end, whatever happened later
    assert y[3].tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]
    # an event exactly at an edge belongs to the interval it closes
    assert y[4].tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0]]


def test_recovers_the_true_survival_curve(single_cause):
    curves, _, (X, t, e, true) = single_cause
    predicted = curves.risk(X, HORIZONS)
    error = np.abs(predicted - true)
    # Stated tolerance: mean absolute error under 0.03 at every horizon, 95th percentile under 0.08.
    assert np.all(error.mean(axis=0) < 0.03), error.mean(axis=0)
    assert np.all(np.quantile(error, 0.95, axis=0) < 0.08), np.quantile(error, 0.95, axis=0)


def test_predicted_risk_matches_kaplan_meier_in_every_decile(single_cause):
    from workbench.survival_metrics import calibration_table

    curves, _, (X, t, e, _) = single_cause
    predicted = curves.risk(X, HORIZONS)
    for i, years in ((0, 1), (1, 2), (4, 5)):
        table = calibration_table(t, e, predicted[:, i], HORIZONS[i], n_bins=10)
        gap = (table["predicted"] - table["observed"]).abs().max()
        assert gap < 0.05, f"{years} y: max |predicted - KM| {gap:.3f} over deciles\n{table}"


def test_dropping_censored_biases_the_binary_risk_but_not_the_survival_risk():
    """A binary 2-year model must drop every subject censored before 2 years without the outcome;
    what is left over-represents the outcome, so its risk is too high for the population it is
    applied to. The survival model keeps them and is not biased. Censoring within 3 years (a
    study that stopped recruiting 3 years before its end)."""
    from workbench.training import predict_risk, train

    curves, (X, t, e, _), (X_test, _, _, true) = fit(seed=3, censor_years=3.0)
    horizon = 2 * YEAR
    known = (e == 1) & (t <= horizon) | (t > horizon)  # the binary task's complete cases
    y = (e == 1) & (t <= horizon)
    rng = np.random.default_rng(1)
    tune_X, tune_t, tune_e, _ = cohort(2000, rng, censor_years=3.0)
    tune_known = (tune_e == 1) & (tune_t <= horizon) | (tune_t > horizon)
    tune_y = (tune_e == 1) & (tune_t <= horizon)
    binary = train(MODEL, TRAIN, X[known], y[known], tune_X[tune_known], tune_y[tune_known]).model
    true_mean = true[:, 1].mean()
    binary_bias = predict_risk(binary, X_test).mean() - true_mean
    survival_bias = curves.risk(X_test, [horizon])[:, 0].mean() - true_mean
    assert (~known).mean() > 0.3  # the premise: many subjects censored before the horizon
    assert binary_bias > 0.04, f"binary risk bias {binary_bias:+.3f} (true mean {true_mean:.3f})"
    assert abs(survival_bias) < 0.015, f"survival risk bias {survival_bias:+.3f} (true mean {true_mean:.3f})"


def test_competing_risks_recover_the_cause_specific_cumulative_incidence():
    curves, _, (X, _, _, true) = fit(n_causes=2, competing=0.15, seed=2)
    error = np.abs(curves.risk(X, HORIZONS) - true)
    assert np.all(error.mean(axis=0) < 0.03), error.mean(axis=0)
    cif = curves.curves(X[:100])
    assert np.all(np.diff(cif, axis=1) >= -1e-12)  # cumulative incidences never decrease
    assert np.all(cif[:, -1].sum(axis=1) <= 1 + 1e-9)  # and the causes share one probability


def test_calibration_folds_into_the_network_exactly(single_cause):
    curves, _, (X, t, e, _) = single_cause
    logits = predict_logits(curves.model, X[:500])
    before = cumulative_incidence(logits)
    import keras

    copy = keras.models.clone_model(curves.model)
    copy.set_weights(curves.model.get_weights())
    from workbench.survival import HazardCalibration

    calibration = HazardCalibration(a=1.3, b=-0.4)
    fold_calibration(copy, calibration, n_causes=1)
    np.testing.assert_allclose(predict_logits(copy, X[:500]), _calibrated(logits, 1.3, -0.4), rtol=1e-4, atol=1e-4)
    assert not np.allclose(cumulative_incidence(predict_logits(copy, X[:500])), before)


def test_horizon_risk_is_the_curve_at_that_horizon(single_cause):
    curves, _, (X, _, _, _) = single_cause
    for days in (200.0, 730.5, 5 * YEAR):
        module = HorizonRisk(curves.model, curves.grid, days)
        with torch.no_grad():
            got = module(torch.from_numpy(X[:64])).numpy()[:, 0]
        np.testing.assert_allclose(got, curves.risk(X[:64], [days])[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("span_days", [40, 400, 1100, 1500, 4000])
def test_patient_risk_plot_draws_any_follow_up_span_without_warnings(span_days, recwarn):
    import io

    import polars as pl

    from workbench.survival_run import patient_risk_plot

    times = np.datetime64("1990-01-01", "us") + np.linspace(0, span_days, 4).astype("timedelta64[D]")
    visits = pl.DataFrame({"prediction_time": times, "risk_365d": [0.1, 0.2, 0.3, 0.4], "risk_730d": [0.2, 0.3, 0.4, 0.5]})
    drivers = pl.DataFrame({"prediction_time": times, "output": [0.2, 0.3, 0.4, 0.5], "feature": ["LAB/bili/value"] * 4,
                            "shap": [0.05, -0.02, 0.1, 0.0], "step_end_time": times})
    fig = patient_risk_plot(7, visits, drivers)
    fig.savefig(io.BytesIO(), format="png")
    assert not [str(w.message) for w in recwarn], "a user-visible warning in the executed notebook"
    # neighbouring visits' driver notes sit on opposite sides of the line, so they do not overlap
    assert [note.xyann[1] for note in fig.axes[1].texts] == [8, -8, 8, -8]
