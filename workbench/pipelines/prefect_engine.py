"""Pipelines as Prefect 3 flows: the team engine (``workbench run PIPELINE --engine prefect``).

The flow is a thin scheduler around the same step runner the local engine uses,
:func:`workbench.pipelines.steps.execute_step`, inside the same run lifecycle
(:func:`workbench.pipelines.lifecycle.pipeline_run`): one Prefect task per execution (a step, or one
combination of its ``matrix``), each task's inputs are the futures of every execution of its
ancestor steps, so Prefect starts a task as soon as what it reads is done and runs a step's
matrix children side by side. Validation, caching, child runs, parameters, tags and artifacts
are all the local engine's: the MLflow record of a run does not depend on the engine.

What Prefect adds: a flow run per pipeline run and a task run per execution in the Prefect UI,
and deployments (:func:`deployment`, :func:`serve`) so Prefect's scheduler and workers replace
``workbench schedule`` for a team. See ``docs/teams.md``.

Parallelism: tasks run on a thread pool (each execution is its own kernel process, so threads
only wait); at most ``PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS`` at once, or one per CPU
core when that setting is unset.
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from workbench import tracking
from workbench.errors import WorkbenchError
from workbench.pipelines.lifecycle import PipelineRun, pipeline_run
from workbench.pipelines.results import ExecutionResult, PipelineFailed, PipelineResult
from workbench.pipelines.spec import Execution, Pipeline, load_pipeline
from workbench.pipelines.steps import ensure_kernelspec, execute_step, kernel_environment

FLOW_NAME = "workbench-pipeline"


class StepFailed(Exception):
    """A notebook failed: raised so Prefect marks the task run Failed; carries the step's result."""

    def __init__(self, result: ExecutionResult):
        super().__init__(result.error)
        self.result = result

    def __reduce__(self):  # Prefect may pickle task exceptions; keep the result through it
        return (StepFailed, (self.result,))


def _max_workers() -> int:
    """Prefect's thread pool setting when set; otherwise one kernel per core, not one per task."""
    from prefect.settings import PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS

    return PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS.value() or os.cpu_count() or 1


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return Path(str(flow_run.parameters.get("path", "pipeline"))).stem


@task(name="execution", cache_policy=NO_CACHE, persist_result=False)
def run_execution(
    pipeline: Pipeline,
    execution: Execution,
    run_dir: Path,
    parent: dict[str, str],
    upstream: dict[str, list[ExecutionResult]],
    force: bool,
) -> ExecutionResult:
    """One execution through the shared step runner; raises :class:`StepFailed` when it failed."""
    # NO_CACHE: the workbench's own cache (notebook bytes, params, upstream outputs) decides reuse.
    # A fresh context: Prefect copies the submitting thread's contextvars into this one, and
    # among them jupyter_core's event loop, which two threads' kernel clients cannot share.
    result = contextvars.Context().run(
        execute_step, pipeline, execution, run_dir, experiment_id=parent["experiment_id"],
        parent_run_id=parent["run_id"], pipeline_run_id=parent["pipeline_run_id"], upstream=upstream, force=force,
    )
    if result.status == "failed":
        raise StepFailed(result)
    return result


def _submit_all(run: PipelineRun, force: bool) -> dict[str, PrefectFuture]:
    """Submit every execution at once; futures in ``upstream`` make Prefect wait for (and skip after) ancestors."""
    pipeline, run_dir = run.pipeline, run.run_dir
    parent = {"experiment_id": run.experiment_id, "pipeline_run_id": run.pipeline_run_id, "run_id": run.parent_run_id}
    futures: dict[str, PrefectFuture] = {}
    for step in pipeline.steps.values():
        upstream = {
            name: [futures[e.label] for e in pipeline.steps[name].executions] for name in step.ancestors
        }
        for execution in step.executions:
            named = run_execution.with_options(name=step.name, task_run_name=execution.label)
            futures[execution.label] = named.submit(pipeline, execution, run_dir, parent, upstream, force)
    return futures


def _collect(pipeline: Pipeline, futures: dict[str, PrefectFuture]) -> list[ExecutionResult]:
    """Results in plan order; executions never started (an ancestor failed) are left out, as locally."""
    results = []
    for execution in pipeline.executions:
        future = futures[execution.label]
        future.wait()
        if future.state.is_completed():
            results.append(future.result())
        elif future.state.is_failed():
            error = future.result(raise_on_failure=False)
            if not isinstance(error, StepFailed):
                raise error  # not a notebook failure (MLflow unreachable, disk full): surface it as is
            results.append(error.result)
    return results


@flow(
    name=FLOW_NAME,
    flow_run_name=_flow_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=_max_workers()),
    description="A workbench pipeline (YAML) run step by step; matrix children in parallel.",
)
def pipeline_flow(path: str, overrides: Optional[dict[str, Any]] = None, force: bool = False) -> PipelineResult:
    """Run the pipeline at ``path`` as the local engine would, with Prefect scheduling the executions.

    The flow run fails (``PipelineFailed``, holding the result) when a step fails.
    """
    pipeline = load_pipeline(path, overrides)
    ensure_kernelspec()
    uri = tracking.setup()
    # Pin the kernel environment for the whole flow: execute_step sets and restores these
    # variables per execution, which is only thread-safe when the saved value is the same one.
    # Run dir, parent run, manifest and owner lock: the one lifecycle the local engine uses too.
    with kernel_environment(uri), pipeline_run(pipeline, engine="prefect") as run:
        run.results = _collect(pipeline, _submit_all(run, force))
    return run.result.raise_for_failure()


def run_with_prefect(pipeline: Pipeline, force: bool = False) -> PipelineResult:
    """Run a loaded pipeline as a flow (on ``PREFECT_API_URL``, else a temporary local Prefect server).

    Like :func:`workbench.pipelines.local.run_pipeline`, returns the result whatever happened.
    """
    state = pipeline_flow(str(pipeline.path), pipeline.overrides, force, return_state=True)
    if state.is_completed():
        return state.result()
    error = state.result(raise_on_failure=False)
    if isinstance(error, PipelineFailed):
        return error.result
    raise error if isinstance(error, BaseException) else WorkbenchError(f"Prefect flow run ended {state.name}")


# --- deployments: Prefect's scheduler instead of the embedded one ----------------------


def _deployment_settings(pipeline: Pipeline, cron: str, name: Optional[str], force: bool) -> dict[str, Any]:
    """Name, schedule and flow parameters shared by a served deployment and a work-pool one."""
    return {
        "name": name or pipeline.name,
        "cron": cron,
        "parameters": {"path": str(pipeline.path), "overrides": pipeline.overrides, "force": force},
        "tags": ["workbench", pipeline.name],
        "description": f"workbench pipeline {pipeline.path}",
    }


@contextmanager
def _cron_errors(cron: str) -> Iterator[None]:
    try:
        yield
    except ValueError as exc:  # pydantic's complaint about the cron string
        raise WorkbenchError(f"--cron {cron!r}: not a valid cron expression ({exc})") from exc


def deployment(pipeline: Pipeline, cron: str, name: Optional[str] = None, force: bool = True):
    """A Prefect deployment running ``pipeline`` (with its ``-p`` overrides) on a cron schedule.

    ``force`` (default, as ``workbench schedule``): every scheduled run reruns every step; with
    False, unchanged steps are reused from the cache.
    """
    with _cron_errors(cron):
        return pipeline_flow.to_deployment(**_deployment_settings(pipeline, cron, name, force))


def serve(pipeline: Pipeline, cron: str, name: Optional[str] = None, force: bool = True) -> None:
    """Register the deployment and run its scheduled flow runs from this process until stopped.

    Blocks (Ctrl-C stops it). Each scheduled run starts in a fresh subprocess; the Prefect UI
    (``PREFECT_API_URL``) shows the schedule, the runs, and lets a teammate trigger one.
    """
    from prefect import serve as prefect_serve

    prefect_serve(deployment(pipeline, cron, name, force))


def deploy_to_work_pool(
    pipeline: Pipeline, cron: str, work_pool: str, name: Optional[str] = None, force: bool = True
) -> str:
    """Register the deployment with a work pool; ``prefect worker start --pool NAME`` runs it. Returns its id.

    Workers import ``workbench.pipelines.prefect_engine.pipeline_flow`` from the installed package (no image,
    no code upload), so each worker machine needs the project installed at the same path.
    """
    from prefect.deployments.runner import EntrypointType

    with _cron_errors(cron):
        deployment_id = pipeline_flow.deploy(
            **_deployment_settings(pipeline, cron, name, force), work_pool_name=work_pool,
            entrypoint_type=EntrypointType.MODULE_PATH, build=False, push=False, print_next_steps=False,
        )
    return str(deployment_id)
