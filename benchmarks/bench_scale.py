"""Benchmark: the whole pipeline out of memory, at 100M events, within 8 GB peak RSS per stage.

    .venv/bin/python -m benchmarks.bench_scale                 # 1M events (a quick run)
    .venv/bin/python -m benchmarks.bench_scale --with-100m     # 100M events, 1M subjects
    .venv/bin/python -m benchmarks.bench_scale --events 1e7 [--train-samples N] [--data-dir DIR]

Data: ``workbench.data.synth`` (about 100 events per subject, one prediction time per subject),
generated once under ``--data-dir`` (shared with ``bench_features``) and validated once (the
cached check of :func:`workbench.features.prepare_samples` then costs nothing in the stages).
Spec: ``bench_features``'s (T=48 bins of 7 days, ``last``, every code kept: F=32).

Stages, each in its own fresh process (so its peak RSS is its own), in this order:

* ``floor``: ``bench_features``'s bare polars pass (scan, join, bin, group_by, last), the
  reference the tensorize stage is compared with (target: at most 2x its time);
* ``tensorize``: :func:`workbench.shards.write_shards` (fit the spec on the train split, write
  the shards);
* ``train``: one epoch of :func:`workbench.training.train` (LSTM 64, batch 256) streaming
  batches from the train split's shards, the tuning split scored after it; ``--train-samples``
  trains on the first N train rows instead (the tuning split stays whole);
* ``score``: :func:`workbench.training.predict_risk` on every held-out sequence, by block;
* ``explain``: :func:`workbench.explain.explain` on 1,000 held-out sequences against a
  background from :func:`workbench.explain.select_background` (k-means over 5,000 train rows).

Prints seconds and peak RSS per stage, the tensorize/floor ratio, the load average at the start
and at the end, and whether each target is met (peak RSS <= 8 GB in every pipeline stage; the
floor, an in-memory polars query, is only the reference).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

PEAK_TARGET_GB = 8.0
FLOOR_RATIO_TARGET = 2.0
STAGES = ("floor", "tensorize", "train", "score", "explain")
N_EXPLAIN = 1000
BACKGROUND_POOL = 5000


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


# ------------------------------------------------------------------------------------ stages


def stage_floor(root: Path, work: Path, args) -> dict:
    from benchmarks.bench_features import labels_for, run_floor

    labels = labels_for(root)
    start = time.perf_counter()
    groups = run_floor(root, labels)
    return {"seconds": time.perf_counter() - start, "note": f"{groups:,} (subject, bin, code) groups"}


def stage_tensorize(root: Path, work: Path, args) -> dict:
    from benchmarks.bench_features import CONFIG, labels_for
    from workbench import features as ft
    from workbench.shards import write_shards

    labels = labels_for(root)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.UnseenCodesWarning)
        store = write_shards(root, labels, work / "shards", CONFIG, chunk_samples=args.chunk_samples)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (work / "shards").iterdir())
    return {"seconds": seconds, "note": f"shape {list(store.shape)}, {len(store._reader.paths)} shards, "
                                        f"{size / 1e9:.2f} GB on disk"}


def _torch_threads(args) -> None:
    import torch

    torch.set_num_threads(args.threads)


def stage_train(root: Path, work: Path, args) -> dict:
    from workbench.models import ModelConfig
    from workbench.shards import ShardedTensors
    from workbench.training import TrainConfig, train

    _torch_threads(args)
    store = ShardedTensors(work / "shards")
    rows = store.rows("train")
    if args.train_samples:
        rows = rows[: args.train_samples]
    train_rows, tune_rows = store.view(rows), store.view("tuning")
    start = time.perf_counter()
    result = train(ModelConfig(units=64), TrainConfig(epochs=1, batch_size=256, progress=False),
                   train_rows, train_rows.y, tune_rows, tune_rows.y)
    seconds = time.perf_counter() - start
    result.model.save(work / "model.keras")
    h = result.history[0]
    return {"seconds": seconds, "note": f"1 epoch on {len(train_rows):,} train sequences "
                                        f"({h['seconds']:.1f} s incl. scoring {len(tune_rows):,} tuning), "
                                        f"loss {h['loss']:.4f}, tuning AUROC {h['tune_auroc']:.3f}"}


def _load_model(work: Path):
    import keras

    from workbench.models import FusedRecurrent  # registered with Keras where it is defined

    return keras.models.load_model(work / "model.keras", custom_objects={"FusedRecurrent": FusedRecurrent})


def stage_score(root: Path, work: Path, args) -> dict:
    from sklearn.metrics import roc_auc_score

    from workbench.shards import ShardedTensors
    from workbench.training import predict_risk

    _torch_threads(args)
    store = ShardedTensors(work / "shards")
    model = _load_model(work)
    held_out = store.view("held_out")
    start = time.perf_counter()
    risk = predict_risk(model, held_out, batch_size=4096)
    seconds = time.perf_counter() - start
    np.save(work / "held_out_risk.npy", risk)
    return {"seconds": seconds, "note": f"{len(held_out):,} held-out sequences, "
                                        f"AUROC {roc_auc_score(held_out.y, risk):.3f}"}


def stage_explain(root: Path, work: Path, args) -> dict:
    from workbench.explain import ExplainConfig, additivity_errors, explain, select_background
    from workbench.shards import ShardedTensors

    _torch_threads(args)
    store = ShardedTensors(work / "shards")
    model = _load_model(work)
    config = ExplainConfig(progress=False)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    train_rows = store.rows("train")
    pool = np.sort(rng.choice(train_rows, size=min(BACKGROUND_POOL, len(train_rows)), replace=False))
    X_pool, observed_pool = store.read(pool, with_observed=True)
    background = select_background(X_pool, observed_pool, n=config.n_background, seed=config.seed,
                                   method=config.background_selection)
    del X_pool, observed_pool
    rows = store.rows("held_out")[:N_EXPLAIN]
    X, observed = store.read(rows, with_observed=True)
    explanation = explain(model, X, background, config, observed)
    seconds = time.perf_counter() - start
    error = additivity_errors(explanation.shap.sum(axis=(1, 2)), explanation.output, explanation.base_value)
    return {"seconds": seconds, "note": f"{len(rows):,} sequences, background {len(background)} (k-means of "
                                        f"{len(pool):,} train rows), additivity error mean {error.mean():.2%}, "
                                        f"p95 {np.quantile(error, 0.95):.2%}"}


STAGE_FUNCTIONS = {"floor": stage_floor, "tensorize": stage_tensorize, "train": stage_train,
                   "score": stage_score, "explain": stage_explain}


def worker(stage: str, root: Path, work: Path, args) -> None:
    info = STAGE_FUNCTIONS[stage](root, work, args)
    info.update(stage=stage, peak_gb=_peak_gb())
    print(json.dumps(info), flush=True)


def run_stage(stage: str, root: Path, work: Path, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--worker", stage, "--root", str(root),
           "--work", str(work), "--threads", str(args.threads), "--chunk-samples", str(args.chunk_samples)]
    if args.train_samples:
        cmd += ["--train-samples", str(args.train_samples)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["process_seconds"] = time.perf_counter() - started
    return info


# -------------------------------------------------------------------------------------- main


def ensure_validated_dataset(data_dir: Path, n_events: int) -> Path:
    """The synthetic dataset (generated once) with its validation cached (done once)."""
    from benchmarks.bench_features import ensure_dataset
    from workbench.data.validate import require_valid_cached

    root = ensure_dataset(data_dir, n_events)
    started = time.perf_counter()
    require_valid_cached(root)
    spent = time.perf_counter() - started
    if spent > 1:
        print(f"validated {root} once ({spent:.1f} s; cached for the stages)", flush=True)
    return root


def count_events(root: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted((root / "data").rglob("*.parquet")))


def report(rows: list[dict], n_events: int) -> None:
    by = {r["stage"]: r for r in rows}
    print("\n| stage | seconds | peak RSS (GB) | |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | {r.get('note', '')} |")
    pipeline = [r for r in rows if r["stage"] != "floor"]
    total = sum(r["seconds"] for r in pipeline)
    peak = max(r["peak_gb"] for r in pipeline)
    print(f"\npipeline ({' + '.join(r['stage'] for r in pipeline)}): {total:.1f} s, largest stage peak RSS {peak:.2f} GB "
          f"(target <= {PEAK_TARGET_GB:g} GB: {'met' if peak <= PEAK_TARGET_GB else 'NOT met'})")
    if "floor" in by and "tensorize" in by:
        ratio = by["tensorize"]["seconds"] / by["floor"]["seconds"]
        print(f"tensorize takes {ratio:.2f}x the bare polars pass ({by['floor']['seconds']:.1f} s, peak "
              f"{by['floor']['peak_gb']:.2f} GB) (target <= {FLOOR_RATIO_TARGET:g}x: "
              f"{'met' if ratio <= FLOOR_RATIO_TARGET else 'NOT met'})")
    print(f"{n_events:,} events, {n_events / by['tensorize']['seconds'] / 1e6:.2f} M events/s tensorized")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", default="1e6", help="Synthetic events, e.g. 1e6 (default), 1e7")
    parser.add_argument("--with-100m", action="store_true", help="Run on 100M events (1M subjects)")
    parser.add_argument("--train-samples", type=int, default=0, help="Train on the first N train rows (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the model stages (1: two spin-wait on a loaded 2-core machine)")
    parser.add_argument("--chunk-samples", type=int, default=None, help="Samples per chunk and shard (default: the library's)")
    parser.add_argument("--stages", default=",".join(STAGES), help="Comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--keep", action="store_true", help="Keep the shards and the model after the run")
    parser.add_argument("--data-dir", default=os.environ.get("WORKBENCH_BENCH_DIR", "/tmp/workbench-bench"))
    parser.add_argument("--worker", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chunk_samples is None:
        from workbench.features import DEFAULT_CHUNK_SAMPLES

        args.chunk_samples = DEFAULT_CHUNK_SAMPLES
    if args.worker:
        worker(args.worker, Path(args.root), Path(args.work), args)
        return
    n_events = 100_000_000 if args.with_100m else int(float(args.events))
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    root = ensure_validated_dataset(data_dir, n_events)
    work = data_dir / f"scale_{n_events:.0e}".replace("+", "")
    work.mkdir(exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    print(f"scale benchmark: {n_events:.0e} events ({root}), {os.cpu_count()} CPUs, torch threads {args.threads}, "
          f"chunks of {args.chunk_samples:,} samples; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    print(f"load average at start: {load_average()}", flush=True)
    rows = []
    try:
        for stage in stages:
            rows.append(run_stage(stage, root, work, args))
            r = rows[-1]
            print(f"  {stage:>9}: {r['seconds']:8.1f} s  peak RSS {r['peak_gb']:5.2f} GB  {r.get('note', '')}  "
                  f"(load {load_average()})", flush=True)
    finally:
        print(f"load average at end: {load_average()}", flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if {"tensorize"} <= {r["stage"] for r in rows}:
        report(rows, count_events(root))


if __name__ == "__main__":
    main()
