"""One execution of a step (a step, or one combination of its ``matrix``), whichever engine
schedules it: the cache check, a child MLflow run, the notebook run by Papermill in a real
Jupyter kernel (kernelspec ``workbench``, this environment's Python), the executed notebook and
its HTML rendering logged under ``notebook/``, and the cache record of a success.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from workbench import runs, tracking
from workbench.files import code_fingerprint, directory_digest, path_fingerprint, write_text_atomic
from workbench.pipelines.lifecycle import mlflow_client, owned_tags, params_batch, runs_root
from workbench.pipelines.results import ExecutionResult
from workbench.pipelines.spec import Execution, Pipeline
from workbench.record import (
    CACHED_TAG_PREFIX,
    ERROR_TAG,
    MATRIX_TAG_PREFIX,
    NOTEBOOK_TAG,
    PIPELINE_RUN_TAG,
    PIPELINE_TAG,
    STEP_TAG,
)

KERNEL_NAME = "workbench"
#: What JupyterLab shows for the kernel; the notebooks' metadata says the same, so opening one changes nothing.
KERNEL_DISPLAY_NAME = "Python (workbench)"
#: Bump when the cache key's ingredients change, so old records stop matching.
CACHE_VERSION = 1


# --- kernel ------------------------------------------------------------------------------


def ensure_kernelspec() -> str:
    """Install (once) a ``workbench`` kernelspec running this environment's Python; returns its name."""
    from ipykernel.kernelspec import install

    kernel_json = Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json"
    try:
        if json.loads(kernel_json.read_text())["argv"][0] == sys.executable:
            return KERNEL_NAME
    except (OSError, ValueError, KeyError, IndexError):
        pass  # missing or from another interpreter: (re)install below
    install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME, prefix=sys.prefix)
    return KERNEL_NAME


@contextmanager
def kernel_environment(uri: str, threads: Optional[int] = None) -> Iterator[None]:
    """The kernel inherits our environment; pin the tracking store so the notebook logs where we do.

    ``threads``: the compute threads each kernel may use (torch, LightGBM, BLAS read
    ``OMP_NUM_THREADS``), so kernels side by side share the cores instead of each spinning
    threads on all of them; a value the user set is kept."""
    wanted = {"MLFLOW_TRACKING_URI": uri, "WORKBENCH_HOME": str(tracking.project_home())}
    if threads and "OMP_NUM_THREADS" not in os.environ:
        wanted["OMP_NUM_THREADS"] = str(threads)
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def render_html(notebook: Path) -> Path:
    """The executed notebook as standalone HTML beside it (plots are embedded as data URIs)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(embed_images=True).from_notebook_node(nbformat.read(str(notebook), as_version=4))
    html = notebook.with_suffix(".html")
    write_text_atomic(html, body)
    return html


# --- cache -------------------------------------------------------------------------------


def cache_key(execution: Execution, upstream: dict[str, list[ExecutionResult]]) -> str:
    """sha256 of the notebook bytes, resolved params (and the files they name), the workbench
    source, and the keys and contents of upstream outputs."""
    ingredients = {
        "version": CACHE_VERSION,
        "step": execution.step,
        "notebook": hashlib.sha256(execution.notebook.read_bytes()).hexdigest(),
        "code": code_fingerprint(),
        "params": execution.params,
        "inputs": {k: fp for k, v in sorted(execution.params.items()) if (fp := path_fingerprint(v, tracking.project_home()))},
        "upstream": {
            name: sorted([r.cache_key, directory_digest(r.output_dir)] for r in results)
            for name, results in sorted(upstream.items())
        },
    }
    blob = json.dumps(ingredients, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_file(pipeline: str, key: str) -> Path:
    return runs_root(pipeline) / ".cache" / f"{key}.json"


def cached_execution(pipeline: str, key: str) -> Optional[dict]:
    """The record of an earlier successful execution with this key, if its output dir still exists."""
    try:
        record = json.loads(_cache_file(pipeline, key).read_text())
    except (OSError, ValueError):
        return None
    return record if Path(record.get("output_dir", "")).is_dir() else None


def _record_success(pipeline: str, result: ExecutionResult) -> None:
    path = _cache_file(pipeline, result.cache_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "key": result.cache_key,
        "step": result.step,
        "label": result.label,
        "run_id": result.run_id,
        "output_dir": str(result.output_dir),
        "notebook": str(result.notebook),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    write_text_atomic(path, json.dumps(record, indent=2))


# --- the child run ---------------------------------------------------------------------


def start_child_run(
    pipeline: Pipeline, execution: Execution, experiment_id: str, parent_run_id: Optional[str], pipeline_run_id: str
) -> str:
    """Create an execution's child run (tags: pipeline, pipeline run id, step, notebook, git commit,
    matrix values, the owner and extra tags of a run this process owns) and log its params."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

    tags = {
        **owned_tags(pipeline_run_id),
        PIPELINE_TAG: pipeline.name,
        PIPELINE_RUN_TAG: pipeline_run_id,
        STEP_TAG: execution.step,
        NOTEBOOK_TAG: str(execution.notebook),
        MLFLOW_GIT_COMMIT: tracking.git_commit(),
        **{f"{MATRIX_TAG_PREFIX}{k}": str(v) for k, v in execution.matrix.items()},
    }
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    client = mlflow_client()
    run = client.create_run(experiment_id, tags=tags, run_name=execution.label)
    if execution.params:
        client.log_batch(run.info.run_id, params=params_batch(execution.params))
    return run.info.run_id


# --- running ---------------------------------------------------------------------------


class Progress:
    """Live progress of a pipeline run, several executions at a time.

    On a terminal, a spinner lists the executions running now; on any console, each execution
    prints a line when it starts (not on a terminal, where the spinner shows it) and when it
    ends, with its outcome and time. Safe to use from the engine's worker threads.
    """

    STYLE = {"finished": "green", "cached": "cyan", "failed": "bold red"}

    def __init__(self, console, total: int):
        self.console, self.total, self.index = console, total, 0
        self._lock = threading.Lock()
        self._numbers: dict[str, int] = {}  # label -> its [n/total] number
        self._running: dict[str, float] = {}  # label -> when it started
        self._status = None

    def _number(self, label: str) -> int:
        self.index += 1
        self._numbers[label] = self.index
        return self.index

    @contextmanager
    def running(self, label: str) -> Iterator[None]:
        with self._lock:
            number = self._number(label)
            self._running[label] = time.monotonic()
            if self.console is not None and not self.console.is_terminal:
                self._print(f"[{number}/{self.total}] {label}: started")
            self._show()
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(label, None)
                self._show()

    def _show(self) -> None:
        """The spinner's line: every execution running now (terminal only)."""
        if self.console is None or not self.console.is_terminal:
            return
        if not self._running:
            if self._status is not None:
                self._status.stop()
                self._status = None
            return
        from rich.markup import escape

        text = "running: " + ", ".join(f"[{self._numbers[label]}/{self.total}] {escape(label)}" for label in self._running)
        if self._status is None:
            self._status = self.console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def _print(self, text: str) -> None:
        from rich.markup import escape

        self.console.print(escape(text), highlight=False)

    def cached(self, label: str) -> None:
        with self._lock:
            self._number(label)
        self.report_line(label, "cached", 0.0)

    def report_line(self, label: str, status: str, seconds: float) -> None:
        if self.console is None:
            return
        from rich.markup import escape

        timing = f" in {seconds:.1f}s" if status != "cached" else ""
        with self._lock:
            number = self._numbers.get(label, self.index)
            self.console.print(
                f"[{number}/{self.total}] {escape(label)}: [{self.STYLE[status]}]{status}[/]{timing}", highlight=False,
            )


# Kernels this process started and that still run, by process group (each kernel runs in its own
# session): an interrupted run kills them, since worker threads do not see the main thread's Ctrl-C.
_live_kernels: set[int] = set()
_live_lock = threading.Lock()
#: Set while this process stops its kernels: the steps that die of it are reported as interrupted.
stopping = threading.Event()


def stop_kernels() -> int:
    """Kill every kernel this process started that is still running; returns how many."""
    stopping.set()
    with _live_lock:
        groups = list(_live_kernels)
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(groups)


def _failure_message(label: str, exc: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if stopping.is_set() and not isinstance(exc, PapermillExecutionError):
        return f"step {label}: interrupted"
    if isinstance(exc, PapermillExecutionError):
        return f"step {label}, cell {exc.cell_index} (In [{exc.exec_count}]): {exc.ename}: {exc.evalue}"
    if isinstance(exc, KeyboardInterrupt):
        return f"step {label}: interrupted"
    return f"step {label}: {type(exc).__name__}: {exc}"


def _run_notebook(execution: Execution, params: dict[str, Any], run_dir: Path, uri: str) -> Path:
    """Papermill run into a temp name, renamed to ``<label>.ipynb`` whatever the outcome.

    Papermill writes the notebook after every cell and also when a cell raises, so the renamed
    file is complete, errors included; only a killed process leaves a ``.partial.ipynb``.
    """
    import tempfile

    import papermill
    from jupyter_client.manager import AsyncKernelManager

    partial = run_dir / f"{execution.label}{runs.PARTIAL_SUFFIX}"  # what reconcile looks for
    groups: list[int] = []  # the process group of this execution's kernel, once started
    final = run_dir / f"{execution.label}.ipynb"
    try:
        # IPC sockets in a private temp dir: the kernel is reachable only by us (no open TCP
        # ports, and no "running over TCP without encryption" warning on every execution).
        # The kernel's own stderr (its log: start-up errors, a teardown after an interrupt) goes to a
        # file beside the notebook, not to the user's terminal; cell output reaches the notebook.
        with kernel_environment(uri), tempfile.TemporaryDirectory(prefix="wb-kernel-") as sockets, \
                open(run_dir / f".{execution.label}.kernel.log", "ab") as kernel_log:

            class IpcKernelManager(AsyncKernelManager):
                # A class, not an instance: nbclient then owns the kernel and shuts it down.
                def __init__(self, **kwargs):
                    super().__init__(transport="ipc", ip=f"{sockets}/k", **kwargs)

                async def start_kernel(self, **kwargs):
                    kwargs.setdefault("stderr", kernel_log)
                    started = await super().start_kernel(**kwargs)
                    group = getattr(self.provisioner, "pgid", None)
                    if group:
                        with _live_lock:
                            _live_kernels.add(group)
                        groups.append(group)
                    return started

            papermill.execute_notebook(
                str(execution.notebook), str(partial), parameters=params, kernel_name=ensure_kernelspec(),
                language="python", progress_bar=False, log_output=False, cwd=str(tracking.project_home()),
                kernel_manager_class=IpcKernelManager,
                # The notebook is complete when its last cell ends; a graceful kernel exit took 3 s more
                # per step (atexit hooks of the imported libraries) and saves nothing we keep.
                shutdown_kernel="immediate",
            )
    finally:
        with _live_lock:
            _live_kernels.difference_update(groups)
        if partial.exists():
            os.replace(partial, final)
    return final


def _log_notebook(run_id: str, notebook: Path) -> Optional[Path]:
    """Log the executed notebook and its HTML rendering under ``notebook/``; returns the HTML path."""
    client = mlflow_client()
    html = None
    try:
        html = render_html(notebook)
    except Exception as exc:  # a rendering problem must not hide the run's real outcome
        print(f"warning: could not render {notebook} to HTML: {exc}", file=sys.stderr)
    for path in (notebook, html):
        if path is not None:
            client.log_artifact(run_id, str(path), "notebook")
    return html


def execute_step(
    pipeline: Pipeline,
    execution: Execution,
    run_dir: Path,
    *,
    experiment_id: str,
    parent_run_id: Optional[str],
    pipeline_run_id: str,
    upstream: dict[str, list[ExecutionResult]],
    force: bool = False,
    progress: Optional[Progress] = None,
) -> ExecutionResult:
    """One execution: cache check, child run, Papermill run, artifacts, status, cache record.

    Returns a ``failed`` result when a cell raises (the executed notebook keeps the error and
    the child run is FAILED); re-raises KeyboardInterrupt after marking the run FAILED.
    """
    progress = progress or Progress(None, 1)
    key = cache_key(execution, upstream)
    record = None if force else cached_execution(pipeline.name, key)
    if record is not None:
        progress.cached(execution.label)
        if parent_run_id:
            # MLflow tag keys cannot hold "=": train-model=gru is tagged workbench.cached.train-model:gru
            tag = f"{CACHED_TAG_PREFIX}{execution.label.replace('=', ':')}"
            mlflow_client().set_tag(parent_run_id, tag, record["run_id"])
        return ExecutionResult(
            execution.step, execution.label, "cached", record["run_id"], Path(record["output_dir"]), key,
            params=execution.params, matrix=execution.matrix,
        )

    output_dir = run_dir / execution.label
    output_dir.mkdir(parents=True, exist_ok=True)
    run_id = start_child_run(pipeline, execution, experiment_id, parent_run_id, pipeline_run_id)
    injected = {
        "output_dir": str(output_dir),
        "upstream": {name: [str(r.output_dir) for r in results] for name, results in upstream.items()},
        "mlflow_run_id": run_id,
        "mlflow_parent_run_id": parent_run_id,
    }
    params = {**execution.params, **{k: v for k, v in injected.items() if k in execution.injectable}}
    result = ExecutionResult(
        execution.step, execution.label, "failed", run_id, output_dir, key,
        notebook=run_dir / f"{execution.label}.ipynb", params=execution.params, matrix=execution.matrix,
    )
    started = time.monotonic()
    try:
        with progress.running(execution.label):
            _run_notebook(execution, params, run_dir, tracking.setup())
        result.status = "finished"
    except Exception as exc:  # a cell error or a dead kernel: this step failed, the run goes on to report it
        result.error = _failure_message(execution.label, exc)
    except BaseException as exc:  # KeyboardInterrupt: record it, then let it stop everything
        result.error = _failure_message(execution.label, exc)
        _finish_child(result)
        raise
    result.seconds = time.monotonic() - started
    _finish_child(result)
    progress.report_line(execution.label, result.status, result.seconds)
    if result.status == "finished":
        _record_success(pipeline.name, result)  # only now: a failed run must never be reused
    return result


def _finish_child(result: ExecutionResult) -> None:
    """Log the kept notebook (when there is one) and close the child run FINISHED or FAILED."""
    try:
        if result.notebook is not None and result.notebook.exists():
            result.html = _log_notebook(result.run_id, result.notebook)
        else:
            result.notebook = None  # the kernel never started: there is no executed notebook
        if result.error:
            mlflow_client().set_tag(result.run_id, ERROR_TAG, result.error[:5000])
    finally:
        # Even if artifact logging fails, the run must not stay RUNNING forever.
        mlflow_client().set_terminated(result.run_id, "FINISHED" if result.status == "finished" else "FAILED")

