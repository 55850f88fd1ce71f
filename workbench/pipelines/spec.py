"""The pipeline file: its YAML schema, validation with file and line, ``-p`` overrides, the
notebooks' parameters cells, and the plan (:func:`load_pipeline` -> :class:`Pipeline`).

Nothing here runs a notebook, starts a kernel or touches MLflow: a pipeline is checked whole
before any run, folder or kernel is created.
"""

from __future__ import annotations

import graphlib
import hashlib
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from workbench.config import check_notebook_parameters, validated
from workbench.errors import WorkbenchError

#: Parameters the engine injects into a notebook that declares them in its parameters cell.
INJECTED = ("output_dir", "upstream", "mlflow_run_id", "mlflow_parent_run_id")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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
    engine: Literal["local", "prefect"] = Field("local", description="Where steps run (prefect: workbench.pipelines.prefect_engine)")
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
        return validated(PipelineSpec, source.data, str(source.path), lambda loc: source.at(*loc))
    except WorkbenchError as exc:
        raise WorkbenchError(f"invalid pipeline:\n{exc}") from None


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

