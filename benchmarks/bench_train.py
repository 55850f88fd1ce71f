"""Seconds per training epoch: the workbench LSTM against a hand-written torch.nn.LSTM loop.

Run: ``.venv/bin/python -m benchmarks.bench_train`` (``--help`` for options).

Both train on the same random data with the same shapes (default N=20,000, T=48, F=32,
hidden 64, batch 256, Adam, binary cross-entropy) and the same torch thread count. Repeats
are interleaved (raw, workbench, raw, workbench, ...) so load from other processes hits both
alike; the median seconds per epoch and the ratio are printed. Target: ratio <= 1.5 on CPU.

Rows:
- raw torch: shuffle, slice, forward, loss, backward, Adam step; nothing else.
- workbench fit: ``build_model`` (fused LSTM layer) + one ``model.fit`` epoch with the
  class-balanced sample weights ``train`` uses. This is the row the target applies to.
- workbench train(): ``train`` for one epoch: build, fit and scoring a tuning split of N/10
  (what a user's epoch costs end to end), for information.
- keras.layers.LSTM (``--keras-lstm``): Keras's own layer, the design the fused layer replaces.

On a loaded machine (more runnable processes than cores) two OpenMP threads spin-wait on
each other and every contender slows by 10-50x; ``--threads 1`` gives steadier numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import workbench.models as wm  # first: workbench/__init__.py chooses the torch backend before keras loads
from workbench.training import TrainConfig, balanced_sample_weights, train

import keras
import torch


class RawLSTM(torch.nn.Module):
    """The reference: torch.nn.LSTM, last hidden state, linear risk head."""

    def __init__(self, n_features: int, hidden: int):
        super().__init__()
        self.lstm = torch.nn.LSTM(n_features, hidden, batch_first=True)
        self.risk = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return torch.sigmoid(self.risk(h[-1]))


def raw_torch_epoch(model: RawLSTM, optimizer, X: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Seconds for one shuffled epoch of a plain torch training loop."""
    started = time.perf_counter()
    order = torch.randperm(len(X))
    for start in range(0, len(X), batch_size):
        idx = order[start : start + batch_size]
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def keras_fit_epoch(model: keras.Model, X: np.ndarray, y: np.ndarray, weights: np.ndarray, batch_size: int) -> float:
    """Seconds for one ``model.fit`` epoch (shuffled, class-weighted)."""
    started = time.perf_counter()
    model.fit(X, y, sample_weight=weights, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
    return time.perf_counter() - started


def workbench_train_epoch(X, y, X_tune, y_tune, hidden: int, batch_size: int) -> float:
    """Seconds for ``train`` with one epoch, tuning-split scoring included."""
    started = time.perf_counter()
    train(
        wm.ModelConfig(units=hidden),
        TrainConfig(epochs=1, batch_size=batch_size, progress=False),
        X, y, X_tune, y_tune,
    )
    return time.perf_counter() - started


def keras_lstm_model(n_steps: int, n_features: int, hidden: int) -> keras.Model:
    """Plain Keras LSTM of the same shape (Python loop over steps under torch on CPU)."""
    inputs = keras.Input(shape=(n_steps, n_features))
    x = keras.layers.LSTM(hidden)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    return model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000, help="sequences (N)")
    p.add_argument("--steps", type=int, default=48, help="time steps (T)")
    p.add_argument("--features", type=int, default=32, help="features per step (F)")
    p.add_argument("--hidden", type=int, default=64, help="LSTM units")
    p.add_argument("--batch", type=int, default=256, help="batch size")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per contender (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, same for all")
    p.add_argument("--keras-lstm", action="store_true", help="also time keras.layers.LSTM (slow)")
    p.add_argument("--skip-train", action="store_true", help="skip the end-to-end train() row")
    p.add_argument("--check", action="store_true", help="exit 1 if the ratio misses the 1.5x target")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.n, args.steps, args.features)).astype(np.float32)
    y = (rng.random(args.n) < 0.2).astype(np.float32)
    n_tune = max(args.n // 10, 2)
    X_tune, y_tune = X[:n_tune], np.r_[0.0, 1.0, y[2:n_tune]].astype(np.float32)
    weights = balanced_sample_weights(y)

    torch.manual_seed(0)
    raw = RawLSTM(args.features, args.hidden)
    raw_opt = torch.optim.Adam(raw.parameters(), lr=1e-3)
    X_t, y_t = torch.from_numpy(X), torch.from_numpy(y)[:, None]
    fused = wm.build_model(wm.ModelConfig(units=args.hidden), args.steps, args.features, seed=0)

    contenders = {
        "raw torch.nn.LSTM loop": lambda: raw_torch_epoch(raw, raw_opt, X_t, y_t, args.batch),
        "workbench fit (fused LSTM)": lambda: keras_fit_epoch(fused, X, y, weights, args.batch),
    }
    if not args.skip_train:
        contenders["workbench train() incl. tuning"] = lambda: workbench_train_epoch(X, y, X_tune, y_tune, args.hidden, args.batch)
    if args.keras_lstm:
        plain = keras_lstm_model(args.steps, args.features, args.hidden)
        contenders["keras.layers.LSTM fit"] = lambda: keras_fit_epoch(plain, X, y, weights, args.batch)

    print(f"N={args.n} T={args.steps} F={args.features} hidden={args.hidden} batch={args.batch} "
          f"threads={args.threads} repeats={args.repeats} backend={keras.backend.backend()}", flush=True)
    for run in contenders.values():  # warm-up: first-call allocation and kernel selection
        run()
    times = {name: [] for name in contenders}
    for repeat in range(args.repeats):  # interleaved so background load hits every contender alike
        for name, run in contenders.items():
            times[name].append(run())
            print(f"  repeat {repeat + 1}: {name}: {times[name][-1]:.2f} s", flush=True)

    baseline = statistics.median(times["raw torch.nn.LSTM loop"])
    print(f"{'contender':34s} {'median s/epoch':>15s} {'ratio':>7s}   all runs")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:34s} {median:15.3f} {median / baseline:6.2f}x   {', '.join(f'{t:.2f}' for t in runs)}")
    ratio = statistics.median(times["workbench fit (fused LSTM)"]) / baseline
    verdict = "meets" if ratio <= 1.5 else "MISSES"
    print(f"workbench / raw torch = {ratio:.2f}x ({verdict} the 1.5x target)")
    return 1 if args.check and ratio > 1.5 else 0


if __name__ == "__main__":
    raise SystemExit(main())
