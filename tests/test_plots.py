"""Tests for workbench.plots: figures render, save atomically, and show the right numbers."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, roc_auc_score

from workbench.errors import WorkbenchError
from workbench.plots import (
    auroc_forest_plot,
    calibration_plot,
    feature_label,
    feature_labels,
    find_best_epoch,
    format_cell_value,
    global_importance_plot,
    metric_comparison_plot,
    pr_curve_plot,
    roc_curve_plot,
    shap_heatmap_plot,
    text_color_for,
    training_curves_plot,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def curves():
    rng = np.random.default_rng(0)
    p = rng.beta(1, 5, 1500)
    y = rng.random(1500) < p
    noisy = np.clip(p + rng.normal(0, 0.15, 1500), 0, 1)
    return {"lstm": (y, p), "gru": (y, noisy)}


HISTORY = [
    {
        "epoch": e,
        "loss": 1 / e,
        "val_loss": 1 / e + 0.01 * (e - 6) ** 2,
        "val_auroc": 0.6 + 0.02 * e,
    }
    for e in range(1, 11)
]


def legend_texts(fig: Figure, axes_index: int = 0) -> list[str]:
    legend = fig.axes[axes_index].get_legend() or (fig.legends[0] if fig.legends else None)
    return [t.get_text() for t in legend.get_texts()]


def assert_png(fig, min_bytes: int = 10_000) -> None:
    """The PNG a notebook shows for ``fig`` (IPython's ``_repr_png_``) is a real, non-blank image."""
    data = fig._repr_png_()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > min_bytes  # a blank 720x600 canvas compresses to ~3 kB


@pytest.mark.parametrize("make", [roc_curve_plot, pr_curve_plot, calibration_plot])
def test_curve_plots_save_non_trivial_pngs(make, curves, tmp_path):
    fig = make(curves)
    assert isinstance(fig, Figure)
    assert_png(fig)
    assert plt.get_fignums() == []  # built without pyplot: nothing left open


def test_roc_legend_reports_sklearn_auroc(curves):
    texts = legend_texts(roc_curve_plot(curves))
    y, p = curves["lstm"]
    assert f"lstm (AUROC {roc_auc_score(y, p):.3f})" in texts
    assert "Chance" in texts


def test_pr_plot_has_auprc_and_prevalence_baseline(curves):
    fig = pr_curve_plot(curves)
    y, p = curves["gru"]
    assert f"gru (AUPRC {average_precision_score(y, p):.3f})" in legend_texts(fig)
    baseline = [line for line in fig.axes[0].lines if line.get_label().startswith("Prevalence")]
    assert len(baseline) == 1
    assert baseline[0].get_ydata()[0] == pytest.approx(y.mean())


def test_calibration_plot_has_diagonal_and_histogram(curves):
    fig = calibration_plot(curves, n_bins=5)
    reliability, histogram = fig.axes
    diagonal = reliability.lines[0]
    np.testing.assert_array_equal(diagonal.get_xdata(), diagonal.get_ydata())
    assert len(reliability.lines) == 3  # diagonal + two models
    assert len(reliability.lines[1].get_xdata()) <= 5
    assert len(histogram.patches) == 2  # one step histogram per model
    assert any(t.startswith("lstm (ECE ") for t in legend_texts(fig))


def test_training_curves_mark_best_epoch(tmp_path):
    # val_loss = 1/e + 0.01 (e - 6)^2: 0.167 at epoch 6, 0.153 at 7, 0.165 at 8.
    expected = 7
    assert find_best_epoch(HISTORY) == (expected, "val_loss")
    fig = training_curves_plot(HISTORY)
    loss_ax, metric_ax = fig.axes
    for ax in (loss_ax, metric_ax):
        marker = [line for line in ax.lines if line.get_label().startswith("Best epoch")]
        assert marker and marker[0].get_xdata()[0] == expected
    assert {"loss", "val_loss"} <= {line.get_label() for line in loss_ax.lines}
    assert "val_auroc" in {line.get_label() for line in metric_ax.lines}
    assert_png(fig)


def test_training_curves_accept_keras_history_dict():
    keras_history = {
        "loss": [0.9, 0.5, 0.4],
        "val_loss": [0.8, 0.6, 0.7],
        "val_auc": [0.6, 0.7, 0.72],
    }
    assert find_best_epoch(keras_history) == (2, "val_loss")
    assert find_best_epoch(keras_history, monitor="val_auc") == (3, "val_auc")
    fig = training_curves_plot(keras_history, monitor="val_auc")
    assert len(fig.axes) == 2


def test_training_curves_reject_unknown_monitor_and_empty_history():
    with pytest.raises(WorkbenchError, match="val_auprc"):
        training_curves_plot(HISTORY, monitor="val_auprc")
    with pytest.raises(WorkbenchError, match="empty"):
        training_curves_plot([])


def test_curve_plots_reject_bad_input():
    with pytest.raises(WorkbenchError, match="at least one"):
        roc_curve_plot({})
    with pytest.raises(WorkbenchError, match="both outcomes"):
        roc_curve_plot({"m": (np.zeros(5), np.linspace(0, 1, 5))})
    with pytest.raises(WorkbenchError, match="NaN"):
        pr_curve_plot({"m": (np.array([0, 1]), np.array([0.2, np.nan]))})


def test_training_curves_mark_a_given_best_epoch_in_trainer_history():
    # The trainer's format: tune_* metrics, a wall-time column, best epoch chosen by AUROC.
    columns = ("epoch", "loss", "tune_auroc", "tune_auprc", "tune_loss", "seconds")
    rows = [
        (1, 0.7, 0.70, 0.30, 0.60, 2.0),
        (2, 0.6, 0.78, 0.35, 0.55, 2.1),
        (3, 0.5, 0.76, 0.36, 0.52, 2.0),
    ]
    history = [dict(zip(columns, row)) for row in rows]
    assert find_best_epoch(history) == (3, "tune_loss")
    fig = training_curves_plot(history, best_epoch=2)
    loss_ax, metric_ax = fig.axes
    assert {line.get_label() for line in loss_ax.lines} >= {"loss", "tune_loss"}
    assert "seconds" not in {line.get_label() for line in metric_ax.lines}
    marker = [line for line in metric_ax.lines if line.get_label().startswith("Best epoch 2")]
    assert marker and marker[0].get_xdata()[0] == 2


# ------------------------------------------------------------------------------ feature labels


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("LAB//bilirubin/last", "bilirubin (last)"),
        ("LAB//bilirubin/mean", "bilirubin (mean)"),
        ("TRIAL//arm//placebo/count", "arm: placebo (count)"),
        ("DX//diabetes/count", "diabetes (count)"),
        ("EXAM//edema/last", "edema (last)"),
        ("LAB//albumin/missing", "albumin (missing)"),
        ("LAB//protime/time_since", "protime (days since last)"),
        ("LAB//alk_phos/max", "alk phos (max)"),
        ("VISIT/count", "VISIT (count)"),
        ("static/age_years", "age (years)"),
        ("static/SEX//F", "sex: F"),
        ("step/observed", "any event in step"),
    ],
)
def test_feature_label_examples(name, label):
    assert feature_label(name) == label


@pytest.mark.parametrize("name", ["", "weird", "LAB//bilirubin/median", "LAB////x/last", "/last", "static/", "step/other"])
def test_feature_label_falls_back_to_the_raw_name(name):
    assert feature_label(name) == name


def test_feature_label_names_every_channel_the_tensorizer_makes():
    from workbench.features import FeatureConfig, _feature_names

    config = FeatureConfig(numeric_aggs=["last", "mean", "min", "max"], add_missing_indicators=True,
                           add_time_since_last=True)
    names = _feature_names(config, ["LAB//bilirubin"], ["DX//diabetes", "TRIAL//arm//placebo"], ["SEX//F"], True)
    labels = [feature_label(n) for n in names]
    assert all(label != name for label, name in zip(labels, names)), dict(zip(names, labels))
    assert len(set(labels)) == len(labels)


def test_feature_labels_keep_colliding_labels_apart():
    labels = feature_labels(["LAB//bilirubin/last", "EXAM//bilirubin/last", "static/age_years"])
    assert labels == ["bilirubin (last) [LAB]", "bilirubin (last) [EXAM]", "age (years)"]
    assert feature_labels(["x", "x"]) == ["x", "x"]


# -------------------------------------------------------------------------------- forest plots


def runs(**overrides) -> pl.DataFrame:
    """A runs_table-like frame: five models with AUROCs 0.905-0.931 and one run without metrics."""
    data = {
        "run_id": ["r1aaaaaaaa", "r2bbbbbbbb", "r3cccccccc", "r4dddddddd", "r5eeeeeeee", "r6ffffffff"],
        "model": ["lstm", "gru", "lstm_attention", "logistic", "transformer", "crashed"],
        "auroc": [0.921, 0.912, 0.928, 0.905, 0.931, None],
        "auroc_ci_low": [0.897, 0.886, 0.905, 0.878, 0.909, None],
        "auroc_ci_high": [0.943, 0.936, 0.949, 0.930, 0.951, None],
        "brier": [0.071, 0.074, 0.069, 0.078, 0.068, None],
        "brier_ci_low": [0.062, 0.065, 0.060, 0.069, 0.059, None],
        "brier_ci_high": [0.080, 0.083, 0.078, 0.087, 0.077, None],
    }
    data.update(overrides)
    return pl.DataFrame(data)


def row_labels(ax) -> list[str]:
    """y tick labels from the top row down (the axis is inverted: best at the top)."""
    ticks = sorted(zip(ax.get_yticks(), ax.get_yticklabels()), key=lambda t: t[0],
                   reverse=bool(ax.get_ylim()[0] < ax.get_ylim()[1]))
    return [label.get_text() for _, label in ticks]


def test_forest_plot_rows_sorted_best_first_nulls_skipped_axis_zoomed(tmp_path):
    fig = auroc_forest_plot(runs())
    ax = fig.axes[0]
    assert row_labels(ax) == ["transformer", "lstm_attention", "lstm", "gru", "logistic"]  # no "crashed"
    low, high = ax.get_xlim()
    assert 0.8 < low < 0.878 and 0.951 < high <= 1.0  # zoomed to the CIs, not from 0
    texts = [t.get_text() for t in ax.texts]
    assert "0.931 (0.909–0.951)" in texts and "0.905 (0.878–0.930)" in texts
    assert not any("nan" in t or "None" in t for t in texts)
    assert_png(fig, min_bytes=5_000)


def test_forest_plot_lower_is_better_reference_and_missing_ci():
    table = runs(brier_ci_low=[0.062, None, 0.060, 0.069, 0.059, None])
    fig = auroc_forest_plot(table, metric="brier", reference=0.1)
    ax = fig.axes[0]
    assert row_labels(ax) == ["transformer", "lstm_attention", "lstm", "gru", "logistic"]  # lowest first
    assert "lower is better" in ax.get_title()
    assert "0.074 (no CI)" in [t.get_text() for t in ax.texts]
    assert any(list(line.get_xdata()) == [0.1, 0.1] for line in ax.lines)  # the reference line
    assert ax.get_xlim()[1] > 0.1 > ax.get_xlim()[0] > 0.0


def test_forest_plot_duplicate_models_and_bad_tables():
    table = runs(model=["lstm", "lstm", "gru", "gru", "gru", "x"])
    labels = row_labels(auroc_forest_plot(table).axes[0])
    assert len(set(labels)) == 5 and "lstm · r1aaaaaa" in labels
    with pytest.raises(WorkbenchError, match="no model"):
        auroc_forest_plot(runs().filter(pl.col("auroc").is_null()))
    with pytest.raises(WorkbenchError, match="auprc"):
        auroc_forest_plot(runs(), metric="auprc")


def test_metric_comparison_plot_is_forest_panels_with_zoomed_axes():
    table = runs(ece=[0.021, 0.034, 0.018, 0.012, 0.027, None], ece_ci_low=[0.012, 0.022, 0.010, 0.006, 0.016, None],
                 ece_ci_high=[0.033, 0.047, 0.030, 0.021, 0.040, None])
    fig = metric_comparison_plot(table)  # the notebook's call; auprc absent from this table
    panels = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in panels]
    assert titles == ["AUROC (higher is better)", "Brier score (lower is better)", "ECE (lower is better)"]
    assert panels[0].get_xlim()[0] > 0.8
    expected = ["transformer", "lstm_attention", "lstm", "gru", "logistic"]  # every panel in AUROC order
    assert row_labels(panels[0]) == expected
    assert "0.012 (0.006–0.021)" in [t.get_text() for t in panels[2].texts]
    with pytest.raises(WorkbenchError, match="auprc"):
        metric_comparison_plot(table, metrics=("auroc", "auprc"))


# ------------------------------------------------------------------------------ SHAP heatmap


@pytest.mark.parametrize(
    ("value", "text"),
    [(1770.0, "1770"), (1770.4, "1770"), (12345.0, "12.3k"), (1.5e6, "1.5M"), (0.0123, "0.012"),
     (3.517, "3.52"), (10.7, "10.7"), (1.0, "1"), (0.0, "0"), (3e-8, "0"), (0.5, "0.5"), (-2.25, "-2.25"),
     (0.00045, "0.00045"), (float("nan"), "–")],
)
def test_format_cell_value(value, text):
    assert format_cell_value(value) == text


def test_text_color_follows_background_luminance():
    assert text_color_for((0.4, 0.0, 0.05, 1.0)) == "white"  # dark red
    assert text_color_for((0.02, 0.19, 0.38, 1.0)) == "white"  # dark blue
    assert text_color_for((0.97, 0.97, 0.97, 1.0)) == "black"
    assert text_color_for((0.96, 0.65, 0.51, 1.0)) == "black"  # light salmon


def test_shap_heatmap_text_is_readable_and_features_are_labelled():
    names = ["LAB//alk_phos/last", "LAB//copper/last", "step/observed", "static/SEX//F", "LAB//protime/time_since"]
    raw = np.array([[1770.0, 0.0123, 1.0, 1.0, 182.6], [12345.0, 0.0123, 0.0, 1.0, 3.0], [9.0, 9.0, 9.0, 9.0, 9.0]])
    shap = np.array([[0.9, 0.01, -0.9, 0.0, 0.05], [1.0, -0.02, -0.1, 0.0, 0.5], [5.0, 5.0, 5.0, 5.0, 5.0]])
    padded = np.array([False, False, True])  # the third step must not be shown
    times = np.array(["2001-01-01", "2001-04-01", "2001-07-01"], dtype="datetime64[D]")
    fig = shap_heatmap_plot(shap, raw, times, names, padded, max_features=5)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "alk phos (last)"  # largest total |SHAP| first
    assert set(labels) == {"alk phos (last)", "copper (last)", "any event in step", "sex: F", "protime (days since last)"}
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(cells) == 2 * 5  # padded step left out
    assert all(t.get_fontsize() >= 8 for t in ax.texts)
    assert not any("e+" in t.get_text() or "e-" in t.get_text() for t in ax.texts)
    row = {label: i for i, label in enumerate(labels)}
    text = lambda label, step: cells[(row[label], step)]
    assert text("alk phos (last)", 0).get_text() == "1770"
    assert text("alk phos (last)", 1).get_text() == "12.3k"
    assert text("copper (last)", 0).get_text() == "0.012"
    assert text("any event in step", 0).get_text() == "1" and text("any event in step", 1).get_text() == "0"
    assert text("protime (days since last)", 0).get_text() == "183"
    # Saturated cells (|SHAP| at the colour limit) get white text, near-zero cells black.
    assert text("alk phos (last)", 1).get_color() == "white"  # darkest red
    assert text("any event in step", 0).get_color() == "white"  # dark blue
    assert text("sex: F", 0).get_color() == "black"  # SHAP 0: near-white cell
    assert text("copper (last)", 0).get_color() == "black"


def test_global_importance_uses_feature_labels_and_keeps_same_label_bars_apart():
    by_feature = pl.DataFrame({"feature": ["LAB//bilirubin/last", "EXAM//bilirubin/last", "static/age_years"],
                               "mean_abs_shap": [0.3, 0.2, 0.1]})
    by_step = pl.DataFrame({"steps_before_prediction": [0, 1], "mean_abs_shap": [0.2, 0.1]})
    left = global_importance_plot(by_feature, by_step).axes[0]
    assert [t.get_text() for t in left.get_yticklabels()] == ["age (years)", "bilirubin (last) [EXAM]",
                                                              "bilirubin (last) [LAB]"]
    assert len(left.patches) == 3


# ------------------------------------------------------------------------- many models overlaid


def test_curve_plots_with_five_models_have_distinct_colours_and_legend_outside(curves):
    y, p = curves["lstm"]
    rng = np.random.default_rng(1)
    five = {f"model_{k}": (y, np.clip(p + rng.normal(0, 0.03 * k, len(p)), 0, 1)) for k in range(5)}
    for make in (roc_curve_plot, pr_curve_plot, calibration_plot):
        fig = make(five)
        ax = fig.axes[0]
        model_lines = [line for line in ax.lines if line.get_label().startswith("model_")]
        assert len(model_lines) == 5
        assert len({line.get_color() for line in model_lines}) == 5
        fig.draw_without_rendering()
        legend = ax.get_legend() or fig.legends[0]
        assert len(legend.get_texts()) >= 6
        box = legend.get_window_extent()
        for axes in fig.axes:
            frame = axes.get_window_extent()
            assert box.y1 <= frame.y0 + 1  # entirely below every axes: covers no curve


def test_figures_display_as_png_in_ipython(curves):
    """A figure made without pyplot shows as an image in Jupyter, not as `<Figure size ...>`."""
    from IPython.core.interactiveshell import InteractiveShell

    data, _ = InteractiveShell.instance().display_formatter.format(roc_curve_plot(curves))
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert "<Figure size" not in data["text/plain"] and "ROC curve" in data["text/plain"]
