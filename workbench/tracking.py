"""MLflow tracking: where runs live, what each run records, and the model registry.

By default the tracking store is SQLite at ``mlruns/mlflow.db`` and artifacts live under
``mlruns/artifacts`` (both relative to the project root, or ``WORKBENCH_HOME``);
``MLFLOW_TRACKING_URI`` overrides both (a shared server, see ``workbench server``).
One experiment per task, one run per model; a pipeline run is the parent of its model runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import polars as pl
from mlflow.tracking import MlflowClient

from workbench.errors import WorkbenchError

CHAMPION = "champion"
AUROC_TAG = "held_out_auroc"


def project_home() -> Path:
    """The directory holding ``mlruns/`` and ``runs/``: ``WORKBENCH_HOME`` or the current directory."""
    return Path(os.environ.get("WORKBENCH_HOME", os.getcwd())).resolve()


def mlruns_dir() -> Path:
    return project_home() / "mlruns"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the local SQLite store under ``mlruns/``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = mlruns_dir()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def setup() -> str:
    """Point MLflow at the workbench store (call before any logging); returns the URI."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """The experiment for a task, created on first use (artifacts under ``mlruns/artifacts``)."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if is_local_store(mlflow.get_tracking_uri()):
        location = (mlruns_dir() / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    """The project's current git commit (``unknown`` outside a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten_params(configs: dict[str, Any]) -> dict[str, str]:
    """Nested resolved configs as ``section.field`` params (MLflow params are flat strings)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[prefix] = text[:6000]

    walk("", configs)
    return flat


def log_json(obj: Any, artifact_file: str) -> None:
    """Log a JSON-serialisable object (pydantic models included) as a run artifact."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    mlflow.log_dict(obj, artifact_file)


def log_figures(figures: dict[str, Any], folder: str = "plots") -> None:
    """Log matplotlib figures as PNG artifacts under ``folder/``."""
    for name, fig in figures.items():
        mlflow.log_figure(fig, f"{folder}/{name}.png")


def keras_signature(n_steps: int, n_features: int):
    """An explicit tensor signature (``input_example`` crashes mlflow.keras in 3.17)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_steps, n_features), "sequences")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1), "risk")]),
    )


def log_keras_model(model, n_steps: int, n_features: int):
    """Log a Keras model with its signature; returns MLflow's ModelInfo."""
    import keras
    import mlflow.keras

    # Explicit requirements: MLflow's inference reloads the model in a subprocess (slow, and it
    # fails on the +cpu local version label of torch).
    return mlflow.keras.log_model(
        model, name="model", signature=keras_signature(n_steps, n_features),
        pip_requirements=[f"keras=={keras.__version__}", "torch==2.13.0", f"workbench=={workbench_version()}"],
    )


def log_sklearn_model(estimator):
    """Log a scikit-learn estimator (the logistic reference) with explicit requirements."""
    import mlflow.sklearn
    import sklearn

    return mlflow.sklearn.log_model(estimator, name="model", pip_requirements=[f"scikit-learn=={sklearn.__version__}"])


def workbench_version() -> str:
    from workbench import __version__

    return __version__


def register_and_maybe_promote(model_uri: str, name: str, auroc: float) -> dict:
    """Register a model version; move the ``champion`` alias to it only if its AUROC beats the champion's."""
    client = MlflowClient()
    version = mlflow.register_model(model_uri, name).version
    client.set_model_version_tag(name, version, AUROC_TAG, f"{auroc:.6f}")
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        current_auroc = float(current.tags.get(AUROC_TAG, "nan"))
    except mlflow.exceptions.MlflowException:
        current, current_auroc = None, float("nan")
    promoted = current is None or not np.isfinite(current_auroc) or auroc > current_auroc
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    return {
        "name": name,
        "version": int(version),
        "promoted": bool(promoted),
        "previous_champion_version": None if current is None else int(current.version),
        "previous_champion_auroc": None if current is None else current_auroc,
    }


def run_of_model(model_uri: str) -> str:
    """The run id that logged a ``models:/NAME@alias`` / ``models:/NAME/version`` model."""
    client = MlflowClient()
    body = model_uri.removeprefix("models:/")
    if "@" in body:
        lookup = client.get_model_version_by_alias
        name, ref = body.split("@", 1)
    elif "/" in body:
        lookup = client.get_model_version
        name, ref = body.split("/", 1)
    else:
        raise WorkbenchError(f"model {model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        mv = lookup(name, ref)
    except mlflow.exceptions.MlflowException as exc:
        raise WorkbenchError(f"model {model_uri}: no such registered model, alias or version ({exc.message})") from exc
    return mv.run_id


def download_artifact(run_id: str, path: str) -> Path:
    """Download one run artifact to a temp dir and return its local path."""
    dst = Path(tempfile.mkdtemp(prefix="workbench-artifact-"))
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))


def log_data_input(dataset_root: str | os.PathLike, fingerprint: str, task: str) -> None:
    """Record the MEDS dataset as the run's input, its fingerprint as the digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    source = resolve_dataset_source(str(Path(dataset_root).resolve()))
    name = f"{task}:{Path(dataset_root).name}"
    mlflow.log_input(MetaDataset(source, name=name, digest=fingerprint[:40]), context="training")


def log_frame(frame, artifact_file: str) -> None:
    """Log a polars frame as a parquet artifact at ``artifact_file``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        frame.write_parquet(path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact_file).parent))


def runs_table(experiment: str, parent_run_id: str | None = None,
               metrics=("auroc", "auprc", "brier", "ece")) -> pl.DataFrame:
    """The model runs of an experiment (optionally one pipeline run's children) with held-out metrics.

    One row per run that logged held-out metrics: run id, model, start time, and each metric
    with its CI, best AUROC first. This is what the compare notebook and monitoring read.
    """

    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        raise WorkbenchError(f"no MLflow experiment named {experiment!r} at {mlflow.get_tracking_uri()}")
    query = "metrics.held_out_auroc >= 0"
    if parent_run_id:
        query += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
    runs = MlflowClient().search_runs([exp.experiment_id], filter_string=query, max_results=5000)
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "model": run.data.tags.get("workbench.model", run.info.run_name),
               "started": run.info.start_time}
        for m in metrics:
            for suffix in ("", "_ci_low", "_ci_high"):
                row[f"{m}{suffix}"] = run.data.metrics.get(f"held_out_{m}{suffix}")
        rows.append(row)
    schema = {"run_id": pl.String, "model": pl.String, "started": pl.Int64,
              **{f"{m}{s}": pl.Float64 for m in metrics for s in ("", "_ci_low", "_ci_high")}}
    return pl.DataFrame(rows, schema=schema).sort("auroc", descending=True, nulls_last=True)


def runs_markdown(table, metrics=("auroc", "auprc", "brier", "ece"), digits: int = 3) -> str:
    """A ``runs_table`` as a Markdown table, each metric as ``value (low-high)``."""
    from workbench.evaluation import format_with_ci

    header = "| model | " + " | ".join(m.upper() for m in metrics) + " | run |\n"
    header += "|---|" + "---|" * (len(metrics) + 1) + "\n"
    rows = []
    for r in table.iter_rows(named=True):
        cells = [format_with_ci({"value": r[m], "ci_low": r[f"{m}_ci_low"], "ci_high": r[f"{m}_ci_high"]}, digits)
                 for m in metrics]
        rows.append(f"| {r['model']} | " + " | ".join(cells) + f" | `{r['run_id'][:8]}` |")
    return header + "\n".join(rows) + "\n"
