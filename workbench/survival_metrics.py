"""Evaluation of risk curves with censoring handled properly, with patient-level bootstrap CIs.

Samples are (subject, prediction time) pairs, several per subject (a landmark at every visit),
each with ``time`` (days from the prediction time to the event or censoring, > 0) and ``event``
(0 censored, 1 the outcome, 2 a competing event). A model gives ``risk`` [N, H]: its predicted
cumulative incidence of the outcome by each horizon.

Metrics (scikit-survival; the censoring distribution of the inverse-probability-of-censoring
weights is the **train** split's Kaplan-Meier, never the evaluated split's):

- ``td_auc_<h>d``: cumulative/dynamic time-dependent AUC at each horizon (``cumulative_dynamic_auc``):
  cases are events by h, controls are samples still event-free at h.
- ``harrell_c`` and ``uno_c``: concordance of the risk by the last horizon (Uno's with
  truncation at that horizon and IPCW).
- ``brier_<h>d`` and ``ibs``: the IPCW Brier score of ``1 - risk`` at each horizon and integrated
  over the horizons (or a finer ``grid_days``).
- ``calibration_max_abs_<h>d`` / ``calibration_mean_abs_<h>d``: by decile of predicted risk at
  h, the gap between the mean predicted risk and the **observed** risk in the decile.

Competing events: for the AUC, concordance and Brier score a competing event counts as censoring
(cause-specific), as scikit-survival defines them; where competing events are common that is a
limitation (the censoring weights then also stand for the competing event). The observed risk
of the calibration is the Aalen-Johansen cumulative incidence of the outcome, the right
observed quantity for a predicted cumulative incidence (the Kaplan-Meier ``1 - S`` would count a
transplanted patient as still at risk of dying); without competing events it is Kaplan-Meier.

Ranges: IPCW needs a positive censoring survival, so evaluated times are clipped to the train
split's last follow-up time, and a metric at a horizon beyond the evaluated follow-up (or with
no event before it) is undefined (left out, not zero). CIs: percentile bootstrap over
**subjects** (all samples of a drawn subject together, :func:`workbench.evaluation.bootstrap_weights`);
a replicate where a metric is undefined is skipped for that metric.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import polars as pl

from workbench.errors import WorkbenchError

N_DECILES = 10


def horizon_metric(metric: str, horizon_days: float) -> str:
    """The name of a per-horizon metric: ``td_auc_730d`` (whole days)."""
    return f"{metric}_{int(round(float(horizon_days)))}d"


def observed_risk(time, event, horizon_days: float) -> float:
    """The observed risk of event 1 by ``horizon_days``: Aalen-Johansen (Kaplan-Meier without
    competing events), from (time, event) with 0 censored, 1 the outcome, 2 competing."""
    t, e = np.asarray(time, dtype=np.float64), np.asarray(event)
    if len(t) == 0:
        return float("nan")
    order = np.argsort(t, kind="stable")
    t, e = t[order], e[order]
    times, first = np.unique(t, return_index=True)
    at_risk = len(t) - first
    d1 = np.add.reduceat((e == 1).astype(np.float64), first)
    dall = np.add.reduceat((e != 0).astype(np.float64), first)
    keep = times <= horizon_days
    survival_before = np.concatenate([[1.0], np.cumprod(1.0 - dall / at_risk)[:-1]])
    return float(np.sum((survival_before * d1 / at_risk)[keep]))


def calibration_table(time, event, risk_at_h, horizon_days: float, n_bins: int = N_DECILES) -> pl.DataFrame:
    """By quantile bin (decile) of predicted risk: n, mean predicted risk, observed risk."""
    t, e, p = np.asarray(time, np.float64), np.asarray(event), np.asarray(risk_at_h, np.float64)
    bins = _bins(p, n_bins)
    rows = []
    for b in range(n_bins):
        rows_b = bins == b
        if rows_b.any():
            rows.append({"horizon_days": float(horizon_days), "decile": b + 1, "n": int(rows_b.sum()),
                         "predicted": float(p[rows_b].mean()), "observed": observed_risk(t[rows_b], e[rows_b], horizon_days)})
    return pl.DataFrame(rows)


def _bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bins 0..n_bins-1 by rank (equal counts, ties split by order)."""
    ranks = np.argsort(np.argsort(p, kind="stable"), kind="stable")
    return (ranks * n_bins) // max(len(p), 1)


@dataclass
class SurvivalEvaluation:
    metrics: dict[str, dict]  # name -> {"value", "ci_low", "ci_high"}
    calibration: pl.DataFrame  # horizon_days, decile, n, predicted, observed, observed_ci_low, observed_ci_high
    horizons_days: list[float]
    n: int
    n_subjects: int
    n_events: int

    def to_flat_dict(self, prefix: str = "") -> dict[str, float]:
        """``{name: number}`` for ``mlflow.log_metrics`` (``_ci_low`` / ``_ci_high`` as the binary runs)."""
        flat = {f"{prefix}n": float(self.n), f"{prefix}n_subjects": float(self.n_subjects),
                f"{prefix}n_events": float(self.n_events)}
        for name, entry in self.metrics.items():
            for key, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
                if entry[key] is not None:
                    flat[f"{prefix}{name}{suffix}"] = float(entry[key])
        return flat

    def to_markdown(self, digits: int = 3) -> str:
        from workbench.evaluation import format_with_ci

        lines = [f"{self.n} samples of {self.n_subjects} patients, {self.n_events} outcome events.", "",
                 "| metric | estimate (95% CI) |", "|---|---|"]
        for name, entry in self.metrics.items():
            lines.append(f"| {name} | {format_with_ci(entry, digits)} |")
        return "\n".join(lines)


def _check(time, event, risk, horizons, cluster):
    t, e = np.asarray(time, dtype=np.float64), np.asarray(event)
    r, h = np.asarray(risk, dtype=np.float64), np.asarray(horizons, dtype=np.float64)
    if r.ndim != 2 or r.shape != (len(t), len(h)) or len(e) != len(t) or len(np.asarray(cluster)) != len(t):
        raise WorkbenchError(f"survival evaluation: risk must be [N, H] = [{len(t)}, {len(h)}] with time, event and "
                             f"cluster of length N; got risk {r.shape}, event {len(e)}, cluster {len(np.asarray(cluster))}")
    if len(t) == 0:
        raise WorkbenchError("survival evaluation: no samples")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise WorkbenchError("survival evaluation: times must be finite and > 0 days")
    if not np.all(np.isin(e, (0, 1, 2))):
        raise WorkbenchError(f"survival evaluation: event types must be 0, 1 or 2; found {sorted(set(np.unique(e).tolist()) - {0, 1, 2})}")
    if not np.all(np.isfinite(r)) or np.any((r < 0) | (r > 1)):
        raise WorkbenchError("survival evaluation: risks must be probabilities in [0, 1] (found NaN or out of range)")
    if len(h) == 0 or np.any(h <= 0) or np.any(np.diff(h) <= 0):
        raise WorkbenchError(f"survival evaluation: horizons must be > 0 and strictly increasing, got {h.tolist()}")
    return t, e.astype(np.int64), r, h


def _point(t, e, risk, horizons, train, grid_risk, grid_days, conc_col) -> tuple[dict[str, float], list[float]]:
    """Every metric on one (re)sample; NaN where undefined. Also the observed risk per decile."""
    from sksurv.metrics import (
        brier_score,
        concordance_index_censored,
        concordance_index_ipcw,
        cumulative_dynamic_auc,
        integrated_brier_score,
    )
    from sksurv.util import Surv

    out: dict[str, float] = {}
    t = np.minimum(t, train["time"].max())  # IPCW: the censoring survival is positive up to the train's last time
    test = Surv.from_arrays(e == 1, t)
    inside = (horizons > t.min()) & (horizons < t.max())
    for i, h in enumerate(horizons):
        auc = brier = float("nan")
        if inside[i] and np.any((e == 1) & (t <= h)) and np.any(t > h):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    auc = float(cumulative_dynamic_auc(train, test, risk[:, i], [h])[0][0])
                    brier = float(brier_score(train, test, 1.0 - risk[:, i : i + 1], [h])[1][0])
                except ValueError:
                    pass
        out[horizon_metric("td_auc", h)] = auc
        out[horizon_metric("brier", h)] = brier
    estimate = risk[:, conc_col]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out["harrell_c"] = float(concordance_index_censored(e == 1, t, estimate)[0])
        except (ValueError, ZeroDivisionError):
            out["harrell_c"] = float("nan")
        try:
            out["uno_c"] = float(concordance_index_ipcw(train, test, estimate, tau=horizons[conc_col])[0])
        except (ValueError, ZeroDivisionError):
            out["uno_c"] = float("nan")
        days, values = (grid_days, grid_risk) if grid_risk is not None else (horizons, risk)
        ok = (days > t.min()) & (days < t.max())
        try:
            out["ibs"] = float(integrated_brier_score(train, test, 1.0 - values[:, ok], days[ok])) if ok.sum() >= 2 else float("nan")
        except ValueError:
            out["ibs"] = float("nan")
    observed = []
    for i, h in enumerate(horizons):
        bins = _bins(risk[:, i], N_DECILES)
        gaps = []
        for b in range(N_DECILES):
            rows = bins == b
            obs = observed_risk(t[rows], e[rows], h) if rows.any() else float("nan")
            observed.append(obs)
            if rows.any():
                gaps.append(abs(risk[rows, i].mean() - obs))
        out[horizon_metric("calibration_max_abs", h)] = float(max(gaps)) if gaps else float("nan")
        out[horizon_metric("calibration_mean_abs", h)] = float(np.mean(gaps)) if gaps else float("nan")
    return out, observed


def evaluate_survival(time, event, risk, horizons_days, *, train_time, train_event, cluster, grid_risk=None,
                      grid_days=None, n_bootstrap: int = 200, ci: float = 0.95, seed: int = 0,
                      concordance_horizon_days: float | None = None) -> SurvivalEvaluation:
    """Every metric of the module docstring at ``horizons_days``, with patient-level bootstrap CIs."""
    from sksurv.util import Surv

    from workbench.evaluation import bootstrap_weights

    t, e, r, h = _check(time, event, risk, horizons_days, cluster)
    tt, te = np.asarray(train_time, dtype=np.float64), np.asarray(train_event)
    if len(tt) == 0 or len(tt) != len(te):
        raise WorkbenchError("survival evaluation: the train split's time and event (for the censoring weights) are empty or differ in length")
    train = Surv.from_arrays(te == 1, tt)
    gd = None if grid_days is None else np.asarray(grid_days, dtype=np.float64)
    gr = None if grid_risk is None else np.asarray(grid_risk, dtype=np.float64)
    if gr is not None and (gd is None or gr.shape != (len(t), len(gd))):
        raise WorkbenchError(f"survival evaluation: grid_risk must be [N, G] with grid_days of length G; got {None if gr is None else gr.shape}")
    conc_h = float(concordance_horizon_days or h[-1])
    conc_col = int(np.argmin(np.abs(h - conc_h)))
    point, observed = _point(t, e, r, h, train, gr, gd, conc_col)
    codes = np.unique(np.asarray(cluster), return_inverse=True)[1]
    draws = {k: [] for k in point}
    observed_draws = []
    if n_bootstrap:
        weights = bootstrap_weights(n_bootstrap, len(t), np.random.default_rng(seed), codes).astype(np.int64)
        for w in weights:
            idx = np.repeat(np.arange(len(t)), w)
            values, obs = _point(t[idx], e[idx], r[idx], h, train, None if gr is None else gr[idx], gd, conc_col)
            for k, v in values.items():
                if np.isfinite(v):
                    draws[k].append(v)
            observed_draws.append(obs)
    alpha = (1 - ci) / 2

    def interval(values):
        if len(values) < max(10, n_bootstrap // 2):
            return None, None
        return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))

    metrics = {}
    for k, v in point.items():
        if np.isfinite(v):
            low, high = interval(draws[k])
            metrics[k] = {"value": v, "ci_low": low, "ci_high": high}
    calibration = pl.concat([calibration_table(t, e, r[:, i], hh) for i, hh in enumerate(h)])
    if observed_draws:
        obs = np.asarray(observed_draws, dtype=np.float64).reshape(len(observed_draws), len(h), N_DECILES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            low, high = np.nanquantile(obs, alpha, axis=0), np.nanquantile(obs, 1 - alpha, axis=0)
        lookup = {(float(hh), d + 1): (low[i, d], high[i, d]) for i, hh in enumerate(h) for d in range(N_DECILES)}
        bounds = [lookup[(row["horizon_days"], row["decile"])] for row in calibration.iter_rows(named=True)]
        calibration = calibration.with_columns(observed_ci_low=pl.Series([b[0] for b in bounds]),
                                               observed_ci_high=pl.Series([b[1] for b in bounds]))
    else:
        calibration = calibration.with_columns(observed_ci_low=pl.lit(None, pl.Float64), observed_ci_high=pl.lit(None, pl.Float64))
    return SurvivalEvaluation(metrics, calibration, h.tolist(), len(t), int(codes.max()) + 1, int(np.sum(e == 1)))
