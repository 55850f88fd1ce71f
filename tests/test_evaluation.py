"""Tests for workbench.evaluation: metrics against scikit-learn, bootstrap CIs, subgroups."""

from __future__ import annotations

import re
import time

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from workbench.errors import WorkbenchError
from workbench.evaluation import (
    METRICS,
    EvalConfig,
    EvaluationResult,
    _BootstrapDesign,
    age_band,
    bootstrap_weights,
    calibration_bin_edges,
    choose_threshold,
    evaluate,
    weighted_metrics,
)


def synthetic(n: int, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated risks with y ~ Bernoulli(p): a model with AUROC around 0.75."""
    rng = np.random.default_rng(seed)
    p = rng.beta(2, 5, n)
    if ties:
        p = np.round(p, 2)
    return rng.random(n) < p, p


def ci_width(result: EvaluationResult, name: str) -> float:
    entry = result.metrics[name]
    return entry["ci_high"] - entry["ci_low"]


FAST = EvalConfig(n_bootstrap=200)


# ------------------------------------------------------------------- point estimates


def test_point_metrics_equal_sklearn():
    y, p = synthetic(1500, seed=1)
    result = evaluate(y, p, FAST)
    assert result.metrics["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert result.metrics["auprc"]["value"] == pytest.approx(average_precision_score(y, p))
    assert result.metrics["brier"]["value"] == pytest.approx(brier_score_loss(y, p))
    assert result.n == 1500 and result.n_positive == int(y.sum())
    assert result.prevalence == pytest.approx(y.mean())


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_calibration_table_matches_sklearn_calibration_curve(strategy):
    y, p = synthetic(2000, seed=2)
    config = EvalConfig(n_bootstrap=0, n_calibration_bins=8, calibration_strategy=strategy)
    result = evaluate(y, p, config)
    observed, predicted = calibration_curve(y, p, n_bins=8, strategy=strategy)
    np.testing.assert_allclose(result.calibration["observed_fraction"].to_numpy(), observed)
    np.testing.assert_allclose(result.calibration["mean_predicted"].to_numpy(), predicted)
    assert result.calibration["count"].sum() == 2000
    # ECE is the count-weighted gap between the two columns.
    counts = result.calibration["count"].to_numpy()
    expected_ece = np.average(np.abs(observed - predicted), weights=counts)
    assert result.metrics["ece"]["value"] == pytest.approx(expected_ece)


def test_threshold_metrics_match_hand_computed_confusion_matrix():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.65, 0.3, 0.2, 0.1, 0.05])
    # At 0.6 (inclusive): flagged 0.9, 0.8, 0.6 (positives) and 0.7, 0.65 (negatives).
    # TP=3, FN=1, FP=2, TN=4.
    m = evaluate(y, p, EvalConfig(threshold=0.6, n_bootstrap=0)).metrics
    assert m["sensitivity"]["value"] == pytest.approx(3 / 4)
    assert m["specificity"]["value"] == pytest.approx(4 / 6)
    assert m["ppv"]["value"] == pytest.approx(3 / 5)
    assert m["npv"]["value"] == pytest.approx(4 / 5)
    assert m["sensitivity"]["ci_low"] is None  # no bootstrap requested


def test_ece_near_zero_when_calibrated_and_large_when_not():
    rng = np.random.default_rng(3)
    p = rng.random(20_000)
    calibrated = rng.random(20_000) < p
    overconfident = rng.random(20_000) < p**2  # true risk is lower than predicted
    config = EvalConfig(n_bootstrap=0)
    assert evaluate(calibrated, p, config).metrics["ece"]["value"] < 0.02
    assert evaluate(overconfident, p, config).metrics["ece"]["value"] > 0.1


# ------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("ties", [False, True])
def test_vectorised_resample_metrics_equal_sklearn_with_sample_weight(ties):
    y, p = synthetic(600, seed=4, ties=ties)
    edges = calibration_bin_edges(p, 10, "uniform")
    design = _BootstrapDesign.build(y, p, 0.3, edges)
    weights = bootstrap_weights(4, len(y), np.random.default_rng(0))
    got = weighted_metrics(weights, design)
    for row, w in enumerate(weights):
        assert got["auroc"][row] == pytest.approx(roc_auc_score(y, p, sample_weight=w))
        assert got["auprc"][row] == pytest.approx(average_precision_score(y, p, sample_weight=w))
        assert got["brier"][row] == pytest.approx(brier_score_loss(y, p, sample_weight=w))
        flagged = p >= 0.3
        assert got["sensitivity"][row] == pytest.approx(w[y & flagged].sum() / w[y].sum())
        assert got["ppv"][row] == pytest.approx(w[y & flagged].sum() / w[flagged].sum())


def test_cluster_weights_keep_a_subjects_samples_together():
    codes = np.array([0, 0, 0, 1, 1, 2])
    weights = bootstrap_weights(50, len(codes), np.random.default_rng(0), codes)
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 4]).all()
    # Three subjects drawn per resample: the subject multiplicities sum to 3.
    np.testing.assert_array_equal(weights[:, [0, 3, 5]].sum(axis=1), 3)


def test_cis_contain_point_estimate_and_narrow_with_more_data():
    small = evaluate(*synthetic(300, seed=5), FAST)
    large = evaluate(*synthetic(3000, seed=5), FAST)
    for name in ("auroc", "auprc", "brier", "sensitivity", "specificity", "ppv", "npv"):
        for result in (small, large):
            entry = result.metrics[name]
            assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], name
        assert ci_width(large, name) < 0.6 * ci_width(small, name), name


def test_cluster_bootstrap_is_wider_when_samples_within_a_patient_are_duplicated():
    y, p = synthetic(400, seed=6)
    copies = 5
    y_rep, p_rep = np.repeat(y, copies), np.repeat(p, copies)
    subject = np.repeat(np.arange(400), copies)
    by_sample = evaluate(y_rep, p_rep, FAST)
    by_patient = evaluate(y_rep, p_rep, FAST, cluster=subject)
    one_per_patient = evaluate(y, p, FAST)
    assert by_patient.cluster_bootstrap and by_patient.n_subjects == 400
    for name in ("auroc", "brier", "sensitivity"):
        # Copies add no information: resampling patients must recover the width of the
        # de-duplicated data, while resampling rows pretends n is 5x larger (~sqrt(5) narrower).
        assert ci_width(by_patient, name) > 1.6 * ci_width(by_sample, name), name
        assert ci_width(by_patient, name) == pytest.approx(ci_width(one_per_patient, name), rel=0.3)


def test_resamples_without_both_classes_are_skipped_and_counted():
    y = np.zeros(30, dtype=bool)
    y[0] = True
    p = np.linspace(0.05, 0.95, 30)
    result = evaluate(y, p, EvalConfig(n_bootstrap=300))
    auroc = result.metrics["auroc"]
    # P(resample misses the single positive) = (29/30)^30 ~ 0.36.
    assert 100 < auroc["n_valid"] < 260
    assert auroc["ci_low"] is not None
    assert result.metrics["brier"]["n_valid"] == 300


def test_bootstrap_is_reproducible_for_a_seed():
    y, p = synthetic(500, seed=7)
    first = evaluate(y, p, EvalConfig(n_bootstrap=100, seed=11)).to_flat_dict()
    again = evaluate(y, p, EvalConfig(n_bootstrap=100, seed=11)).to_flat_dict()
    other = evaluate(y, p, EvalConfig(n_bootstrap=100, seed=12)).to_flat_dict()
    assert first == again
    assert first["auroc_ci_low"] != other["auroc_ci_low"]


def test_thousand_cluster_resamples_of_four_thousand_samples_are_fast():
    y, p = synthetic(4000, seed=8)
    subject = np.random.default_rng(8).integers(0, 800, 4000)
    # CPU time, not wall time: the tests share two cores with other jobs.
    start = time.process_time()
    evaluate(y, p, EvalConfig(n_bootstrap=1000), cluster=subject)
    # About 0.25 s of CPU here; one sklearn call per resample would take about 3 s.
    assert time.process_time() - start < 2.0


# ------------------------------------------------------------------------- subgroups


def test_age_band_labels_and_edges():
    ages = np.array([10, 49.9, 50, 64.99, 65, 99, 250, np.nan])
    assert age_band(ages, [0, 50, 65, 200]).tolist() == [
        "<50", "<50", "50-65", "50-65", ">=65", ">=65", ">=65", "unknown",
    ]
    with pytest.raises(WorkbenchError, match="increasing"):
        age_band(ages, [0, 65, 50])


def test_subgroup_table_shape_and_values():
    y, p = synthetic(1200, seed=9)
    rng = np.random.default_rng(9)
    sex = rng.choice(["F", "M"], 1200)
    age = rng.uniform(20, 90, 1200)
    result = evaluate(y, p, FAST, groups={"sex": sex, "age": age})
    table = result.subgroups
    assert table.height == 5  # F, M and three age bands
    assert table["level"].to_list() == ["F", "M", "<50", "50-65", ">=65"]
    assert table.filter(pl.col("group") == "age_band")["n"].sum() == 1200
    female = table.row(0, named=True)
    mask = sex == "F"
    assert female["n"] == mask.sum() and female["n_positive"] == y[mask].sum()
    assert female["auroc"] == pytest.approx(roc_auc_score(y[mask], p[mask]))
    assert female["auroc_ci_low"] <= female["auroc"] <= female["auroc_ci_high"]
    assert set(f"{m}_ci_high" for m in METRICS) <= set(table.columns)


def test_subgroup_with_one_class_gets_null_rank_metrics():
    y = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.7, 0.4, 0.6, 0.5])
    site = np.array(["a", "a", "a", "b", "b", "b", "b", "b"])  # site a has no positives
    table = evaluate(y, p, EvalConfig(n_bootstrap=50), groups={"site": site}).subgroups
    row_a = table.filter(pl.col("level") == "a").row(0, named=True)
    assert row_a["auroc"] is None and row_a["auprc"] is None and row_a["sensitivity"] is None
    assert row_a["specificity"] == pytest.approx(1.0)
    assert table.schema["auroc"] == pl.Float64


# ---------------------------------------------------------------- outputs and errors


def test_flat_dict_frame_and_markdown():
    y, p = synthetic(800, seed=10)
    result = evaluate(y, p, FAST)
    flat = result.to_flat_dict(prefix="held_out_")
    assert flat["held_out_auroc"] == result.metrics["auroc"]["value"]
    assert {"held_out_auroc_ci_low", "held_out_n", "held_out_threshold"} <= flat.keys()
    assert all(isinstance(v, float) for v in flat.values())
    frame = result.to_frame()
    assert frame["metric"].to_list()[: len(METRICS)] == list(METRICS)
    assert frame.filter(pl.col("metric") == "auroc")["n_valid"].item() == 200
    markdown = result.to_markdown()
    assert re.search(r"\| AUROC \| \d\.\d\d \(\d\.\d\d-\d\.\d\d\) \|", markdown)


def test_data_driven_thresholds():
    y, p = synthetic(1000, seed=12)
    assert choose_threshold(y, p, "prevalence") == pytest.approx(y.mean())
    youden = choose_threshold(y, p, "youden")
    result = evaluate(y, p, EvalConfig(threshold="youden", n_bootstrap=0))
    assert result.threshold == pytest.approx(youden)
    # Youden's threshold maximises sens + spec; 0.5 on skewed risks does worse.
    at_half = evaluate(y, p, EvalConfig(threshold=0.5, n_bootstrap=0)).metrics
    at_youden = result.metrics
    assert (at_youden["sensitivity"]["value"] + at_youden["specificity"]["value"]) > (
        at_half["sensitivity"]["value"] + at_half["specificity"]["value"]
    )


@pytest.mark.parametrize(
    ("y", "p", "kwargs", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], {}, "3 samples but y_prob has 2"),
        ([0, 1, 1], [0.1, np.nan, 0.3], {}, "NaN"),
        ([0, 1, 2], [0.1, 0.2, 0.3], {}, "binary"),
        ([0, 1, 1], [0.1, 1.2, 0.3], {}, r"\[0, 1\]"),
        ([0, 1, 1], [0.1, 0.2, 0.3], {"cluster": np.array([1, 2])}, "cluster"),
        ([0, 1, 1], [0.1, 0.2, 0.3], {"groups": {"sex": np.array(["F"])}}, "sex"),
        ([], [], {}, "empty"),
        ([0, 1], ["low", "high"], {}, "numeric"),
    ],
)
def test_bad_inputs_raise_workbench_error(y, p, kwargs, message):
    with pytest.raises(WorkbenchError, match=message):
        evaluate(np.array(y), np.array(p), EvalConfig(n_bootstrap=10), **kwargs)


def test_config_rejects_out_of_range_values():
    with pytest.raises(ValidationError, match="threshold"):
        EvalConfig(threshold=1.5)
    with pytest.raises(ValidationError, match="age_bands"):
        EvalConfig(age_bands=[0, 65, 50])
    with pytest.raises(ValidationError, match="ci"):
        EvalConfig(ci=1.2)


def test_calibration_slope_and_intercept_match_logistic_recalibration_fits():
    """Slope: the coefficient of logit(p) in a logistic fit; intercept: the constant of the fit that
    keeps logit(p) as an offset (maximum likelihood, solved here with scipy); an overconfident model
    (risks pushed away from 0.5) has a slope below 1, a model that overestimates a negative intercept."""
    from scipy.optimize import brentq
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    true_logit = rng.normal(-1.0, 1.5, 3000)
    y = rng.uniform(size=3000) < 1 / (1 + np.exp(-true_logit))
    overconfident = 1 / (1 + np.exp(-(2.0 * true_logit + 0.8)))
    result = evaluate(y, overconfident, EvalConfig(n_bootstrap=200))
    x = np.log(overconfident / (1 - overconfident))
    slope = LogisticRegression(C=np.inf).fit(x[:, None], y).coef_[0, 0]
    intercept = brentq(lambda a: np.sum(y - 1 / (1 + np.exp(-(a + x)))), -10, 10)
    assert result.metrics["calibration_slope"]["value"] == pytest.approx(slope, rel=1e-4)
    assert result.metrics["calibration_intercept"]["value"] == pytest.approx(intercept, abs=1e-4)
    assert 0.45 < slope < 0.55 and intercept < -0.3
    low, high = result.metrics["calibration_slope"]["ci_low"], result.metrics["calibration_slope"]["ci_high"]
    assert low < slope < high and high - low < 0.2
    t = rng.normal(-1.0, 1.5, 20000)
    calibrated = evaluate(rng.uniform(size=20000) < 1 / (1 + np.exp(-t)), 1 / (1 + np.exp(-t)), EvalConfig(n_bootstrap=0)).metrics
    assert abs(calibrated["calibration_slope"]["value"] - 1) < 0.06 and abs(calibrated["calibration_intercept"]["value"]) < 0.06


def test_reliability_table_has_a_bootstrap_band_around_each_bin():
    rng = np.random.default_rng(4)
    p = rng.uniform(0.02, 0.98, 2000)
    y = rng.uniform(size=2000) < p
    table = evaluate(y, p, EvalConfig(n_bootstrap=300)).calibration
    assert (table["observed_ci_low"] <= table["observed_fraction"]).all()
    assert (table["observed_fraction"] <= table["observed_ci_high"]).all()
    no_ci = evaluate(y, p, EvalConfig(n_bootstrap=0)).calibration
    assert no_ci["observed_ci_low"].null_count() == no_ci.height


def test_paired_auroc_difference_is_tighter_than_separate_intervals():
    from workbench.evaluation import paired_auroc_difference

    rng = np.random.default_rng(5)
    n = 600
    subject = rng.integers(0, 200, n)
    signal = rng.normal(size=n)
    y = rng.uniform(size=n) < 1 / (1 + np.exp(-2 * signal))
    a = 1 / (1 + np.exp(-(signal + 0.3 * rng.normal(size=n))))
    b = 1 / (1 + np.exp(-(signal + 0.6 * rng.normal(size=n))))  # the same signal, noisier
    config = EvalConfig(n_bootstrap=500)
    diff = paired_auroc_difference(y, a, b, config, cluster=subject)
    ea, eb = (evaluate(y, p, config, cluster=subject).metrics["auroc"] for p in (a, b))
    assert diff["value"] == pytest.approx(ea["value"] - eb["value"])
    assert diff["ci_low"] > 0 and diff["p_a_better"] > 0.975  # a is better, and the pairing shows it
    assert ea["ci_low"] < eb["ci_high"]  # while the separate intervals overlap
    same = paired_auroc_difference(y, a, a, config)
    assert same["value"] == 0 and same["ci_low"] == same["ci_high"] == 0


def test_decision_curve_net_benefit_by_hand():
    """Net benefit from the confusion counts at each threshold (Vickers & Elkin 2006, eq. 1)."""
    from sklearn.metrics import confusion_matrix

    from workbench.evaluation import decision_curve

    rng = np.random.default_rng(6)
    p = rng.uniform(0, 1, 400)
    y = rng.uniform(size=400) < p
    curve = decision_curve(y, p, thresholds=[0.1, 0.25, 0.5])
    for row in curve.iter_rows(named=True):
        t = row["threshold"]
        tn, fp, fn, tp = confusion_matrix(y, p >= t).ravel()
        assert row["net_benefit"] == pytest.approx(tp / 400 - fp / 400 * t / (1 - t))
        assert row["net_benefit_treat_all"] == pytest.approx(y.mean() - (1 - y.mean()) * t / (1 - t))
    # a calibrated, informative model beats treating everyone once the threshold is not tiny
    full = decision_curve(y, p).filter(pl.col("threshold") >= 0.1)
    assert (full["net_benefit"] > full["net_benefit_treat_all"]).all() and (full["net_benefit"] > 0).all()
    with pytest.raises(WorkbenchError):
        decision_curve(y, p, thresholds=[0.0, 0.5])


def test_threshold_table_holds_a_tuning_threshold_fixed():
    from workbench.evaluation import threshold_table

    rng = np.random.default_rng(7)
    p = rng.uniform(0, 1, 1000)
    y = rng.uniform(size=1000) < p
    table = threshold_table(y[500:], p[500:], tuning=(y[:500], p[:500]))
    row = table.filter(pl.col("rule") == "sensitivity 90% on tuning").row(0, named=True)
    reached = (p[:500][y[:500]] >= row["threshold"]).mean()
    assert 0.9 <= reached < 0.9 + 1 / y[:500].sum() + 1e-9  # the target is met on tuning, just
    fixed = table.filter(pl.col("rule") == "risk >= 0.20").row(0, named=True)
    flagged = p[500:] >= 0.2
    assert fixed["ppv"] == pytest.approx(y[500:][flagged].mean())
    assert fixed["number_needed_to_evaluate"] == pytest.approx(1 / fixed["ppv"])
