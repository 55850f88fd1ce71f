"""Tests for workbench.plots: figures render, save atomically, and show the right numbers."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, roc_auc_score

from workbench.errors import WorkbenchError
from workbench.plots import (
    find_best_epoch,
    calibration_plot,
    pr_curve_plot,
    roc_curve_plot,
    save_figure,
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
    return [t.get_text() for t in fig.axes[axes_index].get_legend().get_texts()]


def assert_png(path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > min_bytes  # a blank 720x600 canvas compresses to ~3 kB


@pytest.mark.parametrize("make", [roc_curve_plot, pr_curve_plot, calibration_plot])
def test_curve_plots_save_non_trivial_pngs(make, curves, tmp_path):
    fig = make(curves)
    assert isinstance(fig, Figure)
    assert_png(save_figure(fig, tmp_path / "plots" / f"{make.__name__}.png"))
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
    assert_png(save_figure(fig, tmp_path / "training.png"))


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


def test_save_figure_replaces_atomically_and_leaves_no_temp_files(curves, tmp_path):
    target = tmp_path / "roc.png"
    target.write_bytes(b"old")
    save_figure(roc_curve_plot(curves), target)
    assert_png(target)
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]


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
