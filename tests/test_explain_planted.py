"""Planted-signal test on the synthetic generator's data: SHAP must find the step that drives the outcome.

The generator plants ``DX//planted_event`` once, 30-360 days after enrollment, in 30% of
subjects, and only those subjects are at high risk (0.7 against 0.05); its ground truth says
when. The whole pipeline runs here as a user would run it: synthetic MEDS data, the shipped
``synth_planted`` task, tensors, an LSTM trained on train/tuning, SHAP on the held-out split.
A model trained on shuffled labels is the control: if the ranking came from the inputs alone
(a large count on a rare code) rather than from the model, the control would pass too.

Settings: 30-day bins, 14 steps (420 days before the prediction time at enrollment + 365 days),
so the planted event lands in one of steps 2-13 and step 0, before enrollment, is padding for
every sample. About 40 s on an idle 2-core machine.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from workbench import explain as E
from workbench.data.synth import SynthConfig, generate, read_ground_truth
from workbench.features import FeatureConfig, fit_transform
from workbench.models import ModelConfig
from workbench.tasks import make_labels
from workbench.training import TrainConfig, predict_risk, train

pytestmark = pytest.mark.slow

# Risk above this counts as predicted positive. Training uses balanced class weights, which
# put the decision point of the trained risk at 0.5.
THRESHOLD = 0.5
TOP_K = 3
MIN_RATE = 0.9
# Padded steps have x == baseline, so expected gradients give them exactly 0; the bound leaves
# room only for float32 rounding.
PADDED_BOUND = 1e-6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Tensors by split, the held-out samples' planted step (-1: not planted) and the SHAP background."""
    root = tmp_path_factory.mktemp("planted") / "synth"
    generate(root, SynthConfig(n_subjects=2000, seed=7), progress=False)
    labels = make_labels(root, "synth_planted").labels
    _, tensors = fit_transform(root, labels, FeatureConfig(bin_width="30d", n_steps=14))
    train_split, tune, held_out = (tensors.by_split(s) for s in ("train", "tuning", "held_out"))

    truth = pl.DataFrame({"subject_id": held_out.subject_id}).join(read_ground_truth(root), on="subject_id", how="left")
    # The task's prediction time is the generator's, so the ground truth's steps are the tensors' steps.
    np.testing.assert_array_equal(truth["prediction_time"].to_numpy(), held_out.prediction_time)
    planted_step = np.array([step_of(ends, t) for ends, t in zip(held_out.step_end_time, truth["planted_time"].to_numpy())])
    assert (planted_step >= 0).sum() > 50  # enough planted subjects to measure a rate on

    config = E.ExplainConfig(progress=False)  # the defaults, as an analyst would run it
    background = E.select_background(
        train_split.X, train_split.observed, n=config.n_background, seed=config.seed, method=config.background_selection
    )
    return train_split, tune, held_out, planted_step, background, config


def step_of(step_ends: np.ndarray, event_time: np.datetime64) -> int:
    """Index of the step holding ``event_time`` (step t covers (end_t - width, end_t]); -1 for NaT."""
    if np.isnat(event_time):
        return -1
    step = int(np.searchsorted(step_ends, event_time, side="left"))  # first step with end >= time
    assert step < len(step_ends), "planted event after the prediction time"
    return step


def planted_rate(y_train: np.ndarray, cohort) -> tuple[float, int, float]:
    """Train on ``y_train``, explain held-out correctly predicted positives.

    Returns the share of them whose planted step is among their top-3 steps by *signed* step
    total (the planted event raises the risk, so it should push it up, not just move it; a
    positive with no planted event counts as a miss), how many there were, and the largest
    |step total| on a padded step.
    """
    train_split, tune, held_out, planted_step, background, config = cohort
    result = train(
        ModelConfig(units=32, learning_rate=3e-3),
        # Balanced weights: "correctly predicted" means risk > THRESHOLD, a ranking question here, and
        # a model trained on shuffled labels must still flag some positives for the test to mean anything.
        TrainConfig(epochs=8, batch_size=64, seed=0, progress=False, class_weight="balanced"),
        train_split.X, y_train, tune.X, tune.y,
    )
    risk = predict_risk(result.model, held_out.X)
    rows = np.flatnonzero((held_out.y == 1) & (risk > THRESHOLD))
    X, observed = held_out.X[rows], held_out.observed[rows]
    expl = E.explain(result.model, X, background, config, observed)

    top = np.argsort(-expl.step_totals, axis=1, kind="stable")[:, :TOP_K]
    hits = (top == planted_step[rows, None]).any(axis=1)
    padded = E.padded_steps(X, observed)
    assert padded.any()  # step 0 precedes enrollment: the padding bound is really exercised
    return float(hits.mean()) if len(rows) else 0.0, len(rows), float(np.abs(expl.step_totals[padded]).max())


def test_planted_step_ranks_top3_and_padding_gets_no_attribution(cohort):
    rate, n, padded_max = planted_rate(cohort[0].y, cohort)
    assert n >= 30, f"only {n} correctly predicted positives: the model did not learn the planted signal"
    assert rate >= MIN_RATE, f"planted step in the top {TOP_K} for {rate:.1%} of {n} correctly predicted positives"
    assert padded_max <= PADDED_BOUND


def test_shuffled_labels_break_the_planted_ranking(cohort):
    shuffled = np.random.default_rng(0).permutation(cohort[0].y)
    rate, n, padded_max = planted_rate(shuffled, cohort)
    # A rate over an empty or tiny set would pass without showing anything.
    assert n >= 10, f"only {n} correctly predicted positives under shuffled labels"
    assert rate < MIN_RATE, f"a model trained on shuffled labels still ranks the planted step top {TOP_K} for {rate:.1%}"
    assert padded_max <= PADDED_BOUND
