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
"""

from __future__ import annotations

import datetime as dt
import graphlib
import hashlib
import itertools
import json
import os
import re
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workbench import runs, tracking
from workbench.errors import WorkbenchError
from workbench.config import check_notebook_parameters, validation_message
from workbench.files import code_fingerprint, directory_digest, path_fingerprint, write_text_atomic

KERNEL_NAME = "workbench"
#: What JupyterLab shows for the kernel; the notebooks' metadata says the same, so opening one changes nothing.
KERNEL_DISPLAY_NAME = "Python (workbench)"
#: Parameters the engine injects into a notebook that declares them in its parameters cell.
INJECTED = ("output_dir", "upstream", "mlflow_run_id", "mlflow_parent_run_id")
#: Bump when the cache key's ingredients change, so old records stop matching.
CACHE_VERSION = 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PipelineFailed(WorkbenchError):
    """A step failed; ``result`` holds the pipeline result (exit code 1: not bad input)."""

    exit_code = 1

    def __init__(self, message: str, result: "PipelineResult"):
        super().__init__(message)
        self.result = result


# --- the YAML schema -------------------------------------------------------------------


class StepSpec(BaseModel):
    """One step: a notebook, the steps it needs, its parameters and an optional sweep."""

    model_config = ConfigDict(extra="forbid")

    notebook: str = Field(description="Notebook path, relative to the pipeline YAML file")
    needs: list[str] = Field(default_factory=list, description="Steps that must finish first")
    params: dict[str, Any] = Field(
        default_factory=dict, description='Notebook parameters; "${name}" substitutes a pipeline param'
    )
    matrix: dict[str, list[Any]] = Field(
        default_factory=dict, description="Parameter sweeps: one execution (child run) per combination"
    )

    @field_validator("matrix")
    @classmethod
    def _sweeps_not_empty(cls, matrix: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in matrix.items():
            if not values:
                raise ValueError(f"matrix {key!r} has no values")
        return matrix


class PipelineSpec(BaseModel):
    """A pipeline file: a name, an MLflow experiment, parameters and steps."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Pipeline name (runs/<name>/)")
    experiment: Optional[str] = Field(
        None, description='MLflow experiment (default: the name); "${task}" names it after the task param (a task YAML\'s name, a labels file\'s name)'
    )
    engine: Literal["local", "prefect"] = Field("local", description="Where steps run (prefect: workbench.orchestrate)")
    params: dict[str, Any] = Field(default_factory=dict, description="Pipeline parameters (-p overrides)")
    steps: dict[str, StepSpec] = Field(min_length=1, description="Steps by name")

    @field_validator("steps")
    @classmethod
    def _step_names_are_paths(cls, steps: dict[str, StepSpec]) -> dict[str, StepSpec]:
        for name in steps:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"step name {name!r} must match {NAME_PATTERN} (it names a folder)")
        return steps


# --- the validated plan ----------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One planned notebook execution: a step, or one combination of its matrix."""

    step: str
    label: str  # step name plus matrix values: names the output dir and the child run
    notebook: Path
    params: dict[str, Any]  # resolved user parameters (nothing injected)
    matrix: dict[str, Any]
    injectable: tuple[str, ...]  # injected parameters the notebook declares


@dataclass(frozen=True)
class Step:
    """A validated step with its executions; ``ancestors`` are all steps it depends on."""

    name: str
    notebook: Path
    needs: tuple[str, ...]
    ancestors: tuple[str, ...]
    executions: tuple[Execution, ...]


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline: steps in topological order, parameters resolved."""

    name: str
    experiment: str
    engine: str
    path: Path
    yaml_sha256: str
    params: dict[str, Any]
    overrides: dict[str, Any]
    steps: dict[str, Step]

    @property
    def executions(self) -> list[Execution]:
        return [e for step in self.steps.values() for e in step.executions]


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


# --- reading the YAML with line numbers -------------------------------------------------


class _YamlSource:
    """A pipeline file's data and node tree, so every complaint can name its line."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.raw = path.read_bytes()
        except OSError as exc:
            raise WorkbenchError(f"{path}: cannot read pipeline file ({exc.strerror})") from exc
        try:
            text = self.raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WorkbenchError(f"{path}: pipeline file is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        try:
            self.root = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise WorkbenchError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from exc
        self._refuse_duplicate_keys(self.root)

    def _refuse_duplicate_keys(self, node) -> None:
        # PyYAML silently keeps the last duplicate; a repeated step name would vanish unnoticed.
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                if key.value in seen:
                    raise WorkbenchError(f"{self.path}:{key.start_mark.line + 1}: duplicate key {key.value!r}")
                seen.add(key.value)
                self._refuse_duplicate_keys(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._refuse_duplicate_keys(item)

    def line(self, *keys: Any) -> int:
        """1-based line of the value at ``keys`` (of its mapping key), or of the deepest prefix found."""
        node = self.root
        if node is None:
            return 1
        line = node.start_mark.line + 1
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
                if match is None:
                    break
                line, node = match[0].start_mark.line + 1, match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def at(self, *keys: Any) -> str:
        return f"{self.path}:{self.line(*keys)}"


def _parse_spec(source: _YamlSource) -> PipelineSpec:
    if not isinstance(source.data, dict):
        raise WorkbenchError(f"{source.at()}: a pipeline file is a mapping with name and steps")
    try:
        return PipelineSpec.model_validate(source.data)
    except ValidationError as exc:
        raise WorkbenchError("invalid pipeline:\n" + validation_message(str(source.path), exc, lambda loc: source.at(*loc))) from None


# --- validation and planning -----------------------------------------------------------


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["epochs=5", "model=gru"]`` as a dict; values are parsed as YAML scalars (5 is an int)."""
    overrides: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise WorkbenchError(f"-p {pair!r}: expected key=value")
        try:
            overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise WorkbenchError(f"-p {pair!r}: value is not a YAML scalar ({exc})") from exc
    return overrides


def notebook_parameters(path: Path) -> dict[str, dict]:
    """Names (and inferred defaults) declared in the notebook's ``parameters`` cell, via Papermill."""
    import nbformat
    import papermill

    try:
        try:
            declared = papermill.inspect_notebook(str(path))
        except ValueError:
            # inspect_notebook needs kernelspec metadata; a notebook written by hand may lack it.
            declared = _python_parameters(path)
        cell = _parameters_cell_source(nbformat.read(str(path), as_version=4))
    except Exception as exc:  # a corrupt .ipynb: say which file, not a JSON traceback
        raise WorkbenchError(f"{path}: cannot read notebook parameters ({exc})") from exc
    # Papermill's line regex misses annotations like `x: str | None = None`; top-level
    # assignments found by ast fill the gap so such a parameter is neither refused nor left uninjected.
    for name in _assigned_names(cell):
        declared.setdefault(name, {"name": name, "inferred_type_name": "None", "default": None, "help": ""})
    return declared


def _parameters_cell(nb):
    """The first cell tagged ``parameters`` (as Papermill picks it), or None."""
    return next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)


def _parameters_cell_source(nb) -> str:
    cell = _parameters_cell(nb)
    return cell.source if cell is not None else ""


def _assigned_names(source: str) -> list[str]:
    """Names assigned at the top level of a Python cell (``x = 1``, ``x: T = 1``)."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def _python_parameters(path: Path) -> dict[str, dict]:
    import nbformat
    from papermill.translators import papermill_translators

    cell = _parameters_cell(nbformat.read(str(path), as_version=4))
    if cell is None:
        return {}
    translator = papermill_translators.find_translator("python3", "python")
    return {p.name: p._asdict() for p in translator.inspect(cell)}


def _substitute(value: Any, params: dict[str, Any], where: str) -> Any:
    """Replace ``${name}`` with pipeline params; a whole-string reference keeps the value's type."""
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        for name in _REF.findall(value):
            if name not in params:
                known = ", ".join(sorted(params)) or "none"
                raise WorkbenchError(f"{where}: unknown pipeline parameter ${{{name}}} (pipeline params: {known})")
        if whole:
            return params[whole.group(1)]
        return _REF.sub(lambda m: str(params[m.group(1)]), value)
    if isinstance(value, list):
        return [_substitute(v, params, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, params, where) for k, v in value.items()}
    return value


def _resolve_notebooks(spec: PipelineSpec, source: _YamlSource) -> dict[str, Path]:
    notebooks = {}
    for name, step in spec.steps.items():
        path = (source.path.parent / step.notebook).resolve()
        if not path.is_file():
            raise WorkbenchError(f"{source.at('steps', name, 'notebook')}: step {name!r}: notebook not found: {path}")
        notebooks[name] = path
    return notebooks


def _topological_order(spec: PipelineSpec, source: _YamlSource) -> list[str]:
    for name, step in spec.steps.items():
        for i, need in enumerate(step.needs):
            if need not in spec.steps:
                raise WorkbenchError(
                    f"{source.at('steps', name, 'needs', i)}: step {name!r} needs unknown step {need!r} "
                    f"(steps: {', '.join(spec.steps)})"
                )
    sorter = graphlib.TopologicalSorter({name: step.needs for name, step in spec.steps.items()})
    try:
        return list(sorter.static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        raise WorkbenchError(
            f"{source.at('steps', cycle[0], 'needs')}: steps depend on each other in a cycle: {' -> '.join(cycle)}"
        ) from exc


def _ancestors(spec: PipelineSpec, name: str, order: list[str]) -> tuple[str, ...]:
    found: set[str] = set()
    stack = list(spec.steps[name].needs)
    while stack:
        need = stack.pop()
        if need not in found:
            found.add(need)
            stack.extend(spec.steps[need].needs)
    return tuple(s for s in order if s in found)


def _check_step_keys(name: str, step: StepSpec, declared: dict, notebook: Path, source: _YamlSource) -> None:
    """Refuse step params / matrix keys that the notebook does not declare, or that the engine injects."""
    for section in ("params", "matrix"):
        for key in getattr(step, section):
            where = source.at("steps", name, section, key)
            if key in INJECTED:
                raise WorkbenchError(f"{where}: step {name!r}: {key!r} is set by the engine, not the pipeline")
            if key not in declared:
                known = ", ".join(sorted(k for k in declared if k not in INJECTED)) or "none"
                raise WorkbenchError(
                    f"{where}: step {name!r}: unknown parameter {key!r}: not in the parameters cell of "
                    f"{notebook.name} (its parameters: {known})"
                )
    for key in step.params.keys() & step.matrix.keys():
        raise WorkbenchError(f"{source.at('steps', name, 'matrix', key)}: step {name!r}: {key!r} is in both params and matrix")


def _split_overrides(
    spec: PipelineSpec, overrides: dict[str, Any], declared: dict[str, dict], source: _YamlSource
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Overrides of pipeline params, and overrides of notebook params (applied to every step declaring them)."""
    pipeline_level, step_level = {}, {}
    for key, value in overrides.items():
        if key in spec.params:
            pipeline_level[key] = value
        elif key in INJECTED:
            raise WorkbenchError(f"{source.path}: -p {key}: set by the engine, cannot be overridden")
        elif any(key in names for names in declared.values()):
            step_level[key] = value
        else:
            raise WorkbenchError(
                f"{source.path}: -p {key}: unknown parameter: not a pipeline param "
                f"({', '.join(sorted(spec.params)) or 'none'}) nor a parameter of any step's notebook"
            )
    return pipeline_level, step_level


def _absolute_if_path(value: Any) -> Any:
    """A -p value naming an existing file or folder, relative to where the command runs, made
    absolute: the notebooks run with the project home as their working directory."""
    if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(value):
        return os.path.abspath(value)
    return value


def _label(step: str, matrix: dict[str, Any]) -> str:
    """``train-model=gru``: a folder- and run-name-safe name for one matrix combination."""
    parts = [step] + [f"{k}={v}" for k, v in matrix.items()]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", "-".join(parts))


def _plan_step(
    name: str, step: StepSpec, params: dict[str, Any], step_overrides: dict[str, Any],
    notebook: Path, declared: dict, source: _YamlSource,
) -> tuple[Execution, ...]:
    """The executions of one step: params resolved, -p applied, matrix expanded."""
    resolved = {k: _substitute(v, params, source.at("steps", name, "params", k)) for k, v in step.params.items()}
    matrix = {k: _substitute(v, params, source.at("steps", name, "matrix", k)) for k, v in step.matrix.items()}
    for key, value in step_overrides.items():
        if key in matrix:
            matrix[key] = [value]  # -p model=gru runs only the gru child of a model sweep
        elif key in declared:
            resolved[key] = value
    injectable = tuple(k for k in INJECTED if k in declared)
    executions = []
    for combo in itertools.product(*matrix.values()):
        values = dict(zip(matrix, combo))
        executions.append(Execution(name, _label(name, values), notebook, {**resolved, **values}, values, injectable))
    return tuple(executions)


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> Pipeline:
    """Read and validate a pipeline YAML; every problem names the file and line. Runs nothing."""
    source = _YamlSource(Path(path).resolve())
    spec = _parse_spec(source)
    order = _topological_order(spec, source)
    notebooks = _resolve_notebooks(spec, source)
    declared = {name: notebook_parameters(nb) for name, nb in notebooks.items()}
    for name in order:
        _check_step_keys(name, spec.steps[name], declared[name], notebooks[name], source)
    overrides = {k: _absolute_if_path(v) for k, v in (overrides or {}).items()}
    pipeline_overrides, step_overrides = _split_overrides(spec, overrides, declared, source)
    params = {**spec.params, **pipeline_overrides}
    steps = {}
    for name in order:
        wanted = {k: v for k, v in step_overrides.items() if k in declared[name]}
        executions = _plan_step(name, spec.steps[name], params, wanted, notebooks[name], declared[name], source)
        for execution in executions:  # a wrong type or range fails here, before any kernel starts
            check_notebook_parameters(notebooks[name], execution.params, declared[name], f"{source.path}: step {execution.label}")
        steps[name] = Step(name, notebooks[name], tuple(spec.steps[name].needs), _ancestors(spec, name, order), executions)
    from workbench.tasks import task_name

    experiment = _substitute(spec.experiment, params, source.at("experiment")) if spec.experiment else spec.name
    return Pipeline(
        name=spec.name,
        experiment=task_name(experiment),
        engine=spec.engine,
        path=source.path,
        yaml_sha256=hashlib.sha256(source.raw).hexdigest(),
        params=params,
        overrides=overrides,
        steps=steps,
    )


# --- kernel, files and cache -----------------------------------------------------------


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


def runs_root(pipeline_name: str) -> Path:
    """``runs/<pipeline>/`` under the project home: executed notebooks, outputs and the cache."""
    return tracking.project_home() / "runs" / pipeline_name


def new_run_dir(pipeline: Pipeline, tags: Optional[dict[str, str]] = None) -> Path:
    """A fresh ``runs/<pipeline>/<timestamp>-<id>/`` for one pipeline run, owned by this process.

    The process holds the run's owner lock (:func:`workbench.runs.claim`) until
    :func:`release_run`; its parent and child MLflow runs are tagged with the owner and ``tags``.
    """
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = runs_root(pipeline.name) / f"{stamp}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir(parents=True)
    _OWNED[run_dir.name] = (runs.claim(run_dir), {str(k): str(v) for k, v in (tags or {}).items()})
    return run_dir


#: Pipeline runs this process owns: pipeline run id -> (owner lock, extra tags of its MLflow runs).
_OWNED: dict[str, tuple[runs.Owner, dict[str, str]]] = {}


def release_run(pipeline_run_id: str) -> None:
    """Give up a pipeline run once its MLflow runs are ended: its owner lock is free from then on."""
    owned = _OWNED.pop(pipeline_run_id, None)
    if owned is not None:
        owned[0].release()


def _owned_tags(pipeline_run_id: str) -> dict[str, str]:
    """The owner tag and extra tags of a run this process owns (nothing for one it does not)."""
    owned = _OWNED.get(pipeline_run_id)
    return {} if owned is None else {**owned[1], runs.OWNER_TAG: owned[0].tag}


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


@contextmanager
def _kernel_environment(uri: str) -> Iterator[None]:
    """The kernel inherits our environment; pin the tracking store so the notebook logs where we do."""
    wanted = {"MLFLOW_TRACKING_URI": uri, "WORKBENCH_HOME": str(tracking.project_home())}
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


# --- MLflow runs -----------------------------------------------------------------------


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _params_batch(params: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in tracking.flatten_params(params).items()]


def start_parent_run(pipeline: Pipeline, experiment_id: str, pipeline_run_id: str) -> str:
    """Create the pipeline's parent run (tags: pipeline, YAML hash, git commit, pipeline run id,
    and, for a run dir from :func:`new_run_dir`, its owner and extra tags)."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    client = _client()
    tags = {
        **_owned_tags(pipeline_run_id),
        "workbench.pipeline": pipeline.name,
        "workbench.pipeline_yaml": str(pipeline.path),
        "workbench.pipeline_yaml_sha256": pipeline.yaml_sha256,
        "workbench.pipeline_run_id": pipeline_run_id,
        "workbench.overrides": json.dumps(pipeline.overrides, default=str),
        MLFLOW_GIT_COMMIT: tracking.git_commit(),
    }
    run = client.create_run(experiment_id, tags=tags, run_name=f"{pipeline.name} {pipeline_run_id}")
    if pipeline.params:
        client.log_batch(run.info.run_id, params=_params_batch(pipeline.params))
    return run.info.run_id


def _start_child_run(
    pipeline: Pipeline, execution: Execution, experiment_id: str, parent_run_id: Optional[str], pipeline_run_id: str
) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

    tags = {
        **_owned_tags(pipeline_run_id),
        "workbench.pipeline": pipeline.name,
        "workbench.pipeline_run_id": pipeline_run_id,
        "workbench.step": execution.step,
        "workbench.notebook": str(execution.notebook),
        MLFLOW_GIT_COMMIT: tracking.git_commit(),
        **{f"workbench.matrix.{k}": str(v) for k, v in execution.matrix.items()},
    }
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    client = _client()
    run = client.create_run(experiment_id, tags=tags, run_name=execution.label)
    if execution.params:
        client.log_batch(run.info.run_id, params=_params_batch(execution.params))
    return run.info.run_id


# --- running ---------------------------------------------------------------------------


class _Progress:
    """One line per execution: running (with a spinner on a terminal), then its outcome and time."""

    STYLE = {"finished": "green", "cached": "cyan", "failed": "bold red"}

    def __init__(self, console, total: int):
        self.console, self.total, self.index = console, total, 0

    @contextmanager
    def running(self, label: str) -> Iterator[None]:
        self.index += 1
        if self.console is None:
            yield
            return
        with self.console.status(f"[{self.index}/{self.total}] {label}: running"):
            yield

    def cached(self, label: str) -> None:
        self.index += 1
        self.report_line(label, "cached", 0.0)

    def report_line(self, label: str, status: str, seconds: float) -> None:
        if self.console is not None:
            from rich.markup import escape

            timing = f" in {seconds:.1f}s" if status != "cached" else ""
            self.console.print(
                f"[{self.index}/{self.total}] {escape(label)}: [{self.STYLE[status]}]{status}[/]{timing}",
                highlight=False,
            )


def _failure_message(label: str, exc: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

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

    partial = run_dir / f"{execution.label}.partial.ipynb"
    final = run_dir / f"{execution.label}.ipynb"
    try:
        # IPC sockets in a private temp dir: the kernel is reachable only by us (no open TCP
        # ports, and no "running over TCP without encryption" warning on every execution).
        # The kernel's own stderr (its log: start-up errors, a teardown after an interrupt) goes to a
        # file beside the notebook, not to the user's terminal; cell output reaches the notebook.
        with _kernel_environment(uri), tempfile.TemporaryDirectory(prefix="wb-kernel-") as sockets, \
                open(run_dir / f".{execution.label}.kernel.log", "ab") as kernel_log:

            class IpcKernelManager(AsyncKernelManager):
                # A class, not an instance: nbclient then owns the kernel and shuts it down.
                def __init__(self, **kwargs):
                    super().__init__(transport="ipc", ip=f"{sockets}/k", **kwargs)

                async def start_kernel(self, **kwargs):
                    kwargs.setdefault("stderr", kernel_log)
                    return await super().start_kernel(**kwargs)

            papermill.execute_notebook(
                str(execution.notebook), str(partial), parameters=params, kernel_name=ensure_kernelspec(),
                language="python", progress_bar=False, log_output=False, cwd=str(tracking.project_home()),
                kernel_manager_class=IpcKernelManager,
            )
    finally:
        if partial.exists():
            os.replace(partial, final)
    return final


def _log_notebook(run_id: str, notebook: Path) -> Optional[Path]:
    """Log the executed notebook and its HTML rendering under ``notebook/``; returns the HTML path."""
    client = _client()
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
    progress: Optional[_Progress] = None,
) -> ExecutionResult:
    """One execution: cache check, child run, Papermill run, artifacts, status, cache record.

    Returns a ``failed`` result when a cell raises (the executed notebook keeps the error and
    the child run is FAILED); re-raises KeyboardInterrupt after marking the run FAILED.
    """
    progress = progress or _Progress(None, 1)
    key = cache_key(execution, upstream)
    record = None if force else cached_execution(pipeline.name, key)
    if record is not None:
        progress.cached(execution.label)
        if parent_run_id:
            # MLflow tag keys cannot hold "=": train-model=gru is tagged workbench.cached.train-model:gru
            tag = f"workbench.cached.{execution.label.replace('=', ':')}"
            _client().set_tag(parent_run_id, tag, record["run_id"])
        return ExecutionResult(
            execution.step, execution.label, "cached", record["run_id"], Path(record["output_dir"]), key,
            params=execution.params, matrix=execution.matrix,
        )

    output_dir = run_dir / execution.label
    output_dir.mkdir(parents=True, exist_ok=True)
    run_id = _start_child_run(pipeline, execution, experiment_id, parent_run_id, pipeline_run_id)
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
            _client().set_tag(result.run_id, "workbench.error", result.error[:5000])
    finally:
        # Even if artifact logging fails, the run must not stay RUNNING forever.
        _client().set_terminated(result.run_id, "FINISHED" if result.status == "finished" else "FAILED")


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
        from workbench.orchestrate import run_with_prefect  # same execute_step, Prefect schedules it

        result = run_with_prefect(pipeline, force=force)
        release_run(result.pipeline_run_id)  # the flow ran here, in this process, and has ended its runs
        return result
    if engine != "local":
        raise WorkbenchError(f"{pipeline.path}: engine {engine!r} is not available here (use 'local' or 'prefect')")
    ensure_kernelspec()
    tracking.setup()
    with runs.store_lock():  # another run may be creating the same new store or experiment right now
        experiment = tracking.experiment_id(pipeline.experiment)
    run_dir = new_run_dir(pipeline, tags)
    pipeline_run_id = run_dir.name
    try:
        return _run_owned(pipeline, experiment, run_dir, force, console)
    finally:
        release_run(pipeline_run_id)  # only now: every MLflow run of it is ended


def _run_owned(pipeline: Pipeline, experiment: str, run_dir: Path, force: bool, console) -> PipelineResult:
    pipeline_run_id = run_dir.name
    parent_run_id = start_parent_run(pipeline, experiment, pipeline_run_id)
    progress = _Progress(console, len(pipeline.executions))
    results: list[ExecutionResult] = []
    status = "FAILED"  # until every step has finished: an interrupt leaves the parent FAILED
    try:
        for step in pipeline.steps.values():
            upstream = {name: [r for r in results if r.step == name] for name in step.ancestors}
            for execution in step.executions:
                results.append(
                    execute_step(
                        pipeline, execution, run_dir, experiment_id=experiment, parent_run_id=parent_run_id,
                        pipeline_run_id=pipeline_run_id, upstream=upstream, force=force, progress=progress,
                    )
                )
                if results[-1].status == "failed":
                    break
            if results and results[-1].status == "failed":
                break
        else:
            status = "FINISHED"
    finally:
        _client().set_terminated(parent_run_id, status)
        result = PipelineResult(pipeline.name, pipeline_run_id, parent_run_id, run_dir, results, pipeline.experiment)
        write_text_atomic(run_dir / "run.json", json.dumps(_manifest(result, pipeline), indent=2, default=str))
    return result


def _manifest(result: PipelineResult, pipeline: Pipeline) -> dict:
    """``run.json`` in the run dir: what ran, with which params, and where everything went."""
    return {
        "pipeline": result.pipeline,
        "pipeline_yaml": str(pipeline.path),
        "pipeline_run_id": result.pipeline_run_id,
        "parent_run_id": result.parent_run_id,
        "params": pipeline.params,
        "overrides": pipeline.overrides,
        "ok": result.ok,
        "executions": [asdict(r) for r in result.executions],
    }
