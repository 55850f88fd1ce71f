"""One pipeline run's life, the same for every engine: the run dir it owns, its parent MLflow
run, and how it ends (parent FINISHED or FAILED, ``run.json`` written, owner lock let go).

An engine only decides how the executions are scheduled::

    with pipeline_run(pipeline, tags, engine="local") as run:
        run.results.append(execute_step(pipeline, execution, run.run_dir, ...))
    return run.result

The parent run ends FINISHED only when the block returned normally with every planned
execution finished or cached; a failed step, an exception or an interrupt leaves it FAILED.
The manifest is written and the owner lock released whatever happened.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from workbench import runs, tracking
from workbench.files import write_text_atomic
from workbench.pipelines.results import ExecutionResult, PipelineResult
from workbench.pipelines.spec import Pipeline
from workbench.record import (
    MANIFEST_FILE,
    OVERRIDES_TAG,
    OWNER_TAG,
    PIPELINE_RUN_TAG,
    PIPELINE_TAG,
    PIPELINE_YAML_SHA256_TAG,
    PIPELINE_YAML_TAG,
)


# --- run dirs and their owner ------------------------------------------------------------


def runs_root(pipeline_name: str) -> Path:
    """``runs/<pipeline>/`` under the project home: executed notebooks, outputs and the cache."""
    return tracking.project_home() / "runs" / pipeline_name


#: Pipeline runs this process owns: pipeline run id -> (owner lock, extra tags of its MLflow runs).
_OWNED: dict[str, tuple[runs.Owner, dict[str, str]]] = {}


def own_run(pipeline_run_id: str, owner: runs.Owner, tags: Optional[dict[str, str]] = None) -> None:
    """Record ``owner`` as the owner of a pipeline run: until :func:`release_run`, its parent and
    child MLflow runs are tagged with the owner and ``tags``."""
    _OWNED[pipeline_run_id] = (owner, {str(k): str(v) for k, v in (tags or {}).items()})


def new_run_dir(pipeline: Pipeline, tags: Optional[dict[str, str]] = None) -> Path:
    """A fresh ``runs/<pipeline>/<timestamp>-<id>/`` for one pipeline run, owned by this process.

    The process holds the run's owner lock (:func:`workbench.runs.claim`) until
    :func:`release_run`; its parent and child MLflow runs are tagged with the owner and ``tags``.
    """
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = runs_root(pipeline.name) / f"{stamp}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir(parents=True)
    own_run(run_dir.name, runs.claim(run_dir), tags)
    return run_dir


def release_run(pipeline_run_id: str) -> None:
    """Give up a pipeline run once its MLflow runs are ended: its owner lock is free from then on."""
    owned = _OWNED.pop(pipeline_run_id, None)
    if owned is not None:
        owned[0].release()


def owned_tags(pipeline_run_id: str) -> dict[str, str]:
    """The owner tag and extra tags of a run this process owns (nothing for one it does not)."""
    owned = _OWNED.get(pipeline_run_id)
    return {} if owned is None else {**owned[1], OWNER_TAG: owned[0].tag}


# --- MLflow ------------------------------------------------------------------------------


def mlflow_client():
    """An MLflow client on the current tracking store (MLflow imported only when needed)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def params_batch(params: dict[str, Any]):
    """Parameters as MLflow ``Param`` entities for one ``log_batch`` (values cut to MLflow's limit)."""
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in tracking.flatten_params(params).items()]


def start_parent_run(pipeline: Pipeline, experiment_id: str, pipeline_run_id: str) -> str:
    """Create the pipeline's parent run (tags: pipeline, YAML hash, git commit, pipeline run id,
    and, for a run dir from :func:`new_run_dir`, its owner and extra tags)."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    client = mlflow_client()
    tags = {
        **owned_tags(pipeline_run_id),
        PIPELINE_TAG: pipeline.name,
        PIPELINE_YAML_TAG: str(pipeline.path),
        PIPELINE_YAML_SHA256_TAG: pipeline.yaml_sha256,
        PIPELINE_RUN_TAG: pipeline_run_id,
        OVERRIDES_TAG: json.dumps(pipeline.overrides, default=str),
        MLFLOW_GIT_COMMIT: tracking.git_commit(),
    }
    run = client.create_run(experiment_id, tags=tags, run_name=f"{pipeline.name} {pipeline_run_id}")
    if pipeline.params:
        client.log_batch(run.info.run_id, params=params_batch(pipeline.params))
    return run.info.run_id


# --- one pipeline run, start to end ---------------------------------------------------------


@dataclass
class PipelineRun:
    """A pipeline run in progress: where the engine puts its executions' results.

    ``result`` is set when the run has ended (the :func:`pipeline_run` block has exited).
    """

    pipeline: Pipeline
    experiment_id: str
    run_dir: Path
    parent_run_id: str
    engine: str = "local"
    results: list[ExecutionResult] = field(default_factory=list)
    result: Optional[PipelineResult] = None

    @property
    def pipeline_run_id(self) -> str:
        return self.run_dir.name

    def succeeded(self) -> bool:
        """Every planned execution finished or was cached."""
        return len(self.results) == len(self.pipeline.executions) and all(r.status != "failed" for r in self.results)

    def end(self, completed: bool) -> PipelineResult:
        """Close the parent run (FINISHED only if ``completed`` and :meth:`succeeded`) and write ``run.json``."""
        status = "FINISHED" if completed and self.succeeded() else "FAILED"
        mlflow_client().set_terminated(self.parent_run_id, status)
        self.result = PipelineResult(
            self.pipeline.name, self.pipeline_run_id, self.parent_run_id, self.run_dir, self.results,
            self.pipeline.experiment,
        )
        record = manifest(self.result, self.pipeline, self.engine)
        write_text_atomic(self.run_dir / MANIFEST_FILE, json.dumps(record, indent=2, default=str))
        return self.result


@contextmanager
def pipeline_run(pipeline: Pipeline, tags: Optional[dict[str, str]] = None, engine: str = "local") -> Iterator[PipelineRun]:
    """Own a new run dir and a parent MLflow run for the block; end both however the block ends.

    ``tags`` go on the parent and every child run (the scheduler's schedule tags). On exit the
    parent run is terminated (see :meth:`PipelineRun.end`), ``run.json`` is written, and only
    then, with every MLflow run of it ended, is the owner lock released.
    """
    tracking.setup()
    with runs.store_lock():  # another run may be creating the same new store or experiment right now
        experiment = tracking.experiment_id(pipeline.experiment)
    run_dir = new_run_dir(pipeline, tags)
    try:
        run = PipelineRun(pipeline, experiment, run_dir, start_parent_run(pipeline, experiment, run_dir.name), engine)
        completed = False  # until the block returns: an interrupt leaves the parent FAILED
        try:
            yield run
            completed = True
        finally:
            run.end(completed)
    finally:
        release_run(run_dir.name)  # only now: every MLflow run of it is ended


def manifest(result: PipelineResult, pipeline: Pipeline, engine: str = "local") -> dict:
    """``run.json`` in the run dir: what ran, with which params, and where everything went.

    A run of another engine than the local one names it (``"engine": "prefect"``).
    """
    record = {
        "pipeline": result.pipeline,
        "pipeline_yaml": str(pipeline.path),
        "pipeline_run_id": result.pipeline_run_id,
        "parent_run_id": result.parent_run_id,
        "params": pipeline.params,
        "overrides": pipeline.overrides,
        "ok": result.ok,
        "executions": [asdict(r) for r in result.executions],
    }
    if engine != "local":
        record["engine"] = engine
    return record
