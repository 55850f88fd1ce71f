"""Runs whose process died: owners, reconcile, the killed run's folder, and two pipelines racing.

The first tests need no kernel: an owner is a real process holding a real lock, killed for
real. The slow ones run `workbench run` in real processes: one SIGKILLed in the middle of a
step and rerun, and two at once registering models on one SQLite store.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pipeline_project, wait_for
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from workbench import pipelines, record, runs, tracking
from workbench.cli import app
from workbench.record import ERROR_TAG, KILLED_TAG, OWNER_TAG

NOTE_PARAMS = "output_dir = 'scratch'\nmlflow_run_id = None\n"
NOTE_CELLS = ["import pathlib\npathlib.Path(output_dir, 'note.txt').write_text('hi')"]
PIPELINE = """\
name: owned
steps:
  prep: {notebook: ../nb/note.ipynb}
  train: {notebook: ../nb/note.ipynb, needs: [prep]}
"""
HOLDER = "import fcntl, sys, time\nf = open(sys.argv[1], 'w')\nfcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(120)\n"


@pytest.fixture
def project(tmp_path, monkeypatch):
    return pipeline_project(tmp_path, monkeypatch, {"note.ipynb": (NOTE_PARAMS, NOTE_CELLS)}, "owned", PIPELINE)


def hold_lock(lock: Path) -> subprocess.Popen:
    """Another process holding ``lock``, as a pipeline run's owner does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def owner_record(proc: subprocess.Popen, lock: Path) -> dict:
    return {"host": socket.gethostname(), "pid": proc.pid, "start": runs.process_start(proc.pid), "lock": str(lock)}


def runs_owned_by(pipeline, run_dir: Path, owner: runs.Owner) -> tuple[str, str]:
    """A parent run and its train step run, created by the engine's own functions, owned by ``owner``."""
    tracking.setup()
    experiment = tracking.experiment_id(pipeline.experiment)
    pipelines.own_run(run_dir.name, owner)
    try:
        parent = pipelines.start_parent_run(pipeline, experiment, run_dir.name)
        child = pipelines.start_child_run(pipeline, pipeline.steps["train"].executions[0], experiment, parent, run_dir.name)
    finally:
        pipelines.release_run(run_dir.name)  # the record only: this owner's lock is another process's
    return parent, child


def test_owner_gone_decides_by_the_lock_then_by_pid_and_start_time(tmp_path):
    lock = tmp_path / runs.LOCK_FILE
    mine = runs.claim(tmp_path)
    assert runs.owner_gone(mine.info) is None, "a held lock is a live owner (even probed from its own process)"
    mine.release()
    assert "let go of the run" in runs.owner_gone(mine.info), "free lock, live process: it gave the run up"
    holder = hold_lock(lock)
    record = owner_record(holder, lock)
    assert runs.owner_gone(record) is None
    holder.kill()
    holder.wait()
    assert runs.owner_gone(record) == f"owner pid {holder.pid} gone (its lock {lock} is free)"
    lock.unlink()  # no lock file: pid and start time decide
    assert "was removed" in runs.owner_gone(record)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": runs.process_start(os.getpid()), "lock": str(lock)}
    assert runs.owner_gone(me) is None
    assert "was removed" in runs.owner_gone({**me, "start": me["start"] - 1}), "a reused pid is not the owner"
    assert runs.owner_gone({**record, "host": "elsewhere"}) is None, "another host's owner is never judged"


def test_reconcile_kills_runs_of_a_dead_owner_only_and_tidies_its_folder(project):
    pipeline = pipelines.load_pipeline(project)
    # A live owner: this process, through new_run_dir; its runs must stay RUNNING.
    live_dir = pipelines.new_run_dir(pipeline)
    tracking.setup()
    experiment = tracking.experiment_id(pipeline.experiment)
    live_parent = pipelines.start_parent_run(pipeline, experiment, live_dir.name)
    # Another owner: a process holding the lock of its run dir, killed below.
    dead_dir = pipelines.runs_root("owned") / "20240101-000000-dead00"
    (dead_dir / "prep").mkdir(parents=True)
    (dead_dir / "prep" / "out.txt").write_text("kept")
    (dead_dir / "train").mkdir()
    holder = hold_lock(dead_dir / runs.LOCK_FILE)
    try:
        parent, child = runs_owned_by(pipeline, dead_dir, runs.Owner(owner_record(holder, dead_dir / runs.LOCK_FILE), None))
        (dead_dir / "train.partial.ipynb").write_text(json.dumps({"cells": [], "nbformat": 4, "nbformat_minor": 5, "metadata": {}}))
        client = MlflowClient()
        assert client.get_run(parent).data.tags[OWNER_TAG] and client.get_run(child).data.tags[OWNER_TAG]
        assert runs.reconcile("test") == [], "both owners alive: nothing is touched"
    finally:
        holder.kill()
        holder.wait()
    out = CliRunner().invoke(app, ["runs", "reconcile"])
    assert out.exit_code == 0, out.output
    assert f"step train (MLflow run {child}) marked KILLED: owner pid {holder.pid} gone" in out.output
    for run_id in (parent, child):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert f"owner pid {holder.pid} gone" in run.data.tags[KILLED_TAG]
        assert "found by workbench runs reconcile at 20" in run.data.tags[KILLED_TAG]
    assert "while running train" in client.get_run(parent).data.tags[KILLED_TAG]
    assert client.get_run(live_parent).info.status == "RUNNING", "a live owner's run is never reconciled"
    assert sorted(p.name for p in dead_dir.iterdir()) == [".owner.lock", "prep", "train.killed.ipynb"]
    assert {a.path for a in client.list_artifacts(child, "notebook")} == {"notebook/train.killed.ipynb"}
    out = CliRunner().invoke(app, ["runs", "reconcile"])
    assert out.exit_code == 0 and "no killed runs" in out.output, "nothing twice"
    pipelines.release_run(live_dir.name)
    assert runs.reconcile("test")[0].run_id == live_parent, "let go without ending it: now it is settled too"


def test_reconcile_without_a_store_creates_nothing(project):
    assert runs.reconcile("test") == []
    assert not (project.parent.parent / "mlflow.db").exists()


# --- end to end: a SIGKILLed `workbench run` -------------------------------------------------

SLOW_PARAMS = "output_dir = 'scratch'\nmlflow_run_id = None\n"
# The train step says it is running (with its kernel's pid, to clean up), then waits while hold/ exists.
SLOW_CELLS = [
    "import os, pathlib, time\nhome = pathlib.Path(os.environ['WORKBENCH_HOME'])\n"
    "(home / 'train-started').write_text(str(os.getpid()))\n"
    "deadline = time.time() + 60\nwhile (home / 'hold').exists() and time.time() < deadline:\n    time.sleep(0.1)",
    "pathlib.Path(output_dir, 'model.txt').write_text('trained')",
]
KILL_PIPELINE = """\
name: killme
steps:
  prep: {notebook: ../nb/note.ipynb}
  train: {notebook: ../nb/slow.ipynb, needs: [prep]}
"""


def workbench(home: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workbench.cli", *args], cwd=home, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie (dead, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


SLOW_NOTEBOOKS = {"note.ipynb": (NOTE_PARAMS, NOTE_CELLS), "slow.ipynb": (SLOW_PARAMS, SLOW_CELLS)}


def stop_during_train(home: Path, path: Path, stop):
    """Start `workbench run` in its own session, call ``stop(proc)`` once the train step runs; returns
    (proc, what stop returned). Whatever happens, nothing of it is left running."""
    (home / "hold").mkdir()
    proc = workbench(home, "run", str(path), start_new_session=True)
    kernel = None
    try:
        kernel = int(wait_for(lambda: (home / "train-started").is_file() and (home / "train-started").read_text(),
                              90, "the train step to start"))
        returned = stop(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if kernel:
            kill_process(kernel)  # the kernel runs in its own session; it would follow its parent within 1 s
    (home / "hold").rmdir()
    return proc, returned


@pytest.mark.slow
def test_sigkilled_run_is_recorded_killed_and_rerun_computes_only_the_killed_step(tmp_path, monkeypatch):
    path = pipeline_project(tmp_path, monkeypatch, SLOW_NOTEBOOKS, "killme", KILL_PIPELINE)
    # the whole `workbench run` process group, mid-step
    proc, _ = stop_during_train(tmp_path, path, lambda proc: (os.killpg(proc.pid, signal.SIGKILL), proc.wait(timeout=30)))
    killed_dir = next(d for d in (tmp_path / "runs" / "killme").iterdir() if not d.name.startswith("."))
    assert (killed_dir / "train.partial.ipynb").is_file() and (killed_dir / "train").is_dir()

    out = CliRunner().invoke(app, ["run", str(path)])
    assert out.exit_code == 0, out.output
    assert "marked KILLED: owner pid" in out.output
    client = MlflowClient()
    exp = client.get_experiment_by_name("killme").experiment_id
    old = {r.info.run_name: r for r in client.search_runs([exp], f"tags.`workbench.pipeline_run_id` = '{killed_dir.name}'")}
    assert {name: r.info.status for name, r in old.items()} == {
        f"killme {killed_dir.name}": "KILLED", "prep": "FINISHED", "train": "KILLED",
    }
    for name in (f"killme {killed_dir.name}", "train"):
        assert f"owner pid {proc.pid} gone" in old[name].data.tags[KILLED_TAG]
        assert "found by workbench run at" in old[name].data.tags[KILLED_TAG]
    assert not [d for d in killed_dir.iterdir() if d.is_dir() and not any(d.iterdir())], "no empty step folder"
    assert (killed_dir / "train.killed.ipynb").is_file() and not (killed_dir / "train.partial.ipynb").exists()

    rerun = json.loads(next((tmp_path / "runs" / "killme").glob("*/run.json")).read_text())
    assert rerun["ok"]
    assert [(e["label"], e["status"]) for e in rerun["executions"]] == [("prep", "cached"), ("train", "finished")]
    assert rerun["executions"][0]["run_id"] == old["prep"].info.run_id, "the step that finished before the kill is reused"
    assert client.get_run(rerun["parent_run_id"]).info.status == "FINISHED"
    assert runs.reconcile("test") == []


@pytest.mark.slow
def test_sigterm_closes_the_runs_failed_at_once(tmp_path, monkeypatch):
    """SIGTERM (what `timeout` and `kill` send) ends `workbench run` like Ctrl-C: nothing stays RUNNING."""
    path = pipeline_project(tmp_path, monkeypatch, SLOW_NOTEBOOKS, "killme", KILL_PIPELINE)

    def stop(proc):
        output = proc.communicate(timeout=60) if proc.send_signal(signal.SIGTERM) is None else None
        kernel = int((tmp_path / "train-started").read_text())
        return output, wait_for(lambda: process_gone(kernel), 10, "the kernel to be gone")

    proc, ((output, _), _) = stop_during_train(tmp_path, path, stop)
    assert proc.returncode == 130 and "stopped (SIGTERM)" in output and "Traceback" not in output, output
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # this test's store (mlflow keeps an earlier one's URI)
    exp = client.get_experiment_by_name("killme").experiment_id
    found = client.search_runs([exp])
    statuses = {r.info.run_name.split()[0]: r.info.status for r in found}
    assert statuses == {"killme": "FAILED", "prep": "FINISHED", "train": "FAILED"}, (
        statuses, [r.data.tags.get(KILLED_TAG) for r in found], output)
    train = next(r for r in found if r.info.run_name == "train")
    assert train.data.tags[ERROR_TAG] == "step train: interrupted", "its kernel was stopped with the run, not left behind"


# --- two pipelines at once on one store ----------------------------------------------------

RACE_PARAMS = "seed = 0\noutput_dir = 'scratch'\nmlflow_run_id = None\n"
# Both kernels wait for each other, then log and register a tiny model: a real race on the store.
RACE_CELLS = [
    "import json, os, pathlib, time\nimport mlflow\nfrom workbench import tracking\n"
    "home = pathlib.Path(os.environ['WORKBENCH_HOME'])\n(home / f'ready-{seed}').write_text('')\n"
    "deadline = time.time() + 30\nwhile len(list(home.glob('ready-*'))) < 2 and time.time() < deadline:\n    time.sleep(0.05)",
    "class Tiny(mlflow.pyfunc.PythonModel):\n    def predict(self, context, model_input):\n        return model_input\n"
    "with mlflow.start_run(run_id=mlflow_run_id):\n"
    "    info = mlflow.pyfunc.log_model(name='model', python_model=Tiny(), pip_requirements=[])\n"
    "    mlflow.log_metric('tuning_auroc', 0.6 + seed / 100)\n"
    "result = tracking.register_and_maybe_promote(info.model_uri, 'race', 0.6 + seed / 100, tags={'seed': str(seed)})\n"
    "pathlib.Path(output_dir, 'registered.json').write_text(json.dumps(result))",
]
RACE_PIPELINE = """\
name: race
params: {seed: 0}
steps:
  register: {notebook: ../nb/race.ipynb, params: {seed: "${seed}"}}
"""


@pytest.mark.slow
def test_two_pipelines_at_once_on_one_store(tmp_path, monkeypatch):
    path = pipeline_project(tmp_path, monkeypatch, {"race.ipynb": (RACE_PARAMS, RACE_CELLS)}, "race", RACE_PIPELINE)
    procs = {seed: workbench(tmp_path, "run", str(path), "-p", f"seed={seed}") for seed in (7, 3)}
    try:
        outputs = {seed: p.communicate(timeout=180)[0] for seed, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for seed, p in procs.items():
        assert p.returncode == 0, f"seed {seed}:\n{outputs[seed]}"
    tracking.setup()
    client = MlflowClient()
    exp = client.get_experiment_by_name("race").experiment_id
    parents = client.search_runs([exp], "tags.`workbench.pipeline_yaml` IS NOT NULL")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]
    assert sorted(r.data.params["seed"] for r in parents) == ["3", "7"]
    for parent in parents:
        children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert [(c.info.run_name, c.info.status) for c in children] == [("register", "FINISHED")], "none lost or doubled"
    versions = client.search_model_versions("name='race'")
    assert sorted(v.tags["seed"] for v in versions) == ["3", "7"], "one version per run"
    champion = client.get_model_version_by_alias("race", record.CHAMPION)
    assert champion.tags["seed"] == "7", "the champion is the better version, whoever registered last"
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "race").glob("*/run.json")]
    assert len(manifests) == 2 and all(m["ok"] for m in manifests)
