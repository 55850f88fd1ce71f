"""Training: class-weighted fit, per-epoch tuning metrics, early stopping, best-epoch restore.

``train`` builds the model from a :class:`~workbench.models.ModelConfig`, fits it on the
train split with Keras, and after every epoch scores the tuning split with scikit-learn
(AUROC, AUPRC). Early stopping watches one of them and the weights of the best epoch are
restored at the end. The same seed gives the same weights, hence the same metrics, on CPU.

``X`` may be an array or a *sequence source* too large for memory (anything with ``shape`` and
``read_rows(positions) -> float32 [n, T, F]``, e.g. :meth:`workbench.shards.ShardedTensors.view`):
training then streams batches from it through :class:`SequenceBatches`, which shuffles exactly
as Keras shuffles arrays on the torch backend, so the same seed gives the same batches and the
same model either way; scoring (:func:`predict_risk`, the tuning metrics) reads it block by block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import keras  # its backend is torch: workbench/__init__.py, run before this module, chose it
import numpy as np

from workbench.errors import WorkbenchError
from workbench.settings import TrainConfig
from workbench.models import ModelConfig, build_model

EpochHook = Callable[[int, dict], None]




@dataclass
class TrainResult:
    """A trained model (best epoch's weights) and how it got there."""

    model: keras.Model
    history: list[dict] = field(default_factory=list)  # one dict per epoch, see TuningMetrics
    best_epoch: int = 0  # 1-based, as in history's "epoch"
    seconds: float = 0.0  # wall time of the whole fit

    @property
    def best_metrics(self) -> dict:
        """History entry of the restored (best) epoch."""
        return self.history[self.best_epoch - 1]


def is_sequence_source(X) -> bool:
    """Whether X is read by rows (``read_rows``) rather than held as an array."""
    return hasattr(X, "read_rows") and hasattr(X, "shape")


def _require_finite(name: str, X: np.ndarray) -> None:
    if not np.isfinite(X).all():
        raise WorkbenchError(f"{name} contains NaN or infinite values; fill them in the feature step")


def read_rows(X, rows: slice | np.ndarray, name: str = "X") -> np.ndarray:
    """Rows (a slice or positions) of an array or of a sequence source; a source's rows are
    checked finite as they are read (an array is checked whole by :func:`check_split`)."""
    if not is_sequence_source(X):
        return X[rows]
    if isinstance(rows, slice):
        rows = np.arange(*rows.indices(len(X)))
    block = np.asarray(X.read_rows(rows), dtype=np.float32)
    _require_finite(name, block)
    return block


def predict_risk(model: keras.Model, X, batch_size: int = 1024) -> np.ndarray:
    """Risk [N] for sequences X [N, T, F] (an array or a sequence source), in inference mode (no
    dropout, no gradients).

    Calls the model batch by batch rather than ``model.predict``, which adds per-call
    overhead that matters when the tuning split is scored every epoch.
    """
    import torch

    if not is_sequence_source(X):
        X = np.asarray(X, dtype=np.float32)
    out = np.empty(len(X), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(X), batch_size):
            batch = keras.ops.convert_to_tensor(read_rows(X, slice(start, start + batch_size)))
            out[start : start + batch_size] = keras.ops.convert_to_numpy(model(batch, training=False))[:, 0]
    return out


class SequenceBatches(keras.utils.PyDataset):
    """``(x, y)`` or ``(x, y, sample_weight)`` batches read from a sequence source, for
    ``model.fit``: only one batch is in memory at a time.

    The order is Keras's for arrays on the torch backend (``torch.utils.data.RandomSampler``):
    at each epoch's first batch a seed is drawn from torch's global generator, at the same point
    of the epoch as the sampler draws it, and a ``torch.randperm`` of that seed orders the rows;
    batches are consecutive slices of it, the last one partial. So ``model.fit`` on this and on
    the arrays gives the same batches, hence the same weights (``tests/test_shards.py``).
    Batches are read in the training loop's thread (``workers=1``): the reads are small next to
    a training step.
    """

    def __init__(self, X, y: np.ndarray, batch_size: int, sample_weight: np.ndarray | None = None,
                 shuffle: bool = True, name: str = "train"):
        super().__init__()
        self.X, self.y, self.sample_weight = X, np.asarray(y, dtype=np.float32), sample_weight
        self.batch_size, self.shuffle, self.name = batch_size, shuffle, name
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def _epoch_order(self) -> np.ndarray:
        import torch

        n = len(self.y)
        if not self.shuffle:
            return np.arange(n)
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # as RandomSampler.__iter__
        generator = torch.Generator()
        generator.manual_seed(seed)
        return torch.randperm(n, generator=generator).numpy()

    def __getitem__(self, index: int):
        if index == 0 or self._order is None:
            self._order = self._epoch_order()
        rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        x = read_rows(self.X, rows, f"{self.name} X")
        if self.sample_weight is None:
            return x, self.y[rows]
        return x, self.y[rows], self.sample_weight[rows]

    def on_epoch_end(self) -> None:
        self._order = None


def tuning_metrics(y_true: np.ndarray, risk: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC (average precision) and log loss of a risk on the tuning split."""
    from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

    return {
        "tune_auroc": float(roc_auc_score(y_true, risk)),
        "tune_auprc": float(average_precision_score(y_true, risk)),
        "tune_loss": float(log_loss(y_true, np.clip(risk, 1e-7, 1 - 1e-7), labels=[0, 1])),
    }


class TuningMetrics(keras.callbacks.Callback):
    """Scores the tuning split after each epoch, adds the scores to Keras's logs (so early
    stopping can watch them), keeps the history, and feeds a progress bar and a hook."""

    def __init__(self, X_tune, y_tune, batch_size: int, progress_bar=None, on_epoch_end: EpochHook | None = None):
        super().__init__()
        self.X_tune, self.y_tune, self.batch_size = X_tune, y_tune, batch_size
        self.progress_bar, self.hook = progress_bar, on_epoch_end
        self.history: list[dict] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        scores = tuning_metrics(self.y_tune, predict_risk(self.model, self.X_tune, self.batch_size))
        logs.update(scores)  # the same dict reaches EarlyStopping next
        entry = {"epoch": epoch + 1, "loss": float(logs["loss"]), **scores, "seconds": time.perf_counter() - self.started}
        self.history.append(entry)
        if self.progress_bar is not None:
            self.progress_bar.update(1)
            self.progress_bar.set_postfix(loss=f"{entry['loss']:.4f}", auroc=f"{entry['tune_auroc']:.3f}", auprc=f"{entry['tune_auprc']:.3f}")
        if self.hook is not None:
            self.hook(epoch + 1, dict(entry))


def balanced_sample_weights(y: np.ndarray) -> np.ndarray:
    """Per-sample weights n / (2 * n_class): both classes carry equal total weight."""
    y = y.astype(int)
    counts = np.bincount(y, minlength=2)
    return (len(y) / (2.0 * counts))[y].astype(np.float32)


def check_split(name: str, X, y: np.ndarray) -> None:
    """Fail early, naming the split, on shapes or labels that would break training (a sequence
    source's values are checked batch by batch as they are read)."""
    if len(X.shape) != 3:
        raise WorkbenchError(f"{name} X must be [N, T, F], got shape {X.shape}")
    if len(X) != len(y):
        raise WorkbenchError(f"{name} X has {len(X)} rows but y has {len(y)}")
    if not np.isin(y, (0, 1)).all():
        raise WorkbenchError(f"{name} labels must be 0/1")
    if len(np.unique(y)) < 2:
        raise WorkbenchError(f"{name} split has only one class; AUROC and class weights need both")
    if not is_sequence_source(X):
        _require_finite(f"{name} X", X)


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    X_train,
    y_train: np.ndarray,
    X_tune,
    y_tune: np.ndarray,
    on_epoch_end: EpochHook | None = None,
) -> TrainResult:
    """Train a sequence risk model and return it with the best tuning epoch's weights.

    ``X_train`` and ``X_tune`` are arrays [N, T, F] or sequence sources (streamed by batch; see
    the module docstring). ``on_epoch_end(epoch, metrics)`` is called after each epoch (1-based)
    with that epoch's history entry, e.g. to log it to MLflow.
    """
    if not is_sequence_source(X_train):
        X_train = np.asarray(X_train, np.float32)
    if not is_sequence_source(X_tune):
        X_tune = np.asarray(X_tune, np.float32)
    y_train, y_tune = np.asarray(y_train).astype(np.float32), np.asarray(y_tune).astype(np.float32)
    check_split("train", X_train, y_train)
    check_split("tuning", X_tune, y_tune)
    if X_train.shape[1:] != X_tune.shape[1:]:
        raise WorkbenchError(f"train and tuning sequences differ in shape: {X_train.shape[1:]} vs {X_tune.shape[1:]}")

    # Seeds Python, NumPy and torch: initial weights, shuffling and dropout masks.
    keras.utils.set_random_seed(train_config.seed)
    model = build_model(model_config, X_train.shape[1], X_train.shape[2], seed=train_config.seed)
    sample_weight = balanced_sample_weights(y_train) if train_config.class_weight == "balanced" else None

    progress_bar = None
    if train_config.progress:
        from tqdm import tqdm  # a terminal bar (notebooks pass progress=False: progress belongs in the terminal)

        progress_bar = tqdm(total=train_config.epochs, desc=f"train {model.name}", unit="epoch")
    metrics = TuningMetrics(X_tune, y_tune, train_config.batch_size, progress_bar, on_epoch_end)
    stopper = keras.callbacks.EarlyStopping(
        monitor=f"tune_{train_config.early_stopping_metric}",
        mode="max",
        patience=train_config.patience,
        restore_best_weights=True,
    )
    started = time.perf_counter()
    callbacks = [metrics, stopper]  # order matters: metrics fill the logs stopper reads
    try:
        if is_sequence_source(X_train):
            batches = SequenceBatches(X_train, y_train, train_config.batch_size, sample_weight)
            model.fit(batches, epochs=train_config.epochs, shuffle=False, callbacks=callbacks, verbose=0)
        else:
            model.fit(
                X_train,
                y_train,
                sample_weight=sample_weight,
                batch_size=train_config.batch_size,
                epochs=train_config.epochs,
                shuffle=True,
                callbacks=callbacks,
                verbose=0,
            )
    finally:
        if progress_bar is not None:
            progress_bar.close()
    return TrainResult(
        model=model,
        history=metrics.history,
        best_epoch=stopper.best_epoch + 1,
        seconds=time.perf_counter() - started,
    )
