"""Synthetic generator throughput and peak memory (target: 1,000,000 subjects within 4 GB).

``python -m benchmarks.bench_synth [--subjects N] [--shard-size K]`` generates N subjects into a
temp dir and prints events per second and the process's peak RSS. The baseline, measured in the
same run on the same data, is the parquet I/O floor: reading every shard back and writing it
again; the ratio says how much generation costs beyond writing the files at all.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import polars as pl

from workbench.data.synth import SynthConfig, generate

MEMORY_BUDGET_GB = 4.0


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def rewrite_seconds(files: list[Path], scratch: Path) -> float:
    """Baseline: read each shard and write it back out (one shard in memory at a time)."""
    start = time.perf_counter()
    for f in files:
        pl.read_parquet(f).write_parquet(scratch / f.name, statistics=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1_000_000, help="subjects to generate")
    parser.add_argument("--shard-size", type=int, default=10_000, help="subjects per shard")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = SynthConfig(n_subjects=args.subjects, seed=args.seed, subjects_per_shard=args.shard_size)
    with tempfile.TemporaryDirectory(prefix="bench_synth-") as tmp:
        start = time.perf_counter()
        ds = generate(Path(tmp) / "ds", config, progress=False)
        seconds = time.perf_counter() - start
        peak = peak_rss_gb()  # before the baseline, so it measures generation alone
        info = ds.metadata()["synth"]
        size_gb = sum(f.stat().st_size for f in ds.data_files) / 1024**3
        scratch = Path(tmp) / "rewrite"
        scratch.mkdir()
        baseline = rewrite_seconds(ds.data_files, scratch)

    events = info["n_events"]
    print(f"subjects          {info['n_subjects']:,} in {info['n_shards']} shards ({size_gb:.2f} GiB parquet)")
    print(f"events            {events:,} ({events / info['n_subjects']:.1f} per subject)")
    print(f"generate          {seconds:.1f} s = {events / seconds:,.0f} events/s")
    print(f"baseline rewrite  {baseline:.1f} s = {events / baseline:,.0f} events/s (read + write every shard)")
    print(f"ratio             generate / rewrite = {seconds / baseline:.2f}x")
    verdict = "within" if peak < MEMORY_BUDGET_GB else "OVER"
    print(f"peak RSS          {peak:.2f} GiB ({verdict} the {MEMORY_BUDGET_GB:.0f} GB budget)")


if __name__ == "__main__":
    main()
