"""A pipeline process killed with SIGKILL mid-step: nothing half-written is trusted, the rerun completes."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import pipeline_project, wait_for
from workbench import schedule, tracking

WORK_PARAMS = "output_dir = 'scratch'\nhold = 'hold'\n"
WORK_CELLS = [
    "import pathlib, time\n"
    "pathlib.Path(output_dir, 'half.txt').write_text('half written')\n"
    "pathlib.Path(hold + '.reached').touch()\n"
    "while pathlib.Path(hold).exists():\n    time.sleep(0.1)",
    "pathlib.Path(output_dir, 'done.txt').write_text('done')",
]
PIPELINE = """\
name: fragile
steps:
  work: {notebook: ../nb/work.ipynb, params: {hold: HOLD}}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    notebooks = {"work.ipynb": (WORK_PARAMS, WORK_CELLS)}
    return pipeline_project(tmp_path, monkeypatch, notebooks, "fragile", PIPELINE.replace("HOLD", str(tmp_path / "hold")))


def kernels_of(pid: int) -> list[int]:
    """Processes started with JPY_PARENT_PID=pid: the Jupyter kernels of that process."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"JPY_PARENT_PID={pid}\0".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_sigkill_mid_step_leaves_nothing_trusted_and_rerun_completes(project):
    """Two scheduled runs, one killed mid-step (20-60 s by load)."""
    home = project.parent.parent
    schedule.add_schedule(project, "0 3 * * *", name="fragile", force=False)
    (home / "hold").touch()
    outcome: dict[str, str] = {}
    job = threading.Thread(target=lambda: outcome.update(status=schedule.run_scheduled(str(project), {}, "fragile", force=False)))
    job.start()
    try:
        wait_for(lambda: (home / "hold.reached").exists(), 120, "the step to start")
        child = schedule.history("fragile")[-1].pid
        os.kill(child, signal.SIGKILL)
        job.join(timeout=60)
    finally:
        (home / "hold").unlink(missing_ok=True)  # whatever happens, let a stray kernel finish
    assert outcome == {"status": "killed"}
    # The orphaned kernel notices its parent is gone and exits: nothing is left running.
    wait_for(lambda: not kernels_of(child), 30, f"the kernel of {child} to exit")

    killed = schedule.history("fragile")[-1]
    assert killed.status == "killed" and "signal 9" in killed.error
    assert [s.last_status for s in schedule.list_schedules()] == ["killed"], "never shown as finished"
    run_dir = next(p for p in (home / "runs" / "fragile").iterdir() if not p.name.startswith("."))
    # the killed step's notebook is kept, named for what happened to it
    assert (run_dir / "work.killed.ipynb").is_file() and not (run_dir / "work.ipynb").exists()
    assert not (run_dir / "work.partial.ipynb").exists()
    assert not (run_dir / "run.json").exists()
    assert not list((home / "runs" / "fragile").glob(".cache/*.json")), "no cache record for the killed step"
    tracking.setup()
    client = MlflowClient()
    parent = client.get_run(killed.parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{killed.parent_run_id}'")
    assert parent.info.status == "KILLED" and [c.info.status for c in children] == ["KILLED"]
    assert "signal 9" in parent.data.tags["workbench.error"]

    # The rerun (cache allowed) must execute the step again, not trust the killed one's output dir.
    assert schedule.run_scheduled(str(project), {}, "fragile", force=False) == "finished"
    rerun = schedule.history("fragile")[-1]
    manifest = json.loads((home / "runs" / "fragile" / client.get_run(rerun.parent_run_id).data.tags["workbench.pipeline_run_id"] / "run.json").read_text())
    (execution,) = manifest["executions"]
    assert execution["status"] == "finished" and execution["run_id"] != children[0].info.run_id
    assert (Path(execution["output_dir"]) / "done.txt").read_text() == "done"
    assert client.get_run(rerun.parent_run_id).info.status == "FINISHED"
    assert [s.last_status for s in schedule.list_schedules()] == ["finished"]
