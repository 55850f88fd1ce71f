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
# # 06 · Compare survival models, and see a patient's risk curve move from visit to visit
#
# The held-out metrics of the pipeline's survival models side by side, with 95% CIs (bootstrap
# over patients): time-dependent AUC at each horizon, Uno's and Harrell's concordance and the
# integrated Brier score; their calibration at 1, 2 and 5 years against the observed
# (Aalen-Johansen) risk. Then the question a binary model cannot answer on its own terms: on the
# **same held-out visits** the binary 2-year task kept (it drops every visit whose follow-up ends
# before 2 years), does the survival LSTM discriminate at 2 years as well as the binary 2-year
# LSTM, while it also scores the censored visits? Last, for the explained champion, patients'
# predicted risk curves at each of their visits, with the time steps that moved the risk.

# %% tags=["parameters"]
task = "pbc_survival"
upstream = None  # the pipeline's train, binary, explain and cohort outputs
n_bootstrap = 200
seed = 0
n_patients = 2  # patients shown in the risk-curve view (the highest predicted risks among the explained)
mlflow_run_id = None
output_dir = None

# %%
from IPython.display import Markdown, display

from workbench import tracking
from workbench.survival_run import compare_survival, patient_views

display(Markdown(tracking.store_description()))
comparison = compare_survival(task, upstream, n_bootstrap=n_bootstrap, seed=seed)
display(Markdown(comparison.markdown()))

# %% [markdown]
# ## Held-out metrics with 95% CIs

# %% tags=["figure"]
display(comparison.figures["metrics"])

# %% [markdown]
# ## Calibration at 1, 2 and 5 years
# Mean predicted risk against the observed risk in each decile of predicted risk (bars: 95% CI),
# and the observed cumulative incidence against each model's mean predicted curve.

# %% tags=["figure"]
display(comparison.figures["calibration_1_2_5y"], comparison.figures["observed_vs_predicted"])

# %% [markdown]
# ## Survival vs binary on the same visits

# %% tags=["figure"]
display(comparison.figures.get("binary_vs_survival") or Markdown("No binary step in this pipeline."))

# %% [markdown]
# ## Risk curves at every visit
# Each line is the champion's predicted risk of death by 0-5 years after one visit (darker:
# later visit); on the right, the risk by the explained horizon at each visit, annotated with the
# time step and feature that moved it most (SHAP, from the explain step).

# %% tags=["figure"]
views = patient_views(upstream, n_patients=n_patients)
comparison.figures |= views
display(*views.values()) if views else display(Markdown("No explain step upstream: run the pbc_survival pipeline for this view."))

# %%
if output_dir:
    comparison.save(output_dir)
if mlflow_run_id:
    comparison.log(mlflow_run_id)
