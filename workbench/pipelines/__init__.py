"""Pipelines: notebooks run in order by Papermill, each execution an MLflow child run.

A pipeline is a YAML file (``pipelines/*.yaml``)::

    name: pbc_mortality
    experiment: pbc_mortality              # MLflow experiment (default: name)
    params: {task: pbc_mortality, epochs: 30}   # overridable: workbench run ... -p epochs=5
    steps:
      cohort:  {notebook: ../notebooks/01_cohort.ipynb, params: {task: "${task}"}}
      train:   {notebook: ../notebooks/02_train.ipynb, needs: [cohort],
                params: {epochs: "${epochs}"}, matrix: {model: [lstm, gru, rnn]}}
      explain: {notebook: ../notebooks/03_explain.ipynb, needs: [train]}

Everything is checked by :func:`load_pipeline` before anything runs: unknown keys, unknown
steps in ``needs``, cycles, missing notebooks, and step parameters that the notebook's
``parameters`` cell does not declare are refused with the YAML file and line.

:func:`run_pipeline` runs the steps in topological order. Each execution (a step, or one
combination of its ``matrix``) runs in a real Jupyter kernel (kernelspec ``workbench``, this
environment's Python), writes into its own ``output_dir`` under
``runs/<pipeline>/<timestamp>-<id>/``, and is a nested MLflow child run of one parent run
per pipeline run; the executed notebook and its HTML rendering are kept beside the output
dir and logged to the child run under ``notebook/``.

Caching: an execution whose notebook bytes, resolved parameters and upstream outputs are
unchanged is skipped (``force=True`` reruns it). A skipped execution creates no child run:
the parent run is tagged ``workbench.cached.<label>=<run id>`` and the execution's result
points at the run and output dir of the execution it reuses.

The package, one module per concern; each imports only modules listed above it, and none
imports the package itself::

    spec.py            the YAML schema, validation, overrides, notebook parameters, the plan
    results.py         ExecutionResult, PipelineResult, PipelineFailed
    lifecycle.py       one pipeline run's life for both engines: run dir and owner lock,
                       parent MLflow run, its end status, the ``run.json`` manifest
    steps.py           one execution: kernel, cache, child run, Papermill, notebook + HTML
    prefect_engine.py  the Prefect engine: flow, tasks, deployments (imports Prefect, so only
                       local.py imports it, lazily, for ``engine="prefect"``)
    local.py           the local engine, :func:`run_pipeline`
"""

from __future__ import annotations

from workbench.pipelines.lifecycle import (
    PipelineRun,
    manifest,
    new_run_dir,
    own_run,
    pipeline_run,
    release_run,
    runs_root,
    start_parent_run,
)
from workbench.pipelines.local import run_pipeline
from workbench.pipelines.results import ExecutionResult, PipelineFailed, PipelineResult
from workbench.pipelines.spec import (
    INJECTED,
    NAME_PATTERN,
    Execution,
    Pipeline,
    PipelineSpec,
    Step,
    StepSpec,
    load_pipeline,
    notebook_parameters,
    parse_overrides,
)
from workbench.pipelines.steps import (
    CACHE_VERSION,
    KERNEL_DISPLAY_NAME,
    KERNEL_NAME,
    Progress,
    cache_key,
    cached_execution,
    ensure_kernelspec,
    execute_step,
    kernel_environment,
    render_html,
    start_child_run,
)

__all__ = [
    "CACHE_VERSION",
    "INJECTED",
    "KERNEL_DISPLAY_NAME",
    "KERNEL_NAME",
    "NAME_PATTERN",
    "Execution",
    "ExecutionResult",
    "Pipeline",
    "PipelineFailed",
    "PipelineResult",
    "PipelineRun",
    "PipelineSpec",
    "Progress",
    "Step",
    "StepSpec",
    "cache_key",
    "cached_execution",
    "ensure_kernelspec",
    "execute_step",
    "kernel_environment",
    "load_pipeline",
    "manifest",
    "new_run_dir",
    "notebook_parameters",
    "own_run",
    "parse_overrides",
    "pipeline_run",
    "release_run",
    "render_html",
    "run_pipeline",
    "runs_root",
    "start_child_run",
    "start_parent_run",
]
