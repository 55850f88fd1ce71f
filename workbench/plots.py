"""Evaluation and training plots: ROC, precision-recall, calibration, training curves.

Every function builds a ``matplotlib.figure.Figure`` directly instead of going through
``pyplot``: no global figure registry (nothing leaks in long pipelines, no ``plt.close``
needed), no GUI backend (safe headless and under Agg), and in Jupyter the returned figure
is displayed once rather than twice. Nothing here calls ``plt.show``.

Curves are passed as ``{"model name": (y_true, y_prob)}``; a model keeps the same colour
in every plot because colours follow the dict's order.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from workbench.errors import WorkbenchError
from workbench.evaluation import (
    calibration_bin_edges,
    calibration_table,
    check_predictions,
    expected_calibration_error,
)

FIGSIZE = (6.0, 5.0)
DPI = 120
_COLORS = [f"C{i}" for i in range(10)]
# Keys of a training history that are not per-epoch quality measures.
_NOT_METRICS = {"epoch", "lr", "learning_rate", "time", "seconds"}

Curves = Mapping[str, tuple[Sequence, Sequence]]


def _checked_curves(curves: Curves) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validated (labels, probabilities) per model; raises on an empty mapping."""
    if not curves:
        raise WorkbenchError("a plot needs at least one model's (y_true, y_prob)")
    return {name: check_predictions(y, p) for name, (y, p) in curves.items()}


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    """The shared look: title, axis labels, light grid, legend when something is labelled."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small", framealpha=0.9)


def _both_classes(name: str, y: np.ndarray) -> None:
    if y.all() or not y.any():
        raise WorkbenchError(f"{name}: ROC and PR curves need both outcomes in y_true")


def roc_curve_plot(curves: Curves, title: str = "ROC curve") -> Figure:
    """ROC curves of several models on one axes, AUROC in the legend, chance diagonal."""
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    for color, (name, (y, p)) in zip(_COLORS * 10, _checked_curves(curves).items()):
        _both_classes(name, y)
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, color=color, lw=2, label=f"{name} (AUROC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="Chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    _style(ax, title, "False positive rate (1 - specificity)", "True positive rate (sensitivity)")
    return fig


def pr_curve_plot(curves: Curves, title: str = "Precision-recall curve") -> Figure:
    """Precision-recall curves with AUPRC in the legend and the prevalence baseline.

    The baseline (precision of a random ranking = outcome rate) is what AUPRC must beat;
    models evaluated on different data each get their own dotted baseline.
    """
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    checked = _checked_curves(curves)
    prevalences = {name: float(y.mean()) for name, (y, _) in checked.items()}
    shared = len(set(prevalences.values())) == 1
    for color, (name, (y, p)) in zip(_COLORS * 10, checked.items()):
        _both_classes(name, y)
        precision, recall, _ = precision_recall_curve(y, p)
        label = f"{name} (AUPRC {average_precision_score(y, p):.3f})"
        # Step plot: average precision is the area under this step function.
        ax.step(recall, precision, where="post", color=color, lw=2, label=label)
        if not shared:
            ax.axhline(prevalences[name], ls=":", color=color, lw=1, label=f"{name} prevalence")
    if shared:
        prevalence = next(iter(prevalences.values()))
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"Prevalence ({prevalence:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    _style(ax, title, "Recall (sensitivity)", "Precision (PPV)")
    return fig


def calibration_plot(
    curves: Curves,
    n_bins: int = 10,
    strategy: str = "uniform",
    title: str = "Calibration",
) -> Figure:
    """Reliability diagram (observed vs mean predicted risk per bin) over a prediction histogram.

    Points come from ``sklearn.calibration.calibration_curve``; the legend gives each model's
    expected calibration error with the same bins as :func:`workbench.evaluation.evaluate`.
    """
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * 1.25), layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
    ax = fig.add_subplot(grid[0])
    hist_ax = fig.add_subplot(grid[1], sharex=ax)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="Perfectly calibrated")
    hist_bins = np.linspace(0.0, 1.0, 41)
    for color, (name, (y, p)) in zip(_COLORS * 10, _checked_curves(curves).items()):
        observed, predicted = calibration_curve(y, p, n_bins=n_bins, strategy=strategy)
        edges = calibration_bin_edges(p, n_bins, strategy)
        ece = expected_calibration_error(calibration_table(y, p, edges))
        ax.plot(predicted, observed, marker="o", color=color, lw=2, label=f"{name} (ECE {ece:.3f})")
        hist_ax.hist(p, bins=hist_bins, histtype="step", color=color, lw=1.5, label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    _style(ax, title, "", "Observed outcome rate")
    ax.tick_params(labelbottom=False)
    hist_ax.set_yscale("log")  # risk scores are skewed; a log count keeps the tail visible
    _style(hist_ax, "", "Mean predicted risk", "Samples")
    if hist_ax.get_legend() is not None:
        hist_ax.get_legend().remove()  # colours already named above
    return fig


def _history_columns(history) -> dict[str, np.ndarray]:
    """Per-key arrays from a list of per-epoch dicts or a Keras ``History.history`` dict."""
    if isinstance(history, Mapping):
        lengths = {len(v) for v in history.values()}
        if len(lengths) > 1:
            raise WorkbenchError(f"history lists have different lengths: {sorted(lengths)}")
        rows = [dict(zip(history.keys(), values)) for values in zip(*history.values())]
    else:
        rows = list(history)
    if not rows:
        raise WorkbenchError("training history is empty: nothing to plot")
    keys = [k for k in dict.fromkeys(k for row in rows for k in row)]
    columns = {}
    for key in keys:
        values = [row.get(key) for row in rows]
        if all(v is None or isinstance(v, (int, float, np.number)) for v in values):
            columns[key] = np.array([math.nan if v is None else float(v) for v in values])
    return columns


def _default_monitor(names: list[str]) -> str:
    """The quantity early stopping most likely watched: validation loss, else training loss."""
    for candidate in ("val_loss", "tune_loss", "tuning_loss", "loss"):
        if candidate in names:
            return candidate
    return names[0]


def find_best_epoch(
    history, monitor: str | None = None, mode: str | None = None
) -> tuple[int, str]:
    """(best epoch number, monitored key); mode 'min' for losses, 'max' otherwise."""
    columns = _history_columns(history)
    names = [k for k in columns if k not in _NOT_METRICS]
    if not names:
        raise WorkbenchError("training history has no numeric metrics to plot")
    monitor = monitor or _default_monitor(names)
    if monitor not in columns:
        raise WorkbenchError(f"monitor {monitor!r} not in history; available: {names}")
    mode = mode or ("min" if "loss" in monitor else "max")
    values = columns[monitor]
    if np.isnan(values).all():
        raise WorkbenchError(f"monitor {monitor!r} has no values")
    index = int(np.nanargmin(values) if mode == "min" else np.nanargmax(values))
    epochs = columns.get("epoch", np.arange(1, len(values) + 1))
    return int(epochs[index]), monitor


def training_curves_plot(
    history,
    monitor: str | None = None,
    mode: str | None = None,
    best_epoch: int | None = None,
    title: str = "Training curves",
) -> Figure:
    """Losses (left) and tuning metrics (right) per epoch, the best epoch marked on both.

    ``history`` is a list of per-epoch dicts (an optional ``epoch`` key gives the x axis,
    as in ``TrainResult.history``) or a Keras ``History.history`` dict of lists. Pass
    ``best_epoch`` (e.g. ``TrainResult.best_epoch``) to mark the epoch whose weights were
    kept; otherwise it is found from ``monitor``/``mode``, by default the lowest
    ``val_loss`` / ``tune_loss``.
    """
    columns = _history_columns(history)
    names = [k for k in columns if k not in _NOT_METRICS]
    if best_epoch is None:
        best, monitor = find_best_epoch(history, monitor, mode)
    else:
        best, monitor = best_epoch, monitor or "restored"
    epochs = columns.get("epoch", np.arange(1, len(next(iter(columns.values()))) + 1))
    losses = [k for k in names if "loss" in k]
    others = [k for k in names if "loss" not in k]
    panels = [(keys, label) for keys, label in ((losses, "Loss"), (others, "Metric")) if keys]
    fig = Figure(figsize=(FIGSIZE[0] * len(panels), FIGSIZE[1] * 0.8), layout="constrained")
    fig.suptitle(title)
    for i, (keys, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for color, key in zip(_COLORS * 10, keys):
            ax.plot(epochs, columns[key], marker=".", color=color, lw=1.5, label=key)
        ax.axvline(best, ls="--", color="black", lw=1, label=f"Best epoch {best} ({monitor})")
        _style(ax, "Loss" if ylabel == "Loss" else "Tuning metrics", "Epoch", ylabel)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG atomically (temporary file in the same folder, then rename).

    A reader (MLflow artifact upload, a report build) never sees a half-written image, and
    an interrupted save leaves any previous file intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".png")
    os.close(handle)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def patient_timelines_plot(events, subject_ids: Sequence[int], max_codes: int = 12, title: str = "Event timelines") -> Figure:
    """One row per patient: every event as a mark at its time, coloured by code family.

    ``events`` is a polars frame of MEDS events (subject_id, time, code) for those patients.
    Shows visit rhythm, when labs were drawn and where follow-up ends, at a glance.
    """
    import polars as pl

    ids = list(subject_ids)
    if not ids:
        raise WorkbenchError("patient_timelines_plot needs at least one subject id")
    timed = events.filter(pl.col("subject_id").is_in(ids)).drop_nulls("time")
    families = timed["code"].str.split("//").list.first()
    timed = timed.with_columns(families.alias("family"))
    order = timed.group_by("family").len().sort("len", descending=True)["family"].head(max_codes).to_list()
    fig = Figure(figsize=(9.0, 0.6 * len(ids) + 1.6))
    ax = fig.subplots()
    for i, family in enumerate(order):
        part = timed.filter(pl.col("family") == family)
        rows = [ids.index(s) for s in part["subject_id"].to_list()]
        ax.scatter(part["time"].to_list(), rows, s=18, marker="|" if family in ("VISIT",) else "o",
                   color=_COLORS[i % len(_COLORS)], label=family, alpha=0.8)
    ax.set_yticks(range(len(ids)), [f"subject {s}" for s in ids])
    ax.invert_yaxis()
    _style(ax, title, "time", "")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    return fig


def metric_comparison_plot(table, metrics: Sequence[str] = ("auroc", "auprc", "brier"),
                           title: str = "Held-out metrics with 95% CIs") -> Figure:
    """Models side by side, one panel per metric, point estimates with CI error bars.

    ``table`` is a polars frame with a ``model`` column and ``<metric>``, ``<metric>_ci_low``,
    ``<metric>_ci_high`` columns (what ``tracking.runs_table`` returns).
    """
    if table.height == 0:
        raise WorkbenchError("metric_comparison_plot needs at least one model row")
    fig = Figure(figsize=(4.0 * len(metrics), 4.2))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    names = table["model"].to_list()
    for ax, metric in zip(axes, metrics):
        value = table[metric].to_numpy().astype(float)
        low = value - table[f"{metric}_ci_low"].to_numpy().astype(float)
        high = table[f"{metric}_ci_high"].to_numpy().astype(float) - value
        ax.bar(range(len(names)), value, yerr=np.vstack([low, high]), capsize=4,
               color=[_COLORS[i % len(_COLORS)] for i in range(len(names))], alpha=0.85)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        _style(ax, metric.upper(), "", metric)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def shap_heatmap_plot(shap_values, raw_values, step_end_time, feature_names, padded=None,
                      max_features: int = 12, title: str = "SHAP per time step and feature") -> Figure:
    """One patient's attributions: features (rows) x time steps (columns), raw values written in.

    Red pushed the risk up, blue down; padded steps are left out. Only the ``max_features``
    features with the largest total |SHAP| are shown, so the picture stays readable.
    """
    shap_values, raw_values = np.asarray(shap_values, float), np.asarray(raw_values, float)
    keep = ~np.asarray(padded, bool) if padded is not None else np.ones(shap_values.shape[0], bool)
    if not keep.any():
        raise WorkbenchError("shap_heatmap_plot: every step of this sequence is padding")
    s, v, times = shap_values[keep], raw_values[keep], np.asarray(step_end_time)[keep]
    order = np.argsort(-np.abs(s).sum(axis=0))[:max_features]
    s, v = s[:, order].T, v[:, order].T
    limit = float(np.abs(s).max()) or 1.0
    fig = Figure(figsize=(max(6.0, 0.55 * s.shape[1] + 3.5), 0.42 * len(order) + 2.0))
    ax = fig.subplots()
    image = ax.imshow(s, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), value in np.ndenumerate(np.where(np.abs(v) < 1e-6, 0.0, v)):  # float32 round-trip noise
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=6, color="black")
    ax.set_yticks(range(len(order)), [_short(feature_names[k]) for k in order], fontsize=8)
    labels = [str(np.datetime64(t, "D")) for t in times]
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    fig.colorbar(image, ax=ax, label="SHAP (risk)")
    ax.set_title(title)
    ax.set_xlabel("end of time step")
    fig.tight_layout()
    return fig


def step_timeline_plot(step_totals, step_end_time, padded, risk_times, risk_values, base_value: float,
                       title: str = "Step contributions and risk trajectory") -> Figure:
    """One patient: each time step's total SHAP as a bar at its calendar time, and the model's
    risk at each of the patient's prediction times as a line (right axis)."""
    keep = ~np.asarray(padded, bool)
    totals, times = np.asarray(step_totals, float)[keep], np.asarray(step_end_time)[keep]
    fig = Figure(figsize=(9.0, 4.2))
    ax = fig.subplots()
    if len(times) > 1:
        width = float(np.median(np.diff(times).astype("timedelta64[s]").astype(float))) / 86400 * 0.8
    else:
        width = 30.0
    colors = np.where(totals >= 0, "#c0392b", "#2e6da4")
    ax.bar(times.astype("datetime64[s]").tolist(), totals, width=width, color=colors, alpha=0.85,
           label="step contribution (SHAP)")
    ax.axhline(0, color="black", linewidth=0.8)
    right = ax.twinx()
    right.plot(np.asarray(risk_times).astype("datetime64[s]").tolist(), risk_values, "o-", color="C1", label="risk")
    right.axhline(base_value, color="grey", linestyle=":", label=f"base value {base_value:.2f}")
    right.set_ylabel("risk")
    right.set_ylim(0, 1)
    _style(ax, title, "time", "SHAP (change in risk)")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    ax.legend(handles, labels, loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def global_importance_plot(by_feature, by_step, max_features: int = 15,
                           title: str = "Global importance (mean |SHAP|)") -> Figure:
    """Mean |SHAP| by feature (left) and by time step relative to the prediction time (right).

    ``by_feature`` and ``by_step`` are polars frames with columns (feature, mean_abs_shap) and
    (steps_before_prediction, mean_abs_shap).
    """
    fig = Figure(figsize=(11.0, 4.8))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    top = by_feature.sort("mean_abs_shap", descending=True).head(max_features).reverse()
    left.barh([_short(f) for f in top["feature"].to_list()], top["mean_abs_shap"].to_list(), color="C0")
    _style(left, "by feature", "mean |SHAP|", "")
    steps = by_step.sort("steps_before_prediction")
    right.bar(steps["steps_before_prediction"].to_list(), steps["mean_abs_shap"].to_list(), color="C2")
    right.invert_xaxis()
    _style(right, "by time step (0 = the bin ending at the prediction time)", "steps before prediction", "mean |SHAP|")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
