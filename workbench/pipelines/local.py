"""The local engine: :func:`run_pipeline` runs the executions one after another in this process.

``engine: prefect`` (or ``engine="prefect"``) hands the loaded pipeline to
:mod:`workbench.pipelines.prefect_engine` instead; Prefect is imported only then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from workbench.errors import WorkbenchError
from workbench.pipelines.lifecycle import PipelineRun, pipeline_run
from workbench.pipelines.results import PipelineResult
from workbench.pipelines.spec import load_pipeline
from workbench.pipelines.steps import Progress, ensure_kernelspec, execute_step


def run_pipeline(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    engine: Optional[str] = None,
    console=None,
    tags: Optional[dict[str, str]] = None,
) -> PipelineResult:
    """Validate, then run every step in order under one parent MLflow run; stops at the first failure.

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
    ensure_kernelspec()
    with pipeline_run(pipeline, tags) as run:
        _run_in_order(run, force, Progress(console, len(pipeline.executions)))
    return run.result


def _run_in_order(run: PipelineRun, force: bool, progress: Progress) -> None:
    """Each step's executions in plan order, each seeing its ancestors' results; stop at the first failure."""
    for step in run.pipeline.steps.values():
        upstream = {name: [r for r in run.results if r.step == name] for name in step.ancestors}
        for execution in step.executions:
            result = execute_step(
                run.pipeline, execution, run.run_dir, experiment_id=run.experiment_id,
                parent_run_id=run.parent_run_id, pipeline_run_id=run.pipeline_run_id, upstream=upstream,
                force=force, progress=progress,
            )
            run.results.append(result)
            if result.status == "failed":
                return
