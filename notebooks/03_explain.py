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
# # 03 · Explain: which moments of a patient's history drove the risk
#
# SHAP values per time step and feature (expected gradients against a background of train
# patients), for the best sequence model of the sweep on its held-out patients. Padded steps
# (before a patient's history starts) get no attribution. Every explanation run is checked:
# **additivity** (attributions sum to risk minus base value), agreement with an **exact
# per-step Shapley reference** on a sample of patients, and a **deletion curve** (removing the
# top-ranked steps should lower the risk more than removing random ones).

# %% tags=["parameters"]
run_id = None  # the model run to explain (default: the best sequence model of the upstream train step)
n_background = 16  # ExplainConfig.n_background
background_selection = "kmeans"  # ExplainConfig.background_selection
alphas_per_background = 8  # ExplainConfig.alphas_per_background (gradient points per background path)
path_grid = 4  # ExplainConfig.path_grid (forward-only points that place them)
reference_samples = 20  # ExplainConfig.reference_samples
seed = 0  # ExplainConfig.seed
subjects = None  # explain only these subject ids (default: every held-out subject)
max_samples = None  # explain at most this many held-out samples
cohort_dir = None  # a saved cohort (default: the pipeline's cohort step output)
upstream = None
output_dir = None
mlflow_run_id = None

# %%
from IPython.display import Markdown, display

from workbench.experiment import best_sequence_run, explain_run, load_cohort
from workbench.explain import ExplainConfig

cohort = load_cohort(cohort_dir or upstream["cohort"][0])
chosen = run_id or best_sequence_run(upstream["train"])["run_id"]
config = ExplainConfig(n_background=n_background, background_selection=background_selection,
                       alphas_per_background=alphas_per_background, path_grid=path_grid,
                       reference_samples=reference_samples, seed=seed)
result = explain_run(chosen, cohort.tensors, config, subjects=subjects, max_samples=max_samples)
display(Markdown(f"Explained run `{chosen}`: {result.frame['subject_id'].n_unique()} patients, "
                 f"{result.frame.select('subject_id', 'prediction_time').n_unique()} prediction times."))

# %% [markdown]
# ## Can these explanations be trusted?

# %%
result.checks

# %% [markdown]
# ## Global importance
# Mean |SHAP| over every explained cell, by feature and by how many steps before the
# prediction time the cell lies.

# %%
result.figures["explain_global_importance"]

# %% [markdown]
# ## Patients with the highest predicted risk
# For each: the time steps (bars, red raises the risk) with the risk the model gave at each of
# the patient's earlier visits, then the step-by-feature heatmap with the measured values.

# %%
display(*[figure for name, figure in result.figures.items() if name != "explain_global_importance"])

# %%
if output_dir:
    from pathlib import Path

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    result.frame.write_parquet(Path(output_dir) / "explanations.parquet")
