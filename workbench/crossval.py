"""Subject-level cross-validation: calibration judged on every patient, not one lucky or unlucky split.

A single held-out split of a small cohort can differ from the tuning split by chance (PBC: 62
held-out patients), and then no model fitted without peeking is calibrated-in-the-large there.
:func:`cross_validate` splits the labelled subjects into ``folds`` folds (stratified by whether a
subject has any positive label). For fold k: fold k is held out, fold k+1 is the tuning split,
the rest is train; the FeatureSpec (codes, statistics), the model, its early stopping, the
recalibration map and every choice are fitted on that fold's train / tuning only, exactly as in a
model run. The out-of-fold risks of all folds are then pooled and evaluated once, with a
bootstrap over patients: discrimination, ECE, calibration slope and intercept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import polars as pl

from workbench import record, tracking
from workbench.errors import WorkbenchError
from workbench.evaluation import EvaluationResult, evaluate, format_with_ci
from workbench.settings import MODEL_KINDS, EvalConfig, ModelConfig, TrainConfig

CV_PREFIX = "cv_"  # metric prefix of a cross-validation run (pooled out-of-fold)


def fold_of_subjects(labels: pl.DataFrame, folds: int, seed: int = 0) -> pl.DataFrame:
    """``subject_id, fold``: subjects shuffled by ``seed`` within strata (any positive label or
    not) and dealt round-robin, so every fold holds about the same share of positive subjects."""
    per_subject = labels.group_by("subject_id").agg(pl.col("boolean_value").any().alias("positive")).sort("subject_id")
    if per_subject.height < 2 * folds:
        raise WorkbenchError(f"{per_subject.height} labelled subjects are too few for {folds}-fold cross-validation")
    rng = np.random.default_rng(seed)
    parts = []
    for positive in (True, False):
        ids = per_subject.filter(pl.col("positive") == positive)["subject_id"].to_numpy()
        ids = ids[rng.permutation(len(ids))]
        parts.append(pl.DataFrame({"subject_id": ids, "fold": np.arange(len(ids)) % folds}))
    # the negatives continue the deal where the positives stopped, so fold sizes stay within one
    first = parts[0].height % folds
    parts[1] = parts[1].with_columns(((pl.col("fold") + first) % folds).alias("fold"))
    return pl.concat(parts).sort("subject_id")


def fold_splits(folds_of: pl.DataFrame, k: int, folds: int) -> pl.DataFrame:
    """``subject_id, split`` of fold ``k``: held out k, tune on k + 1, train on the rest."""
    split = (pl.when(pl.col("fold") == k).then(pl.lit("held_out"))
             .when(pl.col("fold") == (k + 1) % folds).then(pl.lit("tuning")).otherwise(pl.lit("train")))
    return folds_of.select("subject_id", split.alias("split"))


@dataclass
class CrossValidation:
    """Pooled out-of-fold predictions and their evaluation, per model kind."""

    task: str
    folds: int
    predictions: dict[str, pl.DataFrame]  # kind -> subject_id, prediction_time, fold, label, risk
    evaluations: dict[str, EvaluationResult]
    run_ids: dict[str, str] = field(default_factory=dict)

    def markdown(self, metrics=("auroc", "auprc", "brier", "ece", "calibration_slope", "calibration_intercept")) -> str:
        names = {"calibration_slope": "slope", "calibration_intercept": "intercept"}
        header = "| model | " + " | ".join(names.get(m, m.upper()) for m in metrics) + " |"
        lines = [header, "|---|" + "---|" * len(metrics)]
        for kind, result in sorted(self.evaluations.items(), key=lambda kv: -kv[1].metrics["auroc"]["value"]):
            lines.append(f"| {kind} | " + " | ".join(format_with_ci(result.metrics[m], 3) for m in metrics) + " |")
        return "\n".join(lines)


def cross_validate(
    task,
    data,
    kinds=("lstm", "gru", "logistic"),
    folds: int = 5,
    features: dict | None = None,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    eval_config: EvalConfig | None = None,
    seed: int = 0,
    log: bool = True,
    progress=None,
) -> CrossValidation:
    """``folds``-fold subject-level cross-validation of each model kind (see the module docstring).

    Each kind's pooled result is logged (``log``) as one MLflow run of the task's experiment, tagged
    ``workbench.evaluation=cross-validation``, with ``cv_<metric>`` metrics and the out-of-fold
    predictions; nothing is registered.
    """
    from workbench.cohort import feature_config
    from workbench.data.datasets import resolve
    from workbench.data.validate import require_valid_cached
    from workbench.experiment import fit_model, horizon_days, inputs, not_applicable, recalibrate
    from workbench.features import fit_transform
    from workbench.tasks import load_task, make_labels

    unknown = [k for k in kinds if k not in MODEL_KINDS]
    if unknown:
        raise WorkbenchError(f"unknown model kind(s) {unknown}; expected some of {', '.join(MODEL_KINDS)}")
    if folds < 3:
        raise WorkbenchError(f"folds must be at least 3 (one held out, one for tuning, the rest to train), got {folds}")
    eval_config = eval_config or EvalConfig()
    train_config = (train_config or TrainConfig()).model_copy(update={"progress": False})
    root = resolve(data)
    require_valid_cached(root)
    spec = load_task(task)
    labels = make_labels(root, spec).labels
    config = feature_config(spec, features)
    assignment = fold_of_subjects(labels, folds, seed)
    parts: dict[str, list[pl.DataFrame]] = {k: [] for k in kinds}
    skipped: dict[str, str] = {}
    for k in range(folds):
        _, tensors = fit_transform(root, labels, config, splits=fold_splits(assignment, k, folds))
        for kind in kinds:
            if progress is not None:
                progress(f"fold {k + 1}/{folds}: {kind}")
            reason = not_applicable(kind, tensors, spec)
            if reason:
                skipped[kind] = reason
                continue
            years = round(horizon_days(spec) / 365.25) if kind == "mayo" else 2
            fitted = fit_model(kind, tensors, model_config, train_config, mayo_horizon_years=years, data_root=str(root),
                               seed=train_config.seed)
            recalibrate(fitted, tensors, eval_config.recalibration if kind != "mayo" else "none")
            held = tensors.by_split("held_out")
            parts[kind].append(pl.DataFrame({
                "subject_id": held.subject_id, "prediction_time": held.prediction_time, "fold": k,
                "label": held.y, "risk": np.asarray(fitted.predict(inputs(fitted, tensors, "held_out")), dtype=np.float64),
            }))
    predictions = {kind: pl.concat(frames) for kind, frames in parts.items() if frames}
    # The pooled evaluation: the threshold rule needs a tuning split there is not, so a fixed 0.5 is
    # not assumed either; threshold metrics use the pooled prevalence (reported for completeness).
    pooled = eval_config.model_copy(update={"threshold": "prevalence"})
    evaluations = {kind: evaluate(f["label"].to_numpy(), f["risk"].to_numpy(), pooled, cluster=f["subject_id"].to_numpy())
                   for kind, f in predictions.items()}
    result = CrossValidation(spec.name, folds, predictions, evaluations)
    if log:
        result.run_ids = _log(result, spec, str(root), config, model_config, train_config, eval_config, seed, skipped)
    return result


def _log(result: CrossValidation, spec, root: str, config, model_config, train_config, eval_config, seed, skipped) -> dict:
    from workbench.plots import calibration_plot, decision_curve_plot, roc_curve_plot

    tracking.setup()
    run_ids = {}
    experiment = tracking.experiment_id(spec.name)
    for kind, evaluation in result.evaluations.items():
        frame = result.predictions[kind]
        tags = {record.TASK_TAG: spec.name, record.CV_MODEL_TAG: kind, record.EVALUATION_TAG: "cross-validation",
                record.DATA_ROOT_TAG: root, "mlflow.source.git.commit": tracking.git_commit()}
        with mlflow.start_run(experiment_id=experiment, run_name=f"cv{result.folds} {kind}", tags=tags) as run:
            configs = {"features": config, "eval": eval_config, "train": train_config, "model": model_config or ModelConfig()}
            mlflow.log_params({f"config.{k}": v for k, v in tracking.flatten_params(configs).items()})
            mlflow.log_params({"folds": result.folds, "fold_seed": seed, "model_kind": kind})
            mlflow.log_metrics(evaluation.to_flat_dict(prefix=CV_PREFIX))
            mlflow.log_dict(spec.model_dump(mode="json"), record.TASK_ARTIFACT)
            tracking.log_frame(frame, record.CV_PREDICTIONS_ARTIFACT)
            curves = {kind: (frame["label"].to_numpy(), frame["risk"].to_numpy())}
            tracking.log_figures({
                "cv_roc": roc_curve_plot(curves, title=f"{kind}: ROC, pooled out-of-fold"),
                "cv_calibration": calibration_plot(curves, bands={kind: evaluation.calibration},
                                                   title=f"{kind}: calibration, pooled out-of-fold"),
                "cv_decision_curve": decision_curve_plot(curves, title=f"{kind}: decision curve, pooled out-of-fold"),
            })
            mlflow.log_text(evaluation.to_markdown(), str(Path(record.CV_PREDICTIONS_ARTIFACT).with_name("evaluation.md")))
            run_ids[kind] = run.info.run_id
    for kind, reason in skipped.items():
        with mlflow.start_run(experiment_id=experiment, run_name=f"cv{result.folds} {kind}",
                              tags={record.TASK_TAG: spec.name, record.CV_MODEL_TAG: kind, record.SKIPPED_TAG: reason,
                                    record.EVALUATION_TAG: "cross-validation"}) as run:
            run_ids[kind] = run.info.run_id
    return run_ids
