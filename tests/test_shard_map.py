"""The shard map on Prefect: two task-worker processes on a local Prefect server tensorize and
score the chunks; the store and the scores are bit for bit the single-process path's
(``write_shards`` with the spec, then ``score_shards``)."""

from __future__ import annotations

import filecmp
import json
import os
import re
import signal
import subprocess
import sys
import warnings

import numpy as np
import polars as pl
import pytest
from conftest import wait_for

from workbench import features as ft
from workbench.data.synth import SynthConfig, generate, read_ground_truth
from workbench.errors import WorkbenchError
from workbench.models import ModelConfig, build_model
from workbench.shard_map import MAP_RECORD, SCORES_FILE, map_shards, score_shards, serving_workers
from workbench.shards import SHARDS_MANIFEST, ShardedTensors, write_shards

CONFIG = ft.FeatureConfig(bin_width="30d", n_steps=12, numeric_aggs=["last", "mean"], add_missing_indicators=True,
                          add_time_since_last=True, min_code_frequency=0.05)
CHUNK_SAMPLES = 50  # 400 subjects in 4 files of 100: 8 chunks, two per file
BATCH_SIZE = 32  # two batches a chunk, the second shorter


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.UnseenCodesWarning)
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A MEDS dataset, its labels as a parquet, a spec fitted on the train split, a saved Keras model."""
    base = tmp_path_factory.mktemp("shard_map")
    root = base / "synth"
    generate(root, SynthConfig(n_subjects=400, seed=7, subjects_per_shard=100, mean_events_per_subject=30),
             progress=False)
    labels = read_ground_truth(root).select("subject_id", "prediction_time", pl.col("outcome").alias("boolean_value"))
    labels.write_parquet(base / "labels.parquet")
    spec, _ = quiet(ft.fit_transform, root, labels, CONFIG)
    spec.save(base / "feature_spec.json")
    build_model(ModelConfig(units=8), CONFIG.n_steps, spec.n_features, seed=3).save(base / "model.keras")
    return {"dataset": root, "labels": base / "labels.parquet", "spec": base / "feature_spec.json",
            "model": base / "model.keras"}


def start_worker(env: dict, log) -> subprocess.Popen:
    """``prefect task serve --module workbench.shard_map --limit 1``: what docs/teams.md tells a team to run."""
    return subprocess.Popen([sys.executable, "-m", "prefect", "task", "serve", "--module", "workbench.shard_map",
                             "--limit", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
def test_two_prefect_workers_map_the_shards_bit_for_bit(tmp_path, inputs):
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    # the single-process path: the same spec, the same chunks, every shard scored from its first row
    ref = quiet(write_shards, inputs["dataset"], inputs["labels"], tmp_path / "ref", spec=inputs["spec"],
                chunk_samples=CHUNK_SAMPLES)
    ref_scores = score_shards(ref, inputs["model"], batch_size=BATCH_SIZE)

    storage = tmp_path / "prefect-storage"  # task parameters and results: shared by every process
    logs = [open(tmp_path / f"worker-{i}.log", "wb") for i in range(2)]
    workers = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=120), prefect.settings.temporary_settings(
                updates={prefect.settings.PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
            env = {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(),
                   "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(storage), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "OMP_NUM_THREADS": "1"}  # two workers on two cores: one thread each
            with pytest.raises(WorkbenchError, match="no task worker serves workbench.shard_map"):
                map_shards(inputs["dataset"], inputs["labels"], inputs["spec"], tmp_path / "out")
            try:
                workers = [start_worker(env, log) for log in logs]
                wait_for(lambda: len(serving_workers()) == 2 or any(w.poll() is not None for w in workers), 120,
                         "two task workers subscribed")
                assert all(w.poll() is None for w in workers), "a worker exited"
                summary = quiet(map_shards, inputs["dataset"], inputs["labels"], inputs["spec"], tmp_path / "out",
                                inputs["model"], chunk_samples=CHUNK_SAMPLES, batch_size=BATCH_SIZE, timeout_s=300)
            except BaseException:
                for log in logs:
                    log.flush()
                print("\n".join((tmp_path / f"worker-{i}.log").read_text(errors="replace")[-3000:] for i in range(2)))
                raise
            finally:
                for w in workers:
                    stop(w)
                for log in logs:
                    log.close()

    out = tmp_path / "out"
    # both worker processes ran chunks
    ran = {c["pid"] for c in json.loads((out / MAP_RECORD).read_text())["chunks"]}
    assert ran == {w.pid for w in workers}, f"chunks ran in {ran}, workers were {[w.pid for w in workers]}"
    assert summary["chunks"] == len(ref.shard_ranges()) == 8 and len(summary["workers"]) == 2
    # the store: the same manifest, samples, spec, and shard files byte for byte
    assert json.loads((out / SHARDS_MANIFEST).read_text()) == json.loads((tmp_path / "ref" / SHARDS_MANIFEST).read_text())
    for shard in json.loads((out / SHARDS_MANIFEST).read_text())["shards"]:
        assert filecmp.cmp(out / shard["file"], tmp_path / "ref" / shard["file"], shallow=False), shard["file"]
    got = ShardedTensors(out)
    assert got.samples.equals(ref.samples) and got.spec == ref.spec
    everything = np.arange(len(ref))
    X, observed = got.read(everything, with_observed=True)
    X_ref, observed_ref = ref.read(everything, with_observed=True)
    assert X.tobytes() == X_ref.tobytes() and np.array_equal(observed, observed_ref)
    # the scores
    scores = pl.read_parquet(out / SCORES_FILE)
    assert scores.equals(ref_scores)
    assert scores["risk"].to_numpy().tobytes() == ref_scores["risk"].to_numpy().tobytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == []  # no work folder left


def test_missing_inputs_are_named_before_any_flow_runs(tmp_path, inputs):
    args = dict(dataset=inputs["dataset"], labels=inputs["labels"], spec=inputs["spec"], out=tmp_path / "out",
                model=inputs["model"])
    for name, what in (("labels", "labels file"), ("spec", "feature spec file"), ("model", "model file")):
        with pytest.raises(WorkbenchError, match=re.escape(f"{tmp_path / 'nowhere'}: {what} not found")):
            map_shards(**{**args, name: tmp_path / "nowhere"})
    with pytest.raises(WorkbenchError, match="MEDS dataset folder not found"):
        map_shards(**{**args, "dataset": tmp_path / "nowhere"})
    (tmp_path / "spec.json").write_text("{}")
    with pytest.raises(WorkbenchError, match="invalid feature spec"):
        map_shards(**{**args, "spec": tmp_path / "spec.json"})
    (tmp_path / "model.keras").write_text("not a model")
    with pytest.raises(WorkbenchError, match="not a Keras model file"):
        map_shards(**{**args, "model": tmp_path / "model.keras"})
    with pytest.raises(WorkbenchError, match="chunk_samples must be >= 1"):
        map_shards(**{**args, "chunk_samples": 0})
    with pytest.raises(WorkbenchError, match="would overwrite the input"):
        map_shards(**{**args, "out": inputs["dataset"] / "shards"})
    assert not (tmp_path / "out").exists()


def test_the_command_says_what_is_missing_without_a_traceback(tmp_path, inputs):
    import prefect.settings
    from typer.testing import CliRunner

    from workbench.cli import app

    args = ["map-shards", str(inputs["dataset"]), "--labels", str(inputs["labels"]), "--spec", str(inputs["spec"]),
            "--out", str(tmp_path / "out"), "--model", str(inputs["model"])]
    missing = CliRunner().invoke(app, [*args[:5], str(tmp_path / "nowhere.json"), *args[6:]])
    assert missing.exit_code == 2 and "nowhere.json: feature spec file not found" in missing.output
    with prefect.settings.temporary_settings(restore_defaults={prefect.settings.PREFECT_API_URL}):
        no_server = CliRunner().invoke(app, args)
    assert no_server.exit_code == 2 and "PREFECT_API_URL is not set" in no_server.output
    assert "Traceback" not in missing.output + no_server.output and not (tmp_path / "out").exists()


class _StatelessFirst:
    """A task-run future as Prefect's ``PrefectDistributedFuture`` behaves when the server has
    recorded the run but not yet its first state: ``wait`` raises Prefect's RuntimeError a few
    times, then the run finishes (the race that failed a CI run of the worker test)."""

    def __init__(self, raises: int, record: dict):
        self.raises, self.record, self.state = raises, record, None

    def wait(self, timeout=None):
        if self.raises:
            self.raises -= 1
            raise RuntimeError("Task run 4c81e67c has no state which means it hasn't started yet.")
        from prefect.states import Completed
        self.state = Completed()

    def result(self):
        return self.record


def test_waiting_on_a_task_run_before_its_first_state_asks_again():
    from workbench.shard_map import _wait

    futures = [_StatelessFirst(0, {"chunk": 0}), _StatelessFirst(3, {"chunk": 1})]
    assert _wait(futures, timeout_s=60) == [{"chunk": 0}, {"chunk": 1}]
    # past the deadline the run is named as unfinished, not Prefect's error
    with pytest.raises(WorkbenchError, match="chunk 0 not finished after 0 s"):
        _wait([_StatelessFirst(10**6, {})], timeout_s=0)
    # any other error is not swallowed
    class Broken(_StatelessFirst):
        def wait(self, timeout=None):
            raise RuntimeError("something else")
    with pytest.raises(RuntimeError, match="something else"):
        _wait([Broken(0, {})], timeout_s=60)
