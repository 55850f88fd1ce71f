"""Recalibration: a map from a fitted model's risk to a probability, fitted on the tuning split.

A model trained to rank (early-stopped on AUROC, or with class weights) need not output
probabilities. :func:`fit_recalibration` learns a monotone map on the tuning split, never on
held-out:

* ``platt``: ``sigmoid(a * logit(p) + b)`` (logistic regression on the logit, unpenalized). For a
  network whose last layer is a sigmoid unit, and for a logistic regression, the map folds into
  the last layer's weights (:func:`workbench.models.fold_platt`), so the saved model itself
  outputs the calibrated risk and SHAP explains exactly that risk.
* ``isotonic``: scikit-learn's isotonic regression (a step function, clipped at the ends). It is
  applied after the model; SHAP, which needs gradients, then explains the model's risk before it.
* ``none``: the identity.

The map is stored as plain numbers (JSON) inside the logged model, never as a pickle.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from workbench.errors import WorkbenchError

Method = Literal["platt", "isotonic", "none"]


def logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(q / (1 - q))


class Recalibration(BaseModel):
    """A fitted recalibration map (see the module docstring); ``folded`` when it lives in the model's weights."""

    model_config = ConfigDict(extra="forbid")

    method: Method = Field("none", description="platt, isotonic or none.")
    a: float = Field(1.0, description="platt: slope on the logit.")
    b: float = Field(0.0, description="platt: intercept on the logit.")
    x: list[float] = Field(default_factory=list, description="isotonic: risks at the steps (increasing).")
    y: list[float] = Field(default_factory=list, description="isotonic: calibrated risk at each step.")
    folded: bool = Field(False, description="True when the map was folded into the model's last layer (then not applied again).")
    fitted_on: str = Field("tuning", description="The split the map was fitted on.")

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated risk for raw risks ``p`` (identity when folded or ``none``)."""
        p = np.asarray(p, dtype=np.float64)
        if self.folded or self.method == "none":
            return p
        if self.method == "platt":
            return 1.0 / (1.0 + np.exp(-(self.a * logit(p) + self.b)))
        return np.interp(p, self.x, self.y)

    def describe(self) -> str:
        if self.method == "platt":
            where = "folded into the last layer" if self.folded else "applied after the model"
            return f"Platt on the {self.fitted_on} split: sigmoid({self.a:.3f} logit(p) {self.b:+.3f}), {where}"
        if self.method == "isotonic":
            return f"isotonic regression on the {self.fitted_on} split ({len(self.x)} steps), applied after the model"
        return "none (the model's own output)"


def fit_recalibration(risk: np.ndarray, y: np.ndarray, method: Method) -> Recalibration:
    """The map from ``risk`` to outcome rates ``y`` (the tuning split's), by ``method``."""
    risk, y = np.asarray(risk, dtype=np.float64), np.asarray(y).astype(int)
    if method == "none":
        return Recalibration(method="none")
    if len(np.unique(y)) < 2:
        raise WorkbenchError("recalibration needs both outcomes in the tuning split")
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        fit = LogisticRegression(C=np.inf, max_iter=1000).fit(logit(risk)[:, None], y)
        return Recalibration(method="platt", a=float(fit.coef_[0, 0]), b=float(fit.intercept_[0]))
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        fit = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(risk, y)
        return Recalibration(method="isotonic", x=fit.X_thresholds_.tolist(), y=fit.y_thresholds_.tolist())
    raise WorkbenchError(f"recalibration must be platt, isotonic or none, not {method!r}")
