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
# # 03 · Explain: which moments of a patient's history drove the risk
#
# SHAP values per time step and feature (expected gradients against a background of train
# patients) for one sequence model on its held-out patients: by default the best sequence
# model of the pipeline's sweep (by tuning AUROC), or, run on its own, the task's registered
# sequence model with the best tuning AUROC (the `champion` when it is one). SHAP explains the risk the model reports: the calibrated probability (the Platt
# recalibration is folded into the network's last layer, so explaining the network explains the
# calibrated risk); with `isotonic` recalibration, a step function with no gradient, it explains
# the network's risk before that map (the summary line says which). Padded steps (before a
# patient's history starts) get no attribution. Every
# explanation is checked, each check with its threshold and a PASS / WARN verdict:
# **additivity** (attributions sum to risk minus base value), agreement with an **exact
# per-step Shapley reference** on a sample of patients, and a **deletion test** (removing the
# top-ranked steps must move the risk more than removing random ones).

# %% tags=["parameters"]
task = "pbc_mortality"  # whose best sequence model is explained when neither run_id nor upstream is given
run_id = None  # the model run to explain
n_background = 16  # ExplainConfig
background_selection = "kmeans"
alphas_per_background = 8
path_grid = 8
reference_samples = 20
seed = 0
explain_settings = {}  # any other ExplainConfig field, e.g. {"output_space": "logit", "deletion_samples": 100}
subjects = None  # explain only these subject ids (default: every held-out subject)
max_samples = None  # explain at most this many held-out samples
n_patients = 3  # patients shown (the highest predicted risks)
horizon_years = None  # a survival model: explain its risk by this many years (default 2); a binary model: leave None
upstream = None
output_dir = None

# %%
from IPython.display import Markdown, display

from workbench import tracking
from workbench.explanations import choose_run_to_explain, explain_run
from workbench.settings import ExplainConfig

display(Markdown(tracking.store_description()))
chosen = choose_run_to_explain(run_id, upstream, task)
config = ExplainConfig(**{"n_background": n_background, "background_selection": background_selection,
                          "alphas_per_background": alphas_per_background, "path_grid": path_grid,
                          "reference_samples": reference_samples, "seed": seed, "progress": False, **explain_settings})
result = explain_run(chosen, config=config, subjects=subjects, max_samples=max_samples,
                     n_patients=n_patients, horizon_days=None if horizon_years is None else horizon_years * 365.25)
display(Markdown(result.summary()))

# %% [markdown]
# ## Can these explanations be trusted?

# %%
display(Markdown(result.checks_markdown()))

# %% [markdown]
# ## Global importance
# Mean |SHAP| over every explained cell, by feature and by how many steps before the
# prediction time the cell lies.

# %% tags=["figure"]
display(result.figures["explain_global_importance"])

# %% [markdown]
# ## Patients with the highest predicted risk
# For each: the time steps (bars, red raises the risk) with the risk the model gave at each of
# the patient's earlier visits, then the step-by-feature heatmap with the measured values.

# %% tags=["figure"]
display(*[figure for name, figure in result.figures.items() if name != "explain_global_importance"])

# %%
if output_dir:
    result.save(output_dir)
