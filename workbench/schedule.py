"""Scheduled reruns: cron schedules of pipelines in a persistent APScheduler (3.x) job store.

``workbench schedule add`` writes a job into ``runs/.scheduler/jobs.sqlite`` and runs
nothing; ``workbench scheduler`` is the one process that runs due jobs. Because the job
store is SQLite, schedules survive restarts; jobs use ``coalesce=True`` and no misfire
limit, so a schedule that fired several times while the scheduler was down runs once.

Each scheduled run (:func:`run_scheduled`):

* takes ``runs/.locks/<pipeline>.lock`` (``flock``, non-blocking): if another run of the
  same pipeline holds it, in this process or another, the trigger is recorded ``skipped``;
* runs the pipeline in a child process (``python -m workbench.schedule``), which inherits
  the lock, so the lock lives exactly as long as the run, even if the scheduler dies;
* after the run, compares it with the previous run of the pipeline
  (:func:`workbench.monitor.monitor_rerun`) and logs ``monitor.*`` metrics on its parent run;
* records started / finished / failed / skipped / killed in ``runs/.scheduler/history.sqlite``.
  A child that dies without writing its result (SIGKILL, OOM) is ``killed``, and its MLflow
  runs still RUNNING are terminated KILLED so nothing reports it as finished.

Every MLflow run a scheduled run creates is tagged ``workbench.schedule`` (the schedule) and
``workbench.schedule_entry`` (its history entry id), so the runs of one trigger are found by
tag, never by a time window; and only runs whose owner process is gone
(:mod:`workbench.runs`) are ever terminated, so a live manual run is never touched.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from workbench import runs, tracking
from workbench.errors import WorkbenchError
from workbench.files import write_text_atomic
from workbench.record import PIPELINE_YAML_TAG, SCHEDULE_ENTRY_TAG, SCHEDULE_TAG

log = logging.getLogger(__name__)

JOB_FUNC = "workbench.schedule:run_scheduled"  # a textual reference: the job store pickles it as text
WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]  # crontab numbering: 0 (and 7) is Sunday

HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    schedule TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    experiment TEXT,
    triggered_at TEXT NOT NULL,
    ended_at TEXT,
    status TEXT NOT NULL,
    pid INTEGER,
    parent_run_id TEXT,
    experiment_id TEXT,
    auroc_change REAL,
    error TEXT
)"""


# --- where state lives -----------------------------------------------------------------


def state_dir() -> Path:
    """``runs/.scheduler/`` under the project home: job store, run history, results, logs."""
    path = tracking.project_home() / "runs" / ".scheduler"
    path.mkdir(parents=True, exist_ok=True)
    return path


def lock_path(pipeline_name: str) -> Path:
    """The per-pipeline lock file that keeps two runs of one pipeline apart."""
    path = tracking.project_home() / "runs" / ".locks" / f"{pipeline_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def try_lock(path: Path):
    """The open, ``flock``-ed file, or None when another process (or thread) holds the lock."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


# --- cron expressions ------------------------------------------------------------------


def _weekday_number(token: str, expr: str) -> int:
    if token.lower() in WEEKDAYS:
        return WEEKDAYS.index(token.lower())
    if token.isdigit() and 0 <= int(token) <= 7:
        return int(token) % 7
    raise ValueError(f"day of week {token!r} in {expr!r} is not 0-7 or sun-sat")


def crontab_weekdays(field: str) -> str:
    """A crontab day-of-week field as APScheduler 3 names (``1`` -> ``mon``).

    APScheduler 3 counts weekdays from Monday = 0 while crontab counts from Sunday = 0, so
    ``0 2 * * 1`` passed through unchanged would run on Tuesdays. Expanding to names avoids it.
    """
    if field == "*":
        return "*"
    days: set[int] = set()
    for part in field.split(","):
        span, _, step = part.partition("/")
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            a, b = span.split("-", 1)
            first, last = _weekday_number(a, field), _weekday_number(b, field)
            last = 7 if b.strip() == "7" or (b.lower() == "sun" and first > 0) else last
        else:
            first = _weekday_number(span, field)
            last = 6 if step else first
        if last < first:
            raise ValueError(f"day-of-week range {span!r} runs backwards")
        if step and not (step.isdigit() and int(step) > 0):
            raise ValueError(f"step {step!r} in {part!r} is not a positive number")
        days.update(d % 7 for d in range(first, last + 1, int(step or 1)))
    return ",".join(WEEKDAYS[d] for d in sorted(days))


def parse_cron(expr: str):
    """A CronTrigger from a 5-field crontab expression (local time), or a clear WorkbenchError."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    hint = "expected 5 fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * 1' (Mondays 02:00)"
    if len(fields) != 5:
        raise WorkbenchError(f"invalid cron expression {expr!r}: {len(fields)} field(s); {hint}")
    try:
        return CronTrigger(
            minute=fields[0], hour=fields[1], day=fields[2], month=fields[3], day_of_week=crontab_weekdays(fields[4])
        )
    except ValueError as exc:
        raise WorkbenchError(f"invalid cron expression {expr!r}: {exc}; {hint}") from exc


# --- the job store ---------------------------------------------------------------------


def _scheduler():
    """A scheduler over the persistent SQLite job store (not started)."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    store = SQLAlchemyJobStore(url=f"sqlite:///{state_dir() / 'jobs.sqlite'}")
    defaults = {"coalesce": True, "misfire_grace_time": None, "max_instances": 1}
    return BackgroundScheduler(jobstores={"default": store}, job_defaults=defaults)


@contextmanager
def _job_store() -> Iterator[Any]:
    """A paused scheduler: APScheduler 3 only writes jobs to the store once started, paused runs none."""
    scheduler = _scheduler()
    scheduler.start(paused=True)
    try:
        yield scheduler
    finally:
        scheduler.shutdown(wait=False)


def _job(scheduler, name: str):
    job = scheduler.get_job(name)
    if job is None:
        known = ", ".join(j.id for j in scheduler.get_jobs()) or "none"
        raise WorkbenchError(f"no schedule named {name!r} (schedules: {known})")
    return job


def add_schedule(
    pipeline: str | Path, cron: str, overrides: dict[str, Any] | None = None,
    name: Optional[str] = None, force: bool = True,
) -> str:
    """Validate the pipeline, its overrides and the cron expression, then store the job; returns its name.

    ``force`` (default): a rerun executes every step, since the cache cannot see that the
    data behind an unchanged path changed; ``force=False`` reuses unchanged steps.
    """
    import re

    from workbench.pipelines import NAME_PATTERN, load_pipeline

    trigger = parse_cron(cron)
    loaded = load_pipeline(pipeline, overrides)  # unknown pipeline or parameter: refused here
    name = name or loaded.name
    if not re.match(NAME_PATTERN, name):
        raise WorkbenchError(f"schedule name {name!r} must match {NAME_PATTERN}")
    with _job_store() as scheduler:
        if scheduler.get_job(name) is not None:
            raise WorkbenchError(f"a schedule named {name!r} already exists (remove it or pass --name)")
        scheduler.add_job(
            JOB_FUNC, trigger, args=[str(loaded.path), dict(overrides or {}), name],
            kwargs={"force": force, "cron": cron}, id=name, name=loaded.name,  # name: the pipeline
        )
    return name


def remove_schedule(name: str) -> None:
    """Delete a schedule (its run history stays)."""
    with _job_store() as scheduler:
        scheduler.remove_job(_job(scheduler, name).id)


def pause_schedule(name: str) -> None:
    """Stop triggering a schedule until :func:`resume_schedule` (missed triggers are not made up)."""
    with _job_store() as scheduler:
        scheduler.pause_job(_job(scheduler, name).id)


def resume_schedule(name: str) -> None:
    """Trigger a paused schedule again, from its next fire time after now."""
    with _job_store() as scheduler:
        scheduler.resume_job(_job(scheduler, name).id)


# --- run history -----------------------------------------------------------------------


@dataclass
class HistoryEntry:
    """One trigger of a schedule and what became of it."""

    id: int
    schedule: str
    pipeline: str
    experiment: Optional[str]
    triggered_at: str
    ended_at: Optional[str]
    status: str
    pid: Optional[int]
    parent_run_id: Optional[str]
    experiment_id: Optional[str]
    auroc_change: Optional[float]
    error: Optional[str]


@contextmanager
def _history() -> Iterator[sqlite3.Connection]:
    """A connection in one transaction (committed on exit): a record is written whole or not at all."""
    con = sqlite3.connect(state_dir() / "history.sqlite", timeout=30)
    con.row_factory = sqlite3.Row
    try:
        with con:
            con.execute(HISTORY_SCHEMA)
            yield con
    finally:
        con.close()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _record(schedule: str, pipeline: str, status: str, experiment: Optional[str] = None, error: Optional[str] = None) -> int:
    ended = None if status == "started" else _now()
    with _history() as con:
        cur = con.execute(
            "INSERT INTO runs (schedule, pipeline, experiment, triggered_at, ended_at, status, error) VALUES (?,?,?,?,?,?,?)",
            (schedule, pipeline, experiment, _now(), ended, status, error),
        )
        return int(cur.lastrowid)


def _update(entry_id: int, **values: Any) -> None:
    columns = ", ".join(f"{k} = ?" for k in values)
    with _history() as con:
        con.execute(f"UPDATE runs SET {columns} WHERE id = ?", (*values.values(), entry_id))


def _entry(entry_id: int) -> HistoryEntry:
    with _history() as con:
        return HistoryEntry(**dict(con.execute("SELECT * FROM runs WHERE id = ?", (entry_id,)).fetchone()))


def history(schedule: Optional[str] = None) -> list[HistoryEntry]:
    """Recorded triggers, oldest first (of one schedule, or all)."""
    where, args = ("WHERE schedule = ?", (schedule,)) if schedule else ("", ())
    with _history() as con:
        rows = con.execute(f"SELECT * FROM runs {where} ORDER BY id", args).fetchall()
    return [HistoryEntry(**dict(row)) for row in rows]


# --- one scheduled run -----------------------------------------------------------------


def _result_file(entry_id: int) -> Path:
    path = state_dir() / "results" / f"{entry_id}.json"
    path.parent.mkdir(exist_ok=True)
    return path


def run_scheduled(pipeline: str, overrides: dict[str, Any], schedule: str, force: bool = True, cron: str = "") -> str:
    """The job the scheduler runs (``cron`` is only for display): one locked pipeline run; returns its status."""
    from workbench.pipelines import load_pipeline

    try:
        loaded = load_pipeline(pipeline, overrides)
    except WorkbenchError as exc:  # the YAML changed or vanished since it was scheduled: record, keep the job
        _record(schedule, str(pipeline), "failed", error=str(exc))
        log.error("schedule %s: %s", schedule, exc)
        return "failed"
    lock = try_lock(lock_path(loaded.name))
    if lock is None:
        _record(schedule, loaded.name, "skipped", loaded.experiment, f"another run of {loaded.name} is in progress")
        log.warning("schedule %s: skipped, another run of %s is in progress", schedule, loaded.name)
        return "skipped"
    try:
        entry_id = _record(schedule, loaded.name, "started", loaded.experiment)
        returncode = _run_child(entry_id, str(loaded.path), overrides, force, lock, schedule)
        status = settle(entry_id, returncode=returncode)
    finally:
        lock.close()
    log.info("schedule %s: %s", schedule, status)
    return status


def _run_child(entry_id: int, pipeline: str, overrides: dict[str, Any], force: bool, lock, schedule: str = "") -> int:
    """Run the pipeline in ``python -m workbench.schedule``; it inherits the lock. Returns its exit code."""
    job = {
        "pipeline": pipeline, "overrides": overrides, "force": force, "result": str(_result_file(entry_id)),
        "tags": run_tags(schedule, entry_id),
    }
    log_file = state_dir() / "logs" / f"{entry_id}.log"
    log_file.parent.mkdir(exist_ok=True)
    env = {**os.environ, "WORKBENCH_HOME": str(tracking.project_home())}
    with open(log_file, "ab") as out:
        # A new session: Ctrl-C on the scheduler's terminal does not reach a running pipeline,
        # which the scheduler then waits for on shutdown.
        proc = subprocess.Popen(
            [sys.executable, "-m", "workbench.schedule", json.dumps(job, default=str)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tracking.project_home(),
            pass_fds=(lock.fileno(),), start_new_session=True,
        )
        _update(entry_id, pid=proc.pid)
        return proc.wait()


def run_tags(schedule: str, entry_id: int) -> dict[str, str]:
    """The tags of the MLflow runs one trigger of a schedule creates."""
    return {SCHEDULE_TAG: schedule, SCHEDULE_ENTRY_TAG: str(entry_id)}


def settle(entry_id: int, returncode: Optional[int] = None) -> str:
    """Record a started run's outcome from its result file; no result file means the child was killed."""
    entry = _entry(entry_id)
    try:
        result = json.loads(_result_file(entry_id).read_text())
    except (OSError, ValueError):
        result = None
    if result is not None:
        values = {k: result.get(k) for k in ("status", "parent_run_id", "experiment_id", "error", "auroc_change")}
    else:
        how = f"signal {-returncode}" if returncode is not None and returncode < 0 else f"exit code {returncode}"
        parent = mark_killed_runs(entry, f"the pipeline process died ({how})")
        values = {
            "status": "killed", "parent_run_id": parent[0] if parent else None,
            "experiment_id": parent[1] if parent else None,
            "error": f"the pipeline process died ({how}) before recording a result",
        }
    _update(entry_id, ended_at=_now(), **values)
    return values["status"]


def mark_killed_runs(entry: HistoryEntry, how: str = "") -> Optional[tuple[str, str]]:
    """Terminate as KILLED the still RUNNING MLflow runs of one trigger whose owner process is gone.

    The runs are found by their ``workbench.schedule_entry`` tag, not by when they started, and
    :func:`workbench.runs.reconcile` ends only runs whose owner is gone. Returns the trigger's
    ``(parent run id, experiment id)`` (killed now, or already ended), or None when it made none.
    """
    from mlflow.tracking import MlflowClient

    if not runs.store_exists():
        return None  # the run died before it created anything in MLflow
    tags = run_tags(entry.schedule, entry.id)
    runs.reconcile(f"the scheduler (schedule {entry.schedule}, history entry {entry.id}{': ' + how if how else ''})", tags=tags)
    client = MlflowClient()
    exp = client.get_experiment_by_name(entry.experiment or entry.pipeline)
    if exp is None:
        return None
    # Only parent runs carry the pipeline YAML tag.
    where = " and ".join([f"tags.`{PIPELINE_YAML_TAG}` IS NOT NULL", *(f"tags.`{k}` = '{v}'" for k, v in tags.items())])
    parents = client.search_runs([exp.experiment_id], where, max_results=1, order_by=["attributes.start_time DESC"])
    return (parents[0].info.run_id, exp.experiment_id) if parents else None


def reconcile() -> list[int]:
    """Settle runs left ``started`` by a scheduler that died; returns their entry ids.

    A run whose child still lives holds its pipeline lock and is left alone; one whose child
    finished has a result file; the rest were killed.
    """
    settled = []
    for entry in history():
        if entry.status != "started" or runs.process_alive(entry.pid):
            continue
        lock = try_lock(lock_path(entry.pipeline))
        if lock is None:
            continue
        try:
            settle(entry.id)
            settled.append(entry.id)
        finally:
            lock.close()
    return settled


def _child_main(job: dict) -> int:
    """In the child process: run the pipeline, monitor it against the previous run, write the result file."""
    from workbench import monitor, pipelines

    result: dict[str, Any] = {"status": "failed", "parent_run_id": None, "experiment_id": None, "error": None}
    try:
        run = pipelines.run_pipeline(job["pipeline"], job["overrides"], force=job["force"], tags=job.get("tags"))
        result["parent_run_id"] = run.parent_run_id
        result["status"] = "finished" if run.ok else "failed"
        result["error"] = None if run.ok else run.failure.error
        from mlflow.tracking import MlflowClient

        result["experiment_id"] = MlflowClient().get_run(run.parent_run_id).info.experiment_id
        if run.ok:
            result.update(_monitor_safely(monitor, run.parent_run_id))
    except Exception as exc:  # recorded as failed; the schedule stays and fires again
        result["error"] = f"{type(exc).__name__}: {exc}"
    write_text_atomic(Path(job["result"]), json.dumps(result, indent=2, default=str))
    print(json.dumps(result, default=str))
    return 0 if result["status"] == "finished" else 1


def _monitor_safely(monitor, parent_run_id: str) -> dict[str, Any]:
    """Monitoring metrics for the result; a monitoring problem is reported, never fails the run."""
    try:
        report = monitor.monitor_rerun(parent_run_id)
    except Exception as exc:
        print(f"warning: monitoring failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {"monitor_error": f"{type(exc).__name__}: {exc}"}
    return {"monitor": report, "auroc_change": report.get("metrics", {}).get("monitor.auroc_change")}


# --- listing ---------------------------------------------------------------------------


@dataclass
class ScheduleInfo:
    """A schedule as ``workbench schedule list`` shows it."""

    name: str
    pipeline: str  # its name
    yaml: str  # its file
    cron: str
    overrides: dict[str, Any]
    force: bool
    next_run: Optional[dt.datetime]  # None: paused
    last: Optional[HistoryEntry]
    auroc_dropped: bool  # the last finished run's held-out AUROC fell by more than the threshold

    @property
    def last_status(self) -> str:
        """The last run's status; a ``started`` run whose process is gone shows as ``killed``."""
        if self.last is None:
            return ""
        if self.last.status == "started":
            return "running" if runs.process_alive(self.last.pid) else "killed"
        return self.last.status

    def run_link(self, ui: Optional[str] = None) -> str:
        """The MLflow UI address of the last run's parent run (``workbench ui`` serves 127.0.0.1:5000)."""
        if self.last is None or not self.last.parent_run_id:
            return ""
        base = ui or os.environ.get("WORKBENCH_UI_URL", "http://127.0.0.1:5000")
        return f"{base}/#/experiments/{self.last.experiment_id}/runs/{self.last.parent_run_id}"


def list_schedules(auroc_drop: float = 0.05) -> list[ScheduleInfo]:
    """Every schedule with its next run, its last run and whether its AUROC fell by more than ``auroc_drop``."""
    with _job_store() as scheduler:
        jobs = scheduler.get_jobs()
    entries = history()
    infos = []
    for job in jobs:
        mine = [e for e in entries if e.schedule == job.id]
        finished = [e for e in mine if e.status == "finished"]
        change = finished[-1].auroc_change if finished else None
        infos.append(ScheduleInfo(
            name=job.id, pipeline=job.name, yaml=job.args[0], cron=job.kwargs.get("cron", str(job.trigger)), overrides=job.args[1],
            force=job.kwargs.get("force", True), next_run=job.next_run_time, last=mine[-1] if mine else None,
            auroc_dropped=change is not None and change < -auroc_drop,
        ))
    return infos


# --- the scheduler process -------------------------------------------------------------


def _record_max_instances(scheduler):
    """A listener: a trigger skipped because the schedule's previous run still runs is recorded too."""

    def listener(event) -> None:
        job = scheduler.get_job(event.job_id)
        pipeline = job.name if job is not None else "?"
        _record(event.job_id, pipeline, "skipped", error="the previous run of this schedule is still running")

    return listener


def run_scheduler(poll_seconds: float = 10.0, stop: Optional[threading.Event] = None) -> None:
    """Run due schedules until ``stop`` is set (or SIGTERM / Ctrl-C); waits for running pipelines on exit.

    Refuses to start when another scheduler serves this project: two would run every job twice.
    """
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES

    guard = try_lock(state_dir() / "scheduler.lock")
    if guard is None:
        raise WorkbenchError(f"another scheduler is already running for {tracking.project_home()}")
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        for entry_id in reconcile():
            log.warning("history entry %s: settled a run left behind by an earlier scheduler", entry_id)
        scheduler = _scheduler()
        scheduler.add_listener(_record_max_instances(scheduler), EVENT_JOB_MAX_INSTANCES)
        scheduler.start()
        log.info("scheduler started: %d schedule(s), state in %s", len(scheduler.get_jobs()), state_dir())
        # `schedule add/pause/remove` write the store from other processes; waking up re-reads it.
        while not stop.wait(poll_seconds):
            scheduler.wakeup()
        log.info("scheduler stopping: waiting for running pipelines to finish")
        scheduler.shutdown(wait=True)
    finally:
        guard.close()


if __name__ == "__main__":
    sys.exit(_child_main(json.loads(sys.argv[1])))
