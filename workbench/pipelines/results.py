"""What became of a pipeline run: one :class:`ExecutionResult` per execution, a
:class:`PipelineResult` per run, and :class:`PipelineFailed` for callers that must stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from workbench.errors import WorkbenchError


class PipelineFailed(WorkbenchError):
    """A step failed; ``result`` holds the pipeline result (exit code 1: not bad input)."""

    exit_code = 1

    def __init__(self, message: str, result: "PipelineResult"):
        super().__init__(message)
        self.result = result


@dataclass
class ExecutionResult:
    """What became of one execution: ``finished``, ``cached`` or ``failed``."""

    step: str
    label: str
    status: str
    run_id: Optional[str]
    output_dir: Path
    cache_key: str
    notebook: Optional[Path] = None  # the executed notebook (None when cached)
    html: Optional[Path] = None
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    matrix: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None  # "step X, cell N (In [k]): Ename: evalue" on failure


@dataclass
class PipelineResult:
    """A pipeline run: its parent MLflow run, run dir and every execution's result."""

    pipeline: str
    pipeline_run_id: str
    parent_run_id: str
    run_dir: Path
    executions: list[ExecutionResult]
    experiment: str = ""  # the MLflow experiment of every run

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.executions)

    @property
    def failure(self) -> Optional[ExecutionResult]:
        return next((r for r in self.executions if r.status == "failed"), None)

    def step(self, name: str) -> list[ExecutionResult]:
        """Results of one step's executions (one per matrix combination)."""
        return [r for r in self.executions if r.step == name]

    def raise_for_failure(self) -> "PipelineResult":
        """Raise :class:`PipelineFailed` when a step failed (for callers that must not go on)."""
        failed = self.failure
        if failed is not None:
            raise PipelineFailed(f"{failed.error} (executed notebook: {failed.notebook})", self)
        return self
