"""Held-out evaluation: discrimination, calibration and threshold metrics with bootstrap CIs.

``evaluate(y_true, y_prob)`` returns an :class:`EvaluationResult` holding AUROC, AUPRC,
Brier score, expected calibration error (ECE), the calibration slope and intercept (TRIPOD:
the logistic recalibration ``logit P(y) = a + b logit(p)``; slope ``b`` with ``a`` free,
calibration-in-the-large ``a`` with ``b`` fixed at 1; a perfectly calibrated model has slope 1
and intercept 0) and sensitivity / specificity / PPV / NPV at one threshold, each with a
percentile bootstrap confidence interval, plus the same metrics per subgroup (sex, age band, ...),
and the reliability table with a bootstrap band for each bin's observed rate.

Point estimates come from scikit-learn. The bootstrap does not call scikit-learn once per
resample (about 3 ms per resample for AUROC + AUPRC alone, so 1000 resamples times every
subgroup would take tens of seconds); instead each resample is a vector of multiplicities
(how often each sample was drawn), every metric is written as sums weighted by those
multiplicities, and a whole block of resamples is evaluated with a few matrix products.
The tests check that these weighted sums equal scikit-learn's metrics called with
``sample_weight=multiplicities``.

Samples are usually several prediction times per patient, which are correlated; passing
``cluster=subject_id`` resamples whole patients (cluster bootstrap), so the intervals are
not falsely narrow.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl
from scipy import sparse
from scipy.special import expit
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)

from workbench.errors import WorkbenchError
from workbench.settings import EvalConfig

#: Metrics reported with a bootstrap CI, in report order.
METRICS: tuple[str, ...] = (
    "auroc",
    "auprc",
    "brier",
    "ece",
    "calibration_slope",
    "calibration_intercept",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
)
#: Human-readable names for tables.
METRIC_LABELS: dict[str, str] = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "brier": "Brier score",
    "ece": "ECE",
    "calibration_slope": "Calibration slope",
    "calibration_intercept": "Calibration intercept",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "prevalence": "Prevalence",
}
# Metrics with a CI that `metrics` holds: the eight above plus the outcome rate.
_CI_METRICS: tuple[str, ...] = (*METRICS, "prevalence")
# Key of the per-bin observed outcome rates among the bootstrap outputs (the reliability band).
BIN_OBSERVED = "bin_observed"
# Most distinct logit(p) values a bootstrap calibration fit works with (see _BootstrapDesign).
_LOGIT_GROUPS = 400
# Bound on the float64 cells of one block of bootstrap weights (about 40 MB).
_MAX_BLOCK_CELLS = 5_000_000




@dataclass
class EvaluationResult:
    """Metrics of one model on one evaluated set, with bootstrap CIs and subgroups.

    ``metrics`` maps each name in :data:`METRICS` (and ``prevalence``) to
    ``{"value", "ci_low", "ci_high", "n_valid"}``; a metric undefined on the data (AUROC
    with one class, PPV with nobody flagged) has ``None`` there. ``n_valid`` counts the
    bootstrap resamples in which the metric was defined.
    """

    metrics: dict[str, dict[str, float | int | None]]
    calibration: pl.DataFrame
    subgroups: pl.DataFrame
    n: int
    n_positive: int
    n_subjects: int
    threshold: float
    n_bootstrap: int
    ci: float
    cluster_bootstrap: bool
    config: EvalConfig = field(default_factory=EvalConfig)

    @property
    def prevalence(self) -> float:
        """Observed outcome rate."""
        return self.n_positive / self.n

    def to_flat_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: number}`` for ``mlflow.log_metrics``; undefined values are left out."""
        flat: dict[str, float] = {
            f"{prefix}n": float(self.n),
            f"{prefix}n_positive": float(self.n_positive),
            f"{prefix}n_subjects": float(self.n_subjects),
            f"{prefix}threshold": float(self.threshold),
        }
        for name, entry in self.metrics.items():
            for key, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
                if entry[key] is not None:
                    flat[f"{prefix}{name}{suffix}"] = float(entry[key])
        return flat

    def to_frame(self) -> pl.DataFrame:
        """One row per metric: metric, value, ci_low, ci_high, n_valid."""
        return pl.DataFrame(
            [{"metric": name, **entry} for name, entry in self.metrics.items()],
            schema={
                "metric": pl.String,
                "value": pl.Float64,
                "ci_low": pl.Float64,
                "ci_high": pl.Float64,
                "n_valid": pl.Int64,
            },
        )

    def to_markdown(self, digits: int = 2, include_subgroups: bool = True) -> str:
        """Markdown tables for a README: ``| AUROC | 0.83 (0.78-0.88) |`` and subgroups."""
        pct = f"{self.ci:.0%}"
        lines = [
            f"n = {self.n} ({self.n_subjects} subjects), positives = {self.n_positive} "
            f"({self.prevalence:.1%}), threshold = {self.threshold:.{digits}f}",
            "",
            f"| Metric | Value ({pct} CI) |",
            "|---|---|",
        ]
        for name, entry in self.metrics.items():
            lines.append(f"| {METRIC_LABELS[name]} | {format_with_ci(entry, digits)} |")
        if include_subgroups and self.subgroups.height:
            lines += ["", _subgroups_markdown(self.subgroups, digits)]
        return "\n".join(lines)


def format_with_ci(entry: dict, digits: int = 2) -> str:
    """``"0.83 (0.78-0.88)"``, ``"-0.20 (-0.46 to 0.06)"`` when a bound is negative; ``"0.83"``
    without a CI; ``"n/a"`` when undefined."""
    value = entry.get("value")
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    low, high = entry.get("ci_low"), entry.get("ci_high")
    if low is not None and high is not None:
        joiner = " to " if low < 0 or high < 0 else "-"
        text += f" ({low:.{digits}f}{joiner}{high:.{digits}f})"
    return text


def _subgroups_markdown(subgroups: pl.DataFrame, digits: int) -> str:
    """Subgroup table: one row per (group, level), one column per metric."""
    header = ["Group", "Level", "n", "Positives", *(METRIC_LABELS[m] for m in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in subgroups.iter_rows(named=True):
        cells = [str(row["group"]), str(row["level"]), str(row["n"]), str(row["n_positive"])]
        for m in METRICS:
            entry = {"value": row[m], "ci_low": row[f"{m}_ci_low"], "ci_high": row[f"{m}_ci_high"]}
            cells.append(format_with_ci(entry, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- input checks


def _as_binary_labels(y_true) -> np.ndarray:
    """y_true as a bool array; raises unless every value is 0/1 or True/False."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise WorkbenchError(f"y_true must be one-dimensional, got shape {y.shape}")
    if y.dtype == bool:
        return y
    if not np.issubdtype(y.dtype, np.number):
        raise WorkbenchError(f"y_true must be binary (0/1 or bool), got dtype {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        examples = np.unique(y[bad])[:5].tolist()
        raise WorkbenchError(f"y_true must be binary (0/1 or bool); found values {examples}")
    return y.astype(bool)


def _as_probabilities(y_prob, n: int) -> np.ndarray:
    """y_prob as float64; raises on a length mismatch, NaN/inf, or values outside [0, 1]."""
    try:
        p = np.asarray(y_prob, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise WorkbenchError(f"y_prob must be numeric probabilities: {exc}") from None
    if p.ndim == 2 and p.shape[1] == 1:  # Keras predict() returns [N, 1]
        p = p[:, 0]
    if p.ndim != 1:
        raise WorkbenchError(f"y_prob must be one-dimensional, got shape {p.shape}")
    if len(p) != n:
        raise WorkbenchError(f"y_true has {n} samples but y_prob has {len(p)}")
    if not np.isfinite(p).all():
        raise WorkbenchError(
            f"y_prob has {int((~np.isfinite(p)).sum())} NaN or infinite values; "
            "check the model output before evaluating"
        )
    if p.min() < 0.0 or p.max() > 1.0:
        raise WorkbenchError(
            f"y_prob must be probabilities in [0, 1], got range [{p.min():.4g}, {p.max():.4g}]"
        )
    return p


def check_predictions(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """(bool labels, float64 probabilities) after the checks :func:`evaluate` makes."""
    y = _as_binary_labels(y_true)
    if len(y) == 0:
        raise WorkbenchError("cannot evaluate an empty set of predictions")
    return y, _as_probabilities(y_prob, len(y))


def _check_same_length(name: str, values, n: int) -> np.ndarray:
    """``values`` as an array of length n, or a WorkbenchError naming ``name``."""
    arr = np.asarray(values)
    if arr.ndim != 1 or len(arr) != n:
        raise WorkbenchError(f"{name} must have one entry per sample ({n}), got shape {arr.shape}")
    return arr


# ---------------------------------------------------------------------- helpers for users


def age_band_labels(edges) -> list[str]:
    """Band labels in age order for edges like [0, 50, 65, 200]: ["<50", "50-65", ">=65"]."""
    edges = [float(e) for e in edges]
    if len(edges) < 3 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise WorkbenchError(
            f"age band edges must be >= 3 strictly increasing numbers, got {edges}"
        )
    inner = edges[1:-1]
    middle = [f"{a:g}-{b:g}" for a, b in zip(inner, inner[1:])]
    return [f"<{inner[0]:g}", *middle, f">={inner[-1]:g}"]


def age_band(age_years, edges=(0, 50, 65, 200)) -> np.ndarray:
    """Age band label per age, e.g. ``"<50"``, ``"50-65"``, ``">=65"`` for edges [0, 50, 65, 200].

    The outer edges only name the range: ages below the second edge fall in the first band
    and ages at or above the second-to-last edge in the last, so no age is dropped. A band
    ``"a-b"`` holds a <= age < b. Missing ages (NaN) get ``"unknown"``.
    """
    labels = age_band_labels(edges)
    inner = [float(e) for e in edges][1:-1]
    ages = np.asarray(age_years, dtype=np.float64)
    out = np.asarray(labels, dtype=object)[np.digitize(ages, inner, right=False)]
    out[np.isnan(ages)] = "unknown"
    return out.astype(str)


def choose_threshold(y_true, y_prob, method: Literal["youden", "prevalence"] = "youden") -> float:
    """A decision threshold chosen on (ideally tuning-split) data.

    'youden' maximises sensitivity + specificity - 1 over the ROC curve's thresholds;
    'prevalence' returns the outcome rate, flagging anyone above the base risk.
    """
    y, p = check_predictions(y_true, y_prob)
    if method == "prevalence":
        return float(y.mean())
    if method != "youden":
        raise WorkbenchError(f"threshold method must be 'youden' or 'prevalence', got {method!r}")
    if y.all() or not y.any():
        raise WorkbenchError("the Youden threshold needs both outcomes in y_true")
    fpr, tpr, thresholds = roc_curve(y, p)
    # roc_curve's first threshold is +inf (flag nobody); clip it to a usable probability.
    return float(min(thresholds[int(np.argmax(tpr - fpr))], 1.0))


# ------------------------------------------------------------------------ point estimates


def calibration_bin_edges(p: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    """Bin edges exactly as sklearn.calibration.calibration_curve computes them."""
    if strategy == "quantile":
        return np.percentile(p, np.linspace(0.0, 100.0, n_bins + 1))
    return np.linspace(0.0, 1.0, n_bins + 1)


def _calibration_bin_ids(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each prediction, with calibration_curve's rule (inner edges, left side)."""
    return np.searchsorted(edges[1:-1], p)


def calibration_table(y: np.ndarray, p: np.ndarray, edges: np.ndarray) -> pl.DataFrame:
    """Per non-empty bin: edges, mean predicted risk, observed outcome rate, count.

    ``mean_predicted`` and ``observed_fraction`` equal sklearn's ``calibration_curve``
    (prob_pred, prob_true); the count is what sklearn does not return and the ECE needs.
    """
    n_bins = len(edges) - 1
    ids = _calibration_bin_ids(p, edges)
    count = np.bincount(ids, minlength=n_bins)
    sum_p = np.bincount(ids, weights=p, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y.astype(np.float64), minlength=n_bins)
    keep = count > 0
    return pl.DataFrame(
        {
            "bin": np.arange(n_bins)[keep],
            "bin_low": edges[:-1][keep],
            "bin_high": edges[1:][keep],
            "mean_predicted": sum_p[keep] / count[keep],
            "observed_fraction": sum_y[keep] / count[keep],
            "count": count[keep],
        }
    )


def expected_calibration_error(calibration: pl.DataFrame) -> float:
    """ECE: the count-weighted mean |observed - predicted| over calibration bins."""
    count = calibration["count"].to_numpy()
    observed = calibration["observed_fraction"].to_numpy()
    gap = np.abs(observed - calibration["mean_predicted"].to_numpy())
    return float(np.sum(count * gap) / np.sum(count))


def _ratio_or_none(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator > 0 else None


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(q / (1 - q))


def calibration_fits(pos: np.ndarray, neg: np.ndarray, x: np.ndarray, start: dict | None = None,
                     iterations: int = 25) -> dict[str, np.ndarray]:
    """Calibration slope and intercept for each row of weights, by Newton's method on all rows at once.

    ``pos`` / ``neg`` [B, K]: weight of the positives / negatives at each covariate value ``x``
    [K] (``logit(p)``). Slope: ``b`` of the weighted logistic fit ``logit P(y) = a + b x``.
    Intercept (calibration-in-the-large): ``a`` of ``logit P(y) = a + x`` (slope held at 1).
    ``start`` (the fit on the whole set) lets bootstrap rows converge in a few steps. NaN where a
    fit is undefined (one class) or did not converge (separable data).
    """
    pos, neg = np.atleast_2d(pos).astype(np.float64), np.atleast_2d(neg).astype(np.float64)
    w = pos + neg
    B = w.shape[0]
    start = start or {}
    a = np.full(B, start.get("a", 0.0))
    b = np.full(B, start.get("calibration_slope", 1.0))
    c = np.full(B, start.get("calibration_intercept", 0.0))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(iterations):
            # slope model: two parameters per row, 2 x 2 Newton step solved in closed form
            mu = expit(a[:, None] + b[:, None] * x)
            v = w * mu * (1 - mu)
            r = pos - w * mu
            h00, h01, h11 = v.sum(1), v @ x, v @ (x * x)
            g0, g1 = r.sum(1), r @ x
            det = h00 * h11 - h01 * h01
            step_a, step_b = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
            a, b = a + step_a, b + step_b
            # intercept model: one parameter, the offset x
            mu1 = expit(c[:, None] + x)
            step_c = (pos - w * mu1).sum(1) / (w * mu1 * (1 - mu1)).sum(1)
            c = c + step_c
        n_pos, total = pos.sum(1), w.sum(1)
        bad = (n_pos == 0) | (n_pos == total)
        converged = (np.abs(step_b) < 1e-4 * (1 + np.abs(b))) & (np.abs(step_c) < 1e-4 * (1 + np.abs(c)))
        b[bad | ~converged | ~np.isfinite(b)] = np.nan
        c[bad | ~converged | ~np.isfinite(c)] = np.nan
    return {"calibration_slope": b, "calibration_intercept": c, "a": a}


def _none_if_nan(values: dict[str, np.ndarray]) -> dict[str, float | None]:
    return {k: (float(v[0]) if np.isfinite(v[0]) else None) for k, v in values.items() if k != "a"}


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float, edges: np.ndarray) -> dict:
    """All metrics on the data as given (scikit-learn); None where a metric is undefined."""
    both_classes = bool(y.any() and not y.all())
    tn, fp, fn, tp = confusion_matrix(y, p >= threshold, labels=[False, True]).ravel()
    return {
        "auroc": float(roc_auc_score(y, p)) if both_classes else None,
        "auprc": float(average_precision_score(y, p)) if both_classes else None,
        "brier": float(brier_score_loss(y, p, labels=[False, True])),
        "ece": expected_calibration_error(calibration_table(y, p, edges)),
        **_none_if_nan(calibration_fits(y.astype(np.float64), 1.0 - y, _logit(p))),
        "sensitivity": _ratio_or_none(tp, tp + fn),
        "specificity": _ratio_or_none(tn, tn + fp),
        "ppv": _ratio_or_none(tp, tp + fp),
        "npv": _ratio_or_none(tn, tn + fn),
        "prevalence": float(y.mean()),
    }


# ------------------------------------------------------------------------------ bootstrap


def bootstrap_weights(
    n_resamples: int, n: int, rng: np.random.Generator, cluster_codes: np.ndarray | None = None
) -> np.ndarray:
    """[n_resamples, n] multiplicities: how often each sample enters each resample.

    With ``cluster_codes`` (0..C-1 per sample) whole clusters are drawn with replacement
    and every sample inherits its cluster's multiplicity, so a patient's prediction times
    stay together.
    """
    units = n if cluster_codes is None else int(cluster_codes.max()) + 1
    draws = rng.integers(0, units, size=(n_resamples, units))
    # Offsetting each row lets one bincount count all rows at once.
    offsets = (np.arange(n_resamples) * units)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * units)
    counts = counts.reshape(n_resamples, units).astype(np.float64)
    return counts if cluster_codes is None else counts[:, cluster_codes]


@dataclass
class _BootstrapDesign:
    """Per-sample indicator matrices that turn weight rows into metric sums."""

    y: np.ndarray  # float 0/1
    p: np.ndarray
    flagged: np.ndarray  # float 0/1: p >= threshold
    calibration_bins: sparse.csr_matrix  # [n, bins] one-hot
    positives_by_score: sparse.csr_matrix  # [n, distinct scores] one-hot for y = 1
    negatives_by_score: sparse.csr_matrix  # same for y = 0
    # Calibration fits in the bootstrap work on logit(p) rounded into at most _LOGIT_GROUPS groups
    # (widths of about 0.01 on the logit scale): the resampled sums become [B, groups], not [B, n].
    positives_by_logit: sparse.csr_matrix
    negatives_by_logit: sparse.csr_matrix
    logit_groups: np.ndarray  # the mean logit(p) of each group
    calibration_start: dict  # the calibration fit on the whole set: where each resample's fit starts

    @classmethod
    def build(cls, y: np.ndarray, p: np.ndarray, threshold: float, edges: np.ndarray):
        n = len(y)
        rows = np.arange(n)
        bins = _calibration_bin_ids(p, edges)
        one_hot_bins = sparse.csr_matrix((np.ones(n), (rows, bins)), shape=(n, len(edges) - 1))
        # Distinct scores in ascending order; tied scores share a column so ties count 1/2.
        _, score_rank = np.unique(p, return_inverse=True)
        k = int(score_rank.max()) + 1
        yf = y.astype(np.float64)
        pos = sparse.csr_matrix((yf, (rows, score_rank)), shape=(n, k))
        neg = sparse.csr_matrix((1.0 - yf, (rows, score_rank)), shape=(n, k))
        x = _logit(p)
        fit = calibration_fits(yf, 1.0 - yf, x)
        start = {k: float(v[0]) for k, v in fit.items() if np.isfinite(v[0])}
        _, group = np.unique(np.round(x * 100) / 100, return_inverse=True)
        if group.max() + 1 > _LOGIT_GROUPS:
            group = np.minimum((np.argsort(np.argsort(x, kind="stable")) * _LOGIT_GROUPS) // n, _LOGIT_GROUPS - 1)
        g = int(group.max()) + 1
        pos_g = sparse.csr_matrix((yf, (rows, group)), shape=(n, g))
        neg_g = sparse.csr_matrix((1.0 - yf, (rows, group)), shape=(n, g))
        centers = np.bincount(group, weights=x, minlength=g) / np.maximum(np.bincount(group, minlength=g), 1)
        return cls(yf, p, (p >= threshold).astype(np.float64), one_hot_bins, pos, neg, pos_g, neg_g, centers, start)


def _weighted_rank_metrics(
    weights: np.ndarray, design: _BootstrapDesign
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision for each weight row (ties handled as scikit-learn does).

    AUROC: P(score of a positive > score of a negative) + 1/2 P(tie), summed over distinct
    scores. AUPRC: sum over thresholds (descending) of recall increment x precision.
    """
    pos = np.asarray((design.positives_by_score.T @ weights.T).T)  # [B, distinct scores]
    neg = np.asarray((design.negatives_by_score.T @ weights.T).T)
    cum_pos, cum_neg = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    total_pos, total_neg = cum_pos[:, -1], cum_neg[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = np.sum(pos * (cum_neg - 0.5 * neg), axis=1) / (total_pos * total_neg)
        # Flagged at threshold = score k: everything scoring >= k. Weights are integer
        # multiplicities, so these differences of float sums are exact.
        tp = total_pos[:, None] - cum_pos + pos
        flagged = tp + (total_neg[:, None] - cum_neg + neg)
        precision = np.divide(tp, flagged, out=np.zeros_like(tp), where=flagged > 0)
        auprc = np.sum(pos * precision, axis=1) / total_pos
    return auroc, auprc


def weighted_metrics(weights: np.ndarray, design: _BootstrapDesign) -> dict[str, np.ndarray]:
    """Every metric for each row of ``weights`` [B, n]; NaN where a metric is undefined."""
    y, p, flagged = design.y, design.p, design.flagged
    total = weights.sum(axis=1)
    n_pos = weights @ y
    tp = weights @ (y * flagged)
    fp = weights @ ((1.0 - y) * flagged)
    fn = n_pos - tp
    tn = (total - n_pos) - fp
    bin_sum_p = np.asarray((design.calibration_bins.T @ (weights * p).T).T)
    bin_sum_y = np.asarray((design.calibration_bins.T @ (weights * y).T).T)
    auroc, auprc = _weighted_rank_metrics(weights, design)
    with np.errstate(invalid="ignore", divide="ignore"):
        # In a bin, count * |mean_y - mean_p| = |sum_y - sum_p|, so ECE needs no per-bin means.
        return {
            "auroc": auroc,
            "auprc": auprc,
            "brier": (weights @ (p - y) ** 2) / total,
            "ece": np.abs(bin_sum_y - bin_sum_p).sum(axis=1) / total,
            **calibration_fits(np.asarray((design.positives_by_logit.T @ weights.T).T),
                               np.asarray((design.negatives_by_logit.T @ weights.T).T),
                               design.logit_groups, design.calibration_start, iterations=8),
            "sensitivity": tp / n_pos,
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "prevalence": n_pos / total,
            BIN_OBSERVED: bin_sum_y / np.asarray((design.calibration_bins.T @ weights.T).T),
        }


def bootstrap_metrics(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    edges: np.ndarray,
    n_resamples: int,
    rng: np.random.Generator,
    cluster_codes: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Metric values over ``n_resamples`` bootstrap resamples (NaN where undefined)."""
    design = _BootstrapDesign.build(y, p, threshold, edges)
    block = max(1, _MAX_BLOCK_CELLS // max(len(y), 1))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_resamples, block):
        size = min(block, n_resamples - start)
        parts.append(weighted_metrics(bootstrap_weights(size, len(y), rng, cluster_codes), design))
    return {name: np.concatenate([part[name] for part in parts]) for name in (*_CI_METRICS, BIN_OBSERVED)}


def _percentile_interval(values: np.ndarray, ci: float) -> tuple[float | None, float | None, int]:
    """Percentile CI over the resamples where the metric was defined, and how many were."""
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        return None, None, 0
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(valid, [alpha, 1.0 - alpha])
    return float(low), float(high), int(valid.size)


# ------------------------------------------------------------------------------- evaluate


def _resolve_threshold(setting, y: np.ndarray, p: np.ndarray) -> float:
    """The numeric threshold for a config setting (a number, 'youden' or 'prevalence')."""
    if isinstance(setting, str):
        return choose_threshold(y, p, setting)
    return float(setting)


def _metrics_with_ci(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    edges: np.ndarray,
    config: EvalConfig,
    rng: np.random.Generator,
    cluster_codes: np.ndarray | None,
) -> dict[str, dict[str, float | int | None]]:
    """Point estimate, CI and count of valid resamples for every metric on one set."""
    point = point_metrics(y, p, threshold, edges)
    boot = (
        bootstrap_metrics(y, p, threshold, edges, config.n_bootstrap, rng, cluster_codes)
        if config.n_bootstrap > 0
        else {}
    )
    out = {}
    for name in _CI_METRICS:
        low, high, n_valid = (None, None, 0)
        if name in boot and point[name] is not None:
            low, high, n_valid = _percentile_interval(boot[name], config.ci)
        out[name] = {"value": point[name], "ci_low": low, "ci_high": high, "n_valid": n_valid}
    if BIN_OBSERVED in boot:
        out[BIN_OBSERVED] = boot[BIN_OBSERVED]
    return out


def _dense_codes(values: np.ndarray) -> np.ndarray:
    """0..C-1 codes for arbitrary labels (cluster ids)."""
    return np.unique(values, return_inverse=True)[1].ravel()


def _subgroup_levels(
    name: str, values: np.ndarray, config: EvalConfig
) -> tuple[str, np.ndarray, list[str]]:
    """(group name, level label per sample, levels in report order).

    A numeric 'age' group becomes 'age_band', its levels in age order rather than
    alphabetical (which would put "50-65" before "<50").
    """
    if name == "age" and np.issubdtype(values.dtype, np.number):
        labels = age_band(values, config.age_bands)
        order = [*age_band_labels(config.age_bands), "unknown"]
        return "age_band", labels, [lv for lv in order if lv in set(labels.tolist())]
    labels = np.asarray(["unknown" if v is None else str(v) for v in values.tolist()])
    return name, labels, sorted(set(labels.tolist()))


def _metric_columns(names=_CI_METRICS) -> dict[str, pl.DataType]:
    """``name, name_ci_low, name_ci_high`` Float64 columns for each metric."""
    columns: dict[str, pl.DataType] = {}
    for name in names:
        for suffix in ("", "_ci_low", "_ci_high"):
            columns[f"{name}{suffix}"] = pl.Float64
    return columns


def _metric_cells(metrics: dict[str, dict], names=_CI_METRICS) -> dict[str, float | None]:
    """A metrics dict flattened to the cells of :func:`_metric_columns`."""
    cells: dict[str, float | None] = {}
    for name in names:
        entry = metrics[name]
        cells[name] = entry["value"]
        cells[f"{name}_ci_low"] = entry["ci_low"]
        cells[f"{name}_ci_high"] = entry["ci_high"]
    return cells


_SUBGROUP_SCHEMA: dict[str, pl.DataType] = {
    "group": pl.String,
    "level": pl.String,
    "n": pl.Int64,
    "n_positive": pl.Int64,
    **_metric_columns(),
}


def _subgroup_rows(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    edges: np.ndarray,
    config: EvalConfig,
    groups: dict[str, np.ndarray],
    cluster: np.ndarray | None,
    rng: np.random.Generator,
) -> list[dict]:
    """One row per (group, level), same threshold and calibration bins as the whole set.

    Keeping the overall operating point and bins makes subgroup rows comparable: a
    subgroup's sensitivity answers "how does the deployed rule do for this group".
    """
    rows = []
    for name, values in groups.items():
        values = _check_same_length(f"groups[{name!r}]", values, len(y))
        group, levels, order = _subgroup_levels(name, values, config)
        for level in order:
            mask = levels == level
            codes = None if cluster is None else _dense_codes(cluster[mask])
            metrics = _metrics_with_ci(y[mask], p[mask], threshold, edges, config, rng, codes)
            metrics.pop(BIN_OBSERVED, None)
            counts = {"n": int(mask.sum()), "n_positive": int(y[mask].sum())}
            rows.append({"group": group, "level": level, **counts, **_metric_cells(metrics)})
    return rows


def _with_band(table: pl.DataFrame, observed: np.ndarray | None, ci: float) -> pl.DataFrame:
    """The reliability table plus ``observed_ci_low/high``: each bin's bootstrap interval (null without CIs)."""
    low = np.full(table.height, np.nan)
    high = np.full(table.height, np.nan)
    if observed is not None:
        for i, b in enumerate(table["bin"].to_list()):
            lo, hi, _ = _percentile_interval(observed[:, b], ci)
            low[i], high[i] = (np.nan if lo is None else lo), (np.nan if hi is None else hi)
    return table.with_columns(pl.Series("observed_ci_low", low).fill_nan(None), pl.Series("observed_ci_high", high).fill_nan(None))


def evaluate(
    y_true,
    y_prob,
    config: EvalConfig | None = None,
    groups: dict[str, np.ndarray] | None = None,
    cluster: np.ndarray | None = None,
) -> EvaluationResult:
    """Evaluate predicted risks against binary outcomes, with bootstrap CIs and subgroups.

    Args:
        y_true: outcome per sample (0/1 or bool).
        y_prob: predicted risk per sample in [0, 1] (a Keras [N, 1] output is accepted).
        config: threshold, bootstrap and binning settings.
        groups: subgroup labels per sample, e.g. ``{"sex": sex, "age": age_years}``; a
            numeric ``age`` is cut into ``config.age_bands``.
        cluster: subject id per sample. When given, the bootstrap resamples subjects, so
            repeated prediction times of one patient do not count as independent evidence.

    Raises:
        WorkbenchError: mismatched lengths, NaN or out-of-range probabilities, or a
            y_true that is not binary.
    """
    config = config or EvalConfig()
    y, p = check_predictions(y_true, y_prob)
    cluster_arr = None if cluster is None else _check_same_length("cluster", cluster, len(y))
    if y.all() or not y.any():
        warnings.warn(
            "y_true holds a single class; AUROC and AUPRC are undefined and reported as None",
            stacklevel=2,
        )
    threshold = _resolve_threshold(config.threshold, y, p)
    edges = calibration_bin_edges(p, config.n_calibration_bins, config.calibration_strategy)
    rng = np.random.default_rng(config.seed)
    codes = None if cluster_arr is None else _dense_codes(cluster_arr)
    metrics = _metrics_with_ci(y, p, threshold, edges, config, rng, codes)
    calibration = _with_band(calibration_table(y, p, edges), metrics.pop(BIN_OBSERVED, None), config.ci)
    rows = _subgroup_rows(y, p, threshold, edges, config, groups or {}, cluster_arr, rng)
    return EvaluationResult(
        metrics=metrics,
        calibration=calibration,
        subgroups=pl.DataFrame(rows, schema=_SUBGROUP_SCHEMA),
        n=len(y),
        n_positive=int(y.sum()),
        n_subjects=len(y) if codes is None else int(codes.max()) + 1,
        threshold=threshold,
        n_bootstrap=config.n_bootstrap,
        ci=config.ci,
        cluster_bootstrap=codes is not None,
        config=config,
    )


def paired_auroc_difference(y_true, risk_a, risk_b, config: EvalConfig | None = None, cluster=None) -> dict:
    """AUROC(a) - AUROC(b) on the same samples, with a paired bootstrap CI: both models are scored
    on the very same resamples (of patients, with ``cluster``), so their correlation is kept and
    the interval is much narrower than two separate intervals suggest. ``p_a_better`` is the share
    of resamples in which a beats b."""
    config = config or EvalConfig()
    y, a = check_predictions(y_true, risk_a)
    _, b = check_predictions(y_true, risk_b)
    if len(a) != len(b):
        raise WorkbenchError(f"paired comparison needs the same samples: {len(a)} vs {len(b)} predictions")
    edges = calibration_bin_edges(a, 2, "uniform")
    design_a, design_b = (_BootstrapDesign.build(y, p, 0.5, edges) for p in (a, b))
    value = float(roc_auc_score(y, a) - roc_auc_score(y, b))
    rng = np.random.default_rng(config.seed)
    codes = None if cluster is None else _dense_codes(_check_same_length("cluster", cluster, len(y)))
    differences = []
    block = max(1, _MAX_BLOCK_CELLS // max(len(y), 1))
    for start in range(0, config.n_bootstrap, block):
        weights = bootstrap_weights(min(block, config.n_bootstrap - start), len(y), rng, codes)
        differences.append(_weighted_rank_metrics(weights, design_a)[0] - _weighted_rank_metrics(weights, design_b)[0])
    diffs = np.concatenate(differences) if differences else np.array([])
    low, high, n_valid = _percentile_interval(diffs, config.ci)
    valid = diffs[np.isfinite(diffs)]
    return {"value": value, "ci_low": low, "ci_high": high, "n_valid": n_valid,
            "p_a_better": float(np.mean(valid > 0)) if valid.size else None}


def decision_curve(y_true, y_prob, thresholds=None) -> pl.DataFrame:
    """Net benefit across threshold probabilities (Vickers & Elkin, Med Decis Making 2006).

    At threshold ``t`` (the risk at which one would act: the odds t / (1 - t) weigh a false
    positive against a true positive), the model's net benefit is ``TP/n - FP/n * t / (1 - t)``;
    treating everyone gives ``prevalence - (1 - prevalence) * t / (1 - t)``; treating no one, 0.
    A model is worth using at the thresholds where its curve lies above both.
    """
    y, p = check_predictions(y_true, y_prob)
    t = np.asarray(np.arange(0.01, 0.51, 0.01) if thresholds is None else thresholds, dtype=np.float64)
    if ((t <= 0) | (t >= 1)).any():
        raise WorkbenchError("decision curve thresholds must lie strictly between 0 and 1")
    n, prevalence = len(y), float(y.mean())
    odds = t / (1 - t)
    flagged = p[None, :] >= t[:, None]
    tp = (flagged & y[None, :]).sum(axis=1) / n
    fp = (flagged & ~y[None, :]).sum(axis=1) / n
    return pl.DataFrame({
        "threshold": t,
        "net_benefit": tp - fp * odds,
        "net_benefit_treat_all": prevalence - (1 - prevalence) * odds,
        "net_benefit_treat_none": np.zeros_like(t),
        "flagged": flagged.mean(axis=1),
    })


def threshold_table(y_true, y_prob, thresholds=(0.05, 0.1, 0.2, 0.3, 0.5), sensitivities=(0.8, 0.9, 0.95),
                    tuning: tuple | None = None) -> pl.DataFrame:
    """Operating points: sensitivity, specificity, PPV, NPV, share flagged and number needed to
    evaluate (1 / PPV: patients flagged per true case) at fixed risk thresholds, and at the
    thresholds that reach fixed sensitivities. With ``tuning=(y, p)`` of the tuning split, the
    sensitivity targets are met on tuning and the threshold is then held fixed here (as a deployed
    rule would be); otherwise they are met on the data given."""
    y, p = check_predictions(y_true, y_prob)
    rows = [("risk >= %.2f" % t, float(t)) for t in thresholds]
    ty, tp_ = check_predictions(*tuning) if tuning is not None else (y, p)
    for target in sensitivities:
        positives = np.sort(tp_[ty])[::-1]
        if len(positives):
            rows.append((f"sensitivity {target:.0%}" + (" on tuning" if tuning is not None else ""),
                         float(positives[max(int(np.ceil(target * len(positives))) - 1, 0)])))
    out = []
    for label, t in rows:
        flagged = p >= t
        tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
        fn, tn = int((~flagged & y).sum()), int((~flagged & ~y).sum())
        ppv = _ratio_or_none(tp, tp + fp)
        out.append({"rule": label, "threshold": t, "sensitivity": _ratio_or_none(tp, tp + fn),
                    "specificity": _ratio_or_none(tn, tn + fp), "ppv": ppv, "npv": _ratio_or_none(tn, tn + fn),
                    "flagged": float(flagged.mean()), "number_needed_to_evaluate": None if not ppv else 1 / ppv})
    return pl.DataFrame(out, schema={"rule": pl.String, "threshold": pl.Float64, "sensitivity": pl.Float64,
                                     "specificity": pl.Float64, "ppv": pl.Float64, "npv": pl.Float64,
                                     "flagged": pl.Float64, "number_needed_to_evaluate": pl.Float64})
