"""Benchmark: tensorization (``workbench.features.fit_transform``) against two references.

    .venv/bin/python -m benchmarks.bench_features [--events 1e6,1e7] [--repeats 3] [--with-100m] [--data-dir DIR]

Data: ``workbench.data.synth`` (about 100 events per subject, one prediction time per subject
from its ground truth), cached under ``--data-dir``. Spec: T=48 bins of 7 days, numeric codes
aggregated with ``last``, count codes per bin, static age and sex, every code kept
(min_code_frequency 0; the generator emits ~30 feature codes).

Implementations, each timed in its own fresh process (so its peak RSS is its own), repeats
interleaved (workbench, pandas, floor, workbench, ...) and the median reported:

* ``workbench``: :func:`workbench.features.fit_transform` (code selection on the train split,
  binning, aggregation, dense tensor, forward fill, medians, normalization);
* ``pandas``: the whole spec in vectorized pandas (merge + as-of filter, groupby size/count/last,
  pivots on the (sample, step) grid, groupby-ffill, medians, mean/std, normalization; no loop
  over subjects, no workbench code beyond the channel-name rules); its tensor must equal
  workbench's (the run fails otherwise);
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

CONFIG = ft.FeatureConfig(bin_width="7d", n_steps=48, numeric_aggs=["last"], min_code_frequency=0.0,
                          add_history=False)  # the pandas baseline implements the binned channels only
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
    """The whole spec in vectorized pandas (merge + as-of filter, groupby aggregations, pivots,
    groupby-ffill, medians, normalization); numpy only where pandas hands over arrays."""
    import pandas as pd
    import pyarrow.parquet as pq

    config, T, width = CONFIG, CONFIG.n_steps, CONFIG.bin_width_us
    ds = open_dataset(root)
    ev = pq.ParquetDataset([str(p) for p in ds.data_files], read_dictionary=["code"]).read(
        columns=["subject_id", "time", "code", "numeric_value"]).to_pandas()  # code arrives Categorical
    samples = labels.to_pandas().reset_index(names="_sample").merge(ds.splits().to_pandas(), on="subject_id", how="left")
    samples["split"] = samples["split"].fillna("")
    N = len(samples)

    # as of the prediction time: merge each timed event with its subject's samples, filter, bin
    d = ev[ev["time"].notna()].merge(samples[["_sample", "subject_id", "prediction_time"]], on="subject_id")
    d = d[d["time"] <= d["prediction_time"]]
    elapsed = (d["prediction_time"] - d["time"]) // pd.Timedelta(microseconds=width)
    d["_step"] = (T - 1 - elapsed).clip(lower=-1)
    # "last" = the value with the greatest (time, value): sort, then groupby-last skips NaN
    d = d.sort_values(["time", "numeric_value"], na_position="first")
    bins = d.groupby(["_sample", "_step", "code"], observed=True, sort=False)["numeric_value"].agg(
        n="size", n_values="count", last="last").reset_index()
    static = ev[ev["time"].isna()][["subject_id", "code"]].drop_duplicates()

    # code selection over train subjects as of their latest prediction time
    train = samples[samples["split"] == "train"]
    latest = train[train["prediction_time"] == train.groupby("subject_id")["prediction_time"].transform("max")]
    latest = latest.groupby("subject_id")["_sample"].min()
    tb = bins[bins["_sample"].isin(latest)].merge(samples[["_sample", "subject_id"]], on="_sample")
    pairs = pd.concat([tb[["subject_id", "code"]].astype({"code": str}),
                       static[static["subject_id"].isin(latest.index)].astype({"code": str})]).drop_duplicates()
    stats = pd.DataFrame({
        "n_subjects": pairs.groupby("code").size(),
        "n_timed": tb.groupby(tb["code"].astype(str))["n"].sum(),
        "n_numeric": tb.groupby(tb["code"].astype(str))["n_values"].sum(),
    }).fillna(0).rename_axis("code").reset_index()
    code = stats["code"]
    keep = stats[(stats["n_subjects"] >= config.min_code_frequency * latest.size)
                 & ~code.str.contains("|".join(config.exclude_code_patterns)) & (code != config.birth_code)]
    counted = keep["code"].str.contains("|".join(config.count_code_patterns))
    is_numeric = ~counted & (keep["n_numeric"] >= config.numeric_min_fraction * keep["n_timed"]) & (keep["n_timed"] > 0)
    numeric = sorted(keep.loc[is_numeric, "code"])
    count = sorted(keep.loc[(keep["n_timed"] > 0) & ~is_numeric, "code"])
    static_codes = sorted(keep.loc[keep["n_timed"] == 0, "code"])

    # dense blocks on the full (sample, slot) grid; slot 0 = before the window
    grid = pd.MultiIndex.from_product([range(N), range(T + 1)], names=["_sample", "_slot"])
    bins["_slot"] = bins["_step"] + 1
    bins["code"] = bins["code"].astype(str)
    num = bins[bins["code"].isin(numeric) & (bins["n_values"] > 0)]
    last = num.pivot_table(index=["_sample", "_slot"], columns="code", values="last", aggfunc="first", observed=True)
    last = last.reindex(index=grid, columns=numeric).groupby(level="_sample").ffill()
    cnt = bins[bins["code"].isin(count) & (bins["_slot"] > 0)]
    counts = cnt.pivot_table(index=["_sample", "_slot"], columns="code", values="n", aggfunc="sum", observed=True)
    counts = counts.reindex(index=grid, columns=count, fill_value=0).fillna(0)
    events = bins[bins["code"].isin(numeric + count) & ((bins["n_values"] > 0) | bins["code"].isin(count))]
    any_event = events.groupby(["_sample", "_slot"]).size().reindex(grid, fill_value=0) > 0
    started = any_event.groupby(level="_sample").cummax()
    births = d[d["code"] == config.birth_code].groupby("_sample").agg(birth=("time", "min"), pt=("prediction_time", "first"))
    age = ((births["pt"] - births["birth"]) // pd.Timedelta(microseconds=1) / ft.US_PER_YEAR).reindex(range(N))
    st = static[static["code"].isin(static_codes)].merge(samples[["_sample", "subject_id"]], on="subject_id")
    st_block = pd.crosstab(st["_sample"], st["code"].astype(str)).reindex(index=range(N), columns=static_codes, fill_value=0)

    frame = pd.concat([last, counts], axis=1)
    frame = frame[frame.index.get_level_values("_slot") > 0]
    frame[ft.AGE_FEATURE] = np.repeat(age.to_numpy(), T)
    for c in static_codes:
        frame[f"static/{c}"] = np.repeat((st_block[c] > 0).to_numpy(), T)
    frame[ft.OBSERVED_FEATURE] = any_event[any_event.index.get_level_values("_slot") > 0].to_numpy()
    names = [f"{c}/last" for c in numeric] + [f"{c}/count" for c in count] + [ft.AGE_FEATURE] \
        + [f"static/{c}" for c in static_codes] + [ft.OBSERVED_FEATURE]
    frame.columns = names
    frame = frame.astype(np.float32)
    padded = ~started[started.index.get_level_values("_slot") > 0].to_numpy()

    # train statistics over non-padded train steps, then impute, standardize, zero the padding
    is_train = np.repeat((samples["split"] == "train").to_numpy(), T)
    fitted = frame[is_train & ~padded]
    imputed = [n for n in names if ft._is_imputed(n)]
    continuous = [n for n in names if ft._is_continuous(n)]
    median = pd.Series(0.0, index=names)
    median[imputed] = fitted[imputed].median().fillna(0.0)
    filled = fitted.fillna(median)
    mean, std = pd.Series(0.0, index=names), pd.Series(1.0, index=names)
    mean[continuous] = filled[continuous].astype(np.float64).mean()
    sd = filled[continuous].astype(np.float64).std(ddof=0)
    std[continuous] = sd.where(sd > 1e-12, 1.0)
    out = ((frame.fillna(median.astype(np.float32)) - mean.astype(np.float32)) / std.astype(np.float32)).astype(np.float32)
    out[padded] = 0.0
    return out.to_numpy().reshape(N, T, len(names))


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
                expected = np.load(check)
                same = expected.shape == result.shape
                info["max_abs_diff_vs_workbench"] = float(np.max(np.abs(expected - result))) if same else float("inf")
    print(json.dumps(info), flush=True)


def measure(impl: str, root: Path, check: Path | None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_features", "--worker", impl, "--root", str(root)]
    if check is not None:
        cmd += ["--check", str(check)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"{impl} failed on {root}:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if info.get("max_abs_diff_vs_workbench", 0.0) > 1e-5:
        raise SystemExit(f"{impl} tensor differs from workbench's on {root}: {info}")
    return info


def load_average() -> str:
    """The 1-minute load average (timings on a shared machine are only comparable within a run)."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def median_rows(runs: list[dict]) -> list[dict]:
    """Per implementation: the median time over repeats and the largest peak RSS."""
    out = []
    for impl in dict.fromkeys(r["impl"] for r in runs):
        mine = [r for r in runs if r["impl"] == impl]
        row = dict(mine[0], seconds=float(np.median([r["seconds"] for r in mine])),
                   peak_mb=max(r["peak_mb"] for r in mine), all_seconds=[round(r["seconds"], 2) for r in mine])
        out.append(row)
    return out


def report(rows: list[dict]) -> None:
    by = {r["impl"]: r for r in rows}
    for r in rows:
        extra = f"  shape {r['shape']}" if "shape" in r else ""
        if "max_abs_diff_vs_workbench" in r:
            extra += f"  max|X-X_workbench| {r['max_abs_diff_vs_workbench']:.2e}"
        if len(r.get("all_seconds", [])) > 1:
            extra += f"  runs {r['all_seconds']}"
        print(f"  {r['impl']:>9}: {r['seconds']:7.2f} s  {r['events'] / r['seconds'] / 1e6:6.2f} M events/s  "
              f"peak RSS {r['peak_mb'] / 1024:5.2f} GB{extra}")
    wb = by["workbench"]["seconds"]
    if "pandas" in by:
        ratio = by["pandas"]["seconds"] / wb
        print(f"  workbench is {ratio:.2f}x faster than pandas (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})")
    if "floor" in by:
        ratio = wb / by["floor"]["seconds"]
        print(f"  workbench takes {ratio:.2f}x the bare polars pass (target <= 3x: {'met' if ratio <= 3 else 'NOT met'})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", default="1e6,1e7", help="Comma-separated event counts, e.g. 1e6,1e7")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved repeats per implementation (median)")
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
    for n in [int(float(x)) for x in args.events.split(",") if x.strip()]:
        root = ensure_dataset(data_dir, n)
        check = data_dir / f"check_{n}.npy"
        print(f"{n:.0e} events ({root}), {args.repeats} interleaved repeats, load average {load_average()}:", flush=True)
        runs = [measure(impl, root, check) for _ in range(args.repeats) for impl in ("workbench", "pandas", "floor")]
        report(median_rows(runs))
        print(f"  (load average after: {load_average()})", flush=True)
        check.unlink(missing_ok=True)
    if args.with_100m:
        root = ensure_dataset(data_dir, 100_000_000)
        print(f"1e8 events ({root}), workbench only, streaming engine (peak RSS must stay under 16 GB), "
              f"load average {load_average()}:", flush=True)
        row = measure("workbench", root, None)
        report([row])
        print(f"  peak RSS under 16 GB: {'met' if row['peak_mb'] < 16 * 1024 else 'NOT met'}")


if __name__ == "__main__":
    main()
