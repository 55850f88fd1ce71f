"""Benchmark: the patient bootstrap of the censoring-aware survival metrics.

    .venv/bin/python -m benchmarks.bench_survival_metrics [--samples 600] [--replicates 200] [--rounds 3]

Workload: a synthetic cohort whose true risk is known (exponential outcome with a covariate,
constant competing hazard, uniform censoring), ``--samples`` held-out visits of a third as many
subjects, 5 horizons (1-5 years) and a monthly grid for the integrated Brier score: the shape of
the PBC survival evaluation. Both sides compute, per bootstrap replicate of subjects, td-AUC and
the Brier score at each horizon, Harrell's and Uno's C and the integrated Brier score.

* ``workbench``: :func:`workbench.survival_metrics.evaluate_survival` with ``--replicates``
  replicates (the weighted sums over a fixed design, one matrix product per metric);
* ``baseline``: the straightforward bootstrap: for each replicate, duplicate the drawn subjects'
  rows and call scikit-survival's metrics on them (the point path of the same function, which
  the tests hold equal to sksurv), timed over ``--baseline-replicates`` replicates.

Rounds alternate A and B; medians of seconds per replicate, the ratio, and the load average at
the start and the end are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np

YEAR = 365.25


def cohort(n: int, rng):
    """(time, event, outcome rate, competing rate), rates per day (the metrics tests' generator)."""
    r1 = 0.15 * np.exp(0.8 * rng.normal(size=n)) / YEAR
    r2 = np.full(n, 0.05 / YEAR)
    t1, t2, censor = rng.exponential(1 / r1), rng.exponential(1 / r2), rng.uniform(0, 10 * YEAR, n)
    t = np.minimum.reduce([t1, t2, censor])
    return t, np.where(t == t1, 1, np.where(t == t2, 2, 0)), r1, r2


def true_cif(r1, r2, days) -> np.ndarray:
    total = (r1 + r2)[:, None]
    return r1[:, None] / total * (1 - np.exp(-total * np.asarray(days, dtype=np.float64)[None, :]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--baseline-replicates", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from workbench.survival_metrics import evaluate_survival

    rng = np.random.default_rng(7)
    train_t, train_e, _, _ = cohort(2000, rng)
    t, e, r1, r2 = cohort(args.samples, rng)
    cluster = np.arange(args.samples) // 3  # three visits a subject
    horizons = np.arange(1, 6) * YEAR
    grid = np.arange(1, 61) * YEAR / 12
    risk, grid_risk = true_cif(r1, r2, horizons), true_cif(r1, r2, grid)

    def evaluate(idx: np.ndarray, n_bootstrap: int):
        return evaluate_survival(t[idx], e[idx], risk[idx], horizons, train_time=train_t, train_event=train_e,
                                 cluster=cluster[idx], grid_risk=grid_risk[idx], grid_days=grid,
                                 n_bootstrap=n_bootstrap)

    def workbench() -> float:
        start = time.perf_counter()
        evaluate(np.arange(args.samples), args.replicates)
        return (time.perf_counter() - start) / args.replicates

    subjects = np.unique(cluster)
    rows_of = {s: np.flatnonzero(cluster == s) for s in subjects}

    def baseline() -> float:
        draw = np.random.default_rng(1)
        start = time.perf_counter()
        for _ in range(args.baseline_replicates):
            picked = draw.choice(subjects, size=len(subjects), replace=True)
            evaluate(np.concatenate([rows_of[s] for s in picked]), 0)
        return (time.perf_counter() - start) / args.baseline_replicates

    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores); {args.samples} samples, "
          f"{len(subjects)} subjects, 5 horizons, 60-point IBS grid", flush=True)
    ours, theirs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(args.rounds):
            for name, fn, out in (("workbench", workbench, ours), ("baseline", baseline, theirs))[:: 1 if r % 2 == 0 else -1]:
                out.append(fn())
                print(f"  round {r + 1} {name}: {1000 * out[-1]:.2f} ms per replicate", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"workbench: {1000 * a:.2f} ms per replicate ({args.replicates} replicates: {a * args.replicates:.2f} s)")
    print(f"baseline (sksurv on the duplicated rows): {1000 * b:.2f} ms per replicate "
          f"({args.replicates} replicates: {b * args.replicates:.1f} s)")
    print(f"ratio: workbench {b / a:.1f}x faster per replicate; load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
