"""The local engine: :func:`run_pipeline` runs the executions in this process, independent ones
side by side (a matrix's children, steps that do not need each other) up to ``workers`` at a time.

``engine: prefect`` (or ``engine="prefect"``) hands the loaded pipeline to
:mod:`workbench.pipelines.prefect_engine` instead; Prefect is imported only then.
"""

from __future__ import annotations

import contextvars
import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Optional

from workbench import tracking
from workbench.errors import WorkbenchError
from workbench.pipelines.lifecycle import PipelineRun, pipeline_run
from workbench.pipelines.results import ExecutionResult, PipelineResult
from workbench.pipelines.spec import Execution, load_pipeline
from workbench.pipelines.steps import Progress, ensure_kernelspec, execute_step, kernel_environment, stop_kernels, stopping


def default_workers() -> int:
    """The cores this process may use (its CPU affinity): one kernel per core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_pipeline(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    engine: Optional[str] = None,
    console=None,
    tags: Optional[dict[str, str]] = None,
    workers: Optional[int] = None,
) -> PipelineResult:
    """Validate, then run every step under one parent MLflow run; stops starting steps at the first failure.

    An execution starts when every execution of the steps it needs has finished (or was
    cached); up to ``workers`` (default: :func:`default_workers`) run at once, each in its own
    kernel. ``workers=1`` runs them one after another, in plan order. The MLflow record is the
    same either way: the same child runs with the same params, tags and metrics, and the
    results are listed in plan order.

    Returns the result whatever happened (check ``result.ok`` or call ``raise_for_failure()``);
    invalid YAML raises :class:`WorkbenchError` before any run, folder or kernel is created.
    ``tags`` are set on the parent and every child run (the scheduler tags its runs with the
    schedule); this process owns the run (``workbench.owner``) until every run is ended.
    """
    pipeline = load_pipeline(path, overrides)
    engine = engine or pipeline.engine
    if engine == "prefect":
        from workbench.pipelines.prefect_engine import run_with_prefect  # same lifecycle and steps, Prefect schedules them

        return run_with_prefect(pipeline, force=force)  # the flow ran here, in this process, and has ended its runs
    if engine != "local":
        raise WorkbenchError(f"{pipeline.path}: engine {engine!r} is not available here (use 'local' or 'prefect')")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise WorkbenchError(f"--workers must be at least 1 (got {workers})")
    ensure_kernelspec()
    # The kernel environment pinned for the whole run: execute_step sets and restores it per
    # execution, which is thread-safe only while the saved value is this same one.
    threads = max(1, default_workers() // min(workers, len(pipeline.executions) or 1))
    with kernel_environment(tracking.setup(), threads), pipeline_run(pipeline, tags) as run:
        _run_all(run, force, Progress(console, len(pipeline.executions)), workers)
    return run.result


def _run_all(run: PipelineRun, force: bool, progress: Progress, workers: int) -> None:
    """Start each execution once the steps it needs are done, at most ``workers`` at a time.

    After a failure nothing new starts; the executions already running finish. On Ctrl-C or
    SIGTERM (raised in this, the main thread) the running kernels are killed, their steps end
    FAILED as interrupted, and the interrupt goes on up (the parent run ends FAILED).
    """
    pipeline = run.pipeline
    done: dict[str, ExecutionResult] = {}
    pending: list[Execution] = list(pipeline.executions)
    running: dict[Future, Execution] = {}
    failed = False

    def ready(execution: Execution) -> bool:
        ancestors = pipeline.steps[execution.step].ancestors
        return all(e.label in done for name in ancestors for e in pipeline.steps[name].executions)

    def start(pool: ThreadPoolExecutor, execution: Execution) -> Future:
        ancestors = pipeline.steps[execution.step].ancestors
        upstream = {name: [done[e.label] for e in pipeline.steps[name].executions] for name in ancestors}
        # A fresh context per thread: jupyter_core keeps its event loop in a contextvar that two
        # threads' kernel clients cannot share.
        return pool.submit(contextvars.Context().run, execute_step, pipeline, execution, run.run_dir,
                           experiment_id=run.experiment_id, parent_run_id=run.parent_run_id,
                           pipeline_run_id=run.pipeline_run_id, upstream=upstream, force=force, progress=progress)

    stopping.clear()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="workbench-step")
    try:
        while pending or running:
            for execution in [e for e in pending if not failed and ready(e)][: workers - len(running)]:
                pending.remove(execution)
                running[start(pool, execution)] = execution
            if not running:
                break  # a failure left the rest unstartable
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                result = future.result()  # not a step failure (MLflow unreachable, disk full): up it goes
                done[running.pop(future).label] = result
                failed = failed or result.status == "failed"
    except BaseException:
        stop_kernels()  # the worker threads' notebooks end FAILED, "interrupted"
        for future, execution in running.items():
            try:
                done[execution.label] = future.result()
            except Exception:
                pass
        raise
    finally:
        pool.shutdown(wait=True)
        run.results[:] = [done[e.label] for e in pipeline.executions if e.label in done]
