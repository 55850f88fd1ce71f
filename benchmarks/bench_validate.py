"""Validation throughput and memory on ~10 million synthetic events.

``python -m benchmarks.bench_validate [--events N]`` generates about N events (N / 100 subjects)
in a temp dir, in a child process so that the generator's memory does not count against
validation, then times ``validate_dataset`` on them and prints events per second and the peak
RSS of this process around validation. The baseline, measured in the same run on the same files,
is one plain polars streaming pass (row count, distinct subjects and codes, time range): the
least any validator must read. The ratio says how many such passes validation costs.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from workbench.data.meds_io import open_dataset
from workbench.data.synth import SynthConfig

EVENTS_PER_SUBJECT = 100  # SynthConfig's default mean


def rss_gb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory so far of this process or its waited-for children (Linux: KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024**2


def generate_in_child(out: Path, subjects: int) -> float:
    """Run the generator in a child process; returns its wall time in seconds."""
    config = SynthConfig(n_subjects=subjects, seed=0).model_dump_json()
    code = (
        "import sys; from workbench.data.synth import SynthConfig, generate; "
        "generate(sys.argv[1], SynthConfig.model_validate_json(sys.argv[2]), progress=False)"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(out), config], check=True)
    return time.perf_counter() - start


def plain_scan_seconds(root: Path) -> float:
    """Baseline: one streaming pass over every shard with a few whole-column aggregates."""
    start = time.perf_counter()
    open_dataset(root).events().select(
        pl.len(),
        pl.col("subject_id").n_unique(),
        pl.col("code").n_unique(),
        pl.col("time").min().alias("time_min"),
        pl.col("time").max().alias("time_max"),
    ).collect(engine="streaming")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="approximate events to generate")
    args = parser.parse_args(argv)
    subjects = max(1, args.events // EVENTS_PER_SUBJECT)

    from workbench.data.validate import validate_dataset

    with tempfile.TemporaryDirectory(prefix="bench_validate-") as tmp:
        root = Path(tmp) / "ds"
        gen_seconds = generate_in_child(root, subjects)
        n_events = open_dataset(root).metadata()["synth"]["n_events"]

        # Validation runs first so that the process's peak RSS after it is due to validation
        # (plus imports), not to the baseline.
        rss_before = rss_gb()
        start = time.perf_counter()
        report = validate_dataset(root)
        seconds = time.perf_counter() - start
        rss_peak = rss_gb()
        baseline = plain_scan_seconds(root)

    print(f"dataset           {subjects:,} subjects, {n_events:,} events")
    print(f"generate (child)  {gen_seconds:.1f} s = {n_events / gen_seconds:,.0f} events/s, "
          f"peak RSS {rss_gb(resource.RUSAGE_CHILDREN):.2f} GiB (not part of the validation figure)")
    print(f"validate          {seconds:.1f} s = {n_events / seconds:,.0f} events/s "
          f"({len(report.errors)} errors, {len(report.warnings)} warnings)")
    for problem in report.problems[:5]:
        print(f"  {problem}")
    print(f"baseline scan     {baseline:.1f} s = {n_events / baseline:,.0f} events/s (one plain streaming pass)")
    print(f"ratio             validate / plain scan = {seconds / baseline:.2f}x")
    print(f"peak RSS          {rss_peak:.2f} GiB after validation ({rss_before:.2f} GiB before it, "
          f"i.e. the process peak so far; validation raised it by {rss_peak - rss_before:.2f} GiB)")


if __name__ == "__main__":
    main()
