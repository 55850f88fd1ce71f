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
# ROC, precision-recall, calibration and decision curves overlaid on the same held-out patients.
# Overlapping intervals mean the held-out set cannot tell the models apart; the verdict under the
# table compares the best sequence model with the best reference (both picked by tuning AUROC)
# with a paired bootstrap of the AUROC difference.

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
# ## Net benefit
# Acting on each model's risk at every threshold probability, against treating everyone or no one.

# %% tags=["figure"]
display(comparison.figures["decision_curve"])

# %% [markdown]
# ## All metrics
# AUROC and AUPRC (higher is better), Brier score and ECE (lower is better).

# %% tags=["figure"]
display(comparison.figures["metrics"])

# %% [markdown]
# ## The champion's model report
# Cohort, outcome, predictors, methods, discrimination and calibration with CIs, operating points,
# decision curve, the comparison above, explanation checks and limitations, in the order of the
# TRIPOD+AI checklist: logged to the champion's MLflow run and linked from its registered version.

# %%
report_run = comparison.write_champion_report()
display(Markdown(f"Model report: MLflow run `{report_run}`, artifact `report/model_report.html`."))

# %%
if output_dir:
    comparison.save(output_dir)
if mlflow_run_id:
    comparison.log(mlflow_run_id)
