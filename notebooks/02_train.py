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
# # 02 · Train and evaluate one risk model
#
# `model` picks the architecture: a recurrent network (`lstm`, `gru`, `rnn`) over the patient's
# sequence, or one of the two references every comparison shows: logistic regression on the
# most recent values (`logistic`) and, for PBC, the published Mayo risk score (`mayo`, nothing
# fitted). Sequence models stop early on the tuning split and keep their best epoch.
# Everything is evaluated once, on the held-out patients, with patient-level bootstrap CIs,
# and recorded in MLflow; sequence models are registered and the best becomes `champion`.

# %% tags=["parameters"]
model = "lstm"  # lstm | gru | rnn | logistic | mayo
units = 64  # ModelConfig.units
layers = 1  # ModelConfig.layers
dropout = 0.0  # ModelConfig.dropout
recurrent_dropout = 0.0  # ModelConfig.recurrent_dropout
bidirectional = False  # ModelConfig.bidirectional
learning_rate = 0.001  # ModelConfig.learning_rate
epochs = 30  # TrainConfig.epochs
batch_size = 64  # TrainConfig.batch_size
patience = 5  # TrainConfig.patience
seed = 0  # TrainConfig.seed
early_stopping_metric = "auroc"  # TrainConfig.early_stopping_metric
threshold = 0.5  # EvalConfig.threshold
n_bootstrap = 1000  # EvalConfig.n_bootstrap
cohort_dir = None  # a saved cohort (defaults to the pipeline's cohort step output)
upstream = None  # {step: [output dirs]} (the pipeline sets it)
output_dir = None
mlflow_run_id = None
mlflow_parent_run_id = None

# %%
from IPython.display import Markdown, display

from workbench.evaluation import EvalConfig
from workbench.experiment import load_cohort, run_model, save_model_run
from workbench.models import ModelConfig
from workbench.plots import calibration_plot, pr_curve_plot, roc_curve_plot, training_curves_plot
from workbench.training import TrainConfig

cohort = load_cohort(cohort_dir or upstream["cohort"][0])
configs = dict(
    model_config=ModelConfig(units=units, layers=layers, dropout=dropout, recurrent_dropout=recurrent_dropout,
                             bidirectional=bidirectional, learning_rate=learning_rate),
    train_config=TrainConfig(epochs=epochs, batch_size=batch_size, patience=patience, seed=seed,
                             early_stopping_metric=early_stopping_metric),
    eval_config=EvalConfig(threshold=threshold, n_bootstrap=n_bootstrap),
)
result = run_model(model, cohort.tensors, task=cohort.task, cohort_report=cohort.report, data_root=cohort.data_root,
                   run_id=mlflow_run_id, parent_run_id=None if mlflow_run_id else mlflow_parent_run_id, **configs)
if output_dir:
    save_model_run(result, output_dir)

# %% [markdown]
# ## Training curves
# Loss per epoch and the tuning-split metrics that drive early stopping; the dashed line marks
# the epoch whose weights were kept.

# %%
if result.fitted.history:
    display(training_curves_plot(result.fitted.history, best_epoch=result.fitted.best_epoch))
else:
    display(Markdown(f"`{model}` is not trained by epochs."))

# %% [markdown]
# ## Held-out performance
# Point estimates with 95% confidence intervals from a bootstrap over patients (several
# prediction times of one patient are resampled together), overall and per subgroup.

# %%
display(Markdown(result.evaluation.to_markdown()))
held_out = cohort.tensors.by_split("held_out")
curves = {model: (held_out.y, result.risk)}
display(roc_curve_plot(curves), pr_curve_plot(curves), calibration_plot(curves))

# %%
display(Markdown(f"MLflow run `{result.run_id}`; registry: `{result.registry}`"))
