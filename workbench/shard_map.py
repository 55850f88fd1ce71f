"""Tensorize and score a large dataset on a team's Prefect task workers, one task per chunk.

:func:`map_shards` (the flow :func:`shard_map_flow`) is :func:`workbench.shards.write_shards`
with a saved FeatureSpec, and optionally the scoring of every row by a saved Keras model, with
the chunks spread over whichever Prefect task workers serve this module
(``prefect task serve --module workbench.shard_map``, ``docs/teams.md``):

1. **plan** (the process running the flow): the labels are checked against the dataset, sorted
   by subject and cut into the chunks of :func:`workbench.features.transform_chunked` (disjoint
   subject ranges, at event-file ends); the samples, the spec and ``plan.json`` go to a work
   folder beside ``out``.
2. **map** (the workers): one :func:`map_chunk` task run per chunk, given only the work folder
   and the chunk's number. It reads the chunk's events, writes its raw shard ``X-#####.npy``
   and, with a model, the chunk's risks, all into the work folder (each file written under a
   temporary name, then renamed: a retried or repeated chunk replaces its files whole).
3. **reduce** (the flow): the files that make the work folder a store that
   :class:`~workbench.shards.ShardedTensors` reads (``manifest.json``, ``samples.parquet``,
   ``feature_spec.json``), ``scores.parquet`` (``sample_index, subject_id, prediction_time,
   risk`` in store order) and ``map.json`` (which host and process ran each chunk); then the
   work folder replaces ``out`` in one rename.

Bit for bit: a chunk's tensor is computed by the same functions as in
:func:`~workbench.features.transform_chunked`, so the store equals ``write_shards(dataset,
labels, out, spec=spec, chunk_samples=...)``; the risks are :func:`score_shards`'s on that
store: each shard scored in batches of ``batch_size`` from its first row (a batch never spans
two shards, so no process needs another's rows; batches cut elsewhere change a risk's last
bits, as any batched matmul does). ``tests/test_shard_map.py`` checks both with two worker
processes on a local Prefect server.

Everything passed between processes is a path or a few numbers: the arrays stay in files, so
the work folder (beside ``out``), the dataset, the labels, the spec and the model must be at the
same path on every worker (a shared file system), and Prefect's task scheduling storage too
(``PREFECT_RESULTS_LOCAL_STORAGE_PATH`` on that file system, or a storage block): task
parameters and results go through it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import time
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
from prefect import flow, task

from workbench import features as ft
from workbench.errors import WorkbenchError
from workbench.files import check_output, replace_directory, temporary_directory_for, write_text_atomic
from workbench.shards import SAMPLES_FILE, SHARDS_MANIFEST, ShardedTensors, encode_padding, shard_file, write_store_files

FLOW_NAME = "workbench-shard-map"
PLAN_FILE = "plan.json"
SCORES_FILE = "scores.parquet"
MAP_RECORD = "map.json"
DEFAULT_BATCH_SIZE = 1024
WORKER_COMMAND = "prefect task serve --module workbench.shard_map --limit 1"


def _risk_file(k: int) -> str:
    return f"risk-{k:05d}.npy"


# ------------------------------------------------------------------------------------ scoring


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, mtime_ns: int, size: int):
    import keras

    import workbench.models  # noqa: F401  (registers the custom layers the saved model uses)

    try:
        return keras.saving.load_model(path, compile=False)  # scoring only: no optimizer state
    except Exception as exc:  # keras raises ValueError, OSError, zip errors ...
        raise WorkbenchError(f"{path}: cannot load the Keras model ({type(exc).__name__}: {exc})") from None


def load_model(path: str | os.PathLike):
    """The Keras model saved at ``path`` (a ``.keras`` file), loaded once per process and file version."""
    path = check_model_file(path)
    stat = path.stat()
    return _cached_model(str(path), stat.st_mtime_ns, stat.st_size)


def check_model_file(path: str | os.PathLike) -> Path:
    path = Path(path).resolve()
    if not path.is_file():
        raise WorkbenchError(f"{path}: model file not found (a Keras model saved with model.save('....keras'))")
    if not zipfile.is_zipfile(path):
        raise WorkbenchError(f"{path}: not a Keras model file (a .keras file is a zip archive)")
    return path


def _score_rows(model, blocks, n: int, batch_size: int) -> np.ndarray:
    """Risks of ``n`` rows given as normalized blocks of ``batch_size`` rows (the last one shorter)."""
    from workbench.training import predict_risk

    out = np.empty(n, dtype=np.float32)
    start = 0
    for X in blocks:
        out[start:start + len(X)] = predict_risk(model, X, batch_size=batch_size)
        start += len(X)
    return out


def score_shards(store: ShardedTensors, model, batch_size: int = DEFAULT_BATCH_SIZE) -> pl.DataFrame:
    """Every row of ``store`` scored in one process: ``sample_index, subject_id, prediction_time,
    risk`` (float32) in store order; each shard in batches of ``batch_size`` from its first row
    (what the workers of :func:`map_shards` compute, bit for bit)."""
    if not hasattr(model, "predict"):
        model = load_model(model)
    risks = []
    for a, b in store.shard_ranges():
        blocks = (store.read(np.arange(i, min(i + batch_size, b))) for i in range(a, b, batch_size))
        risks.append(_score_rows(model, blocks, b - a, batch_size))
    return _scores_frame(store.samples, np.concatenate(risks) if risks else np.empty(0, dtype=np.float32))


def _scores_frame(samples: pl.DataFrame, risk: np.ndarray) -> pl.DataFrame:
    return samples.select("sample_index", "subject_id", "prediction_time").with_columns(
        pl.Series("risk", risk, dtype=pl.Float32))


# --------------------------------------------------------------------------------- the map task


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_plan(work: Path) -> dict:
    path = work / PLAN_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"{path}: cannot read the shard map's plan ({exc}); is the work folder on a file "
                             "system this worker shares, at the same path?") from None


@task(name="shard-map-chunk", retries=1, retry_delay_seconds=5)
def map_chunk(work: str, k: int) -> dict:
    """Chunk ``k`` of the plan in ``work``: its raw shard and (with a model) its risks, written
    into ``work``; returns a small record of it (rows, unseen codes, which host and process ran it)."""
    started = time.perf_counter()
    work = Path(work)
    plan = _read_plan(work)
    chunk = ft.ChunkPlan(**{**plan["chunks"][k], "files": None if plan["chunks"][k]["files"] is None
                            else tuple(plan["chunks"][k]["files"])})
    spec = ft.FeatureSpec.load(work / ft.SPEC_FILE)
    samples = pl.scan_parquet(work / SAMPLES_FILE).slice(chunk.start, chunk.stop - chunk.start).collect()
    X, _, padded, unseen = ft.transform_chunk(plan["dataset"], samples, chunk, spec)
    encode_padding(X, padded)
    _save_atomic(work / shard_file(k), X)
    if plan["model"] is not None:
        batch = plan["batch_size"]
        blocks = (ft.apply_spec(X[i:i + batch].copy(), padded[i:i + batch], spec) for i in range(0, len(X), batch))
        _save_atomic(work / _risk_file(k), _score_rows(load_model(plan["model"]), blocks, len(X), batch))
    record = {"chunk": k, "file": shard_file(k), "rows": len(X), "unseen_codes": unseen,
              "host": socket.gethostname(), "pid": os.getpid(), "seconds": round(time.perf_counter() - started, 3)}
    return record


# ---------------------------------------------------------------------------------- the flow


def _wait(futures: list, timeout_s: float | None) -> list[dict]:
    """Every chunk's record, once all have finished (a failed chunk raises after the others are done)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for k, future in enumerate(futures):
        while True:
            try:
                future.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                break
            except RuntimeError as e:
                # Prefect records a task run before its first state (the server writes states from
                # its event stream): a wait in between raises; the run is there, so ask again
                if "has no state" not in str(e):
                    raise
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        if future.state is None or not future.state.is_final():
            raise WorkbenchError(f"shard map: chunk {k} not finished after {timeout_s:g} s; are task workers "
                                 f"running? ({WORKER_COMMAND})")
    return [future.result() for future in futures]


def _reduce(work: Path, spec: ft.FeatureSpec, samples: pl.DataFrame, chunks: list[ft.ChunkPlan],
            records: list[dict], scored: bool) -> None:
    for k, (chunk, record) in enumerate(zip(chunks, records)):
        if record["rows"] != chunk.stop - chunk.start or not (work / shard_file(k)).is_file():
            raise WorkbenchError(f"{work / shard_file(k)}: chunk {k} came back with {record['rows']} rows, "
                                 f"expected {chunk.stop - chunk.start}")
    write_store_files(work, spec, samples, [(shard_file(k), c.stop - c.start) for k, c in enumerate(chunks)])
    if scored:
        risk = np.concatenate([np.load(work / _risk_file(k)) for k in range(len(chunks))])
        _scores_frame(samples, risk).write_parquet(work / SCORES_FILE)
    for k in range(len(chunks)):
        (work / _risk_file(k)).unlink(missing_ok=True)
    (work / PLAN_FILE).unlink()
    keep = ("chunk", "rows", "host", "pid", "seconds")
    (work / MAP_RECORD).write_text(json.dumps({"chunks": [{k: r[k] for k in keep} for r in records]}, indent=2) + "\n")
    unseen = sorted(set().union(*(r["unseen_codes"] for r in records)))
    if unseen:
        shown = ", ".join(unseen[:25]) + (f", ... ({len(unseen) - 25} more)" if len(unseen) > 25 else "")
        warnings.warn(f"{len(unseen)} code(s) not seen when the feature spec was fitted are ignored: {shown}",
                      ft.UnseenCodesWarning, stacklevel=2)


@flow(name=FLOW_NAME)
def shard_map_flow(dataset: str, labels: str, spec: str, out: str, model: str | None = None,
                   chunk_samples: int = ft.DEFAULT_CHUNK_SAMPLES, batch_size: int = DEFAULT_BATCH_SIZE,
                   timeout_s: float | None = None) -> dict:
    """Plan, map a :func:`map_chunk` task run per chunk onto the task workers, reduce into ``out``
    (see the module docstring). Paths are absolute and the same on every worker."""
    out_path = Path(out)
    feature_spec = ft.FeatureSpec.load(spec)
    work = temporary_directory_for(out_path)
    try:
        samples, chunks = ft.plan_transform_chunks(dataset, labels, chunk_samples)
        feature_spec.save(work / ft.SPEC_FILE)
        samples.write_parquet(work / SAMPLES_FILE)
        plan = {"dataset": dataset, "labels": labels, "model": model, "batch_size": batch_size,
                "chunks": [asdict(c) for c in chunks]}
        write_text_atomic(work / PLAN_FILE, json.dumps(plan, indent=2) + "\n")
        futures = [map_chunk.delay(str(work), k) for k in range(len(chunks))]
        records = _wait(futures, timeout_s)
        _reduce(work, feature_spec, samples, chunks, records, scored=model is not None)
        replace_directory(work, out_path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    workers = sorted({f"{r['host']}:{r['pid']}" for r in records})
    return {"out": str(out_path), "chunks": len(chunks), "rows": samples.height, "workers": workers}


def _absolute_file(path: str | os.PathLike, what: str, hint: str) -> str:
    path = Path(path).resolve()
    if not path.is_file():
        raise WorkbenchError(f"{path}: {what} not found ({hint})")
    return str(path)


def map_shards(dataset: str | os.PathLike, labels: str | os.PathLike, spec: str | os.PathLike, out: str | os.PathLike,
               model: str | os.PathLike | None = None, chunk_samples: int = ft.DEFAULT_CHUNK_SAMPLES,
               batch_size: int = DEFAULT_BATCH_SIZE, timeout_s: float | None = None) -> dict:
    """Run :func:`shard_map_flow` on the Prefect server of ``PREFECT_API_URL`` after checking the
    inputs (clear errors, no flow run for a missing file). Returns the flow's summary: ``out``,
    ``chunks``, ``rows``, ``workers`` (``host:pid`` of the processes that ran chunks)."""
    from prefect.settings import get_current_settings

    if chunk_samples < 1:
        raise WorkbenchError(f"shard map: chunk_samples must be >= 1, got {chunk_samples}")
    if batch_size < 1:
        raise WorkbenchError(f"shard map: batch_size must be >= 1, got {batch_size}")
    root = Path(dataset).resolve()
    if not root.is_dir():
        raise WorkbenchError(f"{root}: MEDS dataset folder not found")
    labels = _absolute_file(labels, "labels file", "a parquet of subject_id, prediction_time, boolean_value")
    spec = _absolute_file(spec, "feature spec file", "the feature_spec.json fitted on the train split")
    ft.FeatureSpec.load(spec)  # a clear error now for an invalid one
    model = None if model is None else str(check_model_file(model))
    check_output(out, "shard map output", inputs=(root, labels, spec, model), folder_marker=SHARDS_MANIFEST)
    url = get_current_settings().api.url
    if not url:
        raise WorkbenchError("shard map: PREFECT_API_URL is not set; point it at the Prefect server the task "
                             f"workers use (they start with `{WORKER_COMMAND}`)")
    if not serving_workers():
        raise WorkbenchError(f"shard map: no task worker serves workbench.shard_map on {url}; start one on each "
                             f"machine with `{WORKER_COMMAND}` (same PREFECT_API_URL)")
    return shard_map_flow(str(root), labels, spec, str(Path(out).resolve()), model, chunk_samples, batch_size,
                          timeout_s)


def serving_workers() -> list[str]:
    """Identifiers of the task workers the Prefect server sees serving :func:`map_chunk`."""
    import httpx
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            response = client.request("POST", "/task_workers/filter",
                                      json={"task_worker_filter": {"task_keys": [map_chunk.task_key]}})
            response.raise_for_status()
    except httpx.HTTPError as exc:
        raise WorkbenchError(f"shard map: cannot ask the Prefect server which task workers run ({exc})") from None
    return sorted(w["identifier"] for w in response.json())
