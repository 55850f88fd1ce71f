# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: workbench
#     language: python
#     name: workbench
# ---

# %% [markdown]
# # 04 · Compare models
#
# Pulls every model run of the task's MLflow experiment (or of one pipeline run) and lays the
# held-out metrics side by side, with their confidence intervals. Overlapping intervals mean
# the held-out set cannot tell the models apart.

# %% tags=["parameters"]
task = "pbc_mortality"  # the MLflow experiment (one per task)
mlflow_parent_run_id = None  # only this pipeline run's models (None: every run of the task)
mlflow_run_id = None
output_dir = None

# %%
import mlflow
from IPython.display import Markdown, display

from workbench import tracking
from workbench.plots import metric_comparison_plot

tracking.setup()
table = tracking.runs_table(task, parent_run_id=mlflow_parent_run_id)
display(Markdown(tracking.runs_markdown(table)))

# %%
figure = metric_comparison_plot(table)
figure

# %%
if output_dir:
    from pathlib import Path

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    table.write_csv(Path(output_dir) / "comparison.csv")
if mlflow_run_id:
    with mlflow.start_run(run_id=mlflow_run_id):
        mlflow.log_text(table.write_csv(), "comparison/models.csv")
        mlflow.log_figure(figure, "comparison/metrics.png")
