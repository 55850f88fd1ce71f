"""One model run on one task: fit, evaluate on the held-out split, record in MLflow.

This is what ``notebooks/02_train`` calls for each model of a sweep, and what the tests call
directly. The stages stay in their modules (features, models, training, evaluation, plots,
tracking); this module only wires one patient cohort through them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import mlflow
import numpy as np
import polars as pl

from workbench import tracking
from workbench.errors import WorkbenchError
from workbench.evaluation import EvalConfig, EvaluationResult, evaluate
from workbench.features import SequenceTensors
from workbench.models import LogisticReference, ModelConfig, mayo_inputs_from_features, mayo_pbc_score
from workbench.plots import calibration_plot, pr_curve_plot, roc_curve_plot, training_curves_plot
from workbench.training import TrainConfig, predict_risk, train

ModelKind = Literal["lstm", "gru", "rnn", "logistic", "mayo"]
SEQUENCE_KINDS = ("lstm", "gru", "rnn")
HELD_OUT = "held_out_"  # prefix of every held-out metric in MLflow

# Published Mayo model survival function (Dickson et al., Hepatology 1989):
# S(t) = S0(t) ** exp(R - 5.07), with S0(2 years) = 0.941. Turns the score into a 2-year risk
# so Brier score and calibration are defined; AUROC/AUPRC depend only on R's ranking.
MAYO_R_MEAN = 5.07
MAYO_S0 = {1: 0.970, 2: 0.941, 3: 0.883, 4: 0.833, 5: 0.774, 6: 0.721, 7: 0.651}


@dataclass
class FittedModel:
    """A fitted model of any kind behind one ``predict(X) -> risk`` interface."""

    kind: str
    predict: Callable[[np.ndarray], np.ndarray]
    keras_model: object = None  # the Keras model for sequence kinds
    sklearn_model: object = None  # the scikit-learn estimator for the logistic reference
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    seconds: float = 0.0


@dataclass
class ModelRun:
    """What one model run produced: its MLflow run, held-out evaluation and registry outcome."""

    run_id: str
    kind: str
    evaluation: EvaluationResult
    risk: np.ndarray  # held-out risk, in the order of ``tensors.by_split("held_out")``
    registry: dict | None = None
    fitted: FittedModel | None = None


def mayo_risk(tensors: SequenceTensors, X: np.ndarray, horizon_years: int = 2) -> np.ndarray:
    """The Mayo PBC model's risk of death within ``horizon_years``, from raw last-step values."""
    raw_last = tensors.spec.denormalize(X[:, -1, :])
    r = mayo_pbc_score(mayo_inputs_from_features(raw_last, tensors.feature_names))
    return 1.0 - MAYO_S0[horizon_years] ** np.exp(r - MAYO_R_MEAN)


def fit_model(
    kind: ModelKind,
    tensors: SequenceTensors,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    on_epoch_end=None,
    mayo_horizon_years: int = 2,
) -> FittedModel:
    """Fit ``kind`` on the train split (early stopping on tuning); the Mayo score fits nothing."""
    train_split, tune_split = tensors.by_split("train"), tensors.by_split("tuning")
    if kind in SEQUENCE_KINDS:
        config = (model_config or ModelConfig()).model_copy(update={"kind": kind})
        result = train(
            config, train_config or TrainConfig(), train_split.X, train_split.y, tune_split.X, tune_split.y,
            on_epoch_end=on_epoch_end,
        )
        return FittedModel(
            kind, lambda X: predict_risk(result.model, X), keras_model=result.model,
            history=result.history, best_epoch=result.best_epoch, seconds=result.seconds,
        )
    if kind == "logistic":
        reference = LogisticReference().fit(train_split.X, train_split.y)
        return FittedModel(kind, reference.predict_proba, sklearn_model=reference.model)
    if kind == "mayo":
        return FittedModel(kind, lambda X: mayo_risk(tensors, X, mayo_horizon_years))
    raise ValueError(f"unknown model kind {kind!r}; expected one of {SEQUENCE_KINDS + ('logistic', 'mayo')}")


def subgroups(tensors: SequenceTensors) -> dict[str, np.ndarray]:
    """Sex and age at prediction time of each sample, from the raw static features (when present)."""
    raw_last = tensors.spec.denormalize(tensors.X[:, -1, :])
    names = list(tensors.feature_names)
    groups: dict[str, np.ndarray] = {}
    if "static/age_years" in names:
        groups["age"] = raw_last[:, names.index("static/age_years")]
    if "static/SEX//F" in names:
        groups["sex"] = np.where(raw_last[:, names.index("static/SEX//F")] > 0.5, "F", "M")
    return groups


def evaluate_held_out(fitted: FittedModel, tensors: SequenceTensors, config: EvalConfig | None = None):
    """Evaluate on the held-out split with a patient-level bootstrap and sex / age subgroups."""
    held_out = tensors.by_split("held_out")
    risk = np.asarray(fitted.predict(held_out.X), dtype=np.float64)
    result = evaluate(held_out.y, risk, config or EvalConfig(), groups=subgroups(held_out), cluster=held_out.subject_id)
    return result, risk


def figures(kind: str, fitted: FittedModel, y: np.ndarray, risk: np.ndarray) -> dict:
    """The plots every model run logs (training curves only for models trained by epochs)."""
    curves = {kind: (y, risk)}
    out = {"roc": roc_curve_plot(curves), "pr": pr_curve_plot(curves), "calibration": calibration_plot(curves)}
    if fitted.history:
        out["training_curves"] = training_curves_plot(fitted.history, best_epoch=fitted.best_epoch)
    return out


def run_model(
    kind: ModelKind,
    tensors: SequenceTensors,
    *,
    task: str,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    eval_config: EvalConfig | None = None,
    cohort_report=None,
    data_root: str | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    register: bool = True,
) -> ModelRun:
    """Fit, evaluate and log one model as one MLflow run (resumed if ``run_id`` is given).

    Logged: resolved configs as params, per-epoch metrics, held-out metrics with CIs and per
    subgroup, the data fingerprint, the feature spec, the cohort report, plots, and the model
    (Keras flavour with a signature for sequence models); sequence models are registered under
    the task's name, and ``champion`` moves only to a version with a better held-out AUROC.
    """
    tracking.setup()
    model_config = (model_config or ModelConfig()).model_copy(update={"kind": kind}) if kind in SEQUENCE_KINDS else None
    train_config = train_config or TrainConfig()
    eval_config = eval_config or EvalConfig()
    tags = {
        "workbench.task": task,
        "workbench.model": kind,
        "workbench.data_fingerprint": tensors.spec.fitted_on.data_fingerprint,
        "workbench.tensors_hash": tensors.content_hash(),
        "mlflow.source.git.commit": tracking.git_commit(),
    }
    if data_root:
        tags["workbench.data_root"] = str(Path(data_root).resolve())
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    start = {"run_id": run_id} if run_id else {"experiment_id": tracking.experiment_id(task), "run_name": kind}
    with mlflow.start_run(**start, tags=tags):
        active = mlflow.active_run().info.run_id
        configs = {"features": tensors.spec.config, "eval": eval_config}
        if kind in SEQUENCE_KINDS:
            configs.update(model=model_config, train=train_config)
        mlflow.log_params({f"config.{k}": v for k, v in tracking.flatten_params(configs).items()})
        mlflow.log_params({"model_kind": kind, "n_steps": tensors.X.shape[1], "n_features": tensors.X.shape[2]})
        if data_root:
            tracking.log_data_input(data_root, tensors.spec.fitted_on.data_fingerprint, task)

        def log_epoch(epoch: int, metrics: dict) -> None:
            values = {k: float(v) for k, v in metrics.items() if k != "epoch" and np.isfinite(v)}
            mlflow.log_metrics(values, step=epoch)

        fitted = fit_model(kind, tensors, model_config, train_config, on_epoch_end=log_epoch)
        evaluation, risk = evaluate_held_out(fitted, tensors, eval_config)
        mlflow.log_metrics(evaluation.to_flat_dict(prefix=HELD_OUT))
        if fitted.best_epoch:
            mlflow.log_metrics({"best_epoch": fitted.best_epoch, "train_seconds": fitted.seconds})
        mlflow.log_text(evaluation.to_markdown(), "evaluation/held_out.md")
        mlflow.log_text(evaluation.subgroups.write_csv(), "evaluation/subgroups.csv")
        mlflow.log_text(evaluation.calibration.write_csv(), "evaluation/calibration.csv")
        mlflow.log_dict(tensors.spec.model_dump(mode="json"), "feature_spec.json")
        if cohort_report is not None:
            mlflow.log_dict(cohort_report.to_dict(), "cohort/report.json")
            mlflow.log_text(cohort_report.to_markdown(), "cohort/report.md")
            mlflow.log_metrics(cohort_report.to_metrics())
        held_out = tensors.by_split("held_out")
        tracking.log_figures(figures(kind, fitted, held_out.y, risk))
        tracking.log_frame(
            pl.DataFrame({"subject_id": held_out.subject_id, "prediction_time": held_out.prediction_time,
                          "label": held_out.y, "risk": risk}),
            "predictions/held_out.parquet",
        )
        registry = None
        if fitted.keras_model is not None:
            info = tracking.log_keras_model(fitted.keras_model, tensors.X.shape[1], tensors.X.shape[2])
            if register:
                registry = tracking.register_and_maybe_promote(info.model_uri, task, evaluation.metrics["auroc"]["value"])
                mlflow.set_tags({"workbench.registered_version": registry["version"],
                                 "workbench.champion": str(registry["promoted"]).lower()})
        elif fitted.sklearn_model is not None:
            tracking.log_sklearn_model(fitted.sklearn_model)
        elif kind == "mayo":
            mlflow.log_param("mayo_formula", "1 - 0.941**exp(R - 5.07), R = 0.871 ln(bili) - 2.53 ln(alb) + 0.039 age + 2.38 ln(pt) + 0.859 edema")
    return ModelRun(active, kind, evaluation, risk, registry, fitted)


def load_registered(model_uri: str):
    """A registered Keras model and the FeatureSpec logged with it: ``(model, spec, run_id)``."""
    import mlflow.keras

    import workbench.models  # noqa: F401  (registers the custom layers the saved model uses)
    from workbench.features import FeatureSpec

    tracking.setup()
    run_id = tracking.run_of_model(model_uri)
    spec = FeatureSpec.load(tracking.download_artifact(run_id, "feature_spec.json"))
    return mlflow.keras.load_model(model_uri), spec, run_id


def latest_times(data_root) -> pl.DataFrame:
    """One prediction time per subject: its last timed event (score everyone as of now)."""
    from workbench.data.meds_io import open_dataset

    return (
        open_dataset(data_root).events().drop_nulls("time")
        .group_by("subject_id").agg(pl.col("time").max().alias("prediction_time"))
        .sort("subject_id").collect()
    )


def score(model_uri: str, data_root, times=None):
    """Risk for ``times`` (subject_id, prediction_time; default: each subject's last event).

    New data is tensorized with the model's saved FeatureSpec (never refitted).
    """
    from workbench.data.validate import require_valid
    from workbench.features import load_labels, transform

    require_valid(data_root)
    model, spec, _ = load_registered(model_uri)
    samples = load_labels(times if times is not None else latest_times(data_root))
    tensors = transform(data_root, samples, spec)
    return pl.DataFrame(
        {
            "subject_id": tensors.subject_id,
            "prediction_time": tensors.prediction_time,
            "risk": predict_risk(model, tensors.X).astype(np.float64),
        }
    )


@dataclass
class Cohort:
    """A task's labels, cohort report and fitted tensors on one dataset: the input of every model run."""

    task: str
    data_root: str
    report: object  # workbench.tasks.CohortReport
    labels: pl.DataFrame  # subject_id, prediction_time, boolean_value, split
    tensors: SequenceTensors

    def save(self, directory) -> None:
        """Write labels, report and tensors under ``directory`` (each file atomically)."""
        from workbench.data.meds_io import write_parquet_atomic

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(self.labels, directory / "labels.parquet")
        self.tensors.save(directory / "tensors")
        info = {"task": self.task, "data_root": self.data_root, "report": self.report.to_dict()}
        tmp = directory / ".cohort.json.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(directory / "cohort.json")


def prepare_cohort(task, data, features=None) -> Cohort:
    """Validate the data, label the task, and fit tensors on its train split.

    ``task`` is a shipped task name or a YAML path, ``data`` a bundled dataset name or a MEDS
    directory, ``features`` a FeatureConfig (or dict) of the stage's settings.
    """
    from workbench.data.datasets import resolve
    from workbench.data.validate import require_valid
    from workbench.features import FeatureConfig, fit_transform
    from workbench.tasks import load_task, make_labels

    root = resolve(data)
    require_valid(root)
    spec = load_task(task)
    labelled = make_labels(root, spec)
    config = features if isinstance(features, FeatureConfig) else FeatureConfig(**(features or {}))
    _, tensors = fit_transform(root, labelled.labels, config)
    return Cohort(spec.name, str(root), labelled.report, labelled.labels_with_split, tensors)


def load_cohort(directory) -> Cohort:
    """A cohort written by :meth:`Cohort.save` (e.g. the cohort step's output dir)."""
    from workbench.tasks import CohortReport

    directory = Path(directory)
    info = json.loads((directory / "cohort.json").read_text())
    return Cohort(
        info["task"], info["data_root"], CohortReport.model_validate(info["report"]),
        pl.read_parquet(directory / "labels.parquet"), SequenceTensors.load(directory / "tensors"),
    )


def best_sequence_run(train_outputs) -> dict:
    """Among a sweep's train outputs (dirs holding ``model_run.json``), the sequence model with the best AUROC."""
    runs = [json.loads((Path(d) / "model_run.json").read_text()) for d in train_outputs]
    sequence = [r for r in runs if r["kind"] in SEQUENCE_KINDS]
    if not sequence:
        raise WorkbenchError(f"no sequence model among the train outputs {list(map(str, train_outputs))}")
    return max(sequence, key=lambda r: r["auroc"])


def save_model_run(run: ModelRun, directory) -> None:
    """Record a model run's id, kind and held-out AUROC for downstream steps (explain, compare)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"run_id": run.run_id, "kind": run.kind, "auroc": run.evaluation.metrics["auroc"]["value"],
            "registry": run.registry}
    tmp = directory / ".model_run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(directory / "model_run.json")


@dataclass
class ExplanationRun:
    """What an explanation run produced (all of it also logged to the model's MLflow run)."""

    run_id: str
    frame: pl.DataFrame  # the long explanations table (DESIGN.md contract)
    by_step: pl.DataFrame  # mean |SHAP| by steps before the prediction time
    by_feature: pl.DataFrame  # mean |SHAP| by feature
    checks: dict  # additivity, reference agreement, deletion curve
    figures: dict


def global_summaries(frame: pl.DataFrame, n_steps: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Mean |SHAP| by relative time step and by feature over every explained (non-padded) cell."""
    abs_shap = pl.col("shap").abs().mean().alias("mean_abs_shap")
    by_step = (
        frame.with_columns((n_steps - 1 - pl.col("step")).alias("steps_before_prediction"))
        .group_by("steps_before_prediction").agg(abs_shap).sort("steps_before_prediction")
    )
    by_feature = frame.group_by("feature").agg(abs_shap).sort("mean_abs_shap", descending=True)
    return by_step, by_feature


def patient_figures(expl, tensors: SequenceTensors, raw_X: np.ndarray, row: int) -> dict:
    """Heatmap and step timeline (with the patient's risk trajectory) of one explained sample."""
    from workbench.explain import padded_steps
    from workbench.plots import shap_heatmap_plot, step_timeline_plot

    i = int(expl.index[row])
    padded = padded_steps(tensors.X[i : i + 1], tensors.observed[i : i + 1])[0]
    subject = tensors.subject_id[i]
    same = np.flatnonzero(tensors.subject_id[expl.index] == subject)
    up_to = same[tensors.prediction_time[expl.index[same]] <= tensors.prediction_time[i]]
    when = str(np.datetime64(tensors.prediction_time[i], "D"))
    return {
        f"explain_heatmap_subject{subject}": shap_heatmap_plot(
            expl.shap[row], raw_X[i], tensors.step_end_time[i], tensors.feature_names, padded,
            title=f"Subject {subject} at {when}: SHAP per step and feature (values written in)"),
        f"explain_timeline_subject{subject}": step_timeline_plot(
            expl.step_totals[row], tensors.step_end_time[i], padded,
            tensors.prediction_time[expl.index[up_to]], expl.output[up_to], float(expl.base_value[row]),
            title=f"Subject {subject} at {when}: step contributions and risk so far"),
    }


def explain_samples(tensors: SequenceTensors, split: str = "held_out", subjects=None, max_samples: int | None = None):
    """Row indices of ``tensors`` to explain: a split, optionally some subjects, optionally the first N."""
    rows = np.flatnonzero(tensors.split == split)
    if subjects:
        rows = rows[np.isin(tensors.subject_id[rows], np.asarray(list(subjects), dtype=np.int64))]
        if len(rows) == 0:
            raise WorkbenchError(f"none of subjects {list(subjects)} has a sample in the {split} split")
    return rows[:max_samples] if max_samples else rows


def explain_run(run_id: str, tensors: SequenceTensors, config=None, subjects=None, max_samples: int | None = None,
                n_patients: int = 3) -> ExplanationRun:
    """Explain a logged model on held-out samples and log explanations, checks and plots to its run.

    The model is loaded back from the run (what was logged is what is explained); the
    background comes from the train split only.
    """
    import mlflow.keras

    import workbench.models  # noqa: F401  (custom layers of the saved model)
    from workbench.explain import ExplainConfig, check_explanation, explain, explanation_frame, select_background

    config = config or ExplainConfig()
    tracking.setup()
    model = mlflow.keras.load_model(f"runs:/{run_id}/model")
    train_split = tensors.by_split("train")
    background = select_background(train_split.X, train_split.observed, config.n_background, config.seed,
                                   config.background_selection)
    rows = explain_samples(tensors, subjects=subjects, max_samples=max_samples)
    X, observed = tensors.X, tensors.observed
    expl = explain(model, X[rows], background, config, observed=observed[rows])
    expl.index = rows[expl.index]  # positions in the full tensors, for the frame and plots
    checks = check_explanation(model, X, expl, background, config, observed=observed)
    raw_X = tensors.spec.denormalize(X)
    frame = explanation_frame(expl, tensors.subject_id, tensors.prediction_time, tensors.step_end_time,
                              tensors.feature_names, raw_X, observed)
    by_step, by_feature = global_summaries(frame, X.shape[1])
    from workbench.plots import global_importance_plot

    figs = {"explain_global_importance": global_importance_plot(by_feature, by_step)}
    # The patients a clinician would look at first: the highest-risk explained samples, one per subject.
    by_risk = np.argsort(-expl.output)
    _, first = np.unique(tensors.subject_id[expl.index[by_risk]], return_index=True)
    for row in by_risk[np.sort(first)][:n_patients]:
        figs |= patient_figures(expl, tensors, raw_X, int(row))
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"explain_{k}": float(v) for k, v in checks.items()})
        # An artifact, not params: a model may be explained again with other settings (params are write-once).
        mlflow.log_dict(config.model_dump(mode="json"), "explanations/config.json")
        tracking.log_frame(frame, "explanations/explanations.parquet")
        mlflow.log_text(by_step.write_csv(), "explanations/by_step.csv")
        mlflow.log_text(by_feature.write_csv(), "explanations/by_feature.csv")
        tracking.log_figures(figs)
    return ExplanationRun(run_id, frame, by_step, by_feature, checks, figs)


def tensors_for_run(run_id: str) -> SequenceTensors:
    """Rebuild a run's tensors from its task and dataset, with the run's own FeatureSpec (no refit)."""
    from workbench.features import FeatureSpec, transform
    from workbench.tasks import make_labels

    tracking.setup()
    try:
        tags = mlflow.get_run(run_id).data.tags
    except mlflow.exceptions.MlflowException as exc:
        raise WorkbenchError(f"run {run_id}: not found at {mlflow.get_tracking_uri()} ({exc.message})") from None
    if "workbench.data_root" not in tags or "workbench.task" not in tags:
        raise WorkbenchError(f"run {run_id} is not a workbench model run (no workbench.task / workbench.data_root tags)")
    spec = FeatureSpec.load(tracking.download_artifact(run_id, "feature_spec.json"))
    labels = make_labels(tags["workbench.data_root"], tags["workbench.task"]).labels
    return transform(tags["workbench.data_root"], labels, spec)
