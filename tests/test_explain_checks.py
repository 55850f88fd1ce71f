"""Explanation checks with verdicts: the deletion test on low-prevalence data, wrong explanations, verdict rows.

The data: a rare planted spike (channel 0) that raises the risk, and an age-like channel
(per-subject value plus noise, on every real step) that moves it up or down, at about 8%
prevalence, with a model trained without class weights. Most sequences then sit below their
base value and nearly all their steps *lowered* the risk: the case where the old deletion
test (top-k by signed step total, signed fall in risk) reported removing the top steps as
moving the risk less than removing random ones. Tiny model (T=12, F=4), one torch thread:
a few seconds in all.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from workbench import explain as E
from workbench.models import ModelConfig, build_model

T, F = 12, 4
N_TRAIN, N_EXPLAIN = 600, 200
KS = (1, 2, 3, 5)


def low_prevalence_sequences(n: int, seed: int = 0, planted_share: float = 0.08):
    """Left-padded sequences, y ~ Bernoulli(sigmoid(-4 + 5 * planted + 1.5 * age)); about 8% positive.

    Returns X [n, T, F], y [n], observed [n, T] and the planted step (-1: none).
    """
    rng = np.random.default_rng(seed)
    X = (0.5 * rng.normal(size=(n, T, F))).astype(np.float32)
    X[:, :, 0] = 0.0
    age = rng.normal(size=n)
    X[:, :, 1] = age[:, None] + 0.5 * rng.normal(size=(n, T))
    lengths = rng.integers(4, T + 1, size=n)
    planted = rng.random(n) < planted_share
    step = np.full(n, -1)
    for i in range(n):
        X[i, : T - lengths[i]] = 0.0
        if planted[i]:
            step[i] = rng.integers(T - lengths[i], T)
            X[i, step[i], 0] = 3.0
    risk = 1.0 / (1.0 + np.exp(-(-4.0 + 5.0 * planted + 1.5 * age)))
    y = (rng.random(n) < risk).astype(np.float32)
    observed = np.arange(T)[None, :] >= (T - lengths)[:, None]
    return X, y, observed, step


@pytest.fixture(scope="module")
def low_prevalence():
    """A model trained on the low-prevalence data, the held-out sequences, their explanation and the config."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X, y, observed, step = low_prevalence_sequences(N_TRAIN + N_EXPLAIN, seed=0)
        train, held = slice(0, N_TRAIN), slice(N_TRAIN, None)
        model = build_model(ModelConfig(units=16, learning_rate=3e-3), T, F, seed=0)
        model.fit(X[train], y[train], epochs=6, batch_size=32, verbose=0)
        background = E.select_background(X[train], observed[train], n=16, seed=0)
        config = E.ExplainConfig(progress=False, reference_samples=0, deletion_samples=N_EXPLAIN)
        expl = E.explain(model, X[held], background, config, observed[held])
        yield model, X[held], y, observed[held], step[held], background, config, expl
    finally:
        torch.set_num_threads(threads)


def signed_deletion(model, X, observed, step_totals, background, seed: int = 0, draws: int = 4):
    """The old deletion test, for comparison: mean over k of the signed fall in risk, [N] for top-k and for random k.

    Top-k are the k largest *signed* step totals (the steps that raised the risk most).
    """
    fn = E.output_function(model, "probability")
    padded = E.padded_steps(X, observed)
    rng = np.random.default_rng(seed)
    top, rand = np.zeros(len(X)), np.zeros(len(X))
    for i in range(len(X)):
        game = E.StepGame(fn, X[i], padded[i], background)
        P = len(game.players)
        order = np.argsort(-step_totals[i, game.players], kind="stable")
        for k in KS:
            keep = np.ones((1 + draws, P))
            keep[0, order[:k]] = 0
            for d in range(draws):
                keep[1 + d, rng.permutation(P)[:k]] = 0
            fall = game.v_full - game(keep)
            top[i] += fall[0] / len(KS)
            rand[i] += fall[1:].mean() / len(KS)
    return top, rand


def test_deletion_check_passes_on_low_prevalence_where_the_signed_test_misled(low_prevalence, one_torch_thread):
    model, X, y, observed, step, background, config, expl = low_prevalence
    assert y.mean() < 0.12
    # The model learned the planted spike: it is the top step of (nearly) every planted sequence.
    planted = np.flatnonzero(step >= 0)
    assert len(planted) >= 10
    assert (np.argmax(expl.step_totals[planted], axis=1) == step[planted]).mean() >= 0.9

    # Most sequences are below their base value: their steps mostly lowered the risk.
    low = expl.output < expl.base_value
    assert low.mean() > 0.6
    # There the old test misleads: removing the "top" (largest signed, near-zero) steps moves the
    # risk less than removing random (mostly risk-lowering) steps, as users saw it.
    old_top, old_random = signed_deletion(model, X[low], observed[low], expl.step_totals[low], background)
    assert abs(old_top.mean()) < abs(old_random.mean())
    assert old_random.mean() < 0  # removing random steps raises these sequences' risk

    # The fixed test ranks by |attribution| and compares |change|: it passes on every kind of sample.
    checks = E.check_explanation(model, X, expl, background, config, observed)
    assert checks["deletion_samples"] == N_EXPLAIN
    for k in KS:
        assert checks[f"deletion_change_top_k{k}"] > checks[f"deletion_change_random_k{k}"] > 0
    assert checks["deletion_win_rate"] >= config.min_deletion_win_rate
    assert checks["deletion_agreement"] >= config.min_deletion_agreement
    for subset in (low, ~low):
        curve = E.deletion_curve(model, X[subset], expl.step_totals[subset], background, config, observed[subset])
        assert np.all(curve["top"] > curve["random"])
        assert np.all(curve["win_rate"] >= config.min_deletion_win_rate)
        assert np.nanmean(curve["agreement"]) >= config.min_deletion_agreement
    verdicts = E.check_verdicts(checks, config)
    assert verdicts["key"].to_list() == ["additivity", "sampling_additivity", "deletion_ranking", "deletion_agreement"]
    assert verdicts["verdict"].to_list() == ["PASS"] * 4
    assert E.verdict_tags(verdicts)[E.VERDICT_TAG] == "PASS"


def shuffled_over_steps(expl: E.Explanation, observed: np.ndarray, seed: int = 0) -> E.Explanation:
    """The same explanation with each sequence's real steps permuted: additive still, but wrong."""
    rng = np.random.default_rng(seed)
    shap = expl.shap.copy()
    padded = E.padded_steps(shap, observed)  # shap is zero on padding, so observed decides
    for i in range(len(shap)):
        real = np.flatnonzero(~padded[i])
        shap[i, real] = shap[i, rng.permutation(real)]
    return dataclasses.replace(expl, shap=shap, step_totals=shap.sum(axis=2), feature_totals=shap.sum(axis=1))


def test_wrong_explanations_get_a_warning(low_prevalence, one_torch_thread):
    model, X, _, observed, _, background, config, expl = low_prevalence
    config = config.model_copy(update={"reference_samples": 6, "reference_permutations": 4, "deletion_samples": 100})
    # Shuffled over steps: sums are intact (additivity passes), the ranking is chance.
    shuffled = shuffled_over_steps(expl, observed)
    verdicts = E.check_verdicts(E.check_explanation(model, X, shuffled, background, config, observed), config)
    by_key = dict(zip(verdicts["key"], verdicts["verdict"]))
    assert by_key["additivity"] == "PASS"
    assert by_key["deletion_ranking"] == by_key["deletion_agreement"] == "WARN"
    assert by_key["reference_pearson"] == "WARN"
    assert E.verdict_tags(verdicts)[E.VERDICT_TAG] == "WARN"
    # Signs flipped: the |attribution| ranking is unchanged, so only the predicted-vs-actual
    # agreement (and additivity) can see it.
    flipped = dataclasses.replace(expl, shap=-expl.shap, step_totals=-expl.step_totals, feature_totals=-expl.feature_totals)
    checks = E.check_explanation(model, X, flipped, background, config.model_copy(update={"reference_samples": 0}), observed)
    verdicts = E.check_verdicts(checks, config)
    by_key = dict(zip(verdicts["key"], verdicts["verdict"]))
    assert by_key["deletion_ranking"] == "PASS"
    assert by_key["deletion_agreement"] == "WARN" and checks["deletion_agreement"] < 0
    assert by_key["additivity"] == "WARN"


# --------------------------------------------------------------------------------------
# check_verdicts and verdict_tags on given metrics
# --------------------------------------------------------------------------------------

ALL_GOOD = {
    "additivity_mean_rel_error": 0.01,
    "additivity_max_rel_error": 0.4,
    "reference_pearson_mean": 0.97,
    "reference_pearson_min": 0.9,
    "reference_top3_overlap_mean": 0.9,
    "reference_additivity_max_rel_error": 0.0,
    "reference_samples": 20.0,
    "deletion_change_top_k1": 0.05,
    "deletion_change_random_k1": 0.01,
    "deletion_change_top": 0.05,
    "deletion_change_random": 0.01,
    "deletion_win_rate": 0.9,
    "deletion_agreement": 0.95,
    "deletion_samples": 200.0,
}


def test_verdict_rows_columns_and_thresholds():
    verdicts = E.check_verdicts(ALL_GOOD)
    assert verdicts.columns == ["key", "check", "value", "threshold", "verdict", "meaning"]
    assert verdicts["key"].to_list() == ["additivity", "reference_pearson", "reference_top3", "deletion_ranking", "deletion_agreement"]
    assert verdicts["verdict"].to_list() == ["PASS"] * 5
    row = verdicts.row(0, named=True)
    assert row["check"] == "additivity (mean relative error)"
    assert row["value"] == pytest.approx(0.01)
    assert row["threshold"] == "<= 0.05"
    assert row["meaning"]
    config = E.ExplainConfig()
    thresholds = dict(zip(verdicts["key"], verdicts["threshold"]))
    assert thresholds["reference_pearson"] == f">= {config.min_reference_pearson:g}"
    assert thresholds["deletion_ranking"] == f">= {config.min_deletion_win_rate:g}"
    assert verdicts.write_csv().startswith("key,check,value,threshold,verdict,meaning")


@pytest.mark.parametrize(
    ("metric", "value", "key", "verdict"),
    [
        ("additivity_mean_rel_error", 0.05, "additivity", "PASS"),  # at the threshold passes
        ("additivity_mean_rel_error", 0.0501, "additivity", "WARN"),
        ("reference_pearson_mean", 0.89, "reference_pearson", "WARN"),
        ("reference_top3_overlap_mean", 0.8, "reference_top3", "PASS"),
        ("reference_top3_overlap_mean", 0.5, "reference_top3", "WARN"),
        ("deletion_win_rate", 0.5, "deletion_ranking", "WARN"),
        ("deletion_agreement", -0.9, "deletion_agreement", "WARN"),
        ("deletion_agreement", float("nan"), "deletion_agreement", "WARN"),  # not measurable: not verified
    ],
)
def test_one_failing_check_warns_and_sets_the_overall_tag(metric, value, key, verdict):
    verdicts = E.check_verdicts(ALL_GOOD | {metric: value})
    row = verdicts.filter(pl.col("key") == key).row(0, named=True)
    assert row["verdict"] == verdict
    others = verdicts.filter(pl.col("key") != key)["verdict"].to_list()
    assert others == ["PASS"] * 4
    tags = E.verdict_tags(verdicts)
    assert tags[f"workbench.explain.check.{key}"] == verdict
    assert tags["workbench.explain.verdict"] == verdict


def test_thresholds_come_from_the_config():
    strict = E.ExplainConfig(max_additivity_error=0.005, min_deletion_win_rate=0.95)
    verdicts = E.check_verdicts(ALL_GOOD, strict)
    by_key = dict(zip(verdicts["key"], verdicts["verdict"]))
    assert by_key == {"additivity": "WARN", "reference_pearson": "PASS", "reference_top3": "PASS", "deletion_ranking": "WARN", "deletion_agreement": "PASS"}
    assert verdicts.filter(pl.col("key") == "additivity")["threshold"].item() == "<= 0.005"
    for field in ("max_additivity_error", "min_reference_pearson", "min_reference_top3_overlap", "min_deletion_win_rate", "min_deletion_agreement"):
        assert E.ExplainConfig.model_fields[field].description


def test_checks_not_run_have_no_row():
    only_additivity = {"additivity_mean_rel_error": 0.01, "additivity_max_rel_error": 0.2}
    verdicts = E.check_verdicts(only_additivity)
    assert verdicts["key"].to_list() == ["additivity"]
    assert E.verdict_tags(verdicts) == {"workbench.explain.check.additivity": "PASS", "workbench.explain.verdict": "PASS"}
    empty = E.check_verdicts({})
    assert empty.height == 0 and empty.columns == verdicts.columns
    assert E.verdict_tags(empty) == {"workbench.explain.verdict": "WARN"}  # nothing verified
