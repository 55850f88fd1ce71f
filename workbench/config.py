"""Validators shared by the stage configs (tasks, features)."""

from __future__ import annotations

import re


def check_regexes(patterns: list[str]) -> list[str]:
    """Pydantic validator body: every pattern must compile (the message names the bad one)."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
    return patterns


def validation_message(source: str, exc, locate=None) -> str:
    """A pydantic ValidationError as one line per bad field: ``source: field: what is wrong (got value)``.

    The one formatter of validation errors in the project; ``locate(loc)``, when given, replaces
    ``source`` per field (a YAML file's ``path:line``)."""
    lines = []
    for err in exc.errors():
        loc = [part for part in err["loc"] if not str(part).startswith(("function-", "list[", "dict["))]
        dotted = ".".join(str(part) for part in loc) or "(top level)"
        given = "" if err["type"] == "missing" or isinstance(err.get("input"), (dict, list)) else f" (got {err.get('input')!r})"
        where = locate(loc) if locate is not None else source
        lines.append(f"{where}: {dotted}: {err['msg'].removeprefix('Value error, ')}{given}")
    return "\n".join(lines)


def validated(cls, data, source: str, locate=None):
    """``cls.model_validate(data)``; a ValidationError becomes a WorkbenchError with one line per bad
    field (:func:`validation_message`). The one place a config's validation errors are turned into
    what a user reads."""
    from pydantic import ValidationError

    from workbench.errors import WorkbenchError

    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise WorkbenchError(validation_message(source, exc, locate)) from None


def read_yaml(path, what: str):
    """The data of a YAML file; an unreadable, non-UTF-8 or invalid one is a WorkbenchError naming it."""
    from pathlib import Path

    import yaml

    from workbench.errors import WorkbenchError

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkbenchError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"{path}: {what} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise WorkbenchError(f"{path}: not valid YAML: {exc}") from None


def load_yaml_config(cls, path, unwrap: str | None = None):
    """A pydantic config from a YAML file of its fields; every problem names the file and the field.

    The one loader behind every ``--config`` file. ``unwrap``: a top-level key the fields may sit under."""
    from pathlib import Path

    from workbench.errors import WorkbenchError

    path = Path(path)
    data = read_yaml(path, f"{cls.__name__} YAML")
    if unwrap and isinstance(data, dict) and set(data) == {unwrap}:
        data = data[unwrap]
    if data is not None and not isinstance(data, dict):
        raise WorkbenchError(f"{path}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    return validated(cls, data or {}, str(path))


def split_settings(settings: dict, configs: dict) -> dict:
    """``{"units": 32, "epochs": 5}`` as validated configs by field name, e.g. ``{"model_config":
    ModelConfig(units=32), "train_config": TrainConfig(epochs=5)}``; a key no config has is an error."""
    from workbench.errors import WorkbenchError

    unknown = [k for k in settings if not any(k in c.model_fields for c in configs.values())]
    if unknown:
        fields = sorted({f for c in configs.values() for f in c.model_fields})
        raise WorkbenchError(f"-p {', '.join(unknown)}: not a field of {', '.join(c.__name__ for c in configs.values())} "
                             f"(fields: {', '.join(fields)})")
    return {name: validated(cls, {k: v for k, v in settings.items() if k in cls.model_fields}, f"-p ({cls.__name__})")
            for name, cls in configs.items()}


#: The typed configs behind each shipped notebook's parameters (by notebook file stem): a parameter
#: named after a field is checked against that field, a dict parameter against its whole config,
#: ``model`` against the model kinds. Imported only when a pipeline runs such a notebook.
NOTEBOOK_CONFIGS: dict[str, dict] = {
    "01_cohort": {"dicts": {"features": "workbench.features:FeatureConfig"}},
    "02_train": {
        "fields": ("workbench.settings:ModelConfig", "workbench.settings:TrainConfig", "workbench.settings:EvalConfig"),
        "dicts": {"features": "workbench.features:FeatureConfig"},
        "choices": {"model": "workbench.settings:MODEL_KINDS"},
    },
    "05_survival": {
        "fields": ("workbench.settings:ModelConfig", "workbench.settings:TrainConfig"),
        "dicts": {"features": "workbench.features:FeatureConfig"},
        "choices": {"model": "workbench.settings:SURVIVAL_KINDS"},
    },
    "03_explain": {
        "fields": ("workbench.settings:ExplainConfig",),
        "dicts": {"explain_settings": "workbench.settings:ExplainConfig"},
    },
}
_SCALARS = (bool, int, float, str)


def _load(target: str):
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _type_name(value) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}[type(value)]


def check_notebook_parameters(notebook, params: dict, declared: dict, where: str) -> None:
    """Refuse a parameter value of the wrong type or out of range before any notebook runs.

    ``params`` are the values a pipeline passes to ``notebook`` (YAML and ``-p``), ``declared`` the
    notebook's parameters with their defaults (Papermill's inspection). A shipped notebook's values
    are validated by the typed config field of the same name (type, range, allowed values); any
    other parameter whose default is a bool, number or string must get the same kind of value.
    """
    import ast
    from pathlib import Path

    from pydantic import ValidationError

    from workbench.errors import WorkbenchError

    known = NOTEBOOK_CONFIGS.get(Path(notebook).stem, {})
    field_configs = [_load(t) for t in known.get("fields", ())] if params else []
    problems = []
    for key, value in params.items():
        config = next((c for c in field_configs if key in c.model_fields), None)
        if config is not None:
            if isinstance(value, bool) and config.model_fields[key].annotation is not bool:
                annotation = config.model_fields[key].annotation
                problems.append(f"{where}: parameter {key}: expected {getattr(annotation, '__name__', annotation)} "
                                f"(got {str(value).lower()}, which pydantic would read as {int(value)})")
                continue
            try:
                config.model_validate({key: value})
            except ValidationError as exc:
                problems.append(validation_message(f"{where}: parameter", exc).replace(": parameter: ", ": parameter "))
        elif key in known.get("dicts", {}):
            config = _load(known["dicts"][key])
            if not isinstance(value, dict):
                problems.append(f"{where}: parameter {key}: expected a mapping of {config.__name__} fields (got {value!r})")
                continue
            try:
                config.model_validate(value)
            except ValidationError as exc:
                problems.append(validation_message(f"{where}: parameter {key}", exc))
        elif key in known.get("choices", {}):
            choices = _load(known["choices"][key])
            if value not in choices:
                problems.append(f"{where}: parameter {key}: {value!r} is not one of {', '.join(choices)}")
        else:
            try:
                default = ast.literal_eval(declared.get(key, {}).get("default", "None"))
            except (ValueError, SyntaxError):
                continue
            if type(default) not in _SCALARS or value is None:
                continue
            fits = type(value) is type(default) or (type(default) is float and type(value) is int)
            if not fits:
                problems.append(f"{where}: parameter {key}: expected {_type_name(default)} like its default "
                                f"{default!r} in {Path(notebook).name} (got {value!r})")
    if problems:
        raise WorkbenchError("\n".join(problems))
