"""The references every comparison shows, beside the sequence models (no torch, no keras here).

:class:`LogisticReference` (the strong logistic regression on the whole history's tabular
features), :class:`GradientBoostedReference` (LightGBM on windowed aggregates, as MEDS-Tab) and
:func:`mayo_pbc_score` (the published Mayo PBC risk score) with its survival function.
"""

from __future__ import annotations

import numpy as np

from workbench.errors import WorkbenchError


class LogisticReference:
    """The strong logistic reference, on tabular features (:mod:`workbench.tabular`) of the whole history.

    Inputs: the last value of every numeric code (however old) with a missing flag each,
    ever-present flags for the other codes, age and the static codes (sex); train medians impute,
    train mean / std standardize; C is chosen on the tuning split by AUROC (held-out unseen).
    Unweighted, so the risk is a probability before any recalibration.
    """

    C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)

    def __init__(self, feature_names: list[str], max_iter: int = 5000):
        names = list(feature_names)
        last = [j for j, n in enumerate(names) if n.endswith("/last@full") or n == "static/age_years"]
        self.value_columns = last + [j for j, n in enumerate(names) if n.startswith("static/") and j not in last]
        self.missing_columns = last  # values that may be unknown get a missing flag each
        self.ever_columns = [j for j, n in enumerate(names) if n.endswith("/count@full")
                             and n.replace("/count@full", "/last@full") not in names]
        self.names = ([names[j] for j in self.value_columns] + [f"{names[j]}/missing" for j in self.missing_columns]
                      + [names[j].replace("/count@full", "/ever") for j in self.ever_columns])
        self.max_iter = max_iter
        self.model = None
        self.C: float | None = None

    def design(self, X: np.ndarray) -> np.ndarray:
        """The model's inputs before imputation: values, missing flags, ever-present flags."""
        X = np.asarray(X, dtype=np.float64)
        return np.concatenate(
            [X[:, self.value_columns], np.isnan(X[:, self.missing_columns]), X[:, self.ever_columns] > 0], axis=1
        ).astype(np.float64)

    def fit(self, X_train: np.ndarray, y_train: np.ndarray, X_tune: np.ndarray, y_tune: np.ndarray) -> "LogisticReference":
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        train, tune = self.design(X_train), self.design(X_tune)
        best = None
        for C in self.C_GRID:
            model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                                  LogisticRegression(C=C, max_iter=self.max_iter))
            model.fit(train, np.asarray(y_train).astype(int))
            auroc = roc_auc_score(np.asarray(y_tune).astype(int), model.predict_proba(tune)[:, 1])
            if best is None or auroc > best[0] + 1e-9:
                best = (auroc, C, model)
        self.tuning_auroc, self.C, self.model = best
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Risk [N] of the positive class."""
        return self.model.predict_proba(self.design(X))[:, 1]

    def fold_platt(self, a: float, b: float) -> None:
        """Fold a Platt map into the coefficients: the same linear logit, rescaled and shifted."""
        lr = self.model[-1]
        lr.coef_ = lr.coef_ * a
        lr.intercept_ = lr.intercept_ * a + b


class GradientBoostedReference:
    """Gradient-boosted trees (LightGBM) on the windowed aggregates of :mod:`workbench.tabular`,
    as MEDS-Tab builds them; early-stopped on the tuning split's log loss. NaN is "not observed"
    (LightGBM routes it). Saved as LightGBM's own text model, not a pickle."""

    def __init__(self, seed: int = 0, learning_rate: float = 0.03, num_leaves: int = 15, max_rounds: int = 2000):
        self.params = dict(objective="binary", learning_rate=learning_rate, num_leaves=num_leaves, min_child_samples=20,
                           subsample=0.8, subsample_freq=1, colsample_bytree=0.8, reg_lambda=1.0, seed=seed,
                           deterministic=True, force_row_wise=True, verbose=-1)
        self.max_rounds = max_rounds
        self.booster = None

    def fit(self, X_train: np.ndarray, y_train: np.ndarray, X_tune: np.ndarray, y_tune: np.ndarray) -> "GradientBoostedReference":
        import lightgbm as lgb

        train = lgb.Dataset(X_train, label=np.asarray(y_train).astype(int), free_raw_data=False)
        tune = lgb.Dataset(X_tune, label=np.asarray(y_tune).astype(int), reference=train)
        self.booster = lgb.train(
            {**self.params, "metric": "binary_logloss"}, train, num_boost_round=self.max_rounds, valid_sets=[tune],
            callbacks=[lgb.early_stopping(100, verbose=False)],
        )
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.booster.predict(X, num_iteration=self.booster.best_iteration)

    def save(self, path) -> None:
        self.booster.save_model(str(path), num_iteration=self.booster.best_iteration)

    @classmethod
    def load(cls, path) -> "GradientBoostedReference":
        import lightgbm as lgb

        model = cls()
        model.booster = lgb.Booster(model_file=str(path))
        return model


# Mayo PBC model (Dickson et al., Hepatology 1989); units: bilirubin mg/dL, albumin g/dL,
# prothrombin time s, age years, edema 0 / 0.5 / 1.
MAYO_FEATURES = {
    "bilirubin": "LAB//bilirubin/last",
    "albumin": "LAB//albumin/last",
    "protime": "LAB//protime/last",
    "age": "static/age_years",
    "edema": "EXAM//edema/last",
}


def mayo_pbc_score(raw_last: dict[str, np.ndarray]) -> np.ndarray:
    """Mayo PBC risk score R per patient, with the published coefficients (nothing fitted).

    R = 0.871 ln(bilirubin) - 2.53 ln(albumin) + 0.039 age + 2.38 ln(protime) + 0.859 edema.
    ``raw_last`` holds unnormalized arrays keyed bilirubin, albumin, protime, age, edema.
    A missing (NaN) input gives NaN for that patient; a non-positive lab value is an error.
    """
    missing = [k for k in MAYO_FEATURES if k not in raw_last]
    if missing:
        raise WorkbenchError(f"Mayo PBC score needs {missing} (have {sorted(raw_last)})")
    v = {k: np.asarray(raw_last[k], dtype=np.float64) for k in MAYO_FEATURES}
    for lab in ("bilirubin", "albumin", "protime"):
        bad = int(np.sum(v[lab] <= 0))
        if bad:
            raise WorkbenchError(f"Mayo PBC score: {bad} non-positive {lab} values (logarithm undefined); pass raw, unnormalized values")
    return (
        0.871 * np.log(v["bilirubin"])
        - 2.53 * np.log(v["albumin"])
        + 0.039 * v["age"]
        + 2.38 * np.log(v["protime"])
        + 0.859 * v["edema"]
    )


# Published Mayo model survival function (Dickson et al., Hepatology 1989):
# S(t) = S0(t) ** exp(R - 5.07). Turns the score into a risk within t years so Brier score and
# calibration are defined; AUROC/AUPRC depend only on R's ranking.
MAYO_R_MEAN = 5.07
MAYO_S0 = {1: 0.970, 2: 0.941, 3: 0.883, 4: 0.833, 5: 0.774, 6: 0.721, 7: 0.651}
MAYO_FORMULA = "1 - S0(t)**exp(R - 5.07), R = 0.871 ln(bili) - 2.53 ln(alb) + 0.039 age + 2.38 ln(pt) + 0.859 edema"


def mayo_not_applicable(feature_names, horizon_days: float | None) -> str | None:
    """Why the Mayo score cannot be used on these features and horizon, or None when it can."""
    absent = [feat for feat in MAYO_FEATURES.values() if feat not in list(feature_names)]
    if absent:
        return f"the Mayo PBC score needs the features {absent}, which this cohort does not have"
    years = None if horizon_days is None else horizon_days / 365.25
    if years is None or round(years) not in MAYO_S0 or abs(years - round(years)) > 0.05:
        return f"the Mayo PBC score's survival function is published for 1-7 years, not a {horizon_days}-day horizon"
    return None


def mayo_risk(spec, X: np.ndarray, horizon_years: int = 2) -> np.ndarray:
    """The Mayo PBC model's risk of death within ``horizon_years``, from the last step of
    normalized tensors X [N, T, F] made with FeatureSpec ``spec`` (raw values are recovered)."""
    raw_last = spec.denormalize(np.asarray(X)[:, -1, :])
    r = mayo_pbc_score(mayo_inputs_from_features(raw_last, spec.feature_names))
    return 1.0 - MAYO_S0[horizon_years] ** np.exp(r - MAYO_R_MEAN)


def mayo_inputs_from_features(raw_X_last: np.ndarray, feature_names) -> dict[str, np.ndarray]:
    """Pick the Mayo score's inputs from raw last-step features [N, F] by feature name."""
    names = list(feature_names)
    absent = [feat for feat in MAYO_FEATURES.values() if feat not in names]
    if absent:
        raise WorkbenchError(f"Mayo PBC score needs feature(s) {absent}, which the feature spec does not produce")
    return {key: raw_X_last[:, names.index(feat)] for key, feat in MAYO_FEATURES.items()}


class LandmarkCox:
    """The landmark Cox reference of dynamic prediction (van Houwelingen 2007): a Cox model on the
    last values at each prediction time, every prediction time (landmark) a row, the baseline
    hazard by Breslow; the design and preprocessing are :class:`LogisticReference`'s.

    scikit-survival's ``CoxPHSurvivalAnalysis`` with a ridge penalty ``alpha`` chosen on the tuning
    split by Harrell's concordance (held-out unseen). A competing event censors (a cause-specific
    Cox model): ``1 - S(t)`` is then the cause's risk in a world without the competing event,
    which overstates the cumulative incidence where competing events are common (the hazard
    model's softmax does not). Landmarks of one subject are dependent rows: the point estimates
    stay consistent, and the workbench's CIs resample subjects.
    """

    ALPHA_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)

    def __init__(self, feature_names: list[str]):
        self.columns = LogisticReference(feature_names)
        self.model = None
        self.alpha: float | None = None

    def fit(self, X_train, t_train, e_train, X_tune, t_tune, e_tune) -> "LandmarkCox":
        from sklearn.impute import SimpleImputer
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sksurv.linear_model import CoxPHSurvivalAnalysis
        from sksurv.metrics import concordance_index_censored
        from sksurv.util import Surv

        train, tune = self.columns.design(X_train), self.columns.design(X_tune)
        y = Surv.from_arrays(np.asarray(e_train) == 1, np.asarray(t_train, dtype=np.float64))
        best = None
        for alpha in self.ALPHA_GRID:
            model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                                  CoxPHSurvivalAnalysis(alpha=alpha))
            try:
                model.fit(train, y)
            except (ValueError, np.linalg.LinAlgError, ArithmeticError):
                continue  # a too-small penalty that does not converge
            c = concordance_index_censored(np.asarray(e_tune) == 1, np.asarray(t_tune, dtype=np.float64),
                                           model.predict(tune))[0]
            if best is None or c > best[0] + 1e-9:
                best = (c, alpha, model)
        if best is None:
            raise WorkbenchError("landmark Cox: no penalty in the grid converged on the train split")
        self.tuning_c, self.alpha, self.model = best
        return self

    def risk(self, X, horizons_days) -> np.ndarray:
        """[N, H]: 1 - S(h | x) at each horizon (days)."""
        design = self.model[:-1].transform(self.columns.design(X))
        cox = self.model[-1]
        survival = cox.predict_survival_function(design, return_array=True)  # [N, unique event times]
        times = cox.unique_times_
        h = np.asarray(horizons_days, dtype=np.float64)
        idx = np.searchsorted(times, h, side="right") - 1  # a step function: the last event time <= h
        s = np.where(idx[None, :] >= 0, survival[:, np.clip(idx, 0, None)], 1.0)
        return 1.0 - s


def mayo_survival_risk(spec, X: np.ndarray, horizons_days) -> np.ndarray:
    """[N, H]: the published Mayo model's risk of death by each horizon, ``1 - S0(t) ** exp(R - 5.07)``,
    with log S0 linear between the published yearly values (0 at t = 0); horizons up to 7 years."""
    h_years = np.asarray(horizons_days, dtype=np.float64) / 365.25
    if np.any(h_years > max(MAYO_S0) + 1e-9) or np.any(h_years < 0):
        raise WorkbenchError(f"the Mayo PBC survival function is published for 0-7 years, not {h_years.round(2).tolist()}")
    years = np.array([0.0, *MAYO_S0])
    log_s0 = np.interp(h_years, years, np.log([1.0, *MAYO_S0.values()]))
    raw_last = spec.denormalize(np.asarray(X)[:, -1, :])
    r = mayo_pbc_score(mayo_inputs_from_features(raw_last, spec.feature_names))
    return 1.0 - np.exp(log_s0[None, :] * np.exp(r - MAYO_R_MEAN)[:, None])
