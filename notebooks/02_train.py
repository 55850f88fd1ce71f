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
# # 02 · Train and evaluate one risk model
#
# `model` picks the architecture: a recurrent network (`lstm`, `gru`, `rnn`) over the patient's
# sequence, or one of the references every comparison shows: a logistic regression on the whole
# history (`logistic`: last value of every code with a missing flag, ever-present flags, age,
# sex; C chosen on tuning), gradient-boosted trees on windowed aggregates as MEDS-Tab builds them
# (`gbt`), and, for PBC, the published Mayo risk score (`mayo`, nothing fitted; skipped, with the
# reason, where its inputs do not exist). Sequence models stop early
# on the tuning split and keep their best epoch; every fitted model's risk is then recalibrated
# on the tuning split (`recalibration`), and the threshold rule is applied there too. Everything
# is evaluated once, on the held-out patients, with patient-level bootstrap CIs, and recorded in
# MLflow; every model is registered under the task's name and the one with the best **tuning**
# AUROC is `champion` (held-out numbers are only reported, never used to choose).
#
# Run on its own, the notebook trains on the cohort of `task`, `data` and `features`
# (built once, then reused from `runs/cohorts/`); in a pipeline it uses the cohort step's.
# Every other parameter is a field of `ModelConfig`, `TrainConfig` or `EvalConfig`, with the
# same name and default (their docstrings say what each does).

# %% tags=["parameters"]
model = "lstm"  # lstm | gru | rnn | logistic | gbt | mayo
task = "pbc_mortality"  # the cohort when none is handed over (see 01_cohort)
data = "pbc"
features = {}
units = 64  # ModelConfig
layers = 1
dropout = 0.0
recurrent_dropout = 0.0
bidirectional = False
head_units = 0
learning_rate = 0.001
epochs = 30  # TrainConfig
batch_size = 256
patience = 5
seed = 0  # TrainConfig.seed and EvalConfig.seed (bootstrap)
early_stopping_metric = "auroc"
class_weight = None
threshold = "youden"  # EvalConfig (a rule is applied on the tuning split)
recalibration = "platt"
n_bootstrap = 1000
ci = 0.95
n_calibration_bins = 10
calibration_strategy = "uniform"
age_bands = [0.0, 50.0, 65.0, 200.0]
cohort_dir = None  # a saved cohort (default: the pipeline's cohort step output)
upstream = None  # {step: [output dirs]} (the pipeline sets it)
output_dir = None
mlflow_run_id = None
mlflow_parent_run_id = None

# %%
from IPython.display import Markdown, display

from workbench import tracking
from workbench.cohort import handed_over
from workbench.experiment import run_model, save_model_run, threshold_markdown
from workbench.settings import EvalConfig, ModelConfig, TrainConfig

display(Markdown(tracking.store_description()))
cohort = handed_over(cohort_dir, upstream, task, data, features)
configs = dict(
    model_config=ModelConfig(units=units, layers=layers, dropout=dropout, recurrent_dropout=recurrent_dropout,
                             bidirectional=bidirectional, head_units=head_units, learning_rate=learning_rate),
    train_config=TrainConfig(epochs=epochs, batch_size=batch_size, patience=patience, seed=seed,
                             early_stopping_metric=early_stopping_metric, class_weight=class_weight, progress=False),
    eval_config=EvalConfig(threshold=threshold, recalibration=recalibration, n_bootstrap=n_bootstrap, ci=ci, seed=seed, n_calibration_bins=n_calibration_bins,
                           calibration_strategy=calibration_strategy, age_bands=age_bands),
)
result = run_model(model, cohort.tensors, task=cohort.task, cohort_report=cohort.report, data_root=cohort.data_root,
                   run_id=mlflow_run_id, parent_run_id=None if mlflow_run_id else mlflow_parent_run_id, **configs)
if output_dir:
    save_model_run(result, output_dir)
display(Markdown(result.summary()))

# %% [markdown]
# ## Held-out performance
# Point estimates with 95% confidence intervals from a bootstrap over patients (several
# prediction times of one patient are resampled together), overall and per subgroup.

# %%
display(Markdown(result.evaluation.to_markdown() if result.evaluation else "Nothing to evaluate."))

# %% [markdown]
# ## Operating points
# Sensitivity, specificity, PPV, NPV and the number of patients flagged per true case at fixed
# risk thresholds, and at the thresholds that reach a sensitivity on the tuning split (held fixed
# here, as a deployed rule would be). The decision curve below shows the net benefit of acting on
# the risk at every threshold, against treating everyone or no one.

# %%
display(Markdown(threshold_markdown(result.thresholds) if result.thresholds is not None else ""))

# %% [markdown]
# ## Curves
# ROC and precision-recall curves, the calibration plot (shaded: 95% CI of each bin's observed
# rate, bootstrap over patients) and the decision curve on the held-out patients; for
# sequence models also the loss per epoch and the tuning-split metrics that drive early
# stopping (the dashed line marks the epoch whose weights were kept).

# %% tags=["figure"]
display(*result.figures.values())
