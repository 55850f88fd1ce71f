"""Registered models anyone can load: an MLflow pyfunc from raw MEDS events to risks.

Every model run logs its model as this pyfunc, so in any Python process with the project's
dependencies (nothing imported or set beforehand)::

    import mlflow
    model = mlflow.pyfunc.load_model("models:/pbc_mortality@champion")
    risks = model.predict(events)   # pandas or polars: subject_id, time, code, numeric_value

returns one row per (subject_id, prediction_time) with its ``risk``. Without a
``prediction_time`` column the model scores the moments its task predicts at (e.g. every visit),
never at or after a subject's death or end of follow-up; with one, every distinct non-null
(subject_id, prediction_time) in the frame is scored (and one at or after the end of a record is
refused). The usual way: append
one row per prediction wanted, ``subject_id`` and ``prediction_time`` with no ``code`` (such
rows are requests, not events; joining the times onto the events would duplicate them).
``mlflow models serve`` answers the same request over REST.

What travels with the model: the FeatureSpec (new events are tensorized with it, never
refitted), the fitted predictor (Keras ``.keras`` file, a scikit-learn estimator, or nothing
for the published Mayo score), the ``workbench`` package itself (``code_paths``), the Keras
backend (``workbench`` sets it on import), and the exact pins of what scoring imports.
"""

from __future__ import annotations

import importlib.metadata
import re
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl

from workbench import record
from workbench.errors import WorkbenchError

#: The artifact path of every run's model.
#: Columns of a scoring request; subject_id and code are required.
REQUEST_COLUMNS = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float64,
    "prediction_time": pl.Datetime("us"),
}
# What scoring imports (pinned from this package's own requirements).
_SCORING_PACKAGES = {"torch", "keras", "polars", "pyarrow", "numpy", "pandas", "scikit-learn", "scipy",
                     "pydantic", "pyyaml", "meds", "mlflow", "scikit-survival"}


def signature(horizons_days=None):
    """The pyfunc's signature: the request columns in, one risk per sample out (a survival model:
    one ``risk_<days>d`` column per horizon, and a ``horizons_days`` parameter to ask for others)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    risks = [ColSpec("double", "risk")] if horizons_days is None else [ColSpec("double", horizon_column(h)) for h in horizons_days]
    params = None if horizons_days is None else ParamSchema([
        ParamSpec("horizons_days", "double", [float(h) for h in horizons_days], shape=(-1,))])
    return ModelSignature(
        inputs=Schema([
            ColSpec("long", "subject_id"),
            ColSpec("datetime", "time", required=False),
            ColSpec("string", "code", required=False),
            ColSpec("double", "numeric_value", required=False),
            ColSpec("datetime", "prediction_time", required=False),
        ]),
        outputs=Schema([ColSpec("long", "subject_id"), ColSpec("datetime", "prediction_time"), *risks]),
        params=params,
    )


def horizon_column(days: float) -> str:
    """A survival model's output column of the risk by ``days``: ``risk_730d`` (whole days)."""
    return f"risk_{int(round(float(days)))}d"


def _bad_request(message: str) -> Exception:
    """An error ``mlflow models serve`` returns as HTTP 400 with just this message."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def request_frame(model_input) -> pl.DataFrame:
    """A scoring request as a typed polars frame; a clear error names the column that is wrong."""
    if isinstance(model_input, pd.DataFrame):
        frame = pl.from_pandas(model_input)
    elif isinstance(model_input, pl.DataFrame):
        frame = model_input
    else:
        raise _bad_request(f"expected a DataFrame of MEDS events, got {type(model_input).__name__}")
    missing = [c for c in ("subject_id", "code") if c not in frame.columns]
    if missing:
        raise _bad_request(f"events: missing column(s) {missing}; expected subject_id, time, code, numeric_value")
    for name, dtype in REQUEST_COLUMNS.items():
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(name))
            continue
        try:
            frame = frame.with_columns(pl.col(name).cast(dtype, strict=True))
        except (pl.exceptions.PolarsError, OverflowError) as exc:
            raise _bad_request(f"events: column {name!r} ({frame[name].dtype}) cannot be read as {dtype}: {exc}") from None
    frame = frame.select(list(REQUEST_COLUMNS))
    if frame.height == 0:
        raise _bad_request("events: no rows to score")
    if frame["subject_id"].null_count():
        raise _bad_request(f"events: column 'subject_id' has {frame['subject_id'].null_count()} null value(s)")
    orphans = frame.filter(pl.col("code").is_null() & pl.col("prediction_time").is_null()).height
    if orphans:
        raise _bad_request(f"events: column 'code' is null in {orphans} row(s) that ask for no prediction_time either "
                           "(a row is an event, with a code, or a request, with a prediction_time)")
    if not frame["numeric_value"].drop_nulls().is_finite().all():
        raise _bad_request("events: column 'numeric_value' holds NaN or infinite values (use null for no value)")
    return frame


def request_samples(frame: pl.DataFrame) -> pl.DataFrame | None:
    """(subject_id, prediction_time) to score: the frame's own prediction times, else None (the
    moments the model's task predicts at)."""
    asked = frame.select("subject_id", "prediction_time").drop_nulls()
    return asked.unique().sort("subject_id", "prediction_time") if asked.height else None


class RiskModel(mlflow.pyfunc.PythonModel):
    """Raw MEDS events in, one risk per (subject, prediction time) out (see the module docstring).

    Its kind and options come from the logged ``model_config`` (``workbench/pyfunc_model.py`` is
    the code MLflow loads), its FeatureSpec and predictor from the logged artifacts.
    """

    def load_context(self, context) -> None:
        from workbench.features import FeatureSpec

        from workbench.calibration import Recalibration

        from workbench.tasks import TaskSpec

        config = context.model_config or {}
        self.kind = config.get("kind", "")
        self.task = TaskSpec.model_validate(config["task"]) if config.get("task") else None
        self.spec = FeatureSpec.load(context.artifacts["feature_spec"])
        self.predictor = load_predictor(self.kind, context.artifacts, self.spec, config.get("options") or {})
        self.tabular = bool((config.get("options") or {}).get("tabular"))
        path = context.artifacts.get("recalibration")
        self.recalibration = Recalibration.model_validate_json(Path(path).read_text()) if path else Recalibration()
        survival = (config.get("options") or {}).get("survival")
        self.horizons_days = None if survival is None else [float(h) for h in survival["horizons_days"]]

    def risk(self, X: np.ndarray, horizons_days=None) -> np.ndarray:
        """Calibrated risk for normalized tensors X (the recalibration map unless it is in the weights);
        a survival model's [N, H] risk by each horizon (default: the model's own)."""
        if self.horizons_days is not None:
            return self.predictor(X, np.asarray(horizons_days or self.horizons_days, dtype=np.float64))
        return self.recalibration.apply(self.predictor(X))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from workbench.data.meds_io import EventFrame

        frame = request_frame(model_input)
        events = frame.filter(pl.col("code").is_not_null()).drop("prediction_time")
        horizons = (params or {}).get("horizons_days")
        try:
            scores = self.score(EventFrame(events, root="the request"), request_samples(frame), "the request",
                                horizons_days=None if horizons is None else list(np.atleast_1d(horizons)))
        except WorkbenchError as exc:
            raise _bad_request(str(exc)) from None
        return scores.to_pandas()

    def score(self, dataset, samples: pl.DataFrame | None = None, source: str = "prediction times",
              horizons_days=None) -> pl.DataFrame:
        """Risks for ``samples`` (subject_id, prediction_time) of a MEDS dataset (a path or an
        EventFrame), tensorized with the model's own FeatureSpec. Without samples: the moments the
        model's task predicts at (:func:`workbench.tasks.scoring_times`); never at or after a
        subject's end of record (death, end of follow-up)."""
        from workbench.features import as_dataset, transform
        from workbench.tasks import check_before_end_of_record, scoring_times

        dataset = as_dataset(dataset)
        if self.task is None and samples is None:
            raise WorkbenchError("this model records no task, so it has no default moment to score: "
                                 "give prediction times (--times, or prediction_time rows in the request)")
        if samples is None:
            samples = scoring_times(dataset.events(), self.task, str(dataset.root))
        elif self.task is not None:
            check_before_end_of_record(samples, dataset.events(), self.task, source, str(dataset.root))
        if self.tabular:
            from workbench.tabular import tabular_features

            X, samples = tabular_features(dataset, samples, self.spec)
            ids, times = samples["subject_id"].to_numpy(), samples["prediction_time"].to_numpy()
        else:
            tensors = transform(dataset, samples, self.spec)
            X, ids, times = tensors.X, tensors.subject_id, tensors.prediction_time
        keys = {"subject_id": ids, "prediction_time": times}
        if self.horizons_days is None:
            return pl.DataFrame({**keys, "risk": np.asarray(self.risk(X), dtype=np.float64)})
        horizons = [float(h) for h in (horizons_days or self.horizons_days)]
        if horizons_days is not None and (not horizons or any(not 0 < h <= max(self.horizons_days) + 1e-6 for h in horizons)):
            raise WorkbenchError(f"horizons_days {horizons}: each must be > 0 and at most the model's "
                                 f"{max(self.horizons_days):g}-day maximum horizon")
        risk = np.asarray(self.risk(X, horizons), dtype=np.float64).reshape(len(ids), len(horizons))
        return pl.DataFrame({**keys, **{horizon_column(h): risk[:, i] for i, h in enumerate(horizons)}})


# --- the predictor of each model kind -------------------------------------------------------


def save_predictor(fitted, directory: Path) -> dict[str, str]:
    """Write what ``fitted`` (an experiment.FittedModel) needs to predict; returns pyfunc artifacts."""
    from workbench.files import write_text_atomic

    artifacts = {"recalibration": str(write_text_atomic(directory / "recalibration.json",
                                                        fitted.recalibration.model_dump_json(indent=2)))}
    if fitted.keras_model is not None:
        path = directory / "model.keras"
        fitted.keras_model.save(path)
        artifacts["keras_model"] = str(path)
    elif hasattr(fitted.reference, "save"):  # LightGBM's own text format
        path = directory / "lightgbm.txt"
        fitted.reference.save(path)
        artifacts["lightgbm"] = str(path)
    elif fitted.reference is not None:
        import joblib

        path = directory / "estimator.joblib"
        joblib.dump(fitted.reference, path)
        artifacts["estimator"] = str(path)
    return artifacts


class KerasPredictor:
    """A saved Keras network as ``X -> risk``; ``network`` is the Keras model itself (for SHAP)."""

    def __init__(self, path: str):
        import keras

        import workbench.models  # noqa: F401  (registers the custom layers the saved model uses)
        import workbench.survival  # noqa: F401  (and the hazard likelihood a survival network was compiled with)

        self.network = keras.saving.load_model(path)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        from workbench.training import predict_risk

        return predict_risk(self.network, X)


def load_predictor(kind: str, artifacts: dict, spec, options: dict):
    """``X [N, T, F] -> risk [N]`` of a logged model (the inverse of :func:`save_predictor`)."""
    from workbench import references

    survival = options.get("survival")
    if survival is not None:
        return survival_predictor(kind, artifacts, spec, survival)
    if "keras_model" in artifacts:
        return KerasPredictor(artifacts["keras_model"])
    if "estimator" in artifacts:
        import joblib

        return joblib.load(artifacts["estimator"]).predict_proba
    if "lightgbm" in artifacts:
        return references.GradientBoostedReference.load(artifacts["lightgbm"]).predict_proba
    if kind == "mayo":
        return lambda X: references.mayo_risk(spec, X, options.get("horizon_years", 2))
    raise WorkbenchError(f"model kind {kind!r}: no predictor among the logged artifacts {sorted(artifacts)}")


def survival_predictor(kind: str, artifacts: dict, spec, survival: dict):
    """``(X, horizons_days) -> risk [N, H]`` of a logged survival model."""
    from workbench import references

    if "keras_model" in artifacts:
        from workbench.survival import HazardCurves, HazardGrid

        network = KerasPredictor(artifacts["keras_model"]).network
        return HazardCurves(network, HazardGrid(tuple(survival["grid_days"])), int(survival["n_causes"]))
    if "estimator" in artifacts:
        import joblib

        return joblib.load(artifacts["estimator"]).risk
    if kind == "mayo":
        return lambda X, h: references.mayo_survival_risk(spec, X, h)
    raise WorkbenchError(f"survival model kind {kind!r}: no predictor among the logged artifacts {sorted(artifacts)}")


def requirements() -> list[str]:
    """Exact pins (from this package's own metadata) of the packages that scoring imports."""
    pins = []
    for requirement in importlib.metadata.requires("workbench") or []:
        if "extra ==" in requirement:
            continue
        spec = requirement.split(";")[0].strip()
        name = re.split(r"[\[=<>!~ ]", spec, maxsplit=1)[0]
        if name.lower() in _SCORING_PACKAGES:
            pins.append(re.sub(r"\[.*?\]", "", spec))
    return pins


def example_request(spec) -> pd.DataFrame:
    """A made-up patient (subject 0, one visit with the train medians of the numeric codes): the
    model's input example, so the UI and ``mlflow models serve`` show a valid request. No real
    patient's data goes into the model."""
    names = list(spec.feature_names)
    rows = [{"subject_id": 0, "time": pd.Timestamp("2000-01-01"), "code": code,
             "numeric_value": float(spec.median[names.index(f"{code}/last")]) if f"{code}/last" in names else None}
            for code in spec.numeric_codes[:8]]
    rows += [{"subject_id": 0, "time": pd.Timestamp("2000-01-01"), "code": code, "numeric_value": None}
             for code in spec.count_codes[:2]]
    if not rows:
        rows = [{"subject_id": 0, "time": pd.Timestamp("2000-01-01"), "code": "VISIT", "numeric_value": None}]
    frame = pd.DataFrame(rows)
    frame["prediction_time"] = pd.Timestamp("2000-01-01")
    return frame


def log_risk_model(fitted, spec, *, kind: str, options: dict | None = None, metadata: dict | None = None, task=None):
    """Log ``fitted`` as the run's ``model``: the raw-events pyfunc with everything it needs."""
    import workbench

    package = Path(workbench.__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="workbench-model-") as tmp:
        directory = Path(tmp)
        artifacts = {"feature_spec": str(spec.save(directory / record.FEATURE_SPEC_ARTIFACT))}
        artifacts |= save_predictor(fitted, directory)
        return mlflow.pyfunc.log_model(
            name=record.MODEL_PATH,
            python_model=str(package / "pyfunc_model.py"),
            model_config={"kind": kind, "options": dict(options or {}),
                          "task": None if task is None else task.model_dump(mode="json")},
            artifacts=artifacts,
            code_paths=[str(package)],
            signature=signature((options or {}).get("survival", {}).get("horizons_days")),
            input_example=example_request(spec),
            pip_requirements=requirements(),
            metadata={"keras_backend": workbench.KERAS_BACKEND, "workbench_version": workbench.__version__, **(metadata or {})},
        )


def load_risk_model(model_uri: str) -> RiskModel:
    """The RiskModel behind a ``models:/`` or ``runs:/`` URI, loaded the standard MLflow way."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except MlflowException as exc:
        raise WorkbenchError(f"model {model_uri}: cannot load it ({exc.message})") from None
