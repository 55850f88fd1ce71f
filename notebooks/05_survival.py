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
# # 05 · Train and evaluate one survival model: a risk curve at every visit
#
# For a survival task (`kind: survival`: every prediction time labelled with the days to the
# first event or censoring and the event type), `model` picks a recurrent encoder (`lstm`, `gru`,
# `rnn`) with a **discrete-time hazard head**: the risk of the outcome in each interval of
# `interval_days` up to the task's maximum horizon, a softmax per interval over "no event", the
# outcome and (when the task names one) the competing event. It is trained with the
# censoring-aware likelihood, so visits whose follow-up ends early are used for the years they
# were followed instead of being thrown away, early-stopped and calibrated on the tuning split.
# The references: a **landmark Cox** model on the last values at each visit (`cox`, penalty chosen
# on tuning) and the **published Mayo survival function** (`mayo`, nothing fitted).
#
# Everything is evaluated once, on the held-out patients, at each of `horizons_years`:
# time-dependent AUC, Uno's and Harrell's concordance, the integrated Brier score (censoring
# weighted by the train split's censoring distribution) and calibration against the observed
# (Aalen-Johansen) risk by decile of predicted risk, with 95% CIs from a bootstrap over
# patients. Every model is registered under the task's name; the pyfunc returns one risk column
# per horizon. The champion has the best **tuning** time-dependent AUC at 2 years.

# %% tags=["parameters"]
model = "lstm"  # lstm | gru | rnn | cox | mayo
task = "pbc_survival"  # the cohort when none is handed over (see 01_cohort)
data = "pbc"
features = {}
horizons_years = [1, 2, 3, 4, 5]
interval_days = 91.3125  # width of one hazard interval (a quarter of a year)
units = 64  # ModelConfig
layers = 1
dropout = 0.0
head_units = 0
learning_rate = 0.001
epochs = 30  # TrainConfig
batch_size = 256
patience = 5
seed = 0
n_bootstrap = 200
cohort_dir = None  # a saved cohort (default: the pipeline's cohort step output)
upstream = None  # {step: [output dirs]} (the pipeline sets it)
output_dir = None
mlflow_run_id = None
mlflow_parent_run_id = None

# %%
from IPython.display import Markdown, display

from workbench import tracking
from workbench.cohort import handed_over
from workbench.settings import ModelConfig, TrainConfig
from workbench.survival_run import run_survival_model, save_survival_run, survival_data

display(Markdown(tracking.store_description()))
cohort = handed_over(cohort_dir, upstream, task, data, features)
result = run_survival_model(
    model, survival_data(cohort.task, cohort.labels, cohort.tensors), task=cohort.task, horizons_years=horizons_years,
    model_config=ModelConfig(units=units, layers=layers, dropout=dropout, head_units=head_units, learning_rate=learning_rate),
    train_config=TrainConfig(epochs=epochs, batch_size=batch_size, patience=patience, seed=seed, progress=False),
    interval_days=interval_days, n_bootstrap=n_bootstrap, cohort_report=cohort.report, data_root=cohort.data_root,
    run_id=mlflow_run_id, parent_run_id=None if mlflow_run_id else mlflow_parent_run_id)
if output_dir:
    save_survival_run(result, output_dir)
display(Markdown(result.summary()))

# %% [markdown]
# ## Held-out performance at each horizon
# Point estimates with 95% confidence intervals (bootstrap over patients: all visits of a patient
# are resampled together).

# %%
display(Markdown(result.evaluation.to_markdown() if result.evaluation else "Nothing to evaluate."))

# %% [markdown]
# ## Calibration and curves
# Predicted against observed risk by decile of predicted risk at each horizon (bars: 95% CI of
# the observed risk), the observed cumulative incidence against the mean predicted curve, and,
# for networks, the loss per epoch (the dashed line marks the epoch whose weights were kept).

# %% tags=["figure"]
display(*result.figures.values())
