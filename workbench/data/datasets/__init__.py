"""Small real datasets bundled with the package, as MEDS dataset roots.

>>> from workbench.data.datasets import load
>>> root = load("pbc")          # a Path; open it with workbench.data.meds_io.open_dataset
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from workbench.data.meds_io import DATASET_FILE
from workbench.errors import WorkbenchError


def _package_dir() -> Path:
    return Path(str(resources.files(__name__)))


def available() -> list[str]:
    """Names of the bundled datasets (directories holding a MEDS ``metadata/dataset.json``)."""
    return sorted(p.parent.parent.name for p in _package_dir().glob(f"*/{DATASET_FILE}"))


def load(name: str) -> Path:
    """The root directory of the bundled MEDS dataset ``name`` (e.g. ``"pbc"``)."""
    names = available()
    if name not in names:
        raise WorkbenchError(f"unknown bundled dataset {name!r}; available: {', '.join(names) or '(none)'}")
    return _package_dir() / name


def resolve(name_or_path: str | Path) -> Path:
    """A bundled dataset's root for a bundled name (``"pbc"``), else the given path itself."""
    if isinstance(name_or_path, str) and name_or_path in available():
        return load(name_or_path)
    path = Path(name_or_path)
    if not path.is_dir():
        raise WorkbenchError(
            f"{name_or_path!r} is neither a bundled dataset ({', '.join(available())}) nor a MEDS directory"
        )
    return path
