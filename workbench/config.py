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


def split_settings(settings: dict, configs: dict) -> dict:
    """``{"units": 32, "epochs": 5}`` as validated configs by field name, e.g. ``{"model_config":
    ModelConfig(units=32), "train_config": TrainConfig(epochs=5)}``; a key no config has is an error."""
    from pydantic import ValidationError

    from workbench.errors import WorkbenchError

    unknown = [k for k in settings if not any(k in c.model_fields for c in configs.values())]
    if unknown:
        fields = sorted({f for c in configs.values() for f in c.model_fields})
        raise WorkbenchError(f"-p {', '.join(unknown)}: not a field of {', '.join(c.__name__ for c in configs.values())} "
                             f"(fields: {', '.join(fields)})")
    out = {}
    for name, cls in configs.items():
        try:
            out[name] = cls(**{k: v for k, v in settings.items() if k in cls.model_fields})
        except ValidationError as exc:
            raise WorkbenchError(validation_message(f"-p ({cls.__name__})", exc)) from None
    return out
