"""Files written so that a reader or a crash never sees half of one, and cheap fingerprints of inputs.

Every output of the workbench goes through :func:`write_text_atomic`,
:func:`write_parquet_atomic` or :func:`replace_directory`: the data is written under a temporary
name in the same folder and renamed into place, so the target is the old version or the whole
new one, never a torn file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional


def project_home() -> Path:
    """The directory holding ``mlruns/`` and ``runs/``, the same wherever a command or a notebook
    is started from: ``WORKBENCH_HOME`` when set, else the project checkout this package lives in
    (the usual editable install), else the current directory."""
    if os.environ.get("WORKBENCH_HOME"):
        return Path(os.environ["WORKBENCH_HOME"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[1]  # the checkout: workbench/files.py -> ..
    if (checkout / "pyproject.toml").is_file() and (checkout / "notebooks").is_dir():
        return checkout
    return Path.cwd().resolve()


def _temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """``.NAME.tmp-<pid>-<random>``: the writer's pid lets a later writer tell a dead one's leftovers."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``target`` left by writers that died (killed mid-write):
    ``.NAME.tmp-<pid>-*`` and ``.NAME.old-<pid>-*`` whose pid is gone. Returns what was removed."""
    target = Path(target)
    removed = []
    prefix = f".{target.name}."
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        rest = sibling.name[len(prefix):] if sibling.name.startswith(prefix) else ""
        kind, _, tail = rest.partition("-")
        pid = tail.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def write_atomic(path: str | os.PathLike, write) -> Path:
    """``write(tmp)`` into a temporary sibling of ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_output(out: str | os.PathLike, option: str, inputs=(), folder_marker: str | None = None) -> Path:
    """Refuse an output path before anything is computed when writing there would destroy something:
    an input (the dataset, the labels) or a path inside one, a folder holding an input, an existing
    folder where a file goes, or (for a folder output, recognised by ``folder_marker``) an existing
    folder that is not an earlier output of the same command."""
    from workbench.errors import WorkbenchError

    out = Path(out)
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise WorkbenchError(f"{option} {out}: would overwrite the input {given}; write somewhere else")
    if folder_marker is None and target.is_dir():
        raise WorkbenchError(f"{option} {out}: is a folder; give a file path")
    if folder_marker is not None and target.exists():
        if not target.is_dir():
            raise WorkbenchError(f"{option} {out}: is a file; give a folder path")
        if any(target.iterdir()) and not (target / folder_marker).is_file():
            raise WorkbenchError(f"{option} {out}: is a folder that holds other things (no {folder_marker}); "
                                 "its contents would be replaced: give a new or empty folder")
    return out


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary sibling and a rename."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_parquet_atomic(df, path: str | os.PathLike) -> Path:
    """Write a polars frame as parquet via a temporary sibling and a rename."""
    return write_atomic(path, df.write_parquet)


def temporary_directory_for(target: str | os.PathLike) -> Path:
    """A new empty folder beside ``target`` (same file system, so it can be renamed onto it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = _temporary_sibling(target)
    tmp.mkdir()
    return tmp


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    ok = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0
    return ok


def replace_directory(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` onto ``target``. An existing target is swapped with it in
    one atomic step, so a reader sees the old folder or the new one and never a missing one; where
    the file system cannot swap, the old one is renamed aside only at the last moment."""
    tmp, target = Path(tmp), Path(target)
    if target.exists() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = None
    if target.exists():
        old = _temporary_sibling(target, "old")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def directory_digest(path: Path) -> str:
    """sha256 over every file (relative path and bytes) under ``path``."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def path_fingerprint(value: Any, base: Optional[Path] = None) -> Optional[str]:
    """For a value naming an existing file or directory (a dataset, a labels file): a digest of its
    files' names, sizes and modification times, so new data behind the same path is noticed
    without reading gigabytes. None for any other value. Relative paths resolve against ``base``."""
    if not isinstance(value, (str, os.PathLike)) or not str(value) or len(str(value)) > 4096:
        return None
    path = Path(value)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        name = file.relative_to(path) if path.is_dir() else file.name
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def code_fingerprint() -> str:
    """Digest of the workbench package's source: a library change invalidates cached results."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for file in sorted(package.rglob("*.py")):
        digest.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()
