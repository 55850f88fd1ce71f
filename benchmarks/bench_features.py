"""Benchmark: tensorization (``workbench.features.fit_transform``) against two references.

    .venv/bin/python -m benchmarks.bench_features [--events 1e6,1e7] [--with-100m] [--data-dir DIR]

Data: ``workbench.data.synth`` (about 100 events per subject, one prediction time per subject
from its ground truth), cached under ``--data-dir``. Spec: T=48 bins of 7 days, numeric codes
aggregated with ``last``, count codes per bin, static age and sex, every code kept
(min_code_frequency 0; the generator emits ~30 feature codes).

Implementations, each timed in its own fresh process (so its peak RSS is its own):

* ``workbench``: :func:`workbench.features.fit_transform` (code selection on the train split,
  binning, aggregation, dense tensor, forward fill, medians, normalization);
* ``pandas``: the same spec with vectorized pandas for the relational part (categorical codes,
  merge, boolean filters, groupby-last/size, no loop over subjects), then the same numpy
  assembly and statistics as workbench (so only the relational engine differs); its tensor is
  checked against workbench's;
* ``floor``: a bare polars pass: scan, join the prediction time, compute the bin,
  group_by(subject, bin, code), last value. No selection, no tensor: the lower bound.

Prints events/s, peak RSS and the ratios workbench/pandas and workbench/floor.
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

from workbench import features as ft
from workbench.data.meds_io import open_dataset

CONFIG = ft.FeatureConfig(bin_width="7d", n_steps=48, numeric_aggs=["last"], min_code_frequency=0.0)
EVENTS_PER_SUBJECT = 100


def ensure_dataset(data_dir: Path, n_events: int) -> Path:
    """A synthetic dataset with about ``n_events`` events (generated once, then reused)."""
    from workbench.data.synth import SynthConfig, generate

    root = data_dir / f"synth_{n_events:.0e}".replace("+", "")
    if not root.exists():
        n_subjects = max(100, n_events // EVENTS_PER_SUBJECT)
        print(f"generating {root} ({n_subjects} subjects) ...", flush=True)
        generate(root, SynthConfig(n_subjects=n_subjects, seed=1, subjects_per_shard=20_000), progress=False)
    return root


def labels_for(root: Path) -> pl.DataFrame:
    """One prediction time per subject (the generator's intended task)."""
    from workbench.data.synth import read_ground_truth

    return read_ground_truth(root).select(
        "subject_id", "prediction_time", pl.col("outcome").alias("boolean_value")
    )


# ------------------------------------------------------------------------------ implementations


def run_workbench(root: Path, labels: pl.DataFrame) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.UnseenCodesWarning)
        _, tensors = ft.fit_transform(root, labels, CONFIG)
    return tensors.X


def run_floor(root: Path, labels: pl.DataFrame) -> int:
    width = CONFIG.bin_width_us
    elapsed = (pl.col("prediction_time") - pl.col("time")).dt.total_microseconds()
    out = (
        pl.scan_parquet(open_dataset(root).data_files)
        .join(labels.lazy().select("subject_id", "prediction_time"), on="subject_id")
        .with_columns((elapsed // width).alias("bin"))
        .group_by("subject_id", "bin", "code")
        .agg(pl.col("numeric_value").last())
        .collect()
    )
    return out.height


def run_pandas(root: Path, labels: pl.DataFrame) -> np.ndarray:
    """The same spec in vectorized pandas; shares workbench's numpy assembly and statistics."""
    import pandas as pd
    import pyarrow.parquet as pq

    config = CONFIG
    ds = open_dataset(root)
    table = pq.ParquetDataset([str(p) for p in ds.data_files]).read(
        columns=["subject_id", "time", "code", "numeric_value"]
    )
    ev = table.to_pandas()
    ev["code"] = ev["code"].astype("category")
    splits = ds.splits().to_pandas()
    samples = labels.to_pandas().reset_index(names="_sample").merge(splits, on="subject_id", how="left")
    samples["split"] = samples["split"].fillna("")

    # code selection on train subjects as of their prediction time
    train = samples[samples["split"] == "train"]
    cutoff = train.groupby("subject_id")["prediction_time"].max().rename("_cutoff")
    tr = ev.merge(cutoff, left_on="subject_id", right_index=True)
    tr = tr[tr["time"].isna() | (tr["time"] <= tr["_cutoff"])]
    timed = tr["time"].notna()
    stats = pd.DataFrame({
        "n_subjects": tr.groupby("code", observed=True)["subject_id"].nunique(),
        "n_timed": timed.groupby(tr["code"], observed=True).sum(),
        "n_numeric": (timed & tr["numeric_value"].notna()).groupby(tr["code"], observed=True).sum(),
    }).reset_index()
    n_train = train["subject_id"].nunique()
    keep = stats[(stats["n_subjects"] >= config.min_code_frequency * n_train)
                 & ~stats["code"].str.contains("|".join(config.exclude_code_patterns))
                 & (stats["code"] != config.birth_code)]
    is_count = keep["code"].str.contains("|".join(config.count_code_patterns))
    static = keep[keep["n_timed"] == 0]["code"]
    dyn = keep[keep["n_timed"] > 0]
    numeric = sorted(dyn[~is_count & (dyn["n_numeric"] >= config.numeric_min_fraction * dyn["n_timed"])]["code"])
    count = sorted(set(dyn["code"]) - set(numeric))
    seen = sorted(stats["code"])
    layout = ft._Layout(config, numeric, count, sorted(static), include_age=True)

    # binning: as-of filter, step index, groupby last / size
    codes = numeric + count
    d = ev[ev["time"].notna() & ev["code"].isin(codes)]
    d = d.assign(_code=pd.Categorical(d["code"], categories=codes).codes.astype(np.int32))
    d = d[(d["_code"] >= len(numeric)) | d["numeric_value"].notna()]
    d = d.merge(samples[["_sample", "subject_id", "prediction_time"]], on="subject_id")
    d = d[d["time"] <= d["prediction_time"]]
    elapsed = (d["prediction_time"] - d["time"]).to_numpy().astype(np.int64)
    d = d.assign(_step=np.maximum(config.n_steps - 1 - elapsed // config.bin_width_us, -1).astype(np.int32))
    g = d.groupby(["_sample", "_step", "_code"], sort=False)["numeric_value"]
    binned = g.agg(["last", "size"]).reset_index().rename(columns={"size": "n"})

    st = ev[ev["time"].isna() & ev["code"].isin(layout.static)]
    st = st.assign(_code=pd.Categorical(st["code"], categories=layout.static).codes.astype(np.int32))
    st = st.merge(samples[["_sample", "subject_id"]], on="subject_id")[["_sample", "_code"]].drop_duplicates()
    birth = ev[(ev["code"] == config.birth_code) & ev["time"].notna()].merge(samples, on="subject_id")
    birth = birth[birth["time"] <= birth["prediction_time"]]
    birth = birth.groupby("_sample").agg(time=("time", "min"), pt=("prediction_time", "first")).reset_index()
    age = pd.DataFrame({"_sample": birth["_sample"],
                        "age": (birth["pt"] - birth["time"]).to_numpy().astype(np.int64) / ft.US_PER_YEAR})

    # same dense assembly and statistics as workbench
    X, observed, padded = ft._raw_tensor(pl.from_pandas(binned), pl.from_pandas(st), pl.from_pandas(age),
                                         pl.from_pandas(samples[["prediction_time"]]), layout)
    is_train = (samples["split"] == "train").to_numpy()
    median, mean, std = ft._fit_statistics(X, padded, is_train, layout.feature_names)
    spec = ft.FeatureSpec(config=config, numeric_codes=numeric, count_codes=count, static_codes=layout.static,
                          include_age=True, seen_codes=seen, feature_names=layout.feature_names,
                          median=median, mean=mean, std=std)
    return ft._finish(X, padded, spec)


IMPLEMENTATIONS = {"workbench": run_workbench, "pandas": run_pandas, "floor": run_floor}


def worker(impl: str, root: Path, check: Path | None) -> None:
    """Time one implementation in this (fresh) process and print a JSON line."""
    labels = labels_for(root)
    n_events = pl.scan_parquet(open_dataset(root).data_files).select(pl.len()).collect().item()
    start = time.perf_counter()
    result = IMPLEMENTATIONS[impl](root, labels)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = {"impl": impl, "events": n_events, "seconds": seconds, "peak_mb": peak_mb}
    if isinstance(result, np.ndarray):
        info["shape"] = list(result.shape)
        if check is not None:
            if impl == "workbench":
                np.save(check, result)
            elif check.exists():
                info["max_abs_diff_vs_workbench"] = float(np.max(np.abs(np.load(check) - result)))
    print(json.dumps(info), flush=True)


def measure(impl: str, root: Path, check: Path | None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_features", "--worker", impl, "--root", str(root)]
    if check is not None:
        cmd += ["--check", str(check)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"{impl} failed on {root}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(rows: list[dict]) -> None:
    by = {r["impl"]: r for r in rows}
    for r in rows:
        extra = f"  shape {r['shape']}" if "shape" in r else ""
        if "max_abs_diff_vs_workbench" in r:
            extra += f"  max|X-X_workbench| {r['max_abs_diff_vs_workbench']:.2e}"
        print(f"  {r['impl']:>9}: {r['seconds']:7.2f} s  {r['events'] / r['seconds'] / 1e6:6.2f} M events/s  "
              f"peak RSS {r['peak_mb'] / 1024:5.2f} GB{extra}")
    wb = by["workbench"]["seconds"]
    if "pandas" in by:
        print(f"  workbench is {by['pandas']['seconds'] / wb:.2f}x faster than pandas (target >= 3x)")
    if "floor" in by:
        print(f"  workbench takes {wb / by['floor']['seconds']:.2f}x the bare polars pass (target <= 3x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", default="1e6,1e7", help="Comma-separated event counts, e.g. 1e6,1e7")
    parser.add_argument("--with-100m", action="store_true", help="Also run workbench alone on 100M events")
    parser.add_argument("--data-dir", default=os.environ.get("WORKBENCH_BENCH_DIR", "/tmp/workbench-bench"))
    parser.add_argument("--worker", choices=sorted(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--check", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, Path(args.root), Path(args.check) if args.check else None)
        return
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"tensorization benchmark: T={CONFIG.n_steps}, bin {CONFIG.bin_width}, aggs {CONFIG.numeric_aggs}, "
          f"{os.cpu_count()} CPUs, polars {pl.__version__}")
    for n in [int(float(x)) for x in args.events.split(",")]:
        root = ensure_dataset(data_dir, n)
        check = data_dir / f"check_{n}.npy"
        print(f"{n:.0e} events ({root}):")
        report([measure(impl, root, check) for impl in ("workbench", "pandas", "floor")])
        check.unlink(missing_ok=True)
    if args.with_100m:
        root = ensure_dataset(data_dir, 100_000_000)
        print(f"1e8 events ({root}), workbench only (peak RSS must stay under 16 GB):")
        report([measure("workbench", root, None)])


if __name__ == "__main__":
    main()
