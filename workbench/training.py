"""Training: class-weighted fit, per-epoch tuning metrics, early stopping, best-epoch restore.

``train`` builds the model from a :class:`~workbench.models.ModelConfig`, fits it on the
train split with Keras, and after every epoch scores the tuning split with scikit-learn
(AUROC, AUPRC). Early stopping watches one of them and the weights of the best epoch are
restored at the end. The same seed gives the same weights, hence the same metrics, on CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import keras  # its backend is torch: workbench/__init__.py, run before this module, chose it
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from workbench.errors import WorkbenchError
from workbench.models import ModelConfig, build_model

EpochHook = Callable[[int, dict], None]


class TrainConfig(BaseModel):
    """How a sequence model is trained."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(30, ge=1, le=10_000, description="Maximum number of passes over the train split.")
    batch_size: int = Field(256, ge=1, le=1_000_000, description="Sequences per gradient step.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds initial weights, shuffling and dropout; same seed, same result on CPU.")
    early_stopping_metric: Literal["auroc", "auprc"] = Field(
        "auroc", description="Tuning-split metric that picks the best epoch and stops training."
    )
    patience: int = Field(5, ge=1, le=10_000, description="Epochs without improvement of the metric before stopping.")
    class_weight: Literal["balanced"] | None = Field(
        None,
        description="null weighs samples equally (the loss then targets probabilities); 'balanced' weighs each class "
        "inversely to its frequency in the train split, which inflates every risk (recalibration undoes part of it).",
    )
    progress: bool = Field(True, description="Show a progress bar over epochs with the loss and tuning metrics.")


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


def predict_risk(model: keras.Model, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Risk [N] for sequences X [N, T, F], in inference mode (no dropout, no gradients).

    Calls the model batch by batch rather than ``model.predict``, which adds per-call
    overhead that matters when the tuning split is scored every epoch.
    """
    import torch

    X = np.asarray(X, dtype=np.float32)
    out = np.empty(len(X), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(X), batch_size):
            batch = keras.ops.convert_to_tensor(X[start : start + batch_size])
            out[start : start + batch_size] = keras.ops.convert_to_numpy(model(batch, training=False))[:, 0]
    return out


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


def check_split(name: str, X: np.ndarray, y: np.ndarray) -> None:
    """Fail early, naming the split, on shapes or labels that would break training."""
    if X.ndim != 3:
        raise WorkbenchError(f"{name} X must be [N, T, F], got shape {X.shape}")
    if len(X) != len(y):
        raise WorkbenchError(f"{name} X has {len(X)} rows but y has {len(y)}")
    if not np.isin(y, (0, 1)).all():
        raise WorkbenchError(f"{name} labels must be 0/1")
    if len(np.unique(y)) < 2:
        raise WorkbenchError(f"{name} split has only one class; AUROC and class weights need both")
    if not np.isfinite(X).all():
        raise WorkbenchError(f"{name} X contains NaN or infinite values; fill them in the feature step")


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_tune: np.ndarray,
    y_tune: np.ndarray,
    on_epoch_end: EpochHook | None = None,
) -> TrainResult:
    """Train a sequence risk model and return it with the best tuning epoch's weights.

    ``on_epoch_end(epoch, metrics)`` is called after each epoch (1-based) with that epoch's
    history entry, e.g. to log it to MLflow.
    """
    X_train, X_tune = np.asarray(X_train, np.float32), np.asarray(X_tune, np.float32)
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
    try:
        model.fit(
            X_train,
            y_train,
            sample_weight=sample_weight,
            batch_size=train_config.batch_size,
            epochs=train_config.epochs,
            shuffle=True,
            callbacks=[metrics, stopper],  # order matters: metrics fill the logs stopper reads
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
