"""Run every benchmark in turn (each prints its own figures and ratios)."""

from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = ["bench_validate", "bench_synth", "bench_features", "bench_gbt", "bench_train", "bench_explain", "bench_survival_metrics", "bench_scale"]


def main() -> int:
    names = sys.argv[1:] or BENCHMARKS
    for name in names:
        print(f"\n=== benchmarks.{name} ===", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        sys.argv = [name]
        module.main()
        print(f"=== {name}: {time.perf_counter() - start:.1f} s ===", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
