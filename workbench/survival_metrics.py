"""Held-out evaluation of survival models, with censoring handled properly and patient-level CIs.

``evaluate_survival(time, event, risk, horizons_days, train_time=..., train_event=..., cluster=...)``
returns a :class:`SurvivalEvaluation` holding, each with a percentile bootstrap CI over patients:

* ``td_auc_{h}d``: the cumulative/dynamic AUC at each horizon (cases: the outcome by ``h``,
  weighted by inverse probability of censoring; controls: still followed after ``h``),
  :func:`sksurv.metrics.cumulative_dynamic_auc`;
* ``harrell_c`` and ``uno_c``: Harrell's concordance (:func:`sksurv.metrics.concordance_index_censored`)
  and Uno's IPCW concordance truncated at ``tau`` (:func:`sksurv.metrics.concordance_index_ipcw`),
  both ranking the predicted risk by the concordance horizon (default the last; ``tau`` = it);
* ``brier_{h}d`` and ``ibs``: the IPCW Brier score at each horizon and its integral over the fine
  grid (over the horizons without one), :func:`sksurv.metrics.brier_score` /
  :func:`sksurv.metrics.integrated_brier_score`, with survival probability ``1 - risk``;
* ``calibration_max_abs_{h}d`` / ``calibration_mean_abs_{h}d``: the largest / mean over risk deciles
  of |mean predicted risk - observed risk| at each horizon, and the decile table itself
  (:attr:`SurvivalEvaluation.calibration`) with a bootstrap band for each observed risk.

Inputs. Samples are (subject, prediction time) pairs, several per subject. ``time`` is the days
from the prediction time to the event or censoring (> 0), ``event`` 0 (censored), 1 (the outcome)
or 2 (a competing event), ``cluster`` the subject. ``risk[:, k]`` is the predicted cumulative
incidence of the outcome by ``horizons_days[k]``.

The censoring distribution ``G`` behind every IPCW weight is the Kaplan-Meier estimate on the TRAIN
split's (time, event), never on the evaluated split (scikit-survival's ``survival_train``).

Competing events (a limitation, stated on purpose):

* td-AUC, both C-indices, the Brier scores and the IBS are cause-specific: a competing event counts
  as censoring at its time, in the evaluated split and in the train split ``G`` comes from. A
  subject who had the competing event before ``h`` is neither a case nor a control at ``h``, and the
  Brier score compares ``1 - risk`` with "outcome-free" as if the competing event had not happened.
  For a model predicting the cumulative incidence (CIF) this is an approximation: it rewards
  ranking the outcome, not the absolute risk in the presence of the competing event, and the
  censoring weights then also stand in for the competing event.
* The calibration's observed risk is the right quantity for a CIF prediction: the Aalen-Johansen
  cumulative incidence of event 1 when the set (decile) has competing events, and Kaplan-Meier
  ``1 - S(h)`` when it has none (Aalen-Johansen then equals Kaplan-Meier exactly). ``1 - KM`` with
  competing events censored would overstate the observed risk (it counts a transplanted patient
  as still at risk of the outcome).

Follow-up range (scikit-survival refuses times outside it). The rule applied (after a censoring
at or after the last horizon, a task's administrative end of follow-up, is moved a day past it:
such a sample is known event-free through that horizon, a control there):

1. ``G`` is estimable up to ``t_ok``, the last train time at which ``G > 0``. For the IPCW metrics
   an evaluated outcome or competing event after ``t_ok`` becomes a censoring at ``t_ok`` (a
   censoring keeps its time: only an outcome needs ``G > 0`` at its own time). No metric at a horizon below ``t_ok`` changes: a
   sample followed past the horizon stays a control.
2. td-AUC and Brier are evaluated at a horizon only when it lies in ``[min time, max time)`` of the
   evaluated samples after step 1 (scikit-survival's range); outside it they are undefined
   (``None``, with a warning and a note). Calibration needs no ``G`` and is reported at every
   horizon; a decile's observed risk at ``h`` is undefined (null) when none of its samples is
   followed up to ``h``, and the calibration gaps skip such deciles.
3. The IBS keeps the grid points inside the range of step 2 (at least two, else ``None``).
4. Uno's ``tau`` is the concordance horizon; Harrell's C uses the whole follow-up, uncapped.

Bootstrap. Subjects are drawn with replacement (``cluster``; all samples of a drawn subject
together), ``n_bootstrap`` times; the CI is the percentile interval over the replicates in which
a metric is defined (a replicate without a case before a horizon is skipped for that metric;
``n_valid`` counts the others). Point estimates are scikit-survival's on the full data. As in
:mod:`workbench.evaluation`, the replicates do not call scikit-survival one by one (about 40 ms a
replicate for these metrics on 600 samples): a replicate is a row of multiplicities
(:func:`workbench.evaluation.bootstrap_weights`), every metric a weighted sum, and a block of
replicates is evaluated with matrix products. The tests check that these weighted metrics equal
scikit-survival's on the resampled (duplicated) samples. All metrics share the replicates.
The calibration gaps are absolute values of noisy differences: their bootstrap distribution sits
above the point estimate (it adds resampling noise to the decile estimates), so read their
interval as the scale of that noise rather than as a CI centred on the true gap.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from scipy import sparse
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import (
    brier_score,
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.nonparametric import (
    CensoringDistributionEstimator,
    cumulative_incidence_competing_risks,
    kaplan_meier_estimator,
)
from sksurv.util import Surv

from workbench.errors import WorkbenchError
from workbench.evaluation import bootstrap_weights, calibration_bin_edges, format_with_ci

#: Event codes: censored, the outcome, a competing event.
CENSORED, OUTCOME, COMPETING = 0, 1, 2
#: Risk bins of the calibration table.
N_DECILES = 10
#: scikit-survival's tolerance for tied risk scores (``tied_tol``); the bootstrap uses it too.
TIED_TOL = 1e-8
DAYS_PER_YEAR = 365.25
# Bound on the float64 cells of one block of bootstrap weights (about 40 MB).
_MAX_BLOCK_CELLS = 5_000_000
# Bound on the (event, sample) pairs the concordance handles at once (a few temporaries that size).
_PAIR_BLOCK_CELLS = 1_000_000

_OVERALL = ("harrell_c", "uno_c", "ibs")
_PER_HORIZON = ("td_auc", "brier", "calibration_max_abs", "calibration_mean_abs")
_LABELS = {
    "harrell_c": "Harrell's C",
    "uno_c": "Uno's C",
    "ibs": "Integrated Brier score",
    "td_auc": "td-AUC",
    "brier": "Brier score",
    "calibration_max_abs": "Calibration max abs gap",
    "calibration_mean_abs": "Calibration mean abs gap",
}


def horizon_metric(metric: str, horizon_days: float) -> str:
    """The name of a per-horizon metric in whole days: ``horizon_metric("td_auc", 730.5) == "td_auc_730d"``."""
    return f"{metric}_{int(round(float(horizon_days)))}d"


@dataclass
class SurvivalEvaluation:
    """Survival metrics of one model on one evaluated set, with bootstrap CIs over subjects.

    ``metrics`` maps every name (``td_auc_{h}d``, ``harrell_c``, ``uno_c``, ``ibs``, ``brier_{h}d``,
    ``calibration_max_abs_{h}d``, ``calibration_mean_abs_{h}d``, for every horizon, defined or not)
    to ``{"value", "lower", "upper", "ci_low", "ci_high", "n_valid"}``. ``lower``/``upper`` and
    ``ci_low``/``ci_high`` are the same bounds under two names (:func:`workbench.evaluation.format_with_ci`
    and the binary evaluation read ``ci_low``/``ci_high``); ``None`` where undefined; ``n_valid``
    counts the replicates in which the metric was defined.

    ``calibration``: one row per (horizon, non-empty risk decile): ``horizon_days``, ``decile``
    (1..10), ``n``, ``predicted`` (mean predicted risk), ``observed`` (Aalen-Johansen / Kaplan-Meier
    risk by the horizon; null when undefined), and its bootstrap band as ``observed_lower`` /
    ``observed_upper`` and, the same numbers, ``observed_ci_low`` / ``observed_ci_high`` (the names of
    the binary reliability table); null without CIs.
    """

    metrics: dict[str, dict]
    calibration: pl.DataFrame
    horizons_days: list[float]
    n: int
    n_subjects: int
    n_events: int
    n_competing: int = 0
    n_bootstrap: int = 0
    ci: float = 0.95
    concordance_horizon_days: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_flat_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: number}`` for ``mlflow.log_metrics``: ``{prefix}td_auc_730d``,
        ``{prefix}td_auc_730d_ci_low``, ``{prefix}td_auc_730d_ci_high`` (the suffixes of
        :meth:`workbench.evaluation.EvaluationResult.to_flat_dict`); undefined values left out."""
        flat = {f"{prefix}n": float(self.n), f"{prefix}n_subjects": float(self.n_subjects),
                f"{prefix}n_events": float(self.n_events), f"{prefix}n_competing": float(self.n_competing)}
        for name, entry in self.metrics.items():
            for key, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
                if entry[key] is not None:
                    flat[f"{prefix}{name}{suffix}"] = float(entry[key])
        return flat

    def to_markdown(self, digits: int = 3) -> str:
        """Markdown: a row per horizon (td-AUC, Brier, calibration gaps), then the overall metrics, with CIs."""
        pct = f"{self.ci:.0%}"
        lines = [
            f"n = {self.n} samples ({self.n_subjects} subjects), outcome events = {self.n_events}, "
            f"competing events = {self.n_competing}; {pct} CIs from {self.n_bootstrap} bootstrap "
            "resamples of subjects.",
            "",
            "| Horizon | " + " | ".join(_LABELS[m] for m in _PER_HORIZON) + " |",
            "|---" * (len(_PER_HORIZON) + 1) + "|",
        ]
        for h in self.horizons_days:
            cells = [format_with_ci(self.metrics[horizon_metric(m, h)], digits) for m in _PER_HORIZON]
            lines.append(f"| {_horizon_label(h)} | " + " | ".join(cells) + " |")
        lines += ["", f"| Metric | Value ({pct} CI) |", "|---|---|"]
        at = "" if self.concordance_horizon_days is None else f" (risk by {_horizon_label(self.concordance_horizon_days)})"
        for name in _OVERALL:
            label = _LABELS[name] + (at if name != "ibs" else "")
            lines.append(f"| {label} | {format_with_ci(self.metrics[name], digits)} |")
        if self.notes:
            lines += ["", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines)


def _horizon_label(days: float) -> str:
    years = days / DAYS_PER_YEAR
    if round(years) >= 1 and abs(years - round(years)) < 1e-6:
        return f"{round(years)} y ({days:g} d)"
    return f"{days:g} d"


# --------------------------------------------------------------------------- input checks


def _as_float(values, name: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise WorkbenchError(f"{name} must be numeric: {exc}") from None


def check_time_event(time, event, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(float64 times, int64 event codes) after the checks :func:`evaluate_survival` makes."""
    t = _as_float(time, f"{name}time")
    if t.ndim != 1 or len(t) == 0:
        raise WorkbenchError(f"{name}time must be a non-empty one-dimensional array, got shape {t.shape}")
    if not np.isfinite(t).all():
        raise WorkbenchError(f"{name}time has {int((~np.isfinite(t)).sum())} NaN or infinite values")
    if (t <= 0).any():
        raise WorkbenchError(f"{name}time must be > 0 days (from the prediction time to the event or censoring); "
                             f"{int((t <= 0).sum())} values are <= 0, the smallest {t.min():g}")
    e = np.asarray(event)
    if e.ndim != 1 or len(e) != len(t):
        raise WorkbenchError(f"{name}event must have one code per sample ({len(t)}), got shape {e.shape}")
    if e.dtype == bool:
        e = e.astype(np.int64)
    if not np.issubdtype(e.dtype, np.number):
        raise WorkbenchError(f"{name}event must be integer codes 0/1/2, got dtype {e.dtype}")
    bad = ~np.isin(e, (CENSORED, OUTCOME, COMPETING))
    if bad.any():
        raise WorkbenchError(f"{name}event codes must be 0 (censored), 1 (the outcome) or 2 (a competing event); "
                             f"found {np.unique(e[bad])[:5].tolist()}")
    return t, e.astype(np.int64)


def _check_days(values, name: str) -> np.ndarray:
    if np.ndim(values) > 1:
        raise WorkbenchError(f"{name} must be a list of days, got shape {np.shape(values)}")
    days = np.atleast_1d(_as_float(values, name))
    if len(days) == 0 or not np.isfinite(days).all() or (days <= 0).any():
        raise WorkbenchError(f"{name} must be a non-empty list of finite days > 0, got {days.tolist()[:10]}")
    if np.any(np.diff(days) <= 0):
        raise WorkbenchError(f"{name} must be strictly increasing, got {days.tolist()[:10]}")
    return days


def _check_risk(risk, n: int, k: int, name: str, days_name: str) -> np.ndarray:
    r = _as_float(risk, name)
    if r.ndim == 1 and k == 1:
        r = r[:, None]
    if r.shape != (n, k):
        raise WorkbenchError(f"{name} must have shape [samples, len({days_name})] = [{n}, {k}], got {r.shape}")
    if not np.isfinite(r).all():
        raise WorkbenchError(f"{name} has {int((~np.isfinite(r)).sum())} NaN or infinite values; "
                             "check the model output before evaluating")
    if r.min() < -1e-9 or r.max() > 1 + 1e-9:
        raise WorkbenchError(f"{name} must be cumulative incidences in [0, 1], got range [{r.min():.4g}, {r.max():.4g}]")
    return np.clip(r, 0.0, 1.0)


# ------------------------------------------------------------------ observed risk (AJ / KM)


def observed_risk_curve(time, event) -> tuple[np.ndarray, np.ndarray]:
    """The observed cumulative incidence of the outcome as a right-continuous step function:
    (times, risk) from (0, 0). Aalen-Johansen (:func:`sksurv.nonparametric.cumulative_incidence_competing_risks`)
    with competing events, Kaplan-Meier ``1 - S`` (:func:`sksurv.nonparametric.kaplan_meier_estimator`) without."""
    t, e = check_time_event(time, event)
    if not (e == OUTCOME).any():  # sksurv's Aalen-Johansen refuses a cause that never occurs
        times = np.unique(t)
        return np.r_[0.0, times], np.zeros(len(times) + 1)
    if (e == COMPETING).any():
        times, cum_inc = cumulative_incidence_competing_risks(e, t)[:2]
        risk = cum_inc[OUTCOME]
    else:
        times, survival = kaplan_meier_estimator(e == OUTCOME, t)
        risk = 1.0 - survival
    return np.r_[0.0, times], np.r_[0.0, risk]


def observed_risk(time, event, horizon_days: float) -> float:
    """Observed risk of the outcome (event 1) by ``horizon_days``: Aalen-Johansen with competing
    events, Kaplan-Meier ``1 - S(h)`` without. NaN when no sample is followed up to the horizon."""
    t, _ = check_time_event(time, event)
    h = float(horizon_days)
    if h > t.max():
        return float("nan")
    times, risk = observed_risk_curve(time, event)
    return float(risk[np.searchsorted(times, h, side="right") - 1])


def _decile_ids(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bin of each prediction (0..n_bins-1): the binary evaluation's edges and rule
    (``calibration_bin_edges``, inner edges, left side); tied predictions share a bin."""
    edges = calibration_bin_edges(p, n_bins, "quantile")
    return np.searchsorted(edges[1:-1], p)


_CALIBRATION_SCHEMA = {"horizon_days": pl.Float64, "decile": pl.Int64, "n": pl.Int64,
                       "predicted": pl.Float64, "observed": pl.Float64}


def calibration_table(time, event, risk_at_h, horizon_days: float, n_bins: int = N_DECILES) -> pl.DataFrame:
    """Per non-empty quantile bin (decile) of the predicted risk at one horizon: ``horizon_days``,
    ``decile`` (1..n_bins), ``n``, ``predicted`` (mean predicted risk), ``observed``
    (:func:`observed_risk` of the bin; null when undefined). Point estimates only."""
    t, e = check_time_event(time, event)
    p = _check_risk(risk_at_h, len(t), 1, "risk_at_h", "[horizon_days]")[:, 0]
    if n_bins < 1:
        raise WorkbenchError(f"n_bins must be >= 1, got {n_bins}")
    ids = _decile_ids(p, n_bins)
    rows = []
    for d in range(n_bins):
        members = ids == d
        if members.any():
            rows.append({"horizon_days": float(horizon_days), "decile": d + 1, "n": int(members.sum()),
                         "predicted": float(p[members].mean()),
                         "observed": observed_risk(t[members], e[members], horizon_days)})
    return pl.DataFrame(rows, schema=_CALIBRATION_SCHEMA).with_columns(pl.col("observed").fill_nan(None))


# ----------------------------------------------------------------- weighted (bootstrap) metrics


def _weighted_cif(t: np.ndarray, e: np.ndarray, weights: np.ndarray, horizon: float) -> np.ndarray:
    """Aalen-Johansen cumulative incidence of event 1 by ``horizon`` for each row of multiplicities
    [B, n] (sksurv's estimate on the duplicated samples); NaN where no drawn sample is followed up
    to the horizon (the rule of :func:`observed_risk`)."""
    order = np.argsort(t, kind="stable")
    t, e, w = t[order], e[order], weights[:, order]
    times, start = np.unique(t, return_index=True)
    total = np.add.reduceat(w, start, axis=1)
    outcome = np.add.reduceat(w * (e == OUTCOME), start, axis=1)
    any_event = np.add.reduceat(w * (e != CENSORED), start, axis=1)
    at_risk = np.cumsum(total[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        hazard_all = np.where(any_event > 0, any_event / at_risk, 0.0)
        hazard_1 = np.where(outcome > 0, outcome / at_risk, 0.0)
    survival_before = np.cumprod(np.c_[np.ones(len(w)), 1.0 - hazard_all[:, :-1]], axis=1)
    k = int(np.searchsorted(times, horizon, side="right"))
    cif = (survival_before[:, :k] * hazard_1[:, :k]).sum(axis=1)
    followed = w[:, t >= horizon].sum(axis=1) > 0
    return np.where(followed, cif, np.nan)


def _tie_ranks(score: np.ndarray) -> np.ndarray:
    """0..K-1 rank of each score; scores within ``TIED_TOL`` of their sorted neighbour share one
    (the tie rule of sksurv's cumulative_dynamic_auc)."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score), dtype=np.int64)
    ranks[order] = np.cumsum(np.r_[False, np.diff(score[order]) > TIED_TOL])
    return ranks


@dataclass
class _AucDesign:
    """One horizon's cases (IPCW weight) and controls (1) in the columns of their score ranks."""

    cases: sparse.csr_matrix  # [n, K]
    controls: sparse.csr_matrix  # [n, K]

    @classmethod
    def build(cls, score: np.ndarray, case_weight: np.ndarray, is_control: np.ndarray) -> _AucDesign:
        n = len(score)
        ranks, rows = _tie_ranks(score), np.arange(n)
        k = int(ranks.max()) + 1
        return cls(sparse.csr_matrix((case_weight, (rows, ranks)), shape=(n, k)),
                   sparse.csr_matrix((is_control.astype(np.float64), (rows, ranks)), shape=(n, k)))

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """IPCW cumulative/dynamic AUC per weight row: P(case score > control score) + 1/2 P(tie)."""
        pos = np.asarray((self.cases.T @ weights.T).T)
        neg = np.asarray((self.controls.T @ weights.T).T)
        cum_neg = np.cumsum(neg, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = np.sum(pos * (cum_neg - 0.5 * neg), axis=1) / (pos.sum(axis=1) * cum_neg[:, -1])
        return np.where(np.isfinite(auc), auc, np.nan)


@dataclass
class _ConcordanceDesign:
    """sksurv's comparable pairs: i has the outcome, j a later time (or the same time without the
    outcome); each event weighted by ``event_weight`` (1: Harrell's, IPCW^2 before tau: Uno's)."""

    t: np.ndarray
    score: np.ndarray
    outcome: np.ndarray
    events: np.ndarray  # indices of the outcome events with weight > 0
    event_weight: np.ndarray

    @classmethod
    def build(cls, t, outcome, score, event_weight) -> _ConcordanceDesign:
        events = np.flatnonzero(outcome & (event_weight > 0))
        return cls(t, score, outcome, events, event_weight[events])

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        num = np.zeros(len(weights))
        den = np.zeros(len(weights))
        block = max(1, _PAIR_BLOCK_CELLS // len(self.t))
        for start in range(0, len(self.events), block):
            idx = self.events[start:start + block]
            ti = self.t[idx, None]
            comparable = (self.t[None, :] > ti) | ((self.t[None, :] == ti) & ~self.outcome[None, :])
            diff = self.score[None, :] - self.score[idx, None]
            tie = np.abs(diff) <= TIED_TOL
            credit = comparable * (((diff < 0) & ~tie) + 0.5 * tie)
            row_weight = weights[:, idx] * self.event_weight[start:start + block]
            num += np.sum(row_weight * (weights @ credit.T), axis=1)
            den += np.sum(row_weight * (weights @ comparable.T.astype(np.float64)), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, np.nan)


def _brier_terms(t_cap, outcome_cap, g_at_t, survival, days, g_at_days) -> np.ndarray:
    """[n, T] per-sample terms of sksurv's IPCW Brier score: BS(days) = weights @ terms / sum(weights)."""
    case = (t_cap[:, None] <= days[None, :]) & outcome_cap[:, None]
    control = t_cap[:, None] > days[None, :]
    inv_g_t = np.divide(1.0, g_at_t, out=np.zeros_like(g_at_t), where=g_at_t > 0)
    return survival ** 2 * case * inv_g_t[:, None] + (1.0 - survival) ** 2 * control / g_at_days[None, :]


# ----------------------------------------------------------------------------- evaluation


@dataclass
class _SurvivalDesign:
    """What stays fixed across bootstrap replicates: ``point()`` via sksurv, ``weighted()`` via sums."""

    t: np.ndarray
    e: np.ndarray
    risk: np.ndarray
    horizons: np.ndarray
    train: np.ndarray  # sksurv structured array (outcome, time) of the train split
    t_cap: np.ndarray  # rule 1 of the module docstring
    outcome_cap: np.ndarray
    ipcw: np.ndarray  # 1 / G(t_cap) for the (capped) outcome events, else 0
    g_at_t: np.ndarray
    ipcw_ok: np.ndarray  # [H] horizon inside the IPCW range (rule 2)
    ibs_days: np.ndarray  # rule 3
    ibs_survival: np.ndarray
    concordance_index: int
    n_bins: int
    deciles: list[np.ndarray]  # per horizon, the risk bin of each sample
    notes: list[str]
    cens: CensoringDistributionEstimator

    @classmethod
    def build(cls, t, e, risk, horizons, train_t, train_e, grid_risk, grid_days, concordance_index, n_bins):
        if not (train_e == OUTCOME).any():
            raise WorkbenchError("the train split has no outcome event (event == 1): scikit-survival's IPCW censoring "
                                 "distribution refuses an all-censored train split")
        train = Surv.from_arrays(train_e == OUTCOME, train_t)
        cens = CensoringDistributionEstimator().fit(train)
        positive = cens.unique_time_[(cens.prob_ > 0) & np.isfinite(cens.unique_time_)]
        if positive.size == 0:
            raise WorkbenchError("the train split's censoring survival is zero from its first time on; "
                                 "the IPCW metrics need train follow-up")
        t_ok = float(positive[-1])
        # Only an outcome needs G > 0 at its own time (its IPCW weight); a censoring keeps its time
        # (a sample followed past a horizon is a control there, weighted by G at the horizon).
        t_cap = np.where((e != CENSORED) & (t > t_ok), t_ok, t)
        outcome_cap = (e == OUTCOME) & (t <= t_ok)
        g_at_t = cens.predict_proba(t_cap)
        ipcw = np.divide(1.0, g_at_t, out=np.zeros_like(g_at_t), where=outcome_cap & (g_at_t > 0))
        low, high = float(t_cap.min()), float(t_cap.max())
        ipcw_ok = (horizons >= low) & (horizons < high)
        notes = []
        if not ipcw_ok.all():
            notes.append(f"td-AUC and Brier undefined at {horizons[~ipcw_ok].tolist()} d: outside the evaluated "
                         f"follow-up [{low:g}, {high:g}) d (times capped at {t_ok:g} d, the last train time with "
                         "censoring survival > 0)")
            warnings.warn(notes[-1], stacklevel=3)
        days, survival = (grid_days, 1.0 - grid_risk) if grid_risk is not None else (horizons, 1.0 - risk)
        keep = (days >= low) & (days < high)
        if not keep.all():
            notes.append(f"IBS over the {int(keep.sum())} of {len(days)} time points in [{low:g}, {high:g}) d")
        return cls(t, e, risk, horizons, train, t_cap, outcome_cap, ipcw, g_at_t, ipcw_ok, days[keep],
                   survival[:, keep], concordance_index, n_bins,
                   [_decile_ids(risk[:, k], n_bins) for k in range(len(horizons))], notes, cens)

    @property
    def tau(self) -> float:
        return float(self.horizons[self.concordance_index])

    def auc_horizons(self) -> np.ndarray:
        """Indices of the horizons where td-AUC is defined: in range, with a case (controls exist in range)."""
        has_case = np.array([((self.t_cap <= h) & self.outcome_cap).any() for h in self.horizons])
        return np.flatnonzero(self.ipcw_ok & has_case)

    # ------------------------------------------------------------------ point estimates (sksurv)

    def point(self) -> tuple[dict[str, float | None], pl.DataFrame]:
        out: dict[str, float | None] = {}
        test_cap = Surv.from_arrays(self.outcome_cap, self.t_cap)
        has_outcome = bool(self.outcome_cap.any())  # sksurv refuses an all-censored evaluated set
        auc = dict.fromkeys(range(len(self.horizons)))
        ks = self.auc_horizons()
        if ks.size:
            scores, _ = cumulative_dynamic_auc(self.train, test_cap, self.risk[:, ks], self.horizons[ks], tied_tol=TIED_TOL)
            auc.update({int(k): _finite_or_none(s) for k, s in zip(ks, np.atleast_1d(scores))})
        brier = dict.fromkeys(range(len(self.horizons)))
        ok = np.flatnonzero(self.ipcw_ok)
        if ok.size and has_outcome:
            _, scores = brier_score(self.train, test_cap, 1.0 - self.risk[:, ok], self.horizons[ok])
            brier.update({int(k): _finite_or_none(s) for k, s in zip(ok, scores)})
        score = self.risk[:, self.concordance_index]
        outcome = self.e == OUTCOME
        out["harrell_c"] = _concordance_or_none(
            lambda: concordance_index_censored(outcome, self.t, score, TIED_TOL) if outcome.any() else None)
        out["uno_c"] = _concordance_or_none(
            lambda: concordance_index_ipcw(self.train, test_cap, score, tau=self.tau, tied_tol=TIED_TOL)
            if has_outcome else None)
        out["ibs"] = (_finite_or_none(integrated_brier_score(self.train, test_cap, self.ibs_survival, self.ibs_days))
                      if len(self.ibs_days) >= 2 and has_outcome else None)
        tables = []
        for k, h in enumerate(self.horizons):
            out[horizon_metric("td_auc", h)] = auc[k]
            out[horizon_metric("brier", h)] = brier[k]
            table = calibration_table(self.t, self.e, self.risk[:, k], h, self.n_bins)
            gap = (table["predicted"] - table["observed"]).abs().drop_nulls()
            out[horizon_metric("calibration_max_abs", h)] = float(gap.max()) if gap.len() else None
            out[horizon_metric("calibration_mean_abs", h)] = float(gap.mean()) if gap.len() else None
            tables.append(table)
        return out, pl.concat(tables)

    # ------------------------------------------------------------------ bootstrap (weighted sums)

    def weighted(self):
        """A function of a block of weight rows [B, n] returning every metric as an array over B
        (NaN where undefined) and, under ``("observed", k)``, [B, bins] observed risks at horizon k."""
        score = self.risk[:, self.concordance_index]
        auc = {int(k): _AucDesign.build(self.risk[:, k], self.ipcw * (self.t_cap <= self.horizons[k]),
                                        self.t_cap > self.horizons[k]) for k in self.auc_horizons()}
        harrell = _ConcordanceDesign.build(self.t, self.e == OUTCOME, score, np.ones(len(self.t)))
        uno = _ConcordanceDesign.build(self.t_cap, self.outcome_cap, score, self.ipcw ** 2 * (self.t_cap < self.tau))
        has_outcome = bool(self.outcome_cap.any())
        ok = np.flatnonzero(self.ipcw_ok) if has_outcome else np.array([], dtype=np.int64)
        brier_terms = (_brier_terms(self.t_cap, self.outcome_cap, self.g_at_t, 1.0 - self.risk[:, ok], self.horizons[ok],
                                    self.cens.predict_proba(self.horizons[ok])) if ok.size else None)
        ibs_terms = (_brier_terms(self.t_cap, self.outcome_cap, self.g_at_t, self.ibs_survival, self.ibs_days,
                                  self.cens.predict_proba(self.ibs_days))
                     if len(self.ibs_days) >= 2 and has_outcome else None)
        groups = [[self.deciles[k] == d for d in np.unique(self.deciles[k])] for k in range(len(self.horizons))]

        def metrics(weights: np.ndarray) -> dict:
            b = len(weights)
            undefined = np.full(b, np.nan)
            total = weights.sum(axis=1)
            out: dict = {"harrell_c": harrell(weights), "uno_c": uno(weights), "ibs": undefined}
            if ibs_terms is not None:
                curve = (weights @ ibs_terms) / total[:, None]
                out["ibs"] = np.trapezoid(curve, self.ibs_days, axis=1) / (self.ibs_days[-1] - self.ibs_days[0])
            brier = (weights @ brier_terms) / total[:, None] if brier_terms is not None else None
            for k, h in enumerate(self.horizons):
                out[horizon_metric("td_auc", h)] = auc[k](weights) if k in auc else undefined
                column = np.flatnonzero(ok == k)
                out[horizon_metric("brier", h)] = brier[:, column[0]] if column.size else undefined
                observed, gaps = [], []
                for members in groups[k]:
                    w = weights[:, members]
                    with np.errstate(invalid="ignore", divide="ignore"):
                        predicted = (w @ self.risk[members, k]) / w.sum(axis=1)
                    observed.append(_weighted_cif(self.t[members], self.e[members], w, h))
                    gaps.append(np.abs(predicted - observed[-1]))
                gap = np.column_stack(gaps)
                defined = np.isfinite(gap).any(axis=1)
                filled = np.where(np.isfinite(gap), gap, 0.0)
                out[horizon_metric("calibration_max_abs", h)] = np.where(defined, filled.max(axis=1), np.nan)
                with np.errstate(invalid="ignore", divide="ignore"):
                    mean = filled.sum(axis=1) / np.isfinite(gap).sum(axis=1)
                out[horizon_metric("calibration_mean_abs", h)] = np.where(defined, mean, np.nan)
                out[("observed", k)] = np.column_stack(observed)
            return out

        return metrics


def _finite_or_none(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _concordance_or_none(call) -> float | None:
    try:
        result = call()
    except NoComparablePairException:
        return None
    return None if result is None else _finite_or_none(result[0])


def _interval(values: np.ndarray, ci: float) -> tuple[float | None, float | None, int]:
    """Percentile interval over the replicates where the metric is defined, and how many were."""
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        return None, None, 0
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(valid, [alpha, 1.0 - alpha])
    return float(low), float(high), int(valid.size)


def _through_last(t: np.ndarray, e: np.ndarray, last: float) -> np.ndarray:
    """Censorings at or after ``last`` moved a day past it: scikit-survival counts a control at h only
    when its time is > h, and a survival task censors every follow-up at its maximum horizon."""
    return np.where((e == CENSORED) & (t >= last), np.maximum(t, last + 1.0), t)


def evaluate_survival(
    time,
    event,
    risk,
    horizons_days,
    *,
    train_time,
    train_event,
    cluster,
    grid_risk=None,
    grid_days=None,
    n_bootstrap: int = 200,
    ci: float = 0.95,
    seed: int = 0,
    concordance_horizon_days: float | None = None,
    n_bins: int = N_DECILES,
) -> SurvivalEvaluation:
    """Evaluate predicted cumulative incidences against censored (time, event) outcomes.

    Args:
        time, event: days to the event or censoring (> 0) and its code (0 / 1 / 2), per sample.
        risk: [N, H] predicted cumulative incidence of event 1 by each of ``horizons_days`` [H]
            (increasing); a 1-D array with one horizon is accepted.
        train_time, train_event: the train split's outcomes, for the IPCW censoring distribution.
        cluster: subject per sample; the bootstrap resamples subjects.
        grid_risk, grid_days: [N, G] risk on a finer increasing grid [G], for the integrated Brier score.
        n_bootstrap, ci, seed: bootstrap replicates (0: no CIs), interval width, generator seed.
        concordance_horizon_days: the horizon (one of ``horizons_days``) whose risk the C-indices
            rank, and Uno's ``tau``; default the last horizon.
        n_bins: quantile bins of predicted risk in the calibration table (deciles).

    Raises:
        WorkbenchError: mismatched shapes, NaN or out-of-range risks, times <= 0, unknown event
            codes, horizons or grid not strictly increasing, a concordance horizon not among them,
            a train split without an outcome event.
    """
    t, e = check_time_event(time, event)
    train_t, train_e = check_time_event(train_time, train_event, "train_")
    horizons = _check_days(horizons_days, "horizons_days")
    r = _check_risk(risk, len(t), len(horizons), "risk", "horizons_days")
    if (grid_risk is None) != (grid_days is None):
        raise WorkbenchError("grid_risk and grid_days go together: pass both or neither")
    grid = None
    if grid_days is not None:
        grid = _check_days(grid_days, "grid_days")
        grid_risk = _check_risk(grid_risk, len(t), len(grid), "grid_risk", "grid_days")
    clusters = np.asarray(cluster)
    if clusters.ndim != 1 or len(clusters) != len(t):
        raise WorkbenchError(f"cluster must have one subject per sample ({len(t)}), got shape {clusters.shape}")
    if n_bootstrap < 0 or not 0 < ci < 1 or n_bins < 1:
        raise WorkbenchError(f"need n_bootstrap >= 0, 0 < ci < 1 and n_bins >= 1; got {n_bootstrap}, {ci}, {n_bins}")
    if concordance_horizon_days is None:
        c_index = len(horizons) - 1
    else:
        match = np.flatnonzero(np.abs(horizons - float(concordance_horizon_days)) < 1e-6)
        if match.size == 0:
            raise WorkbenchError(f"concordance_horizon_days {concordance_horizon_days} must be one of horizons_days "
                                 f"{horizons.tolist()} (the C-indices rank the risk by that horizon)")
        c_index = int(match[0])

    # A censoring at or after the last horizon (a task's administrative end of follow-up, where every
    # follow-up is cut) is known event-free through it: a control at that horizon, not a censoring at it.
    t, train_t = _through_last(t, e, horizons[-1]), _through_last(train_t, train_e, horizons[-1])
    design = _SurvivalDesign.build(t, e, r, horizons, train_t, train_e, grid_risk, grid, c_index, n_bins)
    point, calibration = design.point()
    codes = np.unique(clusters, return_inverse=True)[1].ravel()
    boot: dict = {}
    if n_bootstrap > 0:
        weighted = design.weighted()
        rng = np.random.default_rng(seed)
        block = max(1, _MAX_BLOCK_CELLS // len(t))
        parts = [weighted(bootstrap_weights(min(block, n_bootstrap - start), len(t), rng, codes))
                 for start in range(0, n_bootstrap, block)]
        boot = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    names = [horizon_metric("td_auc", h) for h in horizons] + list(_OVERALL)
    names += [horizon_metric(m, h) for m in _PER_HORIZON[1:] for h in horizons]
    metrics = {}
    for name in names:
        low, high, n_valid = (None, None, 0)
        if boot and point[name] is not None:
            low, high, n_valid = _interval(boot[name], ci)
        metrics[name] = {"value": point[name], "lower": low, "upper": high, "ci_low": low, "ci_high": high,
                         "n_valid": n_valid}
    return SurvivalEvaluation(
        metrics=metrics, calibration=_with_band(calibration, design, boot, ci), horizons_days=horizons.tolist(),
        n=len(t), n_subjects=int(codes.max()) + 1, n_events=int((e == OUTCOME).sum()),
        n_competing=int((e == COMPETING).sum()), n_bootstrap=n_bootstrap, ci=ci,
        concordance_horizon_days=design.tau, notes=design.notes)


def _with_band(table: pl.DataFrame, design: _SurvivalDesign, boot: dict, ci: float) -> pl.DataFrame:
    """The calibration table plus each observed risk's bootstrap interval (null without one)."""
    low = np.full(table.height, np.nan)
    high = np.full(table.height, np.nan)
    observed = table["observed"].to_list()
    if boot:
        row = 0  # the table's rows: horizon by horizon, the non-empty bins in order, as the bootstrap's columns
        for k in range(len(design.horizons)):
            draws = boot[("observed", k)]
            for j in range(draws.shape[1]):
                lo, hi, _ = _interval(draws[:, j], ci)
                if lo is not None and observed[row] is not None:
                    low[row], high[row] = lo, hi
                row += 1
    low_s, high_s = pl.Series(low).fill_nan(None), pl.Series(high).fill_nan(None)
    return table.with_columns(low_s.alias("observed_lower"), high_s.alias("observed_upper"),
                              low_s.alias("observed_ci_low"), high_s.alias("observed_ci_high"))
