"""Rerun monitoring: how a pipeline run differs from the previous run of the same pipeline.

:func:`compare_runs` reads two pipeline (parent) runs from MLflow and returns

* ``monitor.auroc_change`` / ``monitor.ece_change``: held-out AUROC and calibration error,
  current minus previous;
* ``monitor.n_labels_change`` / ``monitor.prevalence_change``: cohort size and prevalence;
* ``monitor.psi.<feature>`` and ``monitor.psi_max``: the population stability index of each
  feature between the two runs' SequenceTensors (raw, non-padded values).

:func:`monitor_rerun` finds the previous finished run, compares and logs these as metrics on
the current parent run, so the MLflow UI charts them across reruns. A metric is read from the
parent run, else from the first of its executions (in pipeline order) that logged it; with a
model sweep that is the first model of the matrix.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from workbench import record, tracking
from workbench.errors import WorkbenchError
from workbench.features import TENSORS_FILE, SequenceTensors

#: PSI above this is conventionally a major shift (0.1-0.25 moderate).
PSI_DRIFT = 0.25


@dataclass(frozen=True)
class MetricKeys:
    """MLflow metric keys the notebooks log (see workbench/experiment.py and tasks.CohortReport)."""

    auroc: str = record.HELD_OUT_AUROC
    ece: str = record.HELD_OUT_ECE
    n_labels: str = "cohort_labels"
    prevalence: str = "cohort_prevalence"


# --- population stability index ---------------------------------------------------------


def _bin_cuts(expected: np.ndarray, bins: int) -> np.ndarray:
    """Cut points from the expected values: a bin per distinct value when few (0/1 flags, counts), else quantiles."""
    distinct = np.unique(expected)
    if len(distinct) <= bins:
        # [v, next float after v) holds exactly v; values between or beyond them fall in gap bins.
        return np.unique(np.concatenate([distinct, np.nextafter(distinct, np.inf)]))
    return np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of ``actual`` against ``expected`` (quantile bins of ``expected``).

    sum((a - e) * ln(a / e)) over bins; an empty bin counts as ``eps`` so a value range that
    appears or vanishes gives a large finite PSI instead of infinity. NaNs are ignored.
    """
    expected = np.asarray(expected, dtype=np.float64).ravel()
    actual = np.asarray(actual, dtype=np.float64).ravel()
    expected, actual = expected[np.isfinite(expected)], actual[np.isfinite(actual)]
    if expected.size == 0 or actual.size == 0:
        return float("nan")
    cuts = _bin_cuts(expected, bins)
    # side="right": a value equal to a cut point falls in the bin that starts at it.
    e = np.bincount(np.searchsorted(cuts, expected, side="right"), minlength=len(cuts) + 1) / expected.size
    a = np.bincount(np.searchsorted(cuts, actual, side="right"), minlength=len(cuts) + 1) / actual.size
    e, a = np.clip(e, eps, None), np.clip(a, eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def observed_values(tensors: SequenceTensors, feature: str) -> np.ndarray:
    """A feature's raw values over non-padded steps.

    Raw, not normalized: each run standardizes with its own train statistics, which would
    hide exactly the mean shift we look for.
    """
    f = tensors.feature_names.index(feature)
    column = tensors.X[..., f][~tensors.padded].astype(np.float64)
    return column * tensors.spec.std[f] + tensors.spec.mean[f]


def feature_psi(previous: SequenceTensors, current: SequenceTensors, bins: int = 10) -> dict[str, float]:
    """PSI per feature present in both runs (previous run = expected distribution)."""
    common = [name for name in previous.feature_names if name in current.feature_names]
    return {name: psi(observed_values(previous, name), observed_values(current, name), bins) for name in common}


def metric_key(name: str) -> str:
    """A feature name as an MLflow-legal key part (``LAB//bilirubin/last`` -> ``LAB_bilirubin_last``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "feature"


# --- reading pipeline runs ---------------------------------------------------------------


def _client():
    from mlflow.tracking import MlflowClient

    tracking.setup()
    return MlflowClient()


def executions(client, parent_run_id: str) -> list[dict]:
    """The executions of a pipeline run from its ``run.json`` (cached ones point at the run they reused)."""
    from workbench.pipelines import runs_root

    tags = client.get_run(parent_run_id).data.tags
    if record.PIPELINE_TAG not in tags or record.PIPELINE_RUN_TAG not in tags:
        raise WorkbenchError(f"MLflow run {parent_run_id} is not a pipeline run (no {record.PIPELINE_TAG} tags)")
    manifest = runs_root(tags[record.PIPELINE_TAG]) / tags[record.PIPELINE_RUN_TAG] / record.MANIFEST_FILE
    try:
        return [e for e in json.loads(manifest.read_text())["executions"] if e["status"] != "failed"]
    except (OSError, ValueError, KeyError) as exc:
        raise WorkbenchError(f"pipeline run {parent_run_id}: cannot read {manifest} ({exc})") from exc


def run_metric(client, parent_run_id: str, key: str) -> Optional[float]:
    """``key`` from the parent run, else from the first execution that logged it; None if none did."""
    for run_id in [parent_run_id] + [e["run_id"] for e in executions(client, parent_run_id)]:
        metrics = client.get_run(run_id).data.metrics
        if key in metrics:
            return float(metrics[key])
    return None


def find_tensors(client, parent_run_id: str) -> Optional[Path]:
    """The first saved SequenceTensors directory in the run's execution outputs (the cohort step's)."""
    for execution in executions(client, parent_run_id):
        found = sorted(Path(execution["output_dir"]).rglob(TENSORS_FILE))
        if found:
            return found[0].parent
    return None


def previous_run(client, parent_run_id: str) -> Optional[str]:
    """The latest FINISHED run of the same pipeline that started before this one."""
    run = client.get_run(parent_run_id)
    pipeline = run.data.tags.get(record.PIPELINE_TAG)
    if pipeline is None:
        raise WorkbenchError(f"MLflow run {parent_run_id} is not a pipeline run (no {record.PIPELINE_TAG} tag)")
    found = client.search_runs(
        [run.info.experiment_id],
        f"tags.`{record.PIPELINE_TAG}` = '{pipeline}' and tags.`{record.PIPELINE_YAML_TAG}` IS NOT NULL "
        f"and attributes.status = 'FINISHED' and attributes.start_time < {run.info.start_time}",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return found[0].info.run_id if found else None


# --- comparing and logging ---------------------------------------------------------------


def compare_runs(
    previous_parent_run_id: str, current_parent_run_id: str,
    tensors: Optional[tuple[str | Path, str | Path]] = None, keys: MetricKeys = MetricKeys(), bins: int = 10,
) -> dict[str, float]:
    """``monitor.*`` metrics of the current run against the previous one (see the module docstring).

    ``tensors`` = (previous dir, current dir) overrides the SequenceTensors found in the runs'
    outputs; a metric or tensor missing from either run is left out, not guessed.
    """
    client = _client()
    out: dict[str, float] = {}
    for name in ("auroc", "ece", "n_labels", "prevalence"):
        key = getattr(keys, name)
        before, now = run_metric(client, previous_parent_run_id, key), run_metric(client, current_parent_run_id, key)
        if before is not None and now is not None:
            out[f"monitor.{name}_change"] = now - before
    if tensors is None:
        tensors = (find_tensors(client, previous_parent_run_id), find_tensors(client, current_parent_run_id))
    if all(t is not None for t in tensors):
        drift = feature_psi(SequenceTensors.load(tensors[0]), SequenceTensors.load(tensors[1]), bins)
        for feature, value in drift.items():
            key = f"monitor.psi.{metric_key(feature)}"
            while key in out:  # two names that sanitize alike keep both values
                key += "_"
            out[key] = value
        finite = [v for v in drift.values() if np.isfinite(v)]
        if finite:
            out["monitor.psi_max"] = max(finite)
    return out


def log_comparison(current_parent_run_id: str, previous_parent_run_id: str, metrics: dict[str, float]) -> None:
    """Log the comparison as metrics (one batch per 1000, MLflow's limit) and tag the run compared with."""
    from mlflow.entities import Metric

    client = _client()
    stamp = int(time.time() * 1000)
    batch = [Metric(k, float(v), stamp, 0) for k, v in metrics.items() if np.isfinite(v)]
    for start in range(0, len(batch), 1000):
        client.log_batch(current_parent_run_id, metrics=batch[start : start + 1000])
    client.set_tag(current_parent_run_id, record.MONITOR_PREVIOUS_TAG, previous_parent_run_id)


def monitor_rerun(current_parent_run_id: str, keys: MetricKeys = MetricKeys(), bins: int = 10) -> dict:
    """Compare a finished pipeline run with its pipeline's previous one and log the result on it.

    Returns ``{"previous_run_id": ..., "metrics": {...}, "drifted": [features with PSI > PSI_DRIFT]}``
    (empty metrics when there is no previous run to compare with).
    """
    previous = previous_run(_client(), current_parent_run_id)
    if previous is None:
        return {"previous_run_id": None, "metrics": {}, "drifted": []}
    metrics = compare_runs(previous, current_parent_run_id, keys=keys, bins=bins)
    log_comparison(current_parent_run_id, previous, metrics)
    drifted = [k.removeprefix("monitor.psi.") for k, v in metrics.items()
               if k.startswith("monitor.psi.") and v > PSI_DRIFT]
    return {"previous_run_id": previous, "metrics": metrics, "drifted": drifted}
