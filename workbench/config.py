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


def validation_message(source: str, exc) -> str:
    """A pydantic ValidationError as one line per bad field: ``source: field: what is wrong (got value)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        given = "" if err["type"] == "missing" or isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
        lines.append(f"{source}: {loc}: {err['msg'].removeprefix('Value error, ')}{given}")
    return "\n".join(lines)


def load_yaml_config(cls, path):
    """A pydantic config from a YAML file of its fields; every problem names the file and the field."""
    from pathlib import Path

    import yaml
    from pydantic import ValidationError

    from workbench.errors import WorkbenchError

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise WorkbenchError(f"{path}: cannot read {cls.__name__} YAML ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise WorkbenchError(f"{path}: not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise WorkbenchError(f"{path}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    try:
        return cls.model_validate(data or {})
    except ValidationError as exc:
        raise WorkbenchError(validation_message(str(path), exc)) from None
