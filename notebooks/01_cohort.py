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
# # 01 · Cohort: who is predicted, when, and what happened next
#
# A prediction task turns MEDS events into labels: one row per patient and prediction time,
# with the outcome observed in the horizon after it. Patients whose follow-up ends before the
# horizon without the outcome, or who reach a competing event first, are **excluded, not
# counted as negatives**. The cohort report below says how many prediction times each rule
# dropped, and how prevalent the outcome is in each split.
#
# The labels are then turned into sequence tensors: the last `n_steps` bins of `bin_width`
# before each prediction time, using only events at or before it. Normalization statistics
# come from the train split alone.

# %% tags=["parameters"]
task = "pbc_mortality"  # a shipped task name or a task YAML path
data = "pbc"  # a bundled dataset name or a MEDS directory
bin_width = "90d"  # FeatureConfig.bin_width
n_steps = 16  # FeatureConfig.n_steps
numeric_aggs = ["last"]  # FeatureConfig.numeric_aggs
add_missing_indicators = False  # FeatureConfig.add_missing_indicators
add_time_since_last = False  # FeatureConfig.add_time_since_last
output_dir = None  # where the cohort is saved (the pipeline sets it)
mlflow_run_id = None  # the MLflow run to log to (the pipeline sets it)

# %%
import mlflow
from IPython.display import Markdown, display

from workbench import tracking
from workbench.data.meds_io import open_dataset
from workbench.experiment import prepare_cohort
from workbench.features import FeatureConfig, split_counts
from workbench.plots import patient_timelines_plot

features = FeatureConfig(
    bin_width=bin_width, n_steps=n_steps, numeric_aggs=numeric_aggs,
    add_missing_indicators=add_missing_indicators, add_time_since_last=add_time_since_last,
)
cohort = prepare_cohort(task, data, features)
cohort.report

# %% [markdown]
# ## A few patients' histories
# Every mark is an event; the rows are patients with at least one positive label.

# %%
positives = cohort.labels.filter(cohort.labels["boolean_value"])["subject_id"].unique().sort().head(4).to_list()
negatives = cohort.labels.filter(~cohort.labels["boolean_value"])["subject_id"].unique().sort().head(2).to_list()
events = open_dataset(cohort.data_root).events().collect()
patient_timelines_plot(events, positives + negatives, title="Event timelines (first 4 with a positive label, 2 without)")

# %% [markdown]
# ## Sequence tensors

# %%
X = cohort.tensors.X
display(Markdown(
    f"**{X.shape[0]:,} samples × {X.shape[1]} steps × {X.shape[2]} features**; "
    f"samples per split: {split_counts(cohort.tensors.split)}; features: `{', '.join(cohort.tensors.feature_names)}`"
))

# %%
if output_dir:
    cohort.save(output_dir)
if mlflow_run_id:
    tracking.setup()
    with mlflow.start_run(run_id=mlflow_run_id):
        mlflow.log_metrics(cohort.report.to_metrics())
        mlflow.log_dict(cohort.report.to_dict(), "cohort/report.json")
        mlflow.log_text(cohort.report.to_markdown(), "cohort/report.md")
