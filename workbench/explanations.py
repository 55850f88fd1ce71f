"""Explanation runs: SHAP per time step for a logged sequence model, checked, plotted, logged to its run.

What ``notebooks/03_explain`` calls. The model is loaded back from its MLflow run (what was
logged is what is explained), the background comes from the train split only, and every
explanation run logs its checks with their verdicts as metrics and tags of the model's run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import polars as pl

from workbench import record, tracking
from workbench.errors import WorkbenchError
from workbench.experiment import best_sequence_run, model_run_tags, tensors_for_run
from workbench.settings import SEQUENCE_KINDS
from workbench.features import SequenceTensors
from workbench.files import write_parquet_atomic


def check_explainable(run_id: str) -> str:
    """The model kind of ``run_id``, a sequence model run; otherwise a WorkbenchError that says why
    (no such run, not a workbench model run, or a model without time steps to explain)."""
    kind = model_run_tags(run_id).get(record.MODEL_TAG)
    if kind not in SEQUENCE_KINDS:
        raise WorkbenchError(f"run {run_id} is a {kind or 'unknown'!r} model run: SHAP per time step needs a sequence "
                             f"model run ({', '.join(SEQUENCE_KINDS)}); a {kind or 'non-sequence'} model has no "
                             "time steps to explain")
    return kind


def sequence_network(run_id: str, horizon_days: float | None = None):
    """The Keras network a sequence model run logged (inside its pyfunc), for SHAP, and which output
    SHAP then explains: the calibrated risk the model reports (a Platt map is folded into the
    network's last layer), or, with an isotonic map, the network's risk before that map. A
    survival model's network is explained through its risk by ``horizon_days`` (default
    :data:`workbench.survival.DEFAULT_EXPLAIN_HORIZON_DAYS`; its calibration is folded in too)."""
    from workbench.serving import KerasPredictor, load_risk_model

    check_explainable(run_id)
    model = load_risk_model(f"runs:/{run_id}/{record.MODEL_PATH}")
    if model.horizons_days is not None:
        from workbench.survival import DEFAULT_EXPLAIN_HORIZON_DAYS, HazardCurves, HorizonRisk

        if not isinstance(model.predictor, HazardCurves):
            raise WorkbenchError(f"run {run_id}: its survival model holds no hazard network")
        days = float(horizon_days or DEFAULT_EXPLAIN_HORIZON_DAYS)
        network = HorizonRisk(model.predictor.model, model.predictor.grid, days)
        return network, (f"the risk of the outcome by {days:g} days ({days / 365.25:.1f} years) after the prediction "
                         "time (calibrated hazard network: the calibration is folded into its last layer)")
    if horizon_days is not None:
        raise WorkbenchError(f"run {run_id} is a binary model run: it has one horizon, so horizon_days does not apply")
    if not isinstance(model.predictor, KerasPredictor):
        raise WorkbenchError(f"run {run_id}: its model holds no Keras network")
    recal = model.recalibration
    if recal.folded or recal.method == "none":
        output = "the risk the model reports" + (" (calibrated: Platt map folded into the last layer)" if recal.folded else "")
    else:
        output = f"the network's risk before its {recal.method} recalibration (SHAP needs gradients; the map is a step function)"
    return model.predictor.network, output


@dataclass
class ExplanationRun:
    """What an explanation run produced (all of it also logged to the model's MLflow run)."""

    run_id: str
    frame: pl.DataFrame  # the long explanations table (docs/architecture.md)
    by_step: pl.DataFrame  # mean |SHAP| by steps before the prediction time
    by_feature: pl.DataFrame  # mean |SHAP| by feature
    checks: dict  # additivity, reference agreement, deletion test (metrics)
    verdicts: pl.DataFrame  # one row per check: value, threshold, PASS / WARN
    figures: dict
    explained_output: str = "the risk the model reports"

    def summary(self) -> str:
        """One Markdown line: which run, how many patients and times, the overall verdict."""
        failing = self.verdicts.filter(pl.col("verdict") != "PASS")["check"].to_list()
        verdict = "every check PASS" if not failing else f"**WARN** on {', '.join(failing)}"
        return (f"Explained MLflow run `{self.run_id}`: {self.frame['subject_id'].n_unique()} patients, "
                f"{self.frame.select('subject_id', 'prediction_time').n_unique()} prediction times; SHAP explains "
                f"{self.explained_output}; {verdict}.")

    def checks_markdown(self) -> str:
        """The checks as a table: what each measures, its value, threshold and verdict."""
        lines = ["| check | value | threshold | verdict | what it means |", "|---|---|---|---|---|"]
        for row in self.verdicts.iter_rows(named=True):
            verdict = "PASS" if row["verdict"] == "PASS" else f"**{row['verdict']}**"
            lines.append(f"| {row['check']} | {row['value']:.3g} | {row['threshold']} | {verdict} | {row['meaning']} |")
        return "\n".join(lines)

    def save(self, directory) -> None:
        """The long explanations table and the verdicts, for downstream steps."""
        write_parquet_atomic(self.frame, Path(directory) / record.EXPLANATIONS_FILE)
        write_parquet_atomic(self.verdicts, Path(directory) / record.CHECKS_FILE)


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


def explain_run(run_id: str, tensors: SequenceTensors | None = None, config=None, subjects=None, max_samples: int | None = None,
                n_patients: int = 3, horizon_days: float | None = None) -> ExplanationRun:
    """Explain a logged model on held-out samples and log explanations, checks and plots to its run.

    The model is loaded back from the run (what was logged is what is explained); the
    background comes from the train split only. ``tensors`` default to the run's own, rebuilt
    from its task and dataset with its saved FeatureSpec. A survival model is explained through its
    risk by ``horizon_days`` (see :func:`sequence_network`).
    """
    from workbench.explain import (
        ExplainConfig,
        check_explanation,
        check_verdicts,
        explain,
        explanation_frame,
        select_background,
        verdict_tags,
    )

    config = config or ExplainConfig()
    model, explained_output = sequence_network(run_id, horizon_days)
    tensors = tensors if tensors is not None else tensors_for_run(run_id)
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
    verdicts = check_verdicts(checks, config)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"explain_{k}": float(v) for k, v in checks.items()})
        mlflow.set_tags({**verdict_tags(verdicts), record.EXPLAIN_OUTPUT_TAG: explained_output[:250]})
        mlflow.log_text(verdicts.write_csv(), f"{record.EXPLANATIONS_DIR}/checks.csv")
        # An artifact, not params: a model may be explained again with other settings (params are write-once).
        mlflow.log_dict(config.model_dump(mode="json"), f"{record.EXPLANATIONS_DIR}/config.json")
        tracking.log_frame(frame, f"{record.EXPLANATIONS_DIR}/{record.EXPLANATIONS_FILE}")
        mlflow.log_text(by_step.write_csv(), f"{record.EXPLANATIONS_DIR}/by_step.csv")
        mlflow.log_text(by_feature.write_csv(), f"{record.EXPLANATIONS_DIR}/by_feature.csv")
        tracking.log_figures(figs)
    return ExplanationRun(run_id, frame, by_step, by_feature, checks, verdicts, figs, explained_output)




def choose_run_to_explain(run_id: str | None, upstream: dict | None, task: str) -> str:
    """The run a given id names; else the sweep's best sequence model by tuning AUROC (a pipeline's
    ``upstream["train"]``); else the task's registered sequence model with the best tuning AUROC
    (the champion itself when it is a sequence model: a reference has no time steps to explain)."""
    if run_id:
        check_explainable(run_id)  # before any tensors are rebuilt for it
        return run_id
    if record.upstream_train(upstream):
        return best_sequence_run(record.upstream_train(upstream))["run_id"]
    from mlflow.tracking import MlflowClient

    from workbench.tasks import task_name

    tracking.setup()
    name = task_name(task)
    try:
        best = tracking.best_version(MlflowClient(), name, kinds=SEQUENCE_KINDS)
    except mlflow.exceptions.MlflowException:
        best = None
    if best is None:
        raise WorkbenchError(f"no registered sequence model for task {name!r} at {tracking.tracking_uri()}: "
                             "train one first (notebooks/02_train or workbench run)")
    return best.run_id
