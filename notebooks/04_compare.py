# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python (workbench)
#     language: python
#     name: workbench
# ---

# %% [markdown]
# # 04 · Compare models
#
# The held-out metrics of a pipeline's models side by side (or, run on its own, the latest run
# of each model in the task's MLflow experiment), with their confidence intervals, and their
# ROC, precision-recall and calibration curves overlaid on the same held-out patients.
# Overlapping intervals mean the held-out set cannot tell the models apart.

# %% tags=["parameters"]
task = "pbc_mortality"  # the MLflow experiment (one per task)
upstream = None  # the pipeline's train outputs (None: the latest run of each model in the experiment)
mlflow_run_id = None
output_dir = None

# %%
from IPython.display import Markdown, display

from workbench import tracking
from workbench.comparison import compare_runs

display(Markdown(tracking.store_description()))
comparison = compare_runs(task, upstream)
display(Markdown(comparison.markdown()))

# %% [markdown]
# ## Held-out AUROC with 95% CIs

# %% tags=["figure"]
display(comparison.figures["auroc_forest"])

# %% [markdown]
# ## Every model on the same patients
# ROC and precision-recall curves, and calibration: predicted risk against the observed rate.

# %% tags=["figure"]
display(comparison.figures["roc"], comparison.figures["pr"], comparison.figures["calibration"])

# %% [markdown]
# ## All metrics
# AUROC and AUPRC (higher is better), Brier score and ECE (lower is better).

# %% tags=["figure"]
display(comparison.figures["metrics"])

# %%
if output_dir:
    comparison.save(output_dir)
if mlflow_run_id:
    comparison.log(mlflow_run_id)
