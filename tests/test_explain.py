"""SHAP per time step: additivity, the exact reference, padding, agreement with shap, checks.

Models are tiny (T=12, F=4) so the module runs in well under a minute on two busy cores; the
planted-signal test trains a slightly larger one and is marked slow.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from workbench import explain as E
from workbench.models import ModelConfig, build_model

T, F = 12, 4


def planted_sequences(n: int, t: int = T, f: int = F, seed: int = 0):
    """Left-padded sequences; positives carry a spike in channel 0 at one random real step.

    Returns X [n, t, f], y [n], observed [n, t] and the planted step (-1 for negatives).
    """
    rng = np.random.default_rng(seed)
    X = (0.5 * rng.normal(size=(n, t, f))).astype(np.float32)
    X[:, :, 0] = 0.0
    lengths = rng.integers(4, t + 1, size=n)
    y = rng.random(n) < 0.5
    planted = np.full(n, -1)
    for i in range(n):
        X[i, : t - lengths[i]] = 0.0
        if y[i]:
            planted[i] = rng.integers(t - lengths[i], t)
            X[i, planted[i], 0] = 3.0
    observed = np.arange(t)[None, :] >= (t - lengths)[:, None]
    return X, y.astype(np.float32), observed, planted


def trained_model(X, y, units: int = 16, epochs: int = 4, seed: int = 0):
    model = build_model(ModelConfig(units=units, learning_rate=3e-3), X.shape[1], X.shape[2], seed=seed)
    model.fit(X, y, epochs=epochs, batch_size=32, verbose=0)
    return model


class LinearRisk(torch.nn.Module):
    """f(x) = sum(w * x) + b: its Shapley values, per cell and per step, are known in closed form."""

    def __init__(self, t: int, f: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(t, f, generator=g))
        self.b = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return (x * self.w).sum(dim=(1, 2)) + self.b


@pytest.fixture(scope="module")
def planted():
    X, y, observed, steps = planted_sequences(500, seed=0)
    model = trained_model(X[:300], y[:300], epochs=3)
    X_background = E.select_background(X[:300], observed[:300], n=16, seed=0)
    return model, X[300:], y[300:], observed[300:], steps[300:], X_background


def quiet(**kwargs) -> E.ExplainConfig:
    return E.ExplainConfig(progress=False, **kwargs)


def test_default_additivity_below_5_percent(planted):
    model, X, _, observed, _, X_background = planted
    expl = E.explain(model, X, X_background, quiet(), observed)
    assert expl.shap.shape == X.shape and expl.shap.dtype == np.float32
    errors = E.additivity_errors(expl.shap.reshape(len(X), -1).sum(1), expl.output, expl.base_value)
    assert errors.mean() < 0.05
    # The levels are sums of the cells.
    np.testing.assert_allclose(expl.step_totals, expl.shap.sum(2), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(expl.feature_totals, expl.shap.sum(1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(expl.output, model.predict(X, verbose=0)[:, 0], atol=1e-5)


def test_padded_steps_get_exactly_zero(planted):
    model, X, _, observed, _, X_background = planted
    expl = E.explain(model, X[:40], X_background, quiet(), observed[:40])
    padded = E.padded_steps(X[:40], observed[:40])
    assert padded.any()
    assert np.all(expl.shap[padded] == 0.0)
    ref, _, _ = E.exact_step_shap(model, X[:3], X_background, observed[:3], quiet(reference_permutations=2))
    assert np.all(ref[padded[:3]] == 0.0)


@pytest.mark.parametrize("method", ["permutation", "kernel"])
def test_exact_reference_is_additive(planted, method):
    model, X, _, observed, _, X_background = planted
    cfg = quiet(reference_method=method, reference_permutations=3, reference_kernel_samples=200)
    values, base, output = E.exact_step_shap(model, X[:4], X_background, observed[:4], cfg)
    assert E.additivity_errors(values.sum(1), output, base).max() < 1e-6
    np.testing.assert_allclose(output, model.predict(X[:4], verbose=0)[:, 0], atol=1e-5)


def test_linear_model_matches_closed_form():
    """For a linear model both the fast path and the reference equal w * (x - mean baseline) exactly."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(5, T, F)).astype(np.float32)
    X[0, :4] = 0.0  # a padded sequence
    observed = np.ones((5, T), dtype=bool)
    observed[0, :4] = False
    X_background = rng.normal(size=(6, T, F)).astype(np.float32)
    model = LinearRisk(T, F)
    w = model.w.detach().numpy()
    padded = E.padded_steps(X, observed)
    baseline_mean = E.sample_baselines(X, padded, X_background).mean(axis=1)
    expected = w * (X - baseline_mean)

    expl = E.explain(model, X, X_background, quiet(), observed)
    np.testing.assert_allclose(expl.shap, expected, atol=1e-4)
    ref, base, output = E.exact_step_shap(model, X, X_background, observed, quiet(reference_permutations=2))
    np.testing.assert_allclose(ref, expected.sum(2), atol=1e-4)
    np.testing.assert_allclose(base, expl.base_value, atol=1e-5)


def test_agrees_with_shap_gradient_explainer(planted):
    """shap.GradientExplainer estimates the same expectation; at many samples the two agree.

    Sequences without padding, so our per-sequence baselines equal shap's background rows.
    """
    import shap

    model, X, _, observed, _, X_background = planted
    full = np.flatnonzero(observed.all(1))[:4]
    x = X[full]

    class Probability(torch.nn.Module):
        """Thin torch module around the Keras model: shap would take a Keras model for TensorFlow."""

        def __init__(self, keras_model):
            super().__init__()
            self.keras_model = keras_model

        def forward(self, inputs):
            return self.keras_model(inputs, training=False)

    torch.manual_seed(0)
    np.random.seed(0)
    explainer = shap.GradientExplainer(Probability(model), torch.from_numpy(X_background))
    theirs = np.asarray(explainer.shap_values(torch.from_numpy(x), nsamples=3000)).reshape(x.shape)
    ours = E.explain(model, x, X_background, quiet(alpha_scheme="gauss_legendre", alphas_per_background=8)).shap
    for a, b in zip(ours, theirs):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.97
        assert np.corrcoef(a.sum(1), b.sum(1))[0, 1] > 0.97


@pytest.mark.parametrize("output_space", ["probability", "logit"])
def test_recurrent_prefix_shortcut_reproduces_the_model(planted, output_space):
    """The shortcut (recurrent state after the padded prefix, then the real steps) gives the model's outputs."""
    model, X, _, _, _, X_background = planted
    fn = E.output_function(model, output_space)
    runner = E.prefix_runner(model, fn, output_space, X_background[:4])
    assert isinstance(runner, E._RecurrentPrefix)
    x = torch.from_numpy(X[:25])
    with torch.no_grad():
        for L in (0, 1, 5, T - 1):
            out = runner(x[:, L:], runner.select(runner.prefix_state(x[:, :L]), torch.arange(len(x))))
            np.testing.assert_allclose(out.numpy(), fn(x).numpy(), atol=1e-6)
    # A model of another structure gets the generic runner, which concatenates the prefix back.
    linear = LinearRisk(T, F)
    assert isinstance(E.prefix_runner(linear, E.output_function(linear), output_space, X_background[:4]), E._ConcatPrefix)


@pytest.mark.parametrize("pooled", [True, False])
def test_adaptive_alphas_are_unbiased(pooled):
    """Averaged over draws, the importance-weighted path integral equals mean_k (f_k(1) - f_k(0)) exactly."""
    K, G = 3, 4
    steep = np.array([40.0, 5.0, -15.0])  # one path jumps, one is smooth, one falls
    centre = np.array([0.3, 0.6, 0.55])
    f = lambda k, a: 1.0 / (1.0 + np.exp(-steep[k] * (a - centre[k])))  # noqa: E731
    grid = np.stack([f(k, np.linspace(0, 1, G + 1)) for k in range(K)])
    estimates = []
    for seed in range(4000):
        rows, alphas, weights = E.adaptive_alphas(grid, 2, 0.5, np.random.default_rng(seed), pooled)
        slope = steep[rows] * f(rows, alphas) * (1 - f(rows, alphas))
        estimates.append(np.sum(weights * slope))
    truth = np.mean([f(k, 1.0) - f(k, 0.0) for k in range(K)])
    assert abs(np.mean(estimates) - truth) < 4 * np.std(estimates) / np.sqrt(len(estimates)) + 1e-9


class SteepRisk(torch.nn.Module):
    """A risk that jumps when the spike channel's total crosses 1.5: along a path from a background
    row to a spiked sequence the output changes in a narrow stretch, where sampling errors concentrate."""

    def __init__(self, t: int, f: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(0.1 * torch.randn(t, f, generator=g))

    def forward(self, x):
        return torch.sigmoid(6.0 * (x[:, :, 0].sum(dim=1) - 1.5) + (x * self.w).sum(dim=(1, 2)))


def test_completeness_regression_sums_exactly_and_records_the_sampling_residual(planted):
    """The regression correction makes the values sum to output - base and keeps the uncorrected miss as sampling_residual."""
    model, X, _, observed, _, X_background = planted
    n = 40
    plain = E.explain(model, X[:n], X_background, quiet(completeness="none"), observed[:n])
    corrected = E.explain(model, X[:n], X_background, quiet(), observed[:n])
    # Same draws, so the same uncorrected miss; for the plain estimate it is its additivity gap.
    np.testing.assert_allclose(corrected.sampling_residual, plain.sampling_residual, atol=1e-9)
    gap = plain.shap.reshape(n, -1).sum(1) - (plain.output - plain.base_value)
    np.testing.assert_allclose(gap, plain.sampling_residual, atol=1e-5)
    assert np.abs(plain.sampling_residual).max() > 1e-3  # there was something to correct
    assert E.additivity_errors(corrected.shap.reshape(n, -1).sum(1), corrected.output, corrected.base_value).max() < 1e-3
    # Streamed batches keep the residual.
    parts = list(E.iter_explanations(model, X[:n], X_background, quiet(), observed[:n], batch_size=15))
    np.testing.assert_allclose(E.Explanation.concat(parts).sampling_residual, corrected.sampling_residual, atol=1e-6)


def test_completeness_regression_lowers_the_error_where_the_output_jumps():
    """Against a 2,048-draw estimate of the same quantity, the corrected values are closer than the plain ones."""
    X, _, observed, _ = planted_sequences(140, seed=1)
    model = SteepRisk(T, F)
    background = E.select_background(X[:100], observed[:100], n=16, seed=0)
    X, observed = X[100:], observed[100:]
    converged = E.explain(model, X, background, quiet(alphas_per_background=128, path_grid=32, completeness="none", seed=7), observed)

    def error(**kwargs) -> float:
        expl = E.explain(model, X, background, quiet(**kwargs), observed)
        return float(np.linalg.norm((expl.shap - converged.shap).reshape(len(X), -1), axis=1).mean())

    assert error() < 0.85 * error(completeness="none")


def test_completeness_regression_on_given_draws():
    """Exact sums; no change when the draw totals do not vary (nothing to regress on) or already sum to the target."""
    rng = np.random.default_rng(0)
    m, A, S, F_ = 3, 20, 5, 2
    v = torch.from_numpy(rng.normal(size=(m, A, S, F_)))
    totals = v.sum(dim=(2, 3))
    phi, vs = v.sum(1), torch.einsum("masf,ma->msf", v, totals)
    s_sum, s_sq = totals.sum(1), (totals**2).sum(1)
    target = torch.tensor([1.0, -2.0, 0.5])
    out = E.completeness_regression(phi, vs, s_sum, s_sq, A, target)
    np.testing.assert_allclose(out.sum(dim=(1, 2)).numpy(), target.numpy(), atol=1e-10)
    same = E.completeness_regression(phi, vs, s_sum, s_sq, A, s_sum)  # totals already right
    np.testing.assert_allclose(same.numpy(), phi.numpy(), atol=1e-12)
    flat = torch.ones(1, A, S, F_) / (S * F_)  # every draw totals 1: var(s) = 0
    out = E.completeness_regression(flat.sum(1), torch.einsum("masf,ma->msf", flat, flat.sum(dim=(2, 3))),
                                    torch.tensor([float(A)]), torch.tensor([float(A)]), A, torch.tensor([3.0]))
    np.testing.assert_allclose(out.numpy(), flat.sum(1).numpy())


def test_results_do_not_depend_on_threads_or_pass_sizes(planted):
    """Length groups run on parallel threads and draws in passes of any size: the same values either way."""
    model, X, _, observed, _, X_background = planted
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = E.explain(model, X[:30], X_background, quiet(), observed[:30])
        torch.set_num_threads(2)
        two = E.explain(model, X[:30], X_background, quiet(gradient_rows_per_pass=50, max_rows_per_pass=64), observed[:30])
        assert torch.get_num_threads() == 2  # restored after the single-threaded workers
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(one.shap, two.shap, atol=1e-5)
    np.testing.assert_allclose(one.sampling_residual, two.sampling_residual, atol=1e-5)


def test_streaming_matches_one_batch(planted):
    model, X, _, observed, _, X_background = planted
    cfg = quiet(max_rows_per_pass=100)
    whole = E.explain(model, X[:20], X_background, cfg, observed[:20])
    parts = list(E.iter_explanations(model, X[:20], X_background, cfg, observed[:20], batch_size=7))
    assert [len(p) for p in parts] == [7, 7, 6]
    joined = E.Explanation.concat(parts)
    np.testing.assert_array_equal(joined.index, np.arange(20))
    np.testing.assert_allclose(joined.shap, whole.shap, atol=1e-6)
    np.testing.assert_allclose(joined.base_value, whole.base_value, atol=1e-6)


def test_logit_space_sums_to_log_odds(planted):
    model, X, _, observed, _, X_background = planted
    expl = E.explain(model, X[:30], X_background, quiet(output_space="logit"), observed[:30])
    p = model.predict(X[:30], verbose=0)[:, 0].astype(np.float64)
    np.testing.assert_allclose(expl.output, np.log(p / (1 - p)), atol=1e-3)
    errors = E.additivity_errors(expl.shap.reshape(30, -1).sum(1), expl.output, expl.base_value)
    assert errors.mean() < 0.05


def test_check_explanation_reports_agreement_and_faithfulness(planted):
    model, X, _, observed, _, X_background = planted
    cfg = quiet(reference_samples=4, reference_permutations=4, deletion_samples=40)
    expl = E.explain(model, X[:60], X_background, cfg, observed[:60])
    metrics = E.check_explanation(model, X[:60], expl, X_background, cfg, observed[:60])
    assert metrics["additivity_mean_rel_error"] < 1e-3  # the completeness regression: exact up to rounding
    # ... while the sampling error it removed is reported beside it.
    assert metrics["sampling_additivity_mean_rel_error"] > metrics["additivity_mean_rel_error"]
    assert metrics["sampling_additivity_p95_rel_error"] >= metrics["sampling_additivity_mean_rel_error"] * 0.5
    assert metrics["reference_additivity_max_rel_error"] < 1e-6
    assert metrics["reference_pearson_mean"] > 0.8
    assert metrics["reference_top3_overlap_mean"] > 0.6
    # Removing the steps the explanation ranks first moves the risk more than random steps,
    # by about what their SHAP values say.
    for k in cfg.deletion_k:
        assert metrics[f"deletion_change_top_k{k}"] > metrics[f"deletion_change_random_k{k}"]
    assert metrics["deletion_change_top"] > metrics["deletion_change_random"]
    assert metrics["deletion_win_rate"] >= cfg.min_deletion_win_rate
    assert metrics["deletion_agreement"] >= cfg.min_deletion_agreement
    assert metrics["deletion_samples"] == 40
    assert all(np.isfinite(v) for v in metrics.values())
    verdicts = E.check_verdicts(metrics, cfg)
    assert set(verdicts["key"]) == {"additivity", "sampling_additivity", "reference_pearson", "reference_top3", "deletion_ranking", "deletion_agreement"}
    assert verdicts.filter(pl.col("key").str.starts_with("deletion"))["verdict"].to_list() == ["PASS", "PASS"]


def test_deletion_curve_in_logit_space_and_short_sequences(planted):
    """The deletion test runs in the explanation's output space; sequences with at most k real steps are not counted at k."""
    model, X, _, observed, _, X_background = planted
    cfg = quiet(output_space="logit", deletion_k=[1, 3], deletion_random_draws=3)
    short = observed.copy()
    short[:10] = False
    short[:10, -2:] = True  # two real steps
    x = X.copy()
    x[:10, :-2] = 0.0
    expl = E.explain(model, x[:30], X_background, cfg, short[:30])
    curve = E.deletion_curve(model, x[:30], expl.step_totals, X_background, cfg, short[:30])
    np.testing.assert_array_equal(curve["k"], [1, 3])
    assert curve["n"].tolist() == [30, 20]  # k=3 skips the ten two-step sequences
    assert np.all(curve["top"] > curve["random"])
    assert np.nanmean(curve["agreement"]) > 0.6
    # In logit space the removed steps' SHAP sum predicts the change in log-odds, hence the same
    # curve from check_explanation (which follows the explanation's space).
    metrics = E.check_explanation(model, x[:30], expl, X_background, cfg.model_copy(update={"reference_samples": 0, "deletion_samples": 30}), short[:30])
    assert metrics["deletion_samples"] == 30 and metrics["deletion_agreement"] > 0.6


def test_select_background_skips_empty_sequences_and_is_distinct():
    X, _, observed, _ = planted_sequences(120, seed=5)
    X[:10] = 0.0
    observed[:10] = False
    for method in ("random", "kmeans"):
        idx = E.select_background_indices(X, observed, n=12, seed=1, method=method)
        assert len(set(idx.tolist())) == 12 and idx.min() >= 10
    np.testing.assert_array_equal(E.select_background(X, observed, n=5, seed=2, method="random"), X[E.select_background_indices(X, observed, 5, 2, "random")])


def test_explanation_frame_long_format(planted):
    model, X, _, observed, _, X_background = planted
    expl = E.explain(model, X[:5], X_background, quiet(), observed[:5])
    raw = X[:5] * 2.0 + 1.0  # a stand-in for spec.denormalize: raw values differ from X and are non-zero on padding
    times = np.arange(5 * T).reshape(5, T).astype("datetime64[D]").astype("datetime64[us]")
    names = [f"f{j}" for j in range(F)]
    frame = E.explanation_frame(expl, np.arange(100, 105), times[:, -1], times, names, raw, observed[:5])
    assert frame.height == int(observed[:5].sum()) * F
    assert frame.columns == [
        "subject_id", "prediction_time", "step", "step_end_time", "feature", "value", "shap",
        "step_total", "feature_total", "output", "base_value",
    ]
    row = frame.filter((pl.col("subject_id") == 102) & (pl.col("step") == T - 1) & (pl.col("feature") == "f1")).row(0, named=True)
    assert row["value"] == pytest.approx(raw[2, T - 1, 1])
    assert row["shap"] == pytest.approx(expl.shap[2, T - 1, 1])
    assert row["step_total"] == pytest.approx(expl.step_totals[2, T - 1])
    sums = frame.group_by("subject_id").agg(pl.col("shap").sum()).sort("subject_id")["shap"].to_numpy()
    np.testing.assert_allclose(sums, expl.shap.reshape(5, -1).sum(1), atol=1e-5)


def planted_step_hit_rate(model, X, y, observed, steps, X_background, threshold: float | None = 0.5) -> tuple[float, int, float]:
    """Share of the positives the model predicts positive whose planted step is among their top-3 steps,
    how many such positives there are, and the largest |padded attribution|.

    A positive is predicted positive when its output exceeds ``threshold``, or with None the
    model's median output on X (so about half the positives count whatever the model's
    calibration). With no such positive the share is NaN, which no comparison accepts.
    """
    expl = E.explain(model, X, X_background, quiet(), observed)
    cut = np.median(expl.output) if threshold is None else threshold
    hits = (expl.output > cut) & (y == 1)
    top3 = np.argsort(-expl.step_totals, axis=1)[:, :3]
    in_top = np.array([steps[i] in top3[i] for i in np.flatnonzero(hits)])
    padded = E.padded_steps(X, observed)
    rate = float(in_top.mean()) if len(in_top) else float("nan")
    return rate, len(in_top), float(np.abs(expl.step_totals[padded]).max())


@pytest.mark.slow
def test_planted_step_ranks_top3_and_fails_on_shuffled_labels():
    X, y, observed, steps = planted_sequences(1500, t=24, f=8, seed=11)
    train, test = slice(0, 1200), slice(1200, None)
    X_background = E.select_background(X[train], observed[train], n=32, seed=0)
    model = trained_model(X[train], y[train], units=32, epochs=6)
    rate, hits, padded_max = planted_step_hit_rate(model, X[test], y[test], observed[test], steps[test], X_background)
    assert hits >= 30, f"only {hits} positives predicted positive: the hit rate would say little"
    assert rate >= 0.9
    assert padded_max <= 1e-6
    # Trained on shuffled labels, the model has not learned the spike, so its explanations
    # should not find it. Its risks hover around 0.5 and may all fall on one side, so its
    # "predicted positives" are the positives it ranks above its own median: never an empty
    # set that would let the comparison pass without comparing anything.
    shuffled = trained_model(X[train], np.random.default_rng(0).permutation(y[train]), units=32, epochs=6)
    shuffled_rate, shuffled_hits, _ = planted_step_hit_rate(
        shuffled, X[test], y[test], observed[test], steps[test], X_background, threshold=None
    )
    assert shuffled_hits >= 30, f"only {shuffled_hits} positives ranked above the shuffled model's median"
    assert shuffled_rate < 0.9
