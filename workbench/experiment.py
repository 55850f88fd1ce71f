"""One model run on one cohort: fit, evaluate on tuning and held-out, record in MLflow, register.

This is what ``notebooks/02_train`` calls for each model of a sweep, and what the tests call
directly. The stages stay in their modules (features, models, training, evaluation, plots,
tracking, serving); this module only wires one cohort through them. Every kind of model is
logged as the same MLflow pyfunc (:mod:`workbench.serving`): raw MEDS events in, risks out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import polars as pl

from workbench import record, tracking
from workbench.errors import WorkbenchError
from workbench.evaluation import EvaluationResult, decision_curve, evaluate, format_with_ci, threshold_table
from workbench.features import SequenceTensors
from workbench.calibration import Recalibration, fit_recalibration
from workbench.references import (
    MAYO_FORMULA,
    GradientBoostedReference,
    LogisticReference,
    mayo_not_applicable,
    mayo_risk,
)
from workbench.plots import calibration_plot, decision_curve_plot, pr_curve_plot, roc_curve_plot, training_curves_plot
from workbench.tasks import TaskSpec, load_task
from workbench.settings import MODEL_KINDS, EvalConfig, ModelConfig, SEQUENCE_KINDS, TABULAR_KINDS, ModelKind, TrainConfig




@dataclass
class FittedModel:
    """A fitted model of any kind behind one ``predict(X) -> risk`` interface."""

    kind: str
    predict: Callable[[np.ndarray], np.ndarray]
    keras_model: object = None  # the Keras model for sequence kinds
    reference: object = None  # the fitted tabular reference (LogisticReference, GradientBoostedReference)
    tabular: np.ndarray | None = None  # the tabular reference's inputs, one row per sample of the tensors
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    seconds: float = 0.0
    options: dict = field(default_factory=dict)  # what the logged predictor needs besides its artifacts
    recalibration: Recalibration = field(default_factory=Recalibration)  # applied by ``predict`` already


@dataclass
class ModelRun:
    """What one model run produced: its MLflow run, evaluations and registry outcome.

    ``skipped`` says why a reference that does not apply to this cohort (the Mayo score without
    its inputs) was not fitted; then there is no evaluation.
    """

    run_id: str
    kind: str
    evaluation: EvaluationResult | None
    risk: np.ndarray | None  # held-out risk, in the order of ``tensors.by_split("held_out")``
    registry: dict | None = None
    fitted: FittedModel | None = None
    tuning: EvaluationResult | None = None
    skipped: str | None = None
    figures: dict = field(default_factory=dict)  # the plots logged to the run, by name
    thresholds: pl.DataFrame | None = None  # operating points on held-out (sensitivity targets met on tuning)

    def summary(self) -> str:
        """One Markdown line: what was fitted and how it did (or why it was skipped)."""
        if self.skipped:
            return f"`{self.kind}` not fitted: {self.skipped}."
        held = self.evaluation.metrics
        line = (f"`{self.kind}`: held-out AUROC {format_with_ci(held['auroc'], 3)}, AUPRC {format_with_ci(held['auprc'], 3)}, "
                f"Brier {format_with_ci(held['brier'], 3)}, ECE {format_with_ci(held['ece'], 3)}; MLflow run `{self.run_id}`")
        if self.registry:
            verdict = "now the champion" if self.registry["promoted"] else "champion unchanged"
            line += f"; registered as `models:/{self.registry['name']}/{self.registry['version']}` ({verdict})"
        return line + "."


def horizon_days(task: TaskSpec) -> float | None:
    return task.outcome.horizon_days if task.outcome is not None else None


def not_applicable(kind: str, tensors: SequenceTensors, task: TaskSpec) -> str | None:
    """Why ``kind`` cannot be fitted on this cohort, or None (only the Mayo score has conditions)."""
    if kind not in MODEL_KINDS:
        raise WorkbenchError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    return mayo_not_applicable(tensors.feature_names, horizon_days(task)) if kind == "mayo" else None


def fit_model(
    kind: ModelKind,
    tensors: SequenceTensors,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    on_epoch_end=None,
    mayo_horizon_years: int = 2,
    data_root: str | None = None,
    seed: int = 0,
) -> FittedModel:
    """Fit ``kind`` on the train split (early stopping and any choice on tuning); the Mayo score fits nothing."""
    train_split, tune_split = tensors.by_split("train"), tensors.by_split("tuning")
    if kind in SEQUENCE_KINDS:
        from workbench.training import predict_risk, train

        config = (model_config or ModelConfig()).model_copy(update={"kind": kind})
        result = train(
            config, train_config or TrainConfig(), train_split.X, train_split.y, tune_split.X, tune_split.y,
            on_epoch_end=on_epoch_end,
        )
        return FittedModel(
            kind, lambda X: predict_risk(result.model, X), keras_model=result.model,
            history=result.history, best_epoch=result.best_epoch, seconds=result.seconds,
        )
    if kind in TABULAR_KINDS:
        if data_root is None:
            raise WorkbenchError(f"the {kind} reference reads the events themselves: pass data_root")
        X, names = tabular_inputs(tensors, data_root)
        train_rows, tune_rows = tensors.split == "train", tensors.split == "tuning"
        reference = LogisticReference(names) if kind == "logistic" else GradientBoostedReference(seed=seed)
        reference.fit(X[train_rows], tensors.y[train_rows], X[tune_rows], tensors.y[tune_rows])
        return FittedModel(kind, reference.predict_proba, reference=reference, tabular=X, options={"tabular": True})
    if kind == "mayo":
        return FittedModel(kind, lambda X: mayo_risk(tensors.spec, X, mayo_horizon_years),
                           options={"horizon_years": mayo_horizon_years})
    raise WorkbenchError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")


def tabular_inputs(tensors: SequenceTensors, data_root) -> tuple[np.ndarray, list[str]]:
    """The tabular features of every sample of ``tensors`` (same order), and their names."""
    from workbench.tabular import feature_names, tabular_features

    labels = pl.DataFrame({"subject_id": tensors.subject_id, "prediction_time": tensors.prediction_time,
                           "boolean_value": tensors.y.astype(bool)})
    X, samples = tabular_features(data_root, labels, tensors.spec)
    return X, feature_names(tensors.spec)


def inputs(fitted: FittedModel, tensors: SequenceTensors, split: str) -> np.ndarray:
    """What ``fitted.predict`` takes for the samples of one split: sequences, or tabular rows."""
    rows = tensors.split == split
    return fitted.tabular[rows] if fitted.tabular is not None else tensors.X[rows]


def recalibrate(fitted: FittedModel, tensors: SequenceTensors, method: str) -> None:
    """Fit the recalibration map on the tuning split and make ``fitted.predict`` return calibrated risk.

    A Platt map folds into a network's or a logistic regression's last layer (the saved model then
    outputs calibrated risk by itself); any other map wraps ``predict`` and travels with the model.
    """
    recalibration = fit_recalibration(fitted.predict(inputs(fitted, tensors, "tuning")), tensors.by_split("tuning").y, method)
    if recalibration.method == "platt" and fitted.keras_model is not None:
        from workbench.models import fold_platt

        fold_platt(fitted.keras_model, recalibration.a, recalibration.b)
        recalibration.folded = True
    elif recalibration.method == "platt" and isinstance(fitted.reference, LogisticReference):
        fitted.reference.fold_platt(recalibration.a, recalibration.b)
        recalibration.folded = True
    else:
        raw = fitted.predict
        fitted.predict = lambda X: recalibration.apply(raw(X))
    fitted.recalibration = recalibration


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
    risk = np.asarray(fitted.predict(inputs(fitted, tensors, "held_out")), dtype=np.float64)
    result = evaluate(held_out.y, risk, config or EvalConfig(), groups=subgroups(held_out), cluster=held_out.subject_id)
    return result, risk


def evaluate_tuning(fitted: FittedModel, tensors: SequenceTensors, config: EvalConfig | None = None) -> EvaluationResult:
    """Point metrics on the tuning split (what any choice between models may look at); a threshold
    rule ('youden', 'prevalence') is resolved here, and the number is what held-out uses."""
    tune = tensors.by_split("tuning")
    risk = np.asarray(fitted.predict(inputs(fitted, tensors, "tuning")), dtype=np.float64)
    return evaluate(tune.y, risk, (config or EvalConfig()).model_copy(update={"n_bootstrap": 0}))


def figures(kind: str, fitted: FittedModel, y: np.ndarray, risk: np.ndarray, evaluation: EvaluationResult) -> dict:
    """The plots every model run logs (training curves only for models trained by epochs)."""
    curves = {kind: (y, risk)}
    out = {"roc": roc_curve_plot(curves), "pr": pr_curve_plot(curves),
           "calibration": calibration_plot(curves, n_bins=evaluation.config.n_calibration_bins,
                                           strategy=evaluation.config.calibration_strategy,
                                           bands={kind: evaluation.calibration}),
           "decision_curve": decision_curve_plot(curves, title=f"{kind}: decision curve, held-out")}
    if fitted.history:
        out["training_curves"] = training_curves_plot(fitted.history, best_epoch=fitted.best_epoch)
    return out


def threshold_markdown(table: pl.DataFrame) -> str:
    """The operating points of :func:`workbench.evaluation.threshold_table` as a Markdown table."""
    def cell(v, pct=True):
        return "n/a" if v is None else (f"{v:.0%}" if pct else f"{v:.1f}")

    lines = ["| rule | risk threshold | sensitivity | specificity | PPV | NPV | flagged | number needed to evaluate |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.iter_rows(named=True):
        lines.append(f"| {r['rule']} | {r['threshold']:.3f} | {cell(r['sensitivity'])} | {cell(r['specificity'])} | "
                     f"{cell(r['ppv'])} | {cell(r['npv'])} | {cell(r['flagged'])} | {cell(r['number_needed_to_evaluate'], False)} |")
    return "\n".join(lines)


def architecture(kind: str, model_config: ModelConfig | None) -> str:
    """A short human description of the model, e.g. ``lstm, 1 layer x 64 units``."""
    if kind in SEQUENCE_KINDS and model_config is not None:
        c = model_config
        parts = [f"{kind}, {c.layers} layer{'s' if c.layers > 1 else ''} x {c.units} units"]
        parts += ["bidirectional"] if c.bidirectional else []
        parts += [f"dropout {c.dropout}"] if c.dropout else []
        parts += [f"head {c.head_units}"] if c.head_units else []
        return ", ".join(parts)
    if kind == "logistic":
        return "logistic regression on the whole history (last values, missing and ever-present flags, age, sex)"
    if kind == "gbt":
        return "gradient-boosted trees (LightGBM) on windowed aggregates (30 d, 365 d, full history)"
    return "Mayo PBC risk score (published coefficients, nothing fitted)"


def version_description(task: TaskSpec, kind: str, arch: str, tensors: SequenceTensors, run_id: str,
                        tuning: EvaluationResult, held_out: EvaluationResult) -> str:
    """The registry's one-paragraph description of a model version."""
    fit = tensors.spec.fitted_on
    held = held_out.metrics
    return (
        f"{arch} predicting {task.name}" + (f" ({task.description.strip()})" if task.description else "") + ". "
        f"Trained on {fit.n_train_samples:,} samples of {fit.n_train_subjects:,} train subjects (data fingerprint "
        f"{fit.data_fingerprint}), {tensors.X.shape[1]} steps of {tensors.spec.config.bin_width} x {tensors.X.shape[2]} features. "
        f"Tuning AUROC {tuning.metrics['auroc']['value']:.3f} (the champion rule compares it); held-out ({held_out.n_subjects} patients, {held_out.n} samples) "
        f"AUROC {format_with_ci(held['auroc'], 3)}, AUPRC {format_with_ci(held['auprc'], 3)}, "
        f"Brier {format_with_ci(held['brier'], 3)}, ECE {format_with_ci(held['ece'], 3)}. "
        f"Scores raw MEDS events (subject_id, time, code, numeric_value; optional prediction_time) with "
        f"mlflow.pyfunc.load_model. MLflow run {run_id}."
    )


def run_model(
    kind: ModelKind,
    tensors: SequenceTensors,
    *,
    task: str | TaskSpec,
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

    Logged: resolved configs as params, per-epoch metrics, tuning metrics, held-out metrics with
    CIs and per subgroup, the data fingerprint, the task spec, the feature spec, the cohort
    report, plots, held-out predictions, the recalibration map and the model (the raw-events pyfunc,
    which outputs the calibrated risk). Every kind is registered under the task's name, each
    version described and tagged; ``champion`` is the version with the best **tuning** AUROC
    (held-out is evaluated once, after every choice, and only reported). A reference that does not apply
    (see :func:`not_applicable`) is recorded as skipped, with its reason.
    """
    task = load_task(task)
    tracking.setup()
    if kind in SEQUENCE_KINDS:

        model_config = (model_config or ModelConfig()).model_copy(update={"kind": kind})
    else:
        model_config = None
    train_config = train_config or TrainConfig()
    eval_config = eval_config or EvalConfig()
    arch = architecture(kind, model_config)
    tags = {
        record.TASK_TAG: task.name,
        record.MODEL_TAG: kind,
        record.ARCHITECTURE_TAG: arch,
        record.DATA_FINGERPRINT_TAG: tensors.spec.fitted_on.data_fingerprint,
        record.TENSORS_HASH_TAG: tensors.content_hash(),
        "mlflow.source.git.commit": tracking.git_commit(),
    }
    if data_root:
        tags[record.DATA_ROOT_TAG] = str(Path(data_root).resolve())
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    start = {"run_id": run_id} if run_id else {"experiment_id": tracking.experiment_id(task.name), "run_name": kind}
    with mlflow.start_run(**start, tags=tags):
        active = mlflow.active_run().info.run_id
        mlflow.log_dict(task.model_dump(mode="json"), record.TASK_ARTIFACT)
        reason = not_applicable(kind, tensors, task)
        if reason:
            mlflow.set_tag(record.SKIPPED_TAG, reason)
            return ModelRun(active, kind, None, None, skipped=reason)
        configs = {"features": tensors.spec.config, "eval": eval_config}
        if kind in SEQUENCE_KINDS:
            configs.update(model=model_config, train=train_config)
        mlflow.log_params({f"config.{k}": v for k, v in tracking.flatten_params(configs).items()})
        mlflow.log_params({"model_kind": kind, "n_steps": tensors.X.shape[1], "n_features": tensors.X.shape[2]})
        if data_root:
            tracking.log_data_input(data_root, tensors.spec.fitted_on.data_fingerprint, task.name)

        def log_epoch(epoch: int, metrics: dict) -> None:
            values = {k: float(v) for k, v in metrics.items() if k != "epoch" and np.isfinite(v)}
            mlflow.log_metrics(values, step=epoch)

        years = round(horizon_days(task) / 365.25) if kind == "mayo" else 2
        fitted = fit_model(kind, tensors, model_config, train_config, on_epoch_end=log_epoch, mayo_horizon_years=years,
                           data_root=data_root, seed=train_config.seed)
        # Every choice on the tuning split only: the recalibration map, the threshold, the champion.
        recalibrate(fitted, tensors, eval_config.recalibration if kind != "mayo" else "none")
        tuning = evaluate_tuning(fitted, tensors, eval_config)
        eval_config = eval_config.model_copy(update={"threshold": tuning.threshold})
        evaluation, risk = evaluate_held_out(fitted, tensors, eval_config)
        mlflow.log_dict(fitted.recalibration.model_dump(mode="json"), record.RECALIBRATION_ARTIFACT)
        mlflow.log_param("recalibration", fitted.recalibration.describe()[:500])
        mlflow.log_metrics({f"{record.TUNING}{k}": v for k, v in tuning.to_flat_dict().items()})
        mlflow.log_metrics(evaluation.to_flat_dict(prefix=record.HELD_OUT))
        if fitted.best_epoch:
            mlflow.log_metrics({"best_epoch": fitted.best_epoch, "train_seconds": fitted.seconds})
        if isinstance(fitted.reference, LogisticReference):
            mlflow.log_params({"logistic_C": fitted.reference.C, "logistic_inputs": len(fitted.reference.names)})
        if isinstance(fitted.reference, GradientBoostedReference):
            mlflow.log_params({"gbt_rounds": fitted.reference.booster.best_iteration, **{f"gbt_{k}": v for k, v in fitted.reference.params.items()}})
        mlflow.log_text(evaluation.to_markdown(), f"{record.EVALUATION_DIR}/held_out.md")
        mlflow.log_text(evaluation.subgroups.write_csv(), f"{record.EVALUATION_DIR}/subgroups.csv")
        mlflow.log_text(evaluation.calibration.write_csv(), f"{record.EVALUATION_DIR}/calibration.csv")
        mlflow.log_dict(tensors.spec.model_dump(mode="json"), record.FEATURE_SPEC_ARTIFACT)
        if cohort_report is not None:
            tracking.log_cohort_report(cohort_report)
        held_out = tensors.by_split("held_out")
        plots = figures(kind, fitted, held_out.y, risk, evaluation)
        tracking.log_figures(plots)
        tune_risk = np.asarray(fitted.predict(inputs(fitted, tensors, "tuning")), dtype=np.float64)
        thresholds = threshold_table(held_out.y, risk, tuning=(tensors.by_split("tuning").y, tune_risk))
        mlflow.log_text(thresholds.write_csv(), f"{record.EVALUATION_DIR}/thresholds.csv")
        mlflow.log_text(decision_curve(held_out.y, risk).write_csv(), f"{record.EVALUATION_DIR}/decision_curve.csv")
        tracking.log_frame(
            pl.DataFrame({"subject_id": held_out.subject_id, "prediction_time": held_out.prediction_time,
                          "label": held_out.y, "risk": risk}),
            record.PREDICTIONS_ARTIFACT,
        )
        if kind == "mayo":
            mlflow.log_param("mayo_formula", MAYO_FORMULA)
        from workbench.serving import log_risk_model

        info = log_risk_model(fitted, tensors.spec, kind=kind, options=fitted.options,
                              metadata={"task": task.name, "model_kind": kind, "architecture": arch}, task=task)
        registry = None
        if register:
            version_tags = {
                "task": task.name, "model_kind": kind, "architecture": arch,
                "data_fingerprint": tensors.spec.fitted_on.data_fingerprint, "run_id": active,
                "recalibration": fitted.recalibration.method,
                **{f"{record.TUNING}{m}": f"{tuning.metrics[m]['value']:.4f}" for m in ("auprc", "brier", "ece")},
                **{f"{record.HELD_OUT}{m}": f"{evaluation.metrics[m]['value']:.4f}" for m in ("auroc", "auprc", "brier", "ece")},
            }
            registry = tracking.register_and_maybe_promote(
                info.model_uri, task.name, tuning.metrics["auroc"]["value"],
                description=version_description(task, kind, arch, tensors, active, tuning, evaluation), tags=version_tags,
            )
            mlflow.set_tags({record.REGISTERED_VERSION_TAG: registry["version"],
                             record.CHAMPION_TAG: str(registry["promoted"]).lower()})
    return ModelRun(active, kind, evaluation, risk, registry, fitted, tuning, figures=plots, thresholds=thresholds)


def score(model_uri: str, data_root, times=None, horizons_days=None) -> pl.DataFrame:
    """Risk for ``times`` (subject_id, prediction_time; default: the moments the model's task predicts at).

    The model is loaded the standard MLflow way and new data is tensorized with its own saved
    FeatureSpec (never refitted): the same code path as ``mlflow.pyfunc.load_model(...).predict``.
    """
    from workbench.data.validate import require_valid_cached
    from workbench.features import load_labels
    from workbench.serving import load_risk_model

    require_valid_cached(data_root)
    tracking.setup()
    tracking.run_of_model(model_uri)  # a clear error for an unknown name, alias or version
    model = load_risk_model(model_uri)
    samples = None
    if times is not None:
        from workbench.data.meds_io import open_dataset
        from workbench.labels import check_labels_in_data

        samples = load_labels(times).select("subject_id", "prediction_time")
        check_labels_in_data(samples, open_dataset(data_root).events(), str(data_root), source=str(times))
    if horizons_days is not None and model.horizons_days is None:
        raise WorkbenchError(f"model {model_uri} is a binary model with one horizon: --horizon-days applies to survival models")
    return model.score(data_root, samples, source=str(times), horizons_days=horizons_days)


def save_model_run(run: ModelRun, directory) -> None:
    """Record a model run for downstream steps (explain, compare): id, kind, tuning AUROC, registry."""
    record.write_model_run(directory, {
        "run_id": run.run_id, "kind": run.kind, "skipped": run.skipped, "registry": run.registry,
        "tuning_auroc": None if run.tuning is None else run.tuning.metrics["auroc"]["value"]})


def best_sequence_run(train_outputs) -> dict:
    """Among a sweep's train outputs, the sequence model with the best tuning AUROC (held-out stays unseen)."""
    runs = record.read_model_runs(train_outputs)
    sequence = [r for r in runs if r["kind"] in SEQUENCE_KINDS and not r.get("skipped")]
    if not sequence:
        raise WorkbenchError(f"no sequence model among the train outputs {list(map(str, train_outputs))}")
    return max(sequence, key=lambda r: r["tuning_auroc"])


def model_run_tags(run_id: str) -> dict[str, str]:
    """The tags of a workbench model run (a clear error for an unknown or foreign run)."""
    tracking.setup()
    try:
        tags = mlflow.get_run(run_id).data.tags
    except mlflow.exceptions.MlflowException as exc:
        raise WorkbenchError(f"run {run_id}: not found at {mlflow.get_tracking_uri()} ({exc.message})") from None
    if record.DATA_ROOT_TAG not in tags or record.TASK_TAG not in tags:
        raise WorkbenchError(f"run {run_id} is not a workbench model run (no {record.TASK_TAG} / {record.DATA_ROOT_TAG} tags)")
    return tags


def task_of_run(run_id: str) -> TaskSpec:
    """The resolved task spec a model run logged (so a run can be re-read wherever its spec came from)."""
    tags = model_run_tags(run_id)
    try:
        return load_task(json.loads(tracking.download_artifact(run_id, record.TASK_ARTIFACT).read_text()))
    except (OSError, ValueError, mlflow.exceptions.MlflowException):
        return load_task(tags[record.TASK_TAG])  # a run logged before the spec was: a shipped task name


def tensors_for_run(run_id: str) -> SequenceTensors:
    """Rebuild a run's tensors from its task and dataset, with the run's own FeatureSpec (no refit)."""
    from workbench.features import FeatureSpec, transform
    from workbench.tasks import make_labels

    root = model_run_tags(run_id)[record.DATA_ROOT_TAG]
    try:
        spec_path = tracking.download_artifact(run_id, record.FEATURE_SPEC_ARTIFACT)
    except (OSError, mlflow.exceptions.MlflowException):
        raise WorkbenchError(f"run {run_id}: has no feature_spec.json artifact, so its tensors cannot be rebuilt "
                             "(was it logged by a workbench train step?)") from None
    spec = FeatureSpec.load(spec_path)
    labels = make_labels(root, task_of_run(run_id)).labels
    return transform(root, labels, spec)
