"""Explain 1,000 sequences (T=48, F=32, LSTM 64 units) at cell, step and feature level.

Prints seconds per 1,000 sequences for the fast path (``workbench.explain.explain``,
expected gradients with adaptive path sampling) and for the exact per-step reference
(``exact_step_shap``: steps as players, KernelSHAP as TimeSHAP does, and the antithetic
permutation estimator), both measured in this run, the reference extrapolated from the few
sequences it explains. Also prints additivity error, mean Pearson of per-step totals and mean
top-3 overlap against the reference, the deletion-curve faithfulness, and the speed ratio.

The model is ``build_model(ModelConfig())`` trained briefly on planted data: positives carry
a spike in channel 0 at one random step, and the label also depends on a smooth trend in
channels 1-3 over the last steps, so several steps matter.

Timings are wall clock plus process CPU time (on a shared machine the CPU time divided by
the threads used estimates the wall time of an idle one), with the load average.

    .venv/bin/python -m benchmarks.bench_explain [--n 1000] [--reference 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from workbench import explain as E  # workbench/__init__.py chooses the torch backend before keras loads
from workbench.models import ModelConfig, build_model

T, F = 48, 32


def planted_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded sequences X [n, T, F], labels y [n] and observed [n, T]."""
    rng = np.random.default_rng(seed)
    X = (0.7 * rng.normal(size=(n, T, F))).astype(np.float32)
    X[:, :, 0] = 0.0
    lengths = rng.integers(12, T + 1, size=n)
    spike = rng.random(n) < 0.3
    for i in np.flatnonzero(spike):
        X[i, rng.integers(T - lengths[i], T), 0] = 2.5
    trend = X[:, -8:, 1:4].mean(axis=(1, 2))
    y = (spike | (trend > 0.25)).astype(np.float32)
    observed = np.arange(T)[None, :] >= (T - lengths)[:, None]
    X[~observed] = 0.0
    return X, y, observed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="sequences explained by the fast path")
    parser.add_argument("--reference", type=int, default=12, help="sequences explained by each exact reference")
    parser.add_argument("--train", type=int, default=3000, help="training sequences")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the target is for 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    X_train, y_train, obs_train = planted_data(args.train, seed=0)
    X, _, observed = planted_data(args.n, seed=1)
    model = build_model(ModelConfig(), T, F, seed=0)
    t0 = time.perf_counter()
    model.fit(X_train, y_train, epochs=3, batch_size=64, verbose=0)
    print(f"trained LSTM(64) on {args.train} planted sequences in {time.perf_counter() - t0:.1f} s")

    config = E.ExplainConfig(reference_samples=0, deletion_samples=0)
    X_background = E.select_background(X_train, obs_train, config.n_background, config.seed, config.background_selection)

    E.explain(model, X[:50], X_background, config.model_copy(update={"progress": False}), observed[:50])  # warm-up: kernel setup is not per-sequence cost
    t0, c0 = time.perf_counter(), time.process_time()
    expl = E.explain(model, X, X_background, config, observed)
    fast_per_1000 = (time.perf_counter() - t0) / args.n * 1000
    fast_cpu_per_1000 = (time.process_time() - c0) / args.n * 1000
    load = os.getloadavg()[0]
    metrics = E.check_explanation(model, X, expl, X_background, config.model_copy(update={"deletion_samples": 200}), observed)

    pick = np.random.default_rng(0).permutation(args.n)[: args.reference]
    padded = E.padded_steps(X[pick], observed[pick])
    rows = []
    for method in ("kernel", "permutation"):
        ref_config = config.model_copy(update={"reference_method": method, "progress": False})
        t0 = time.perf_counter()
        ref, base, out = E.exact_step_shap(model, X[pick], X_background, observed[pick], ref_config)
        ref_per_1000 = (time.perf_counter() - t0) / args.reference * 1000
        agreement = E.reference_agreement(expl.step_totals[pick], ref, padded)
        ref_err = E.additivity_errors(ref.sum(1), out, base).max()
        rows.append((method, ref_per_1000, agreement, ref_err))

    print(f"\nfast path ({config.alpha_scheme} expected gradients, {config.n_background} background x "
          f"({config.path_grid} forward + {config.alphas_per_background} gradient) per path), all three levels:")
    print(f"  {fast_per_1000:8.1f} s per 1,000 sequences ({args.n} explained; CPU {fast_cpu_per_1000:.1f} s on "
          f"{args.threads} thread(s), load average {load:.1f} on {os.cpu_count()} cores)")
    print(f"  additivity: mean rel error {metrics['additivity_mean_rel_error']:.4f}, max {metrics['additivity_max_rel_error']:.3f}")
    print(f"  deletion: |change| removing the top-k steps {metrics['deletion_change_top']:.4f} vs k random steps "
          f"{metrics['deletion_change_random']:.4f} (top beats random in {metrics['deletion_win_rate']:.0%} of sequences; "
          f"predicted vs actual change: r = {metrics['deletion_agreement']:.3f})")
    for method, ref_per_1000, agreement, ref_err in rows:
        name = "KernelSHAP (TimeSHAP's method)" if method == "kernel" else "PermutationSHAP (antithetic)"
        print(f"\nexact per-step reference, {name}, extrapolated from {args.reference} sequences:")
        print(f"  {ref_per_1000:8.1f} s per 1,000 sequences; ratio reference / fast = {ref_per_1000 / fast_per_1000:.1f}x")
        print(f"  reference additivity max rel error {ref_err:.2e}")
        print(f"  agreement: mean Pearson {agreement['reference_pearson_mean']:.3f} (min {agreement['reference_pearson_min']:.3f}), "
              f"mean top-3 overlap {agreement['reference_top3_overlap_mean']:.3f}")
    print("\ntargets: fast < 20 s per 1,000 on 2 cores; Pearson >= 0.9; top-3 overlap >= 0.8; additivity < 5%")


if __name__ == "__main__":
    main()
