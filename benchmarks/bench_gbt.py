"""Benchmark: the gradient-boosted reference (tabular features + LightGBM fit) on synthetic MEDS.

    .venv/bin/python -m benchmarks.bench_gbt [--events 1e7] [--repeats 3] [--data-dir DIR]

Data: ``workbench.data.synth`` (about 100 events per subject, one prediction time per subject),
cached under ``--data-dir`` and shared with ``bench_features``. Codes: the FeatureSpec's (every
code, min_code_frequency 0). Each implementation runs in its own fresh process (its peak RSS is
its own), repeats interleaved, medians reported:

* ``tabular``: :func:`workbench.tabular.tabular_features`: 3 look-back windows (30 d, 365 d, full),
  last / mean / min / max / count per numeric code, counts per count code, days since first and
  last occurrence, age, static codes, as a dense [N, F] matrix;
* ``floor``: a bare polars pass over the same events: scan, join the prediction time, as-of
  filter, group_by(subject, code) with count and last value; no windows, no matrix: the lower
  bound of any tabularization;
* ``fit``: LightGBM on the tabular matrix as the workbench fits it (train split, early stopping on
  tuning), and the held-out AUROC, so the time buys a model that works.

Prints seconds, events/s, peak RSS and the ratio tabular / floor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.bench_features import ensure_dataset, labels_for


def run_tabular(root: Path, labels: pl.DataFrame):
    from workbench.features import FeatureConfig, UnseenCodesWarning, fit
    from workbench.tabular import tabular_features

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnseenCodesWarning)
        spec = fit(root, labels, FeatureConfig(min_code_frequency=0.0))
    started = time.perf_counter()
    X, samples = tabular_features(root, labels, spec)
    return X, samples, time.perf_counter() - started


def run_floor(root: Path, labels: pl.DataFrame) -> float:
    from workbench.data.meds_io import open_dataset

    started = time.perf_counter()
    (
        open_dataset(root).events().filter(pl.col("time").is_not_null())
        .join(labels.lazy().select("subject_id", "prediction_time"), on="subject_id")
        .filter(pl.col("time") <= pl.col("prediction_time"))
        .group_by("subject_id", "code")
        .agg(pl.len(), pl.col("numeric_value").drop_nulls().last())
        .collect(engine="streaming")
    )
    return time.perf_counter() - started


def worker(impl: str, root: Path) -> None:
    labels = labels_for(root)
    n_events = pl.scan_parquet(str(root / "data" / "**" / "*.parquet")).select(pl.len()).collect().item()
    info = {"impl": impl, "events": n_events}
    if impl == "floor":
        info["seconds"] = run_floor(root, labels)
    else:
        X, samples, seconds = run_tabular(root, labels)
        info |= {"seconds": seconds, "shape": list(X.shape)}
        if impl == "fit":
            from sklearn.metrics import roc_auc_score

            from workbench.references import GradientBoostedReference

            split, y = samples["split"].to_numpy(), samples["boolean_value"].to_numpy().astype(int)
            started = time.perf_counter()
            gbt = GradientBoostedReference().fit(X[split == "train"], y[split == "train"],
                                                 X[split == "tuning"], y[split == "tuning"])
            info |= {"fit_seconds": time.perf_counter() - started, "rounds": gbt.booster.best_iteration,
                     "held_out_auroc": float(roc_auc_score(y[split == "held_out"], gbt.predict_proba(X[split == "held_out"])))}
    info["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(info))


def measure(impl: str, root: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_gbt", "--worker", impl, "--root", str(root)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", default="1e7", help="comma-separated event counts, e.g. 1e6,1e7")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "workbench-bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.root)
        return
    for n_events in (int(float(e)) for e in args.events.split(",")):
        root = ensure_dataset(args.data_dir, n_events)
        runs: dict[str, list[dict]] = {"tabular": [], "floor": [], "fit": []}
        for _ in range(args.repeats):  # interleaved: tabular, floor, tabular, floor, ...
            for impl in ("tabular", "floor"):
                runs[impl].append(measure(impl, root))
        runs["fit"].append(measure("fit", root))
        events = runs["tabular"][0]["events"]
        tab = float(np.median([r["seconds"] for r in runs["tabular"]]))
        floor = float(np.median([r["seconds"] for r in runs["floor"]]))
        fit = runs["fit"][0]
        load = os.getloadavg()[0]
        print(f"\n{events:,} events ({runs['tabular'][0]['shape'][0]:,} samples x {runs['tabular'][0]['shape'][1]} features), "
              f"median of {args.repeats}, load average {load:.1f} on {os.cpu_count()} cores:")
        print(f"  tabular features: {tab:8.2f} s = {events / tab / 1e6:.2f}M events/s, "
              f"peak RSS {max(r['peak_mb'] for r in runs['tabular']) / 1024:.2f} GiB")
        print(f"  bare polars pass: {floor:8.2f} s (peak RSS {max(r['peak_mb'] for r in runs['floor']) / 1024:.2f} GiB); "
              f"ratio tabular / floor = {tab / floor:.1f}x")
        print(f"  LightGBM fit:     {fit['fit_seconds']:8.2f} s ({fit['rounds']} rounds, early-stopped on tuning); "
              f"held-out AUROC {fit['held_out_auroc']:.3f}; features + fit {fit['seconds'] + fit['fit_seconds']:.1f} s, "
              f"peak RSS {fit['peak_mb'] / 1024:.2f} GiB")


if __name__ == "__main__":
    main()
