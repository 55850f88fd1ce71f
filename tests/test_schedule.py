"""Schedules: a real APScheduler SQLite job store, a real `workbench scheduler` process, real runs.

Only the last test starts kernels (and waits for a real cron minute); the others check
validation, persistence and the weekday translation without running anything.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import pipeline_project, wait_for
from workbench import record, schedule, tracking
from workbench.cli import app
from workbench.errors import WorkbenchError

PIPELINE = """\
name: nightly
params: {greeting: hi}
steps:
  hello:
    notebook: ../nb/hello.ipynb
    params: {greeting: "${greeting}"}
"""
HELLO_PARAMS = "greeting = 'x'\noutput_dir = 'scratch'\n"
HELLO_CELLS = ["import pathlib\npathlib.Path(output_dir, 'greeting.txt').write_text(greeting)"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project home with its own MLflow store and a one-step pipeline."""
    return pipeline_project(tmp_path, monkeypatch, {"hello.ipynb": (HELLO_PARAMS, HELLO_CELLS)}, "nightly", PIPELINE)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_crontab_weekdays_count_from_sunday():
    assert schedule.crontab_weekdays("1") == "mon"
    assert schedule.crontab_weekdays("0") == schedule.crontab_weekdays("7") == "sun"
    assert schedule.crontab_weekdays("1-5") == "mon,tue,wed,thu,fri"
    assert schedule.crontab_weekdays("*/2") == "sun,tue,thu,sat"
    assert schedule.crontab_weekdays("5-7") == "sun,fri,sat"
    assert schedule.crontab_weekdays("sat,SUN") == "sun,sat"
    # The design's example, "0 2 * * 1", must fire on a Monday at 02:00 (APScheduler's own 1 is Tuesday).
    trigger = schedule.parse_cron("0 2 * * 1")
    fire = trigger.get_next_fire_time(None, dt.datetime(2024, 1, 3, tzinfo=trigger.timezone))  # a Wednesday
    assert (fire.weekday(), fire.hour, fire.minute, fire.day) == (0, 2, 0, 8)


@pytest.mark.parametrize("expr, message", [
    ("* * * *", "4 field(s)"),
    ("61 * * * *", "61"),
    ("* * * * 8", "not 0-7"),
    ("* * * * 5-1", "backwards"),
    ("every day", "2 field(s)"),
])
def test_invalid_cron_refused(expr, message):
    with pytest.raises(WorkbenchError, match="invalid cron expression") as err:
        schedule.parse_cron(expr)
    assert message in str(err.value)


def test_bad_schedules_refused_with_clear_messages(project):
    out = cli("schedule", "add", str(project), "--cron", "0 2 * *")
    assert out.exit_code == 2 and "invalid cron expression" in out.output and "5 fields" in out.output
    out = cli("schedule", "add", str(project.with_name("nope.yaml")), "--cron", "0 2 * * 1")
    assert out.exit_code == 2 and "cannot read pipeline file" in out.output
    out = cli("schedule", "add", str(project), "--cron", "0 2 * * 1", "-p", "epochs=3")
    assert out.exit_code == 2 and "unknown parameter" in out.output
    assert schedule.list_schedules() == [], "nothing refused was stored"
    assert cli("schedule", "add", str(project), "--cron", "0 2 * * 1").exit_code == 0
    out = cli("schedule", "add", str(project), "--cron", "0 3 * * *")
    assert out.exit_code == 2 and "already exists" in out.output
    for verb in ("remove", "pause", "resume"):
        out = cli("schedule", verb, "weekly")
        assert out.exit_code == 2 and "no schedule named 'weekly' (schedules: nightly)" in out.output


def test_schedules_persist_pause_resume_remove(project):
    assert cli("schedule", "add", str(project), "--cron", "30 4 * * 1-5", "-p", "greeting=yo").exit_code == 0
    assert cli("schedule", "add", str(project), "--cron", "0 1 1 * *", "--name", "monthly", "--use-cache").exit_code == 0
    by_name = {s.name: s for s in schedule.list_schedules()}
    nightly = by_name["nightly"]
    assert (nightly.pipeline, nightly.cron, nightly.overrides, nightly.force) == ("nightly", "30 4 * * 1-5", {"greeting": "yo"}, True)
    assert nightly.next_run.weekday() < 5 and (nightly.next_run.hour, nightly.next_run.minute) == (4, 30)
    assert by_name["monthly"].force is False and by_name["monthly"].next_run.day == 1
    assert nightly.last is None and nightly.last_status == ""

    assert cli("schedule", "pause", "nightly").exit_code == 0
    assert {s.name: s.next_run for s in schedule.list_schedules()}["nightly"] is None
    out = cli("schedule", "list")
    assert out.exit_code == 0 and "paused" in out.output and "monthly" in out.output
    assert cli("schedule", "resume", "nightly").exit_code == 0
    assert {s.name: s.next_run for s in schedule.list_schedules()}["nightly"] is not None
    assert cli("schedule", "remove", "monthly").exit_code == 0
    assert [s.name for s in schedule.list_schedules()] == ["nightly"]
    assert (project.parent.parent / "runs" / ".scheduler" / "jobs.sqlite").is_file()


def test_run_left_started_by_a_dead_scheduler_is_settled_as_killed(project):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    entry = schedule._record("nightly", "nightly", "started", "nightly")
    schedule._update(entry, pid=gone.pid)
    assert schedule.reconcile() == [entry]
    settled = schedule.history("nightly")[-1]
    assert settled.status == "killed" and "died" in settled.error and settled.ended_at


def test_killed_scheduled_run_found_by_its_tag_never_a_live_manual_run(project):
    """The runs of a dead trigger are KILLED; a manual run started in the same minute, alive, is not."""
    import socket

    from workbench import pipelines, runs

    pipeline = pipelines.load_pipeline(project)
    tracking.setup()
    experiment = tracking.experiment_id("nightly")
    entry = schedule._record("nightly", "nightly", "started", "nightly")
    # The scheduled run's owner: a process holding its run's lock, then SIGKILLed.
    run_dir = pipelines.runs_root("nightly") / "20240101-000000-sched0"
    run_dir.mkdir(parents=True)
    lock = run_dir / runs.LOCK_FILE
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'w')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\ntime.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    owner = runs.Owner({"host": socket.gethostname(), "pid": holder.pid, "start": runs.process_start(holder.pid), "lock": str(lock)}, None)
    pipelines.own_run(run_dir.name, owner, schedule.run_tags("nightly", entry))
    try:
        scheduled = pipelines.start_parent_run(pipeline, experiment, run_dir.name)
    finally:
        pipelines.release_run(run_dir.name)  # the record only: this owner's lock is the holder's
    holder.kill()
    holder.wait()
    # A manual run of the same pipeline, started after the trigger and still running (owned by us).
    manual_dir = pipelines.new_run_dir(pipeline)
    manual = pipelines.start_parent_run(pipeline, experiment, manual_dir.name)
    try:
        assert schedule.settle(entry, returncode=-9) == "killed"
        client = MlflowClient()
        assert client.get_run(scheduled).info.status == "KILLED"
        assert "history entry" in client.get_run(scheduled).data.tags[record.KILLED_TAG]
        assert client.get_run(manual).info.status == "RUNNING", "a live run is never marked killed"
        settled = schedule.history("nightly")[-1]
        assert (settled.status, settled.parent_run_id, settled.experiment_id) == ("killed", scheduled, experiment)
        assert "signal 9" in settled.error
    finally:
        pipelines.release_run(manual_dir.name)
        MlflowClient().set_terminated(manual, "FINISHED")


def start_scheduler(home: Path) -> subprocess.Popen:
    log = open(home / "scheduler.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "scheduler", "--poll", "1"], cwd=home, env=os.environ.copy(),
        stdout=log, stderr=subprocess.STDOUT,
    )


def stop_scheduler(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"scheduler exited {proc.returncode}"


def finished_parent_runs(experiment: str) -> list:
    tracking.setup()
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`workbench.pipeline_yaml` IS NOT NULL and attributes.status = 'FINISHED'")


@pytest.mark.slow
def test_scheduler_runs_due_schedule_skips_overlap_and_survives_restart(project):
    """~60-100 s: waits for a real cron minute, then for a run missed while the scheduler was down."""
    home = project.parent.parent
    # Two schedules of one pipeline, both due at the next minute: they trigger together.
    assert cli("schedule", "add", str(project), "--cron", "* * * * *", "--name", "every-a").exit_code == 0
    assert cli("schedule", "add", str(project), "--cron", "* * * * *", "--name", "every-b").exit_code == 0
    proc = start_scheduler(home)
    try:
        wait_for(lambda: len([e for e in schedule.history() if e.status != "started"]) >= 2, 150, "both triggers")
        stop_scheduler(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = schedule.history()
    assert sorted(e.status for e in first) == ["finished", "skipped"], [(e.schedule, e.status, e.error) for e in first]
    done = next(e for e in first if e.status == "finished")
    assert "in progress" in next(e for e in first if e.status == "skipped").error
    runs = finished_parent_runs("nightly")
    assert [r.info.run_id for r in runs] == [done.parent_run_id], "one completed pipeline run in MLflow"
    tags = runs[0].data.tags
    assert (tags[record.SCHEDULE_TAG], tags[record.SCHEDULE_ENTRY_TAG]) == (done.schedule, str(done.id)), "tagged with its trigger"

    # While the scheduler is down: pause both, add a third whose last three minutes were missed.
    assert cli("schedule", "pause", "every-a").exit_code == 0
    assert cli("schedule", "pause", "every-b").exit_code == 0
    assert cli("schedule", "add", str(project), "--cron", "* * * * *", "--name", "missed").exit_code == 0
    with schedule._job_store() as store:
        store.modify_job("missed", next_run_time=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=3))
    proc = start_scheduler(home)
    try:
        wait_for(lambda: schedule.history("missed"), 60, "the missed run to start")
        assert cli("schedule", "pause", "missed").exit_code == 0  # no later minute may add a run
        wait_for(lambda: schedule.history("missed")[-1].status != "started", 120, "the missed run to end")
        listed = {s.name: s for s in schedule.list_schedules()}
        assert set(listed) == {"every-a", "every-b", "missed"}, "schedules survive a restart"
    finally:
        stop_scheduler(proc)
    assert [e.status for e in schedule.history("missed")] == ["finished"], "three missed triggers ran once"
    assert len(finished_parent_runs("nightly")) == 2
    out = cli("schedule", "list")
    assert out.exit_code == 0 and "finished" in out.output
    assert listed["missed"].run_link().endswith(f"/runs/{schedule.history('missed')[-1].parent_run_id}")
