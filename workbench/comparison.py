"""Model comparison: the held-out metrics of several model runs side by side, and their curves overlaid.

What ``notebooks/04_compare`` and the end of ``workbench demo`` show. Which runs: a pipeline's
train outputs (cached ones included), else the latest run of each model kind in the task's
experiment. Every model was evaluated on the same held-out patients, so their ROC,
precision-recall and calibration curves can share one plot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import polars as pl

from workbench import tracking
from workbench.errors import WorkbenchError
from workbench.files import write_text_atomic

METRICS = ("auroc", "auprc", "brier", "ece")


@dataclass
class Comparison:
    """The compared runs (a ``tracking.runs_table``), the models that were skipped, and the plots."""

    task: str
    table: pl.DataFrame
    skipped: dict[str, str]  # model kind -> why it was not fitted
    figures: dict

    def markdown(self) -> str:
        lines = tracking.runs_markdown(self.table, METRICS)
        for kind, reason in self.skipped.items():
            lines += f"\n`{kind}` was not fitted: {reason}.\n"
        return lines

    def save(self, directory) -> None:
        write_text_atomic(Path(directory) / "comparison.csv", self.table.write_csv())

    def log(self, run_id: str) -> None:
        """The table and the plots as artifacts of ``run_id`` (a pipeline's compare step)."""
        with mlflow.start_run(run_id=run_id):
            mlflow.log_text(self.table.write_csv(), "comparison/models.csv")
            tracking.log_figures(self.figures, "comparison")


def train_run_ids(upstream: dict | None) -> tuple[list[str], dict[str, str]] | None:
    """The model runs a pipeline's train step handed over, and the kinds it skipped (with why)."""
    from workbench.experiment import MODEL_RUN_FILE

    if not upstream or not upstream.get("train"):
        return None
    files = [Path(d) / MODEL_RUN_FILE for d in upstream["train"]]
    runs = [json.loads(f.read_text()) for f in files if f.is_file()]
    return [r["run_id"] for r in runs if not r.get("skipped")], {r["kind"]: r["skipped"] for r in runs if r.get("skipped")}


def compare_runs(task: str, upstream: dict | None = None) -> Comparison:
    """Compare a pipeline's models (``upstream``), or the latest run of each model of ``task``."""
    from workbench.plots import auroc_forest_plot, calibration_plot, metric_comparison_plot, pr_curve_plot, roc_curve_plot
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
    curves = tracking.held_out_predictions(table)
    figures = {
        "auroc_forest": auroc_forest_plot(table, title=f"{name}: held-out AUROC with 95% CIs"),
        "roc": roc_curve_plot(curves, title=f"{name}: ROC, held-out"),
        "pr": pr_curve_plot(curves, title=f"{name}: precision-recall, held-out"),
        "calibration": calibration_plot(curves, title=f"{name}: calibration, held-out"),
        "metrics": metric_comparison_plot(table),
    }
    return Comparison(name, table, skipped, figures)
