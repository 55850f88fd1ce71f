"""Dynamic risk over time: a discrete-time hazard head on the sequence encoders.

A survival task (:mod:`workbench.tasks`, ``kind: survival``) labels every prediction time with
the days to the first event or censoring (``float_value``) and the event type (``integer_value``:
0 censored, 1 the outcome, 2 a competing event). This module turns those labels into a model of
the whole risk curve:

- **The grid** (:class:`HazardGrid`): K intervals ``(e_{k-1}, e_k]`` up to the task's maximum
  horizon.
- **The head** (:func:`build_hazard_model`): the same LSTM / GRU / RNN encoder as the binary
  models (:func:`workbench.models.recurrent_layer`), then one Dense layer of K x (C + 1) logits,
  a softmax per interval over "no event" and the C causes. With one cause (no competing code)
  that is the logistic-hazard model (Gensheimer & Narasimhan 2019, pycox's ``LogisticHazard``);
  with a competing code the softmax is the cause-specific discrete hazard of each cause
  (Lee et al. 2018, DeepHit's competing-risks form, here with the hazard likelihood).
- **The likelihood** (:func:`hazard_targets`, :func:`hazard_nll`): a sample with an event of
  cause c in interval j contributes ``sum_{k<j} log p_k(none) + log p_j(c)``; a censored one
  ``sum_{k<j} log p_k(none) + w log p_j(none)`` with ``w`` the fraction of interval j it was
  followed (1 at the maximum horizon): censored samples are kept, and inform every interval
  they lived through. Dropping them, as a binary task must, biases the risk upward
  (``tests/test_survival.py`` shows both).
- **Calibration on the tuning split** (:func:`fit_calibration`): the cause logits relative to
  "none" are rescaled and shifted, ``z_c' = z_0 + a (z_c - z_0) + b``, with (a, b) maximizing
  the tuning likelihood, and folded into the last Dense layer (:func:`fold_calibration`), so
  the saved model outputs calibrated curves and SHAP explains them.
- **Reading the curve** (:func:`cumulative_incidence`, :func:`risk_at`): the survival
  ``S_k = prod_{j<=k} p_j(none)`` and the cumulative incidence of cause c,
  ``F_c(e_k) = sum_{j<=k} S_{j-1} p_j(c)``, linear between edges.
- **One horizon as one output** (:class:`HorizonRisk`): the risk of the outcome by a chosen
  horizon as a differentiable torch function of the sequence, which is what
  :mod:`workbench.explain` explains per time step.
"""

from __future__ import annotations

import dataclasses
import time as _time
from typing import Callable

import keras
import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.models import FusedRecurrent, recurrent_layer  # noqa: F401  (FusedRecurrent: registered layer)
from workbench.settings import ModelConfig, TrainConfig

#: Days per year (the horizons of a survival task are reported in years).
DAYS_PER_YEAR = 365.25
#: Default width of one hazard interval: a quarter of a year.
DEFAULT_INTERVAL_DAYS = DAYS_PER_YEAR / 4
#: The horizon SHAP explains when none is chosen: two years.
DEFAULT_EXPLAIN_HORIZON_DAYS = 2 * DAYS_PER_YEAR
#: The name of the Dense layer whose outputs are the hazard logits (calibration folds into it).
LOGITS_LAYER = "hazard_logits"


@dataclasses.dataclass(frozen=True)
class HazardGrid:
    """Interval edges ``0 = e_0 < e_1 < ... < e_K`` in days after the prediction time."""

    edges_days: tuple[float, ...]

    @classmethod
    def regular(cls, max_days: float, interval_days: float = DEFAULT_INTERVAL_DAYS) -> "HazardGrid":
        """Equal intervals of about ``interval_days`` up to ``max_days`` (the last one ends at it)."""
        if not max_days > 0 or not interval_days > 0:
            raise WorkbenchError(f"hazard grid: max_days ({max_days}) and interval_days ({interval_days}) must be > 0")
        k = max(1, int(round(max_days / interval_days)))
        return cls(tuple(float(x) for x in np.linspace(0.0, max_days, k + 1)))

    @property
    def edges(self) -> np.ndarray:
        return np.asarray(self.edges_days, dtype=np.float64)

    @property
    def n_intervals(self) -> int:
        return len(self.edges_days) - 1

    @property
    def max_days(self) -> float:
        return self.edges_days[-1]


def check_labels(time_days: np.ndarray, event: np.ndarray, n_causes: int, where: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Times as float64 (> 0, finite) and events as int (0 .. n_causes), or a clear error."""
    t, e = np.asarray(time_days, dtype=np.float64), np.asarray(event)
    if t.shape != e.shape or t.ndim != 1:
        raise WorkbenchError(f"{where}: time and event must be 1-d and of one length, got {t.shape} and {e.shape}")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise WorkbenchError(f"{where}: event/censoring times must be finite and > 0 days ({int(np.sum(~(t > 0)))} are not)")
    if not np.issubdtype(e.dtype, np.integer) and not np.all(e == np.round(e)):
        raise WorkbenchError(f"{where}: event types must be integers 0..{n_causes}")
    e = e.astype(np.int64)
    if np.any((e < 0) | (e > n_causes)):
        raise WorkbenchError(f"{where}: event types must be 0 (censored) .. {n_causes}; found {sorted(set(e.tolist()) - set(range(n_causes + 1)))}")
    return t, e


def hazard_targets(time_days, event, grid: HazardGrid, n_causes: int) -> np.ndarray:
    """[N, K, C+1] float32 weights of each log-probability in the likelihood (module docstring).

    Times beyond the grid are censored at its end (administrative censoring at the maximum
    horizon); an event exactly at an edge belongs to the interval it closes.
    """
    t, e = check_labels(time_days, event, n_causes)
    edges, K = grid.edges, grid.n_intervals
    beyond = t > edges[-1]
    e = np.where(beyond, 0, e)
    t = np.minimum(t, edges[-1])
    j = np.clip(np.searchsorted(edges, t, side="left") - 1, 0, K - 1)  # t in (e_j, e_{j+1}]
    y = np.zeros((len(t), K, n_causes + 1), dtype=np.float32)
    y[:, :, 0] = np.arange(K)[None, :] < j[:, None]  # intervals lived through
    rows = np.arange(len(t))
    fraction = (t - edges[j]) / (edges[j + 1] - edges[j])
    censored = e == 0
    y[rows[censored], j[censored], 0] = fraction[censored]
    y[rows[~censored], j[~censored], e[~censored]] = 1.0
    return y


@keras.saving.register_keras_serializable(package="workbench")
def hazard_nll(y_true, y_pred):
    """Per-sample negative log-likelihood of the discrete hazard model, ``y_pred`` the logits
    [N, K, C+1] and ``y_true`` the weights of :func:`hazard_targets`."""
    log_p = keras.ops.log_softmax(y_pred, axis=-1)
    return -keras.ops.sum(keras.ops.sum(y_true * log_p, axis=-1), axis=-1)


def build_hazard_model(config: ModelConfig, n_steps: int, n_features: int, grid: HazardGrid, n_causes: int = 1,
                       seed: int = 0) -> keras.Model:
    """Input [N, T, F] -> hazard logits [N, K, C+1]: the binary models' encoder, a K x (C+1) head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(n_steps, n_features), name="sequence")
    x = inputs
    for i in range(config.layers):
        x = recurrent_layer(config, i, return_sequences=i < config.layers - 1, seed=seed)(x)
    if config.head_units:
        x = keras.layers.Dense(config.head_units, activation="relu", name="risk_features",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))(x)
    K, C = grid.n_intervals, n_causes
    # Start from a small constant hazard (about 1/K of the cohort per interval) rather than 50%.
    start = np.zeros((K, C + 1), dtype=np.float32)
    start[:, 1:] = np.log(1.0 / (K * C))
    logits = keras.layers.Dense(K * (C + 1), name=LOGITS_LAYER, bias_initializer=keras.initializers.Constant(start.ravel()),
                                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2))(x)
    out = keras.layers.Reshape((K, C + 1), name="hazard")(logits)
    model = keras.Model(inputs, out, name=f"{config.kind}_hazard")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate), loss=hazard_nll)
    return model


def predict_logits(model: keras.Model, X, batch_size: int = 1024) -> np.ndarray:
    """Hazard logits [N, K, C+1] (float64) in inference mode."""
    from workbench.training import is_sequence_source, read_rows

    if not is_sequence_source(X):
        X = np.asarray(X, dtype=np.float32)
    out = []
    with torch.no_grad():
        for start in range(0, len(X), batch_size):
            batch = keras.ops.convert_to_tensor(read_rows(X, slice(start, start + batch_size)))
            out.append(keras.ops.convert_to_numpy(model(batch, training=False)).astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0,) + tuple(model.output.shape[1:]))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def cumulative_incidence(logits: np.ndarray) -> np.ndarray:
    """[N, K+1, C]: each cause's cumulative incidence at the grid edges (0 at e_0)."""
    p = np.exp(_log_softmax(np.asarray(logits, dtype=np.float64)))
    survival = np.cumprod(p[:, :, 0], axis=1)
    before = np.concatenate([np.ones((len(p), 1)), survival[:, :-1]], axis=1)  # S_{k-1}
    cif = np.cumsum(before[:, :, None] * p[:, :, 1:], axis=1)
    return np.concatenate([np.zeros((len(p), 1, cif.shape[2])), cif], axis=1)


def risk_at(cif: np.ndarray, grid: HazardGrid, horizons_days, cause: int = 1) -> np.ndarray:
    """[N, H]: cause ``cause``'s cumulative incidence at each horizon (linear between edges)."""
    h = np.asarray(horizons_days, dtype=np.float64)
    if np.any(h < 0) or np.any(h > grid.max_days + 1e-9):
        raise WorkbenchError(f"horizons must lie in [0, {grid.max_days:g}] days (the model's grid), got {h.tolist()}")
    edges = grid.edges
    j = np.clip(np.searchsorted(edges, h, side="right") - 1, 0, grid.n_intervals - 1)
    w = (h - edges[j]) / (edges[j + 1] - edges[j])
    F = cif[:, :, cause - 1]
    return F[:, j] * (1 - w) + F[:, j + 1] * w


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood (numpy), as :func:`hazard_nll`."""
    return float(-np.mean(np.sum(targets * _log_softmax(logits), axis=(1, 2))))


def _calibrated(logits: np.ndarray, a: float, b: float) -> np.ndarray:
    z0 = logits[:, :, :1]
    return np.concatenate([z0, z0 + a * (logits[:, :, 1:] - z0) + b], axis=2)


@dataclasses.dataclass
class HazardCalibration:
    """``z_c' = z_0 + a (z_c - z_0) + b`` for every cause c >= 1 (fitted on tuning)."""

    a: float = 1.0
    b: float = 0.0
    tuning_nll_before: float | None = None
    tuning_nll_after: float | None = None

    def describe(self) -> str:
        return (f"hazard logits relative to no-event scaled by a={self.a:.4f} and shifted by b={self.b:.4f} "
                f"(tuning NLL {self.tuning_nll_before:.4f} -> {self.tuning_nll_after:.4f})")


def fit_calibration(logits: np.ndarray, targets: np.ndarray) -> HazardCalibration:
    """(a, b) maximizing the tuning split's likelihood; identity if that does not improve it."""
    from scipy.optimize import minimize

    before = nll(logits, targets)
    res = minimize(lambda v: nll(_calibrated(logits, v[0], v[1]), targets), x0=np.array([1.0, 0.0]),
                   method="L-BFGS-B", bounds=[(0.05, 20.0), (-10.0, 10.0)])
    a, b = (float(res.x[0]), float(res.x[1])) if res.fun < before else (1.0, 0.0)
    return HazardCalibration(a, b, before, min(before, float(res.fun)))


def fold_calibration(model: keras.Model, calibration: HazardCalibration, n_causes: int) -> None:
    """Fold the calibration into the hazard-logits Dense layer, in place (it is linear in the logits)."""
    layer = model.get_layer(LOGITS_LAYER)
    kernel, bias = layer.get_weights()
    K = kernel.shape[1] // (n_causes + 1)
    W, c = kernel.reshape(kernel.shape[0], K, n_causes + 1), bias.reshape(K, n_causes + 1)
    a, b = calibration.a, calibration.b
    W[:, :, 1:] = W[:, :, :1] + a * (W[:, :, 1:] - W[:, :, :1])
    c[:, 1:] = c[:, :1] + a * (c[:, 1:] - c[:, :1]) + b
    layer.set_weights([W.reshape(kernel.shape), c.reshape(bias.shape)])


@dataclasses.dataclass
class HazardTrainResult:
    model: keras.Model
    history: list[dict]
    best_epoch: int
    seconds: float


class _History(keras.callbacks.Callback):
    def __init__(self, hook: Callable[[int, dict], None] | None):
        super().__init__()
        self.history, self.hook = [], hook

    def on_epoch_end(self, epoch, logs=None):
        entry = {"epoch": epoch + 1, "loss": float(logs["loss"]), "tune_loss": float(logs["val_loss"])}
        self.history.append(entry)
        if self.hook:
            self.hook(epoch + 1, entry)


def train_hazard(model_config: ModelConfig, train_config: TrainConfig, X_train, t_train, e_train, X_tune, t_tune, e_tune,
                 grid: HazardGrid, n_causes: int = 1, on_epoch_end=None) -> HazardTrainResult:
    """Train the hazard model on train, early-stopped on the tuning likelihood (best epoch kept)."""
    from workbench.training import check_split

    X_train, X_tune = np.asarray(X_train, np.float32), np.asarray(X_tune, np.float32)
    y_train, y_tune = hazard_targets(t_train, e_train, grid, n_causes), hazard_targets(t_tune, e_tune, grid, n_causes)
    check_split("train", X_train, np.asarray(e_train) == 1)
    check_split("tuning", X_tune, np.asarray(e_tune) == 1)
    keras.utils.set_random_seed(train_config.seed)
    model = build_hazard_model(model_config, X_train.shape[1], X_train.shape[2], grid, n_causes, seed=train_config.seed)
    history = _History(on_epoch_end)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=train_config.patience,
                                            restore_best_weights=True)
    started = _time.perf_counter()
    model.fit(X_train, y_train, batch_size=train_config.batch_size, epochs=train_config.epochs, shuffle=True,
              validation_data=(X_tune, y_tune), callbacks=[history, stopper], verbose=0)
    return HazardTrainResult(model, history.history, stopper.best_epoch + 1, _time.perf_counter() - started)


class HazardCurves:
    """A hazard network as risk curves: ``curves(X)`` -> [N, K+1, C], ``risk(X, horizons)`` -> [N, H]."""

    def __init__(self, model: keras.Model, grid: HazardGrid, n_causes: int):
        self.model, self.grid, self.n_causes = model, grid, n_causes

    def curves(self, X) -> np.ndarray:
        return cumulative_incidence(predict_logits(self.model, X))

    def risk(self, X, horizons_days) -> np.ndarray:
        return risk_at(self.curves(X), self.grid, horizons_days)

    __call__ = risk


class HorizonRisk(torch.nn.Module):
    """The outcome's risk by ``horizon_days`` [N, 1] as a differentiable function of the sequence
    (what :func:`workbench.explain.explain` takes): SHAP per step of the risk at one horizon."""

    def __init__(self, model: keras.Model, grid: HazardGrid, horizon_days: float):
        super().__init__()
        if not 0 < horizon_days <= grid.max_days + 1e-9:
            raise WorkbenchError(f"horizon {horizon_days:g} days is outside the model's grid (0, {grid.max_days:g}]")
        self.network = model
        edges = grid.edges
        j = min(int(np.searchsorted(edges, horizon_days, side="right") - 1), grid.n_intervals - 1)
        self.j, self.w = j, float((horizon_days - edges[j]) / (edges[j + 1] - edges[j]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.network(x, training=False).double(), dim=-1)
        before = torch.cumprod(torch.cat([torch.ones_like(p[:, :1, 0]), p[:, :-1, 0]], dim=1), dim=1)  # S_{k-1}
        increments = before * p[:, :, 1]
        F = torch.cat([torch.zeros_like(increments[:, :1]), torch.cumsum(increments, dim=1)], dim=1)
        risk = F[:, self.j] * (1 - self.w) + F[:, self.j + 1] * self.w
        return risk.float()[:, None]
