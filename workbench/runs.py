"""Who owns a pipeline run, and settling runs whose owner died (``workbench runs reconcile``).

A pipeline run that is SIGKILLed, OOM-killed or loses its machine cannot end its MLflow runs:
they would stay RUNNING forever. So every pipeline run has an **owner**: the process that
holds an exclusive ``flock`` on ``<run dir>/.owner.lock`` for the run's whole life
(:func:`claim`). The kernel releases a ``flock`` when the last descriptor of it closes, so
the lock vanishes with the process however it dies, and a reused pid can never look alive.
The lock file also holds the owner record (host, pid, process start time, lock path), and so
does the ``workbench.owner`` tag of the parent run and of every step's child run.

:func:`reconcile` (run by ``workbench run``, ``workbench ui``, ``workbench schedule list``, the
scheduler and ``workbench runs reconcile``) makes one search for RUNNING runs with an owner
tag over all experiments, asks each owner whether it is alive (:func:`owner_gone`), and
terminates the runs of dead owners as KILLED with a ``workbench.killed`` tag saying how and
when that was found. A run whose owner is alive, or lives on another host, is never touched.
It then tidies the dead run's folder: the notebook Papermill was writing,
``<label>.partial.ipynb``, becomes ``<label>.killed.ipynb`` (and is logged to its child run),
and step folders the killed step left empty are removed.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Optional

from workbench import tracking
from workbench.record import ERROR_TAG, KILLED_TAG, OWNER_TAG, PIPELINE_YAML_TAG

LOCK_FILE = ".owner.lock"
PARTIAL_SUFFIX = ".partial.ipynb"
KILLED_SUFFIX = ".killed.ipynb"


# --- owners -----------------------------------------------------------------------------


def process_start(pid: int) -> Optional[int]:
    """The process's start time (clock ticks after boot, ``/proc/<pid>/stat`` field 22), or None."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time) of a process from ``/proc``, or None when there is no such entry."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: Optional[int], start: Optional[int] = None) -> bool:
    """Whether process ``pid`` runs (and is the one that started at ``start``, when known)."""
    if not pid:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        return state not in ("Z", "X") and (start is None or started == start)
    if Path("/proc/self/stat").exists():
        return False  # /proc works here and has no such process
    try:  # no /proc (macOS): a signal-0 probe; a reused pid reads as alive, the safe side
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


@dataclass
class Owner:
    """This process's claim on one pipeline run: the open, locked lock file and its record."""

    info: dict[str, Any]
    handle: Optional[IO[str]]

    @property
    def tag(self) -> str:
        return json.dumps(self.info, sort_keys=True)

    def release(self) -> None:
        """Give the run up (after its MLflow runs are ended): the lock is free from now on."""
        if self.handle is not None:
            self.handle.close()  # closing the only descriptor drops the flock
            self.handle = None


def claim(run_dir: Path) -> Owner:
    """Take ``<run_dir>/.owner.lock`` for this process; hold the returned owner for the run's life.

    Python opens files close-on-exec, so kernels and other programs we start do not inherit
    the lock: it is held exactly as long as this process (or a ``fork`` of it) lives.
    """
    lock = Path(run_dir).resolve() / LOCK_FILE
    handle = open(lock, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh run dir: nobody else has it
        info = {
            "host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
            "lock": str(lock), "since": _now(),
        }
        handle.write(json.dumps(info, indent=2) + "\n")
        handle.flush()
    except BaseException:
        handle.close()
        raise
    return Owner(info, handle)


def parse_owner(tag: Optional[str]) -> Optional[dict[str, Any]]:
    """The owner record of a ``workbench.owner`` tag, or None when it is missing or unreadable."""
    try:
        info = json.loads(tag or "")
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get("lock") and info.get("host") else None


def owner_gone(info: dict[str, Any]) -> Optional[str]:
    """Why the owner of a run is gone, or None when it is alive or cannot be told from here.

    The lock decides: held, the owner lives; free, it is gone (or let go of the run without
    ending it). Only when the lock file itself was deleted do pid and start time decide.
    An owner on another host is never judged: its lock and process are not visible here.
    """
    if info.get("host") != socket.gethostname():
        return None
    pid, start, lock = info.get("pid"), info.get("start"), str(info["lock"])
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)  # never create it: a missing lock is not a free one
    except FileNotFoundError:
        if process_alive(pid, start):
            return None
        return f"owner pid {pid} gone (its lock file {lock} was removed)"
    except OSError:
        return None  # unreadable: cannot tell
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: probing needs no write access
        except BlockingIOError:
            return None
        if process_alive(pid, start):
            return f"owner pid {pid} let go of the run without ending it (its lock {lock} is free)"
        return f"owner pid {pid} gone (its lock {lock} is free)"
    finally:
        os.close(fd)


# --- reconcile ----------------------------------------------------------------------------


@dataclass
class KilledRun:
    """A RUNNING run whose owner was gone, now KILLED."""

    run_id: str
    experiment_id: str
    name: str  # the run name: "<pipeline> <run id>" for a parent, the step label for a child
    parent: bool
    run_dir: Optional[Path]
    message: str  # the workbench.killed tag

    def describe(self) -> str:
        kind = "pipeline run" if self.parent else "step"
        return f"{kind} {self.name} (MLflow run {self.run_id}) marked KILLED: {self.message}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def store_exists() -> bool:
    """False for a local SQLite store that was never created (then nothing can be RUNNING)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tracking.mlruns_dir() / 'mlflow.db'}"
    if not uri.startswith("sqlite:///"):
        return True
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return path == ":memory:" or Path(path).is_file()


def _local_db() -> Optional[Path]:
    uri = tracking.tracking_uri()
    if not tracking.is_local_store(uri):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path == ":memory:" else Path(path)


@contextmanager
def store_lock() -> Iterator[None]:
    """Hold ``<db>.lock`` beside a local SQLite store: open a new store and create experiments under it.

    MLflow creates and migrates a SQLite store on a process's first use, and creates an
    experiment after finding none; neither is safe when two processes do it at once (two
    ``workbench run`` started together on a new store fail with "table _alembic_tmp_experiments
    already exists" or "experiment already exists"). A server store needs no lock.
    """
    db = _local_db()
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError(f"tag value {value!r}: quotes are not allowed in a search")
    return f"'{value}'"


def _experiment_ids(client) -> list[str]:
    ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def _running_owned(client, experiment_ids: list[str], tags: dict[str, str]) -> list:
    where = ["attributes.status = 'RUNNING'", f"tags.`{OWNER_TAG}` IS NOT NULL"]
    where += [f"tags.`{key}` = {_quote(str(value))}" for key, value in tags.items()]
    found, token = [], None
    while True:
        page = client.search_runs(experiment_ids, " and ".join(where), max_results=1000, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def reconcile(found_by: str, tags: Optional[dict[str, str]] = None, client=None) -> list[KilledRun]:
    """Terminate as KILLED the RUNNING workbench runs (parents and steps) whose owner is gone.

    One search over all experiments finds the RUNNING runs with an owner tag (and ``tags``,
    when given); nothing else is read when none is dead. Returns what was killed, steps first.
    """
    if client is None:
        if not store_exists():
            return []
        from mlflow.tracking import MlflowClient

        tracking.setup()
        with store_lock():  # the store may be new, and another process opening it at this moment
            client = MlflowClient()
            experiments = _experiment_ids(client)
    else:
        experiments = _experiment_ids(client)
    if not experiments:
        return []
    candidates = _running_owned(client, experiments, dict(tags or {}))
    verdicts: dict[str, Optional[str]] = {}
    killed: list[KilledRun] = []
    when = _now()
    # Steps before their parent: the parent's tag can then name the step that was running.
    for run in sorted(candidates, key=lambda r: PIPELINE_YAML_TAG in r.data.tags):  # only parents carry it
        info = parse_owner(run.data.tags.get(OWNER_TAG))
        if info is None:
            continue
        lock = str(info["lock"])
        if lock not in verdicts:
            verdicts[lock] = owner_gone(info)
        reason = verdicts[lock]
        if reason is None:
            continue
        # Read again now that the lock is known free: an owner ends its runs before letting go,
        # so a run that finished since the search is FINISHED by now and left as it is.
        if client.get_run(run.info.run_id).info.status != "RUNNING":
            continue
        parent = PIPELINE_YAML_TAG in run.data.tags
        message = f"{reason}; found by {found_by} at {when}"
        if parent:
            steps = [k.name for k in killed if not k.parent and k.run_dir == Path(lock).parent]
            if steps:
                message = f"{reason} while running {', '.join(steps)}; found by {found_by} at {when}"
        run_dir = Path(lock).parent
        client.set_tag(run.info.run_id, KILLED_TAG, message)
        if ERROR_TAG not in run.data.tags:
            client.set_tag(run.info.run_id, ERROR_TAG, f"killed: {message}"[:5000])
        client.set_terminated(run.info.run_id, "KILLED", end_time=_last_sign_of_life(run_dir, run.info.start_time))
        killed.append(KilledRun(run.info.run_id, run.info.experiment_id, run.info.run_name, parent, run_dir, message))
    for run_dir in dict.fromkeys(k.run_dir for k in killed if k.run_dir is not None):
        steps = {k.name: k.run_id for k in killed if not k.parent and k.run_dir == run_dir}
        tidy_run_dir(run_dir, steps, client)
    return killed


def _last_sign_of_life(run_dir: Path, start_ms: Optional[int]) -> int:
    """The newest modification in the run folder (Papermill saves after every cell), as the end time."""
    now = int(time.time() * 1000)
    try:
        newest = max(int(p.stat().st_mtime * 1000) for p in [run_dir, *run_dir.iterdir()])
    except (OSError, ValueError):
        return now
    return min(now, max(newest, start_ms or 0))


def tidy_run_dir(run_dir: Path, steps: Optional[dict[str, str]] = None, client=None) -> list[Path]:
    """A dead run's folder made plain: ``<label>.partial.ipynb`` renamed ``<label>.killed.ipynb``
    (logged under ``notebook/`` of its step's run, ``steps`` maps labels to run ids) and empty
    step folders removed. Call only when the run's owner is gone. Returns the killed notebooks."""
    kept = []
    try:
        partials = sorted(run_dir.glob(f"*{PARTIAL_SUFFIX}"))
    except OSError:
        return kept
    for partial in partials:
        label = partial.name[: -len(PARTIAL_SUFFIX)]
        target = partial.with_name(label + KILLED_SUFFIX)
        try:
            os.replace(partial, target)
        except OSError:
            continue  # another reconcile got there first
        kept.append(target)
        run_id = (steps or {}).get(label)
        if run_id and client is not None:
            try:
                client.log_artifact(run_id, str(target), "notebook")
            except Exception:  # the notebook stays in the run folder; the run is KILLED either way
                pass
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return kept
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            try:
                entry.rmdir()  # only an empty folder goes
            except OSError:
                pass
    return kept
