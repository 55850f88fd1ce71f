"""Model comparison: the held-out metrics of several model runs side by side, and their curves overlaid.

What ``notebooks/04_compare`` and the end of ``workbench demo`` show. Which runs: a pipeline's
train outputs (cached ones included), else the latest run of each model kind in the task's
experiment. Every model was evaluated on the same held-out patients, so their ROC,
precision-recall and calibration curves can share one plot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import polars as pl

from workbench import record, tracking
from workbench.errors import WorkbenchError
from workbench.files import write_text_atomic

METRICS = ("auroc", "auprc", "brier", "ece")


@dataclass
class Comparison:
    """The compared runs (a ``tracking.runs_table``), the models that were skipped, the verdict of the
    best sequence model against the best reference, and the plots."""

    task: str
    table: pl.DataFrame
    skipped: dict[str, str]  # model kind -> why it was not fitted
    figures: dict
    verdict: dict | None = None  # see sequence_vs_reference

    def markdown(self) -> str:
        lines = tracking.runs_markdown(self.table, METRICS)
        for kind, reason in self.skipped.items():
            lines += f"\n`{kind}` was not fitted: {reason}.\n"
        if self.verdict:
            lines += f"\n**{self.verdict['sentence']}**\n"
        return lines

    def write_champion_report(self) -> str:
        """The champion's model report (Markdown + HTML) into its run, linked from its version; the run id."""
        from workbench.report import log_champion_report

        return log_champion_report(self.task, self)

    def save(self, directory) -> None:
        write_text_atomic(Path(directory) / record.COMPARISON_FILE, self.table.write_csv())

    def log(self, run_id: str) -> None:
        """The table and the plots as artifacts of ``run_id`` (a pipeline's compare step)."""
        with mlflow.start_run(run_id=run_id):
            mlflow.log_text(self.table.write_csv(), f"{record.COMPARISON_DIR}/models.csv")
            if self.verdict:
                mlflow.log_dict(self.verdict, f"{record.COMPARISON_DIR}/sequence_vs_reference.json")
                mlflow.log_metric("auroc_difference_sequence_vs_reference", self.verdict["value"])
            tracking.log_figures(self.figures, record.COMPARISON_DIR)


def train_run_ids(upstream: dict | None) -> tuple[list[str], dict[str, str]] | None:
    """The model runs a pipeline's train step handed over, and the kinds it skipped (with why)."""
    outputs = record.upstream_train(upstream)
    if not outputs:
        return None
    runs = record.handed_model_runs(outputs)
    return [r["run_id"] for r in runs if not r.get("skipped")], {r["kind"]: r["skipped"] for r in runs if r.get("skipped")}


def compare_runs(task: str, upstream: dict | None = None) -> Comparison:
    """Compare a pipeline's models (``upstream``), or the latest run of each model of ``task``."""
    from workbench.plots import (
        auroc_forest_plot,
        calibration_plot,
        decision_curve_plot,
        metric_comparison_plot,
        pr_curve_plot,
        roc_curve_plot,
    )
    from workbench.tasks import task_name

    tracking.setup()
    name = task_name(task)
    handed = train_run_ids(upstream)
    if handed is None:
        table, skipped = tracking.runs_table(name, latest_per_model=True), {}
    else:
        table, skipped = tracking.runs_table(name, run_ids=handed[0]), handed[1]
    if table.height == 0:
        raise WorkbenchError(f"experiment {name!r} at {tracking.tracking_uri()} has no evaluated model run to compare")
    predictions = tracking.held_out_predictions(table)
    curves = {m: (f["label"].to_numpy(), f["risk"].to_numpy()) for m, f in predictions.items()}
    figures = {
        "auroc_forest": auroc_forest_plot(table, title=f"{name}: held-out AUROC with 95% CIs"),
        "roc": roc_curve_plot(curves, title=f"{name}: ROC, held-out"),
        "pr": pr_curve_plot(curves, title=f"{name}: precision-recall, held-out"),
        "calibration": calibration_plot(curves, title=f"{name}: calibration, held-out"),
        "decision_curve": decision_curve_plot(curves, title=f"{name}: decision curve, held-out"),
        "metrics": metric_comparison_plot(table),
    }
    return Comparison(name, table, skipped, figures, sequence_vs_reference(table, predictions))


def sequence_vs_reference(table: pl.DataFrame, predictions: dict[str, pl.DataFrame]) -> dict | None:
    """Does the sequence model beat the best reference? Both are picked by **tuning** AUROC (the
    held-out split is not used to choose), then compared on held-out with a paired patient-level
    bootstrap of the AUROC difference."""
    from workbench.evaluation import EvalConfig, paired_auroc_difference
    from workbench.settings import SEQUENCE_KINDS

    ranked = table.filter(pl.col(record.TUNING_AUROC).is_not_null()).sort(record.TUNING_AUROC, descending=True)
    sequence = ranked.filter(pl.col("model").is_in(list(SEQUENCE_KINDS)))
    references = ranked.filter(~pl.col("model").is_in(list(SEQUENCE_KINDS)))
    if sequence.height == 0 or references.height == 0:
        return None
    a, b = sequence["model"][0], references["model"][0]
    joined = predictions[a].join(predictions[b], on=["subject_id", "prediction_time"], suffix="_b")
    diff = paired_auroc_difference(joined["label"], joined["risk"], joined["risk_b"], EvalConfig(), cluster=joined["subject_id"].to_numpy())
    ci = f"{diff['value']:+.3f} (95% CI {diff['ci_low']:+.3f} to {diff['ci_high']:+.3f})"
    if diff["ci_low"] > 0:
        outcome = f"{a} beats {b}"
    elif diff["ci_high"] < 0:
        outcome = f"{a} is worse than {b}"
    else:
        outcome = f"the held-out patients cannot tell {a} and {b} apart"
    sentence = (f"Best sequence model by tuning AUROC: {a}; best reference: {b}. Held-out AUROC difference "
                f"{a} - {b}: {ci}, paired bootstrap over {joined['subject_id'].n_unique()} patients: {outcome}.")
    return {"sequence": a, "reference": b, **diff, "sentence": sentence}
