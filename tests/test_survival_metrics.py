"""workbench.survival_metrics against data whose true risk is known, against scikit-survival, and
against a hand-computed Aalen-Johansen estimate.

Synthetic cohort: covariate x ~ N(0, 1); the outcome is exponential with rate ``lam exp(beta x)``
per year, a competing event exponential with a constant rate, censoring uniform and independent.
The true cumulative incidence of the outcome by t is then
``r1 / (r1 + r2) * (1 - exp(-(r1 + r2) t))``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from matplotlib.figure import Figure
from sksurv.metrics import (
    brier_score,
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.nonparametric import cumulative_incidence_competing_risks
from sksurv.util import Surv

from workbench.errors import WorkbenchError
from workbench.survival_metrics import (
    _SurvivalDesign,
    _weighted_cif,
    calibration_table,
    evaluate_survival,
    horizon_metric,
    observed_risk,
    observed_risk_curve,
)

YEAR = 365.25
HORIZONS = np.array([1, 2, 3]) * YEAR


def cohort(n: int, rng, lam=0.15, beta=0.8, competing=0.05, censor_years=10.0):
    """(x, time, event, outcome rate, competing rate), rates per day."""
    x = rng.normal(size=n)
    r1 = lam * np.exp(beta * x) / YEAR
    r2 = np.full(n, competing / YEAR)
    t1, t2 = rng.exponential(1 / r1), rng.exponential(1 / r2)
    censor = rng.uniform(0, censor_years * YEAR, n)
    t = np.minimum.reduce([t1, t2, censor])
    e = np.where(t == t1, 1, np.where(t == t2, 2, 0))
    return x, t, e, r1, r2


def true_cif(r1, r2, days) -> np.ndarray:
    total = (r1 + r2)[:, None]
    return r1[:, None] / total * (1 - np.exp(-total * np.asarray(days, dtype=np.float64)[None, :]))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    _, train_t, train_e, _, _ = cohort(3000, rng)
    _, t, e, r1, r2 = cohort(3000, rng)
    return train_t, train_e, t, e, r1, r2


def evaluate(t, e, risk, train_t, train_e, cluster=None, **kwargs):
    kwargs.setdefault("n_bootstrap", 0)
    cluster = np.arange(len(t)) if cluster is None else cluster
    return evaluate_survival(t, e, risk, HORIZONS, train_time=train_t, train_event=train_e, cluster=cluster, **kwargs)


# ------------------------------------------------------------------- discrimination, Brier


def test_true_risk_discriminates_and_matches_sksurv(data):
    train_t, train_e, t, e, r1, r2 = data
    risk = true_cif(r1, r2, HORIZONS)
    result = evaluate(t, e, risk, train_t, train_e)
    train, test = Surv.from_arrays(train_e == 1, train_t), Surv.from_arrays(e == 1, t)
    direct, _ = cumulative_dynamic_auc(train, test, risk, HORIZONS)
    for h, expected in zip(HORIZONS, direct):
        value = result.metrics[horizon_metric("td_auc", h)]["value"]
        assert value > 0.65, (h, value)
        assert value == pytest.approx(expected, abs=1e-12)
    assert result.metrics["harrell_c"]["value"] == pytest.approx(concordance_index_censored(e == 1, t, risk[:, -1])[0])
    uno = concordance_index_ipcw(train, test, risk[:, -1], tau=HORIZONS[-1])[0]
    assert result.metrics["uno_c"]["value"] == pytest.approx(uno, abs=1e-12)
    _, brier = brier_score(train, test, 1 - risk, HORIZONS)
    for h, expected in zip(HORIZONS, brier):
        assert result.metrics[horizon_metric("brier", h)]["value"] == pytest.approx(expected, abs=1e-12)
    assert result.metrics["ibs"]["value"] == pytest.approx(integrated_brier_score(train, test, 1 - risk, HORIZONS))


def test_random_risk_has_no_discrimination(data):
    train_t, train_e, t, e, _, _ = data
    noise = np.sort(np.random.default_rng(1).random((len(t), len(HORIZONS))), axis=1)
    result = evaluate(t, e, noise, train_t, train_e)
    for h in HORIZONS:
        assert abs(result.metrics[horizon_metric("td_auc", h)]["value"] - 0.5) < 0.05
    assert abs(result.metrics["harrell_c"]["value"] - 0.5) < 0.05
    assert abs(result.metrics["uno_c"]["value"] - 0.5) < 0.05


def test_ibs_over_a_grid_and_the_brier_of_the_truth_beats_a_constant(data):
    train_t, train_e, t, e, r1, r2 = data
    grid = np.arange(1, 37) * YEAR / 12
    good = evaluate(t, e, true_cif(r1, r2, HORIZONS), train_t, train_e, grid_risk=true_cif(r1, r2, grid), grid_days=grid)
    train, test = Surv.from_arrays(train_e == 1, train_t), Surv.from_arrays(e == 1, t)
    expected = integrated_brier_score(train, test, 1 - true_cif(r1, r2, grid), grid)
    assert good.metrics["ibs"]["value"] == pytest.approx(expected, abs=1e-12)
    flat = np.broadcast_to(true_cif(r1, r2, grid).mean(axis=0), (len(t), len(grid)))
    constant = evaluate(t, e, np.broadcast_to(true_cif(r1, r2, HORIZONS).mean(axis=0), (len(t), 3)), train_t, train_e,
                        grid_risk=flat, grid_days=grid)
    assert good.metrics["ibs"]["value"] < constant.metrics["ibs"]["value"]


# ---------------------------------------------------------------------------- calibration


def test_true_cif_is_calibrated_and_a_doubled_risk_is_not():
    rng = np.random.default_rng(2)
    _, train_t, train_e, _, _ = cohort(5000, rng)
    _, t, e, r1, r2 = cohort(20000, rng)
    horizons = np.array([1, 2, 3, 4, 5]) * YEAR
    risk = true_cif(r1, r2, horizons)
    kwargs = dict(train_time=train_t, train_event=train_e, cluster=np.arange(len(t)), n_bootstrap=0)
    good = evaluate_survival(t, e, risk, horizons, **kwargs)
    bad = evaluate_survival(t, e, np.clip(2 * risk, 0, 1), horizons, **kwargs)
    for h in horizons:
        name = horizon_metric("calibration_max_abs", h)
        assert good.metrics[name]["value"] < 0.05, (h, good.calibration)
        assert bad.metrics[name]["value"] > 0.05, h
        assert good.metrics[horizon_metric("calibration_mean_abs", h)]["value"] <= good.metrics[name]["value"]
    # The table is the documented one: ten deciles per horizon, predicted ascending.
    assert good.calibration.height == 10 * len(horizons)
    assert good.calibration.filter(good.calibration["horizon_days"] == horizons[0])["decile"].to_list() == list(range(1, 11))


def test_calibration_table_uses_aalen_johansen_not_one_minus_km():
    """With a common competing event, 1 - KM (competing censored) overstates the observed risk and
    would call the true CIF miscalibrated; the Aalen-Johansen observed risk does not."""
    rng = np.random.default_rng(3)
    _, t, e, r1, r2 = cohort(20000, rng, competing=0.4)
    h = 3 * YEAR
    table = calibration_table(t, e, true_cif(r1, r2, [h])[:, 0], h)
    assert (table["predicted"] - table["observed"]).abs().max() < 0.05
    naive = calibration_table(t, np.where(e == 2, 0, e), true_cif(r1, r2, [h])[:, 0], h)
    assert (naive["observed"] - naive["predicted"]).max() > 0.05


def test_observed_risk_by_hand():
    # Aalen-Johansen by hand: t=1 outcome (6 at risk) -> 1/6, S = 5/6; t=2 competing + censored
    # (5 at risk) -> S = 4/6; t=3 outcome (3 at risk) -> + 4/6 * 1/3 = 7/18, S = 4/9; t=4 censored;
    # t=5 outcome (1 at risk) -> + 4/9 = 15/18.
    time = [1, 2, 2, 3, 4, 5]
    event = [1, 2, 0, 1, 0, 1]
    for h, expected in ((0.5, 0.0), (1, 1 / 6), (2.5, 1 / 6), (3, 7 / 18), (4.9, 7 / 18), (5, 15 / 18)):
        assert observed_risk(time, event, h) == pytest.approx(expected, abs=1e-12), h
    assert np.isnan(observed_risk(time, event, 6))  # nobody followed that long
    # Kaplan-Meier without competing events: t=1 (4 at risk) -> S = 3/4; t=3 (2 at risk) -> 3/8.
    assert observed_risk([1, 2, 3, 4], [1, 0, 1, 0], 3) == pytest.approx(5 / 8, abs=1e-12)
    # 1 - KM with the competing event censored would give 1 - 5/6 * 2/3 = 4/9 at t = 3, not 7/18.
    assert observed_risk([1, 2, 2, 3, 4, 5], [1, 0, 0, 1, 0, 1], 3) == pytest.approx(4 / 9, abs=1e-12)
    times, risk = observed_risk_curve(time, event)
    assert times[0] == 0 and risk[0] == 0 and np.all(np.diff(risk) >= 0)
    assert observed_risk([1, 2], [0, 2], 1.5) == 0.0  # no outcome at all


def test_weighted_aalen_johansen_equals_sksurv_on_duplicated_samples():
    rng = np.random.default_rng(4)
    _, t, e, _, _ = cohort(300, rng, competing=0.3)
    t = np.round(t, -1) + 1  # ties in time
    m = np.bincount(rng.integers(0, 300, 300), minlength=300)
    idx = np.repeat(np.arange(300), m)
    for h in (200.0, 700.0, 1500.0):
        times, cum_inc = cumulative_incidence_competing_risks(e[idx], t[idx])[:2]
        expected = cum_inc[1][np.searchsorted(times, h, side="right") - 1]
        assert _weighted_cif(t, e, m[None, :].astype(float), h)[0] == pytest.approx(expected, abs=1e-12)
        assert observed_risk(t[idx], e[idx], h) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------ bootstrap


def test_bootstrap_metrics_equal_sksurv_on_the_resampled_data(data):
    """The bootstrap's weighted sums are scikit-survival's metrics on the duplicated samples."""
    train_t, train_e, t, e, r1, r2 = data
    risk = true_cif(r1, r2, HORIZONS)
    risk[:50] = np.round(risk[:50], 2)  # some tied scores
    design = _SurvivalDesign.build(t, e, risk, HORIZONS, train_t, train_e, None, None, 2, 10)
    weighted = design.weighted()
    rng = np.random.default_rng(5)
    for _ in range(3):
        m = np.bincount(rng.integers(0, len(t), len(t)), minlength=len(t)).astype(float)
        idx = np.repeat(np.arange(len(t)), m.astype(int))
        fast = weighted(m[None, :])
        reference = evaluate(t[idx], e[idx], risk[idx], train_t, train_e)
        names = ["harrell_c", "uno_c", "ibs", *(horizon_metric(k, h) for k in ("td_auc", "brier") for h in HORIZONS)]
        for name in names:
            assert fast[name][0] == pytest.approx(reference.metrics[name]["value"], abs=1e-10), name


def test_cluster_bootstrap_resamples_subjects():
    """Every sample of every subject three times: same cluster -> the same estimates and intervals;
    the copies as independent clusters -> falsely narrow intervals (about 1/sqrt(3))."""
    rng = np.random.default_rng(6)
    _, train_t, train_e, _, _ = cohort(2000, rng)
    _, t, e, r1, r2 = cohort(400, rng)
    risk = true_cif(r1, r2, HORIZONS)
    rep = lambda a: np.repeat(a, 3, axis=0)  # noqa: E731
    kwargs = dict(train_time=train_t, train_event=train_e, n_bootstrap=300, seed=1)
    base = evaluate_survival(t, e, risk, HORIZONS, cluster=np.arange(400), **kwargs)
    same = evaluate_survival(rep(t), rep(e), rep(risk), HORIZONS, cluster=rep(np.arange(400)), **kwargs)
    apart = evaluate_survival(rep(t), rep(e), rep(risk), HORIZONS, cluster=np.arange(1200), **kwargs)
    assert same.n_subjects == 400 and apart.n_subjects == 1200
    width = lambda m: m["upper"] - m["lower"]  # noqa: E731
    for name in ("td_auc_730d", "harrell_c", "uno_c", "ibs", "brier_730d", "calibration_mean_abs_730d"):
        assert same.metrics[name]["value"] == pytest.approx(base.metrics[name]["value"], abs=1e-12), name
        assert 0.8 < width(same.metrics[name]) / width(base.metrics[name]) < 1.25, name
        assert width(apart.metrics[name]) / width(base.metrics[name]) < 0.8, name


def test_intervals_cover_the_point_and_results_flatten(data):
    train_t, train_e, t, e, r1, r2 = data
    cluster = np.arange(len(t)) // 3
    result = evaluate(t, e, true_cif(r1, r2, HORIZONS), train_t, train_e, cluster=cluster, n_bootstrap=100)
    for name in ("td_auc_365d", "harrell_c", "uno_c", "ibs"):
        entry = result.metrics[name]
        assert entry["lower"] <= entry["value"] <= entry["upper"], name
        assert (entry["ci_low"], entry["ci_high"]) == (entry["lower"], entry["upper"])
        assert entry["n_valid"] == 100
    flat = result.to_flat_dict("held_out_")
    assert flat["held_out_td_auc_730d"] == result.metrics["td_auc_730d"]["value"]
    assert flat["held_out_td_auc_730d_ci_low"] == result.metrics["td_auc_730d"]["lower"]
    assert flat["held_out_n_subjects"] == 1000
    assert {"held_out_brier_1096d", "held_out_calibration_max_abs_1096d_ci_high"} <= set(flat)
    cal = result.calibration
    assert cal.columns[:5] == ["horizon_days", "decile", "n", "predicted", "observed"]
    assert (cal["observed_lower"] <= cal["observed_upper"]).all()
    text = result.to_markdown()
    assert "| 2 y (730.5 d) |" in text and "Uno's C" in text
    assert f"{result.metrics['uno_c']['value']:.3f} (" in text


# ---------------------------------------------------------------------- ranges, bad input


def test_horizon_beyond_follow_up_is_undefined_not_an_error(data):
    train_t, train_e, t, e, r1, r2 = data
    horizons = np.array([1, 2, 30]) * YEAR  # nobody is followed 30 years
    with pytest.warns(UserWarning, match="outside the evaluated follow-up"):
        result = evaluate_survival(t, e, true_cif(r1, r2, horizons), horizons, train_time=train_t,
                                   train_event=train_e, cluster=np.arange(len(t)), n_bootstrap=20,
                                   concordance_horizon_days=2 * YEAR)
    assert result.metrics["td_auc_10958d"]["value"] is None and result.metrics["brier_10958d"]["value"] is None
    assert "td_auc_10958d" not in result.to_flat_dict()
    assert result.metrics["td_auc_730d"]["value"] > 0.65 and result.metrics["uno_c"]["value"] > 0.6
    assert result.calibration.filter(result.calibration["horizon_days"] == 30 * YEAR)["observed"].null_count() == 10
    assert "n/a" in result.to_markdown()


def test_train_follow_up_shorter_than_the_evaluated_one_is_capped(data):
    """Test times beyond the train follow-up would make scikit-survival raise; they are censored there."""
    train_t, train_e, t, e, r1, r2 = data
    short = train_t < 4 * YEAR
    result = evaluate(t, e, true_cif(r1, r2, HORIZONS), train_t[short], train_e[short])
    assert result.metrics["td_auc_1096d"]["value"] > 0.65


@pytest.mark.parametrize("change, message", [
    (dict(risk=np.zeros((10, 2))), "shape"),
    (dict(risk=np.full((10, 3), np.nan)), "NaN"),
    (dict(risk=np.full((10, 3), 1.5)), r"\[0, 1\]"),
    (dict(time=np.r_[0.0, np.ones(9)]), "> 0"),
    (dict(event=np.r_[3, np.zeros(9, int)]), "event codes"),
    (dict(horizons_days=[730.5, 365.25, 1095.75]), "increasing"),
    (dict(cluster=np.arange(9)), "cluster"),
    (dict(grid_days=[100.0, 200.0]), "both or neither"),
    (dict(grid_days=[200.0, 100.0], grid_risk=np.zeros((10, 2))), "increasing"),
    (dict(concordance_horizon_days=500.0), "one of horizons_days"),
    (dict(train_event=np.zeros(10, int)), "no outcome event"),
])
def test_bad_input_is_a_workbench_error(change, message):
    rng = np.random.default_rng(8)
    args = dict(time=rng.uniform(1, 2000, 10), event=np.r_[np.ones(5, int), np.zeros(5, int)],
                risk=np.tile([0.1, 0.2, 0.3], (10, 1)), horizons_days=HORIZONS, train_time=rng.uniform(1, 2000, 10),
                train_event=np.r_[np.ones(5, int), np.zeros(5, int)], cluster=np.arange(10))
    args.update(change)
    time, event, risk, horizons = (args.pop(k) for k in ("time", "event", "risk", "horizons_days"))
    with warnings.catch_warnings(), pytest.raises(WorkbenchError, match=message):
        warnings.simplefilter("ignore")
        evaluate_survival(time, event, risk, horizons, n_bootstrap=0, **args)


# ---------------------------------------------------------------------------------- plots


def test_survival_plots_are_figures_with_one_panel_per_horizon(data):
    from workbench.plots import km_vs_predicted_plot, survival_calibration_plot

    train_t, train_e, t, e, r1, r2 = data
    risk = true_cif(r1, r2, HORIZONS)
    a = evaluate(t, e, risk, train_t, train_e, n_bootstrap=20)
    b = evaluate(t, e, np.clip(risk * 1.3, 0, 1), train_t, train_e, n_bootstrap=20)
    fig = survival_calibration_plot({"true": a.calibration, "inflated": b.calibration})
    assert isinstance(fig, Figure) and len(fig.axes) == len(HORIZONS)
    assert [ax.get_title() for ax in fig.axes] == ["1 year", "2 years", "3 years"]
    fig = survival_calibration_plot({"true": a.calibration}, horizons_days=HORIZONS[:2], title="two")
    assert len(fig.axes) == 2
    grid = np.r_[0.0, HORIZONS]
    fig = km_vs_predicted_plot(t, e, {"true": (grid, np.r_[0.0, risk.mean(axis=0)])})
    assert isinstance(fig, Figure) and len(fig.axes) == 1


def test_follow_up_cut_at_the_last_horizon_makes_controls_there():
    """A survival task censors every follow-up at its maximum horizon: those samples are known
    event-free through it, so the td-AUC and Brier score at that horizon are defined."""
    rng = np.random.default_rng(5)
    n, last = 400, 1826.25
    x = rng.normal(size=n)
    events = rng.exponential(365.25 * 4 / np.exp(x))
    time = np.minimum(events, last)
    event = (events <= last).astype(int)
    risk = 1 - np.exp(-np.exp(x)[:, None] * np.array([730.5, last])[None] / (365.25 * 4))
    result = evaluate_survival(time, event, risk, [730.5, last], train_time=time, train_event=event,
                               cluster=np.arange(n), n_bootstrap=0)
    assert result.metrics["td_auc_1826d"]["value"] > 0.6
    assert result.metrics["brier_1826d"]["value"] is not None and not result.notes
