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
# # 01 · Cohort: who is predicted, when, and what happened next
#
# A prediction task turns MEDS events into labels: one row per patient and prediction time,
# with the outcome observed in the horizon after it. Patients whose follow-up ends before the
# horizon without the outcome, or who reach a competing event first, are **excluded, not
# counted as negatives**. The cohort report below says how many prediction times each rule
# dropped, and how prevalent the outcome is in each split. Labels made elsewhere (ACES, SQL)
# come in as the task itself: a parquet of `subject_id, prediction_time, boolean_value`, whose
# file name names the task.
#
# The labels are then turned into sequence tensors: the last `n_steps` bins of `bin_width`
# before each prediction time, using only events at or before it. Normalization statistics
# come from the train split alone. Run on its own, this notebook builds the cohort once and
# caches it under `runs/cohorts/`, where `02_train` finds it.

# %% tags=["parameters"]
task = "pbc_mortality"  # a shipped task name, a task YAML path, or a labels parquet made elsewhere
data = "pbc"  # a bundled dataset name or a MEDS directory
features = {}  # FeatureConfig fields on top of the task's own `features`, e.g. {"n_steps": 8, "bin_width": "30d"}
output_dir = None  # where the cohort is saved (the pipeline sets it)
mlflow_run_id = None  # the MLflow run to log to (the pipeline sets it)

# %%
from IPython.display import Markdown, display

from workbench import tracking
from workbench.cohort import cached_cohort, prepare_cohort, settings_markdown

display(Markdown(tracking.store_description()))
cohort = (prepare_cohort if output_dir else cached_cohort)(task, data, features)
cohort.report

# %% [markdown]
# ## Feature settings
# Each setting of the tensorization, and whether it is the default, the task's choice or a parameter.

# %%
display(Markdown(settings_markdown(cohort.task, features)))

# %% [markdown]
# ## A few patients' histories
# Every mark is an event; the rows are patients with at least one positive label.

# %% tags=["figure"]
display(cohort.timelines_figure())

# %% [markdown]
# ## Sequence tensors

# %%
display(Markdown(cohort.tensors_markdown()))

# %%
if output_dir:
    cohort.save(output_dir)
if mlflow_run_id:
    tracking.log_cohort(mlflow_run_id, cohort)
