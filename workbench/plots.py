"""Evaluation and training plots: ROC, precision-recall, calibration, training curves.

Every function builds a :class:`Figure` directly instead of going through ``pyplot``: no global
figure registry (nothing leaks in long pipelines, no ``plt.close`` needed), no GUI backend (safe
headless and under Agg), and in Jupyter the returned figure is displayed once rather than twice.
Nothing here calls ``plt.show``. A bare matplotlib figure made without pyplot shows in Jupyter
only as its repr (``<Figure size ...>``: IPython's inline PNG formatter is set up by pyplot);
:class:`Figure` renders itself as PNG, so ``display(fig)`` shows the plot in JupyterLab, in
Papermill's executed notebooks and in their HTML, whatever the kernel's matplotlib state.

Curves are passed as ``{"model name": (y_true, y_prob)}``; a model keeps the same colour
in every plot because colours follow the dict's order, and legends sit outside the axes so
several models overlaid stay visible. Model comparisons from ``tracking.runs_table`` are forest
plots (:func:`auroc_forest_plot`, :func:`metric_comparison_plot`) with zoomed axes. Feature
channels are shown by :func:`feature_label` ("bilirubin (last)"), never by raw channel name.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MatplotlibFigure
from matplotlib.ticker import MaxNLocator
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


class Figure(MatplotlibFigure):
    """A matplotlib figure that IPython displays as a PNG image (see the module docstring)."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        return buffer.getvalue()

    def __repr__(self) -> str:
        """The plain-text stand-in beside the image: what the plot is, not matplotlib's size line."""
        title = self._suptitle.get_text() if self._suptitle is not None else ""
        title = title or next((ax.get_title() for ax in self.axes if ax.get_title()), "")
        return f"[plot: {title or 'untitled'}]"


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


def _legend_below(ax: Axes) -> None:
    """The legend under the axes (outside them), so it never covers a curve however many models."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    ncol = 1 if len(labels) <= 3 or max(len(t) for t in labels) > 34 else 2
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=ncol,
              fontsize="small", frameon=False)


def _legend_height(n_entries: int) -> float:
    """Extra figure height (inches) for a below-axes legend of ``n_entries`` lines."""
    rows = n_entries if n_entries <= 3 else math.ceil(n_entries / 2)
    return 0.22 * rows + 0.2


def _both_classes(name: str, y: np.ndarray) -> None:
    if y.all() or not y.any():
        raise WorkbenchError(f"{name}: ROC and PR curves need both outcomes in y_true")


# ------------------------------------------------------------------------------ feature labels

# Channel naming of workbench.features (``_feature_names``); kept here as literals so the plots
# do not import the tensorization stack. tests/test_plots.py checks they stay in step.
_AGE_CHANNEL = "static/age_years"
_OBSERVED_CHANNEL = "step/observed"
_AGG_LABELS = {
    "last": "last",
    "mean": "mean",
    "min": "min",
    "max": "max",
    "count": "count",
    "missing": "missing",
    "time_since": "days since last",
    "ever": "ever",
    "days_since_first": "days since first",
    "days_since_last": "days since last",
}


def _words(text: str) -> str:
    return text.replace("_", " ").strip()


def _code_label(code: str, static: bool = False) -> str | None:
    """``LAB//bilirubin`` -> bilirubin, ``TRIAL//arm//placebo`` -> arm: placebo; None if malformed.

    A static ``SEX//F`` reads "sex: F": for a static code the prefix is the attribute and the
    rest its value, whereas for an event code the prefix is only the family (LAB, DX, MED).
    """
    parts = code.split("//")
    if any(not part.strip() for part in parts):
        return None
    if len(parts) == 1:
        return code
    if len(parts) == 2:
        return f"{_words(parts[0]).lower()}: {parts[1]}" if static else _words(parts[1])
    return f"{_words(parts[1])}: {' '.join(_words(p) for p in parts[2:])}"


def feature_label(name: str) -> str:
    """A human label for a feature channel name of ``workbench.features`` (the raw name if unknown).

    ``LAB//bilirubin/last`` -> "bilirubin (last)", ``TRIAL//arm//placebo/count`` ->
    "arm: placebo (count)", ``LAB//protime/time_since`` -> "protime (days since last)",
    ``static/age_years`` -> "age (years)", ``static/SEX//F`` -> "sex: F",
    ``step/observed`` -> "any event in step".
    """
    if not isinstance(name, str):
        return str(name)
    if name == _OBSERVED_CHANNEL:
        return "any event in step"
    if name == _AGE_CHANNEL:
        return "age (years)"
    if name.startswith("static/"):
        label = _code_label(name[len("static/"):], static=True)
        return label or name
    code, sep, agg = name.rpartition("/")
    if not sep or agg not in _AGG_LABELS or not code or code.endswith("/"):
        return name
    label = _code_label(code)
    return f"{label} ({_AGG_LABELS[agg]})" if label else name


def feature_labels(names: Sequence[str]) -> list[str]:
    """:func:`feature_label` of each name, kept unique: where two channels would read the same
    (``LAB//bilirubin`` and ``EXAM//bilirubin``), those get their code family appended."""
    labels = [feature_label(n) for n in names]
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    out = []
    for name, label in zip(names, labels):
        if counts[label] > 1 and label != name:
            family = str(name).removeprefix("static/").split("//")[0]
            label = f"{label} [{family}]"
        out.append(label)
    # Still ambiguous (same family twice, e.g. two identical names): fall back to the raw names.
    return [n if out.count(lab) > 1 else lab for n, lab in zip(names, out)]


# ---------------------------------------------------------------------------------- curve plots


def roc_curve_plot(curves: Curves, title: str = "ROC curve") -> Figure:
    """ROC curves of several models on one axes, AUROC in the legend, chance diagonal."""
    checked = _checked_curves(curves)
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] + _legend_height(len(checked) + 1)), layout="constrained")
    ax = fig.add_subplot()
    for color, (name, (y, p)) in zip(_COLORS * 10, checked.items()):
        _both_classes(name, y)
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, color=color, lw=1.8, alpha=0.9, label=f"{name} (AUROC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="Chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    _style(ax, title, "False positive rate (1 - specificity)", "True positive rate (sensitivity)")
    _legend_below(ax)
    return fig


def pr_curve_plot(curves: Curves, title: str = "Precision-recall curve") -> Figure:
    """Precision-recall curves with AUPRC in the legend and the prevalence baseline.

    The baseline (precision of a random ranking = outcome rate) is what AUPRC must beat;
    models evaluated on different data each get their own dotted baseline.
    """
    checked = _checked_curves(curves)
    prevalences = {name: float(y.mean()) for name, (y, _) in checked.items()}
    shared = len(set(prevalences.values())) == 1
    n_entries = len(checked) + (1 if shared else len(checked))
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] + _legend_height(n_entries)), layout="constrained")
    ax = fig.add_subplot()
    for color, (name, (y, p)) in zip(_COLORS * 10, checked.items()):
        _both_classes(name, y)
        precision, recall, _ = precision_recall_curve(y, p)
        label = f"{name} (AUPRC {average_precision_score(y, p):.3f})"
        # Step plot: average precision is the area under this step function.
        ax.step(recall, precision, where="post", color=color, lw=1.8, alpha=0.9, label=label)
        if not shared:
            ax.axhline(prevalences[name], ls=":", color=color, lw=1, label=f"{name} prevalence")
    if shared:
        prevalence = next(iter(prevalences.values()))
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"Prevalence ({prevalence:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    _style(ax, title, "Recall (sensitivity)", "Precision (PPV)")
    _legend_below(ax)
    return fig


def calibration_plot(
    curves: Curves,
    n_bins: int = 10,
    strategy: str = "uniform",
    title: str = "Calibration",
    bands: Mapping | None = None,
) -> Figure:
    """Reliability diagram (observed vs mean predicted risk per bin) over a prediction histogram.

    Points come from ``sklearn.calibration.calibration_curve``; the legend gives each model's
    expected calibration error with the same bins as :func:`workbench.evaluation.evaluate`.
    ``bands`` (``{model: EvaluationResult.calibration}``) shades each bin's bootstrap interval of
    the observed rate.
    """
    checked = _checked_curves(curves)
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * 1.25 + _legend_height(len(checked) + 1)), layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
    ax = fig.add_subplot(grid[0])
    hist_ax = fig.add_subplot(grid[1], sharex=ax)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="Perfectly calibrated")
    hist_bins = np.linspace(0.0, 1.0, 41)
    for color, (name, (y, p)) in zip(_COLORS * 10, checked.items()):
        observed, predicted = calibration_curve(y, p, n_bins=n_bins, strategy=strategy)
        edges = calibration_bin_edges(p, n_bins, strategy)
        ece = expected_calibration_error(calibration_table(y, p, edges))
        ax.plot(predicted, observed, marker="o", ms=4, color=color, lw=1.6, alpha=0.9, label=f"{name} (ECE {ece:.3f})")
        band = (bands or {}).get(name)
        if band is not None and band["observed_ci_low"].null_count() < band.height:
            ax.fill_between(band["mean_predicted"].to_numpy(), band["observed_ci_low"].fill_null(np.nan).to_numpy(),
                            band["observed_ci_high"].fill_null(np.nan).to_numpy(), color=color, alpha=0.15, lw=0,
                            label=f"{name}: 95% CI (bootstrap over patients)")
        hist_ax.hist(p, bins=hist_bins, histtype="step", color=color, lw=1.5, label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    _style(ax, title, "", "Observed outcome rate")
    ax.tick_params(labelbottom=False)
    hist_ax.set_yscale("log")  # risk scores are skewed; a log count keeps the tail visible
    _style(hist_ax, "", "Mean predicted risk", "Samples")
    if hist_ax.get_legend() is not None:
        hist_ax.get_legend().remove()  # colours are named in the one legend
    # One figure legend under both axes, so no reliability point is hidden behind it.
    handles, labels = ax.get_legend_handles_labels()
    ax.get_legend().remove()
    ncol = 1 if len(labels) <= 3 or max(len(t) for t in labels) > 34 else 2
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize="small", frameon=False)
    return fig


def decision_curve_plot(curves: Curves, thresholds=None, title: str = "Decision curve") -> Figure:
    """Net benefit of acting on each model's risk across threshold probabilities, against treating
    everyone and treating no one (see :func:`workbench.evaluation.decision_curve`)."""
    from workbench.evaluation import decision_curve

    checked = _checked_curves(curves)
    fig = Figure(figsize=(FIGSIZE[0] * 1.15, FIGSIZE[1] * 0.9 + _legend_height(len(checked) + 2)), layout="constrained")
    ax = fig.add_subplot()
    top = 0.0
    for color, (name, (y, p)) in zip(_COLORS * 10, checked.items()):
        curve = decision_curve(y, p, thresholds)
        ax.plot(curve["threshold"], curve["net_benefit"], color=color, lw=2, label=name)
        top = max(top, float(curve["net_benefit"].max()))
    ax.plot(curve["threshold"], curve["net_benefit_treat_all"], color="grey", lw=1.2, ls="--", label="Treat all")
    ax.axhline(0, color="black", lw=1, label="Treat none")
    ax.set_ylim(-0.05 * max(top, 0.01), max(top, 0.01) * 1.15)
    ax.set_xlim(float(curve["threshold"].min()), float(curve["threshold"].max()))
    _style(ax, title, "Threshold probability (risk at which one would act)", "Net benefit")
    handles, labels = ax.get_legend_handles_labels()
    ax.get_legend().remove()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize="small", frameon=False)
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


# ------------------------------------------------------------------------------- forest plots

_METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "brier": "Brier score", "ece": "ECE", "ibs": "integrated Brier score",
                 "uno_c": "Uno's C", "harrell_c": "Harrell's C", "td_auc_730d": "td-AUC at 2 years"}
_LOWER_IS_BETTER = {"brier", "ece", "loss", "log_loss", "ibs"}
_UNIT_INTERVAL = {"auroc", "auprc", "brier", "ece", "ibs", "uno_c", "harrell_c", "td_auc_730d"}  # metrics that live in [0, 1]
_DEFAULT_METRICS = ("auroc", "auprc", "brier", "ece")


def _metric_title(metric: str) -> str:
    name = _METRIC_NAMES.get(metric, metric.upper())
    better = "lower" if metric in _LOWER_IS_BETTER else "higher"
    return f"{name} ({better} is better)"


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _model_labels(table) -> list[str]:
    """Model names, made unique (run id prefix, else #n) where a model was run more than once."""
    names = [str(m) if m is not None else "?" for m in table["model"].to_list()]
    run_ids = table["run_id"].to_list() if "run_id" in table.columns else [None] * len(names)
    out = []
    for i, (name, run) in enumerate(zip(names, run_ids)):
        if names.count(name) > 1:
            name = f"{name} · {str(run)[:8]}" if run else f"{name} #{names[: i + 1].count(name)}"
        out.append(name)
    return out


def _forest_rows(table, metric: str) -> list[tuple[int, float, float | None, float | None]]:
    """(table row, estimate, CI low, CI high) of every row whose estimate is a number."""
    missing = [c for c in (metric, f"{metric}_ci_low", f"{metric}_ci_high") if c not in table.columns]
    if missing:
        raise WorkbenchError(f"forest plot of {metric!r}: the table has no column(s) {missing}")
    rows = []
    for i, (v, lo, hi) in enumerate(zip(table[metric].to_list(), table[f"{metric}_ci_low"].to_list(),
                                        table[f"{metric}_ci_high"].to_list())):
        v = _finite(v)
        if v is not None:
            rows.append((i, v, _finite(lo), _finite(hi)))
    return rows


def _best_first(rows, metric: str):
    """Rows sorted by estimate, best first (highest, or lowest for brier/ece/loss)."""
    sign = 1.0 if metric in _LOWER_IS_BETTER else -1.0
    return sorted(rows, key=lambda r: sign * r[1])


def _zoomed_limits(values: Sequence[float], metric: str) -> tuple[float, float]:
    """x limits around the estimates and CIs with a margin: never forced to start at 0."""
    lo, hi = min(values), max(values)
    span = hi - lo
    if span <= 0:
        span = max(abs(hi) * 0.05, 0.01)
    lo, hi = lo - 0.12 * span, hi + 0.12 * span
    if metric in _UNIT_INTERVAL:
        lo, hi = max(lo, 0.0) if min(values) >= 0 else lo, min(hi, 1.0) if max(values) <= 1 else hi
    return lo, hi


def _forest_panel(ax: Axes, placed, labels: list[str], metric: str, reference: float | None,
                  show_labels: bool, n_rows: int) -> None:
    """Draw one forest panel. ``placed`` is [(y position, estimate, low, high)]; row 0 is the top."""
    values = [v for _, v, lo, hi in placed for v in (v, lo, hi) if v is not None]
    if reference is not None:
        values.append(float(reference))
    best = placed[0] if placed else None
    if best is not None and best[2] is not None and best[3] is not None:
        ax.axvspan(best[2], best[3], color="C0", alpha=0.08, lw=0)  # overlap with the best CI = no clear winner
    if reference is not None:
        ax.axvline(reference, color="grey", ls="--", lw=1)
    text_at = ax.get_yaxis_transform()  # x in axes fraction, y in data
    for y, v, lo, hi in placed:
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [y, y], color="C0", lw=2, solid_capstyle="butt")
            ax.plot([lo, hi], [y, y], ls="none", marker="|", ms=8, color="C0")
            note = f"{v:.3f} ({lo:.3f}–{hi:.3f})"
        else:
            note = f"{v:.3f} (no CI)"
        ax.plot([v], [y], ls="none", marker="s", ms=6, color="C3" if (y, v) == best[:2] else "black", zorder=3)
        ax.text(1.03, y, note, transform=text_at, ha="left", va="center", fontsize=9, clip_on=False)
    ax.text(1.03, 1.0, "estimate (95% CI)", transform=ax.transAxes, ha="left", va="bottom", fontsize=8,
            color="dimgrey", clip_on=False)
    ax.set_ylim(n_rows - 0.5, -0.5)  # best at the top
    ax.set_yticks(range(n_rows), labels if show_labels else [""] * n_rows)
    if values:
        ax.set_xlim(*_zoomed_limits(values, metric))
    ax.set_title(_metric_title(metric), fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.grid(True, axis="x", alpha=0.3)
    ax.tick_params(axis="y", length=0)


def auroc_forest_plot(table, metric: str = "auroc", title: str | None = None,
                      reference: float | None = None) -> Figure:
    """Forest plot of one held-out metric: a row per model, estimate and 95% CI, best at the top.

    ``table`` is a polars frame with ``model``, ``<metric>``, ``<metric>_ci_low`` and
    ``<metric>_ci_high`` columns (``tracking.runs_table``); rows whose estimate is null are left
    out. The x axis is zoomed to the intervals (it does not start at 0), so 0.91 and 0.93 read
    apart; each row's value and CI are written at its right. The shaded band is the best model's
    CI: a model whose interval reaches into it is not clearly worse on this held-out set.
    ``reference`` draws a dashed vertical line (e.g. a published model's AUROC).
    """
    rows = _best_first(_forest_rows(table, metric), metric)
    if not rows:
        raise WorkbenchError(f"forest plot: no model has a {metric!r} value")
    names = _model_labels(table)
    labels = [names[i] for i, *_ in rows]
    width = 3.8 + 0.075 * max(len(t) for t in labels)
    fig = Figure(figsize=(width + 2.0, 0.42 * len(rows) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    placed = [(y, v, lo, hi) for y, (_, v, lo, hi) in enumerate(rows)]
    _forest_panel(ax, placed, labels, metric, reference, True, len(rows))
    ax.set_title(title or f"Held-out {_metric_title(metric)} with 95% CIs", fontsize=11)
    ax.set_xlabel(_METRIC_NAMES.get(metric, metric.upper()))
    return fig


def metric_comparison_plot(table, metrics: Sequence[str] | None = None,
                           title: str = "Held-out metrics with 95% CIs") -> Figure:
    """Forest panels, one per metric (default AUROC, AUPRC, Brier, ECE where the table has them).

    ``table`` is a polars frame with a ``model`` column and ``<metric>``, ``<metric>_ci_low``,
    ``<metric>_ci_high`` columns (what ``tracking.runs_table`` returns). Every panel has the
    same rows, ordered by the first metric (best first), so one model reads across one line;
    each x axis is zoomed to its intervals. Null values leave that cell empty.
    """
    if table.height == 0:
        raise WorkbenchError("metric_comparison_plot needs at least one model row")
    if metrics is None:
        metrics = [m for m in _DEFAULT_METRICS if m in table.columns] or list(_DEFAULT_METRICS)
    metrics = list(metrics)
    per_metric = {m: {i: (v, lo, hi) for i, v, lo, hi in _forest_rows(table, m)} for m in metrics}
    first = _best_first([(i, *vals) for i, vals in per_metric[metrics[0]].items()], metrics[0])
    order = [r[0] for r in first]
    order += [i for i in range(table.height) if i not in order and any(i in per_metric[m] for m in metrics)]
    if not order:
        raise WorkbenchError(f"metric_comparison_plot: no model has any of {metrics}")
    names = _model_labels(table)
    labels = [names[i] for i in order]
    ncols = len(metrics) if len(metrics) <= 3 else 2
    nrows = math.ceil(len(metrics) / ncols)
    label_w = 0.075 * max(len(t) for t in labels)
    fig = Figure(figsize=(ncols * 4.6 + label_w, nrows * (0.38 * len(order) + 1.3) + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for k, (ax, metric) in enumerate(zip(axes, metrics)):
        values = per_metric[metric]
        placed = [(y, *values[i]) for y, i in enumerate(order) if i in values]
        # The best of this metric gets the highlight, wherever it sits in the shared order.
        placed = sorted(placed, key=lambda r: r[1] if metric in _LOWER_IS_BETTER else -r[1])
        _forest_panel(ax, placed, labels, metric, None, k % ncols == 0, len(order))
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(title)
    if len(metrics) > 1:
        fig.supxlabel(f"Rows ordered by {_METRIC_NAMES.get(metrics[0], metrics[0].upper())}, best first; "
                      "shaded: the best model's 95% CI (overlap: not clearly different)", fontsize=8, color="dimgrey")
    return fig


# ------------------------------------------------------------------------------ SHAP heatmaps


def format_cell_value(value: float) -> str:
    """A raw feature value as a short cell label: 3 significant digits, no scientific notation
    for ordinary magnitudes. 1770 -> "1770", 12345 -> "12.3k", 3.517 -> "3.52", 0.0123 -> "0.012",
    1.0 -> "1", 0.0 -> "0"; NaN -> "–"."""
    value = float(value)
    if not math.isfinite(value):
        return "–"
    if abs(value) < 1e-6:  # float32 round-trip noise around indicator zeros
        return "0"
    magnitude = abs(value)
    if magnitude < 1e-3:
        return f"{value:.2g}"
    if round(magnitude) >= 10_000:
        for divisor, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "G")):
            scaled = value / divisor
            text = _three_significant(scaled)
            if abs(float(text)) < 1000:
                return text + suffix
        return f"{value:.2g}"
    if magnitude >= 100:
        return f"{value:.0f}"
    return _three_significant(value)


def _three_significant(value: float) -> str:
    """3 significant digits (at most 3 decimals), trailing zeros dropped."""
    decimals = min(3, max(0, 2 - math.floor(math.log10(abs(value)))))
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _relative_luminance(rgba) -> float:
    """WCAG relative luminance of an sRGB colour."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(float(c)) for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_color_for(background) -> str:
    """"white" or "black", whichever contrasts more with ``background`` (WCAG contrast ratio)."""
    lum = _relative_luminance(background)
    return "white" if (1.05 / (lum + 0.05)) > ((lum + 0.05) / 0.05) else "black"


def shap_heatmap_plot(shap_values, raw_values, step_end_time, feature_names, padded=None,
                      max_features: int = 12, title: str = "SHAP per time step and feature") -> Figure:
    """One patient's attributions: features (rows) x time steps (columns), raw values written in.

    Red pushed the risk up, blue down; padded steps are left out. Only the ``max_features``
    features with the largest total |SHAP| are shown, so the picture stays readable. Each
    cell's value is written in white or black, whichever reads better on that cell's colour.
    """
    shap_values, raw_values = np.asarray(shap_values, float), np.asarray(raw_values, float)
    keep = ~np.asarray(padded, bool) if padded is not None else np.ones(shap_values.shape[0], bool)
    if not keep.any():
        raise WorkbenchError("shap_heatmap_plot: every step of this sequence is padding")
    s, v, times = shap_values[keep], raw_values[keep], np.asarray(step_end_time)[keep]
    order = np.argsort(-np.abs(s).sum(axis=0), kind="stable")[:max_features]
    s, v = s[:, order].T, v[:, order].T
    limit = float(np.abs(s).max()) or 1.0
    names = list(feature_names)
    row_labels = [feature_labels(names)[k] for k in order]
    label_width = 0.065 * max(len(t) for t in row_labels)
    fig = Figure(figsize=(max(6.0, 0.6 * s.shape[1] + 2.2 + label_width), 0.42 * len(order) + 2.0),
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(s, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    backgrounds = image.cmap(image.norm(s))
    for (i, j), value in np.ndenumerate(v):
        ax.text(j, i, format_cell_value(value), ha="center", va="center", fontsize=8,
                color=text_color_for(backgrounds[i, j]))
    ax.set_yticks(range(len(order)), row_labels, fontsize=9)
    labels = [str(np.datetime64(t, "D")) for t in times]
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    fig.colorbar(image, ax=ax, label="SHAP (change in risk)")
    ax.set_title(title)
    ax.set_xlabel("end of time step")
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
    top = by_feature.sort("mean_abs_shap", descending=True).head(max_features).reverse()
    labels = feature_labels(top["feature"].to_list())
    fig = Figure(figsize=(11.0, max(4.8, 0.3 * len(labels) + 1.6)))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    # Positions, not categories: two features with the same label must stay two bars.
    left.barh(range(len(labels)), top["mean_abs_shap"].to_list(), color="C0")
    left.set_yticks(range(len(labels)), labels)
    _style(left, "by feature", "mean |SHAP|", "")
    steps = by_step.sort("steps_before_prediction")
    right.bar(steps["steps_before_prediction"].to_list(), steps["mean_abs_shap"].to_list(), color="C2")
    right.invert_xaxis()
    _style(right, "by time step\n(0 = the bin ending at the prediction time)", "steps before prediction", "mean |SHAP|")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- survival: calibration at horizons, observed vs predicted curves ------------------------


def survival_calibration_plot(calibrations: Mapping, horizons_days=None, title: str | None = None) -> Figure:
    """One panel per horizon: mean predicted vs observed risk by decile of predicted risk (bars:
    the observed risk's bootstrap CI), the diagonal, one series per model.

    ``calibrations`` maps a model name to a frame with ``horizon_days, predicted, observed`` and
    optionally ``observed_ci_low / observed_ci_high`` (:func:`workbench.survival_metrics.evaluate_survival`).
    """
    if not calibrations:
        raise WorkbenchError("a survival calibration plot needs at least one model's calibration table")
    first = next(iter(calibrations.values()))
    horizons = sorted(set(first["horizon_days"].to_list())) if horizons_days is None else list(horizons_days)
    fig = Figure(figsize=(4.2 * len(horizons), 4.4), layout="constrained")
    for j, h in enumerate(horizons):
        ax = fig.add_subplot(1, len(horizons), j + 1)
        top = 0.0
        for color, (name, table) in zip(_COLORS * 10, calibrations.items()):
            rows = table.filter(table["horizon_days"] == float(h))
            if rows.height == 0:
                continue
            x, y = rows["predicted"].to_numpy(), rows["observed"].to_numpy()
            if "observed_ci_low" in rows.columns and rows["observed_ci_low"].null_count() == 0:
                lo, hi = rows["observed_ci_low"].to_numpy(), rows["observed_ci_high"].to_numpy()
                ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], fmt="o-", color=color,
                            ms=4, lw=1.2, capsize=2, label=name)
                top = max(top, float(np.nanmax(hi)))
            else:
                ax.plot(x, y, "o-", color=color, ms=4, lw=1.2, label=name)
            top = max(top, float(np.nanmax(x)), float(np.nanmax(y)))
        top = min(1.0, top * 1.08 + 0.02)
        ax.plot([0, top], [0, top], ls="--", color="grey", lw=1)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        years = float(h) / 365.25
        _style(ax, f"{years:g} year{'' if years == 1 else 's'}", "mean predicted risk",
               "observed risk (Aalen-Johansen)" if j == 0 else "")
        if j == 0:
            ax.legend(fontsize="small")
    fig.suptitle(title or "Calibration at each horizon, by decile of predicted risk")
    return fig


def km_vs_predicted_plot(time, event, mean_predicted_curve: Mapping, title: str | None = None) -> Figure:
    """The observed cumulative incidence of the outcome (Aalen-Johansen; Kaplan-Meier without
    competing events) as a step curve, with each model's mean predicted curve ``(days, risk)``."""
    from workbench.survival_metrics import observed_risk

    t, e = np.asarray(time, dtype=np.float64), np.asarray(event)
    days = np.unique(np.concatenate([[0.0], t[e == 1]]))
    end = max(float(np.max(t)), *(float(np.max(d)) for d, _ in mean_predicted_curve.values()))
    days = days[days <= end]
    observed = [observed_risk(t, e, d) for d in days]
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.step(days / 365.25, observed, where="post", color="black", lw=1.8, label="observed")
    for color, (name, (d, risk)) in zip(_COLORS * 10, mean_predicted_curve.items()):
        ax.plot(np.asarray(d) / 365.25, risk, color=color, lw=1.5, marker=".", label=f"{name} (mean predicted)")
    ax.set_ylim(0, None)
    _style(ax, title or "Observed vs mean predicted risk", "years after the prediction time", "cumulative risk of the outcome")
    ax.legend(fontsize="small")
    return fig
