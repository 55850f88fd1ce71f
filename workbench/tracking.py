"""MLflow tracking: where runs live, what each run records, and the model registry.

By default the tracking store is SQLite at ``mlruns/mlflow.db`` and artifacts live under
``mlruns/artifacts`` (both relative to the project root, or ``WORKBENCH_HOME``);
``MLFLOW_TRACKING_URI`` overrides both (a shared server, see ``workbench server``).
One experiment per task, one run per model; a pipeline run is the parent of its model runs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import polars as pl
from mlflow.tracking import MlflowClient

from workbench.errors import WorkbenchError
from workbench.files import project_home  # noqa: F401  (tracking.project_home: where mlruns/ and runs/ live)
from workbench.record import (
    AUROC_TAG,
    CHAMPION,
    COHORT_REPORT_ARTIFACT,
    COHORT_REPORT_MARKDOWN,
    HELD_OUT,
    HELD_OUT_AUROC,
    MODEL_TAG,
    PLOTS_DIR,
    PREDICTIONS_ARTIFACT,
    TASK_ARTIFACT,
    TUNING_AUROC,
)



def store_description() -> str:
    """One line saying where runs are logged (printed by notebooks and commands)."""
    uri = tracking_uri()
    where = f"artifacts in {mlruns_dir() / 'artifacts'}" if is_local_store(uri) else "artifacts on the server"
    return f"MLflow tracking store: {uri} ({where}; `workbench ui` shows it)"


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
    # MLflow's own progress bars belong to no one's terminal here (they fill notebooks' stderr).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's INFO lines (database migrations, input example validation) are not the user's news.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
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


def log_figures(figures: dict[str, Any], folder: str = PLOTS_DIR) -> None:
    """Log matplotlib figures as PNG artifacts under ``folder/``."""
    for name, fig in figures.items():
        mlflow.log_figure(fig, f"{folder}/{name}.png")


def register_and_maybe_promote(model_uri: str, name: str, auroc: float, description: str = "",
                               tags: dict[str, str] | None = None) -> dict:
    """Register a model version with its description and tags; move the ``champion`` alias to it
    only if its AUROC beats the champion's."""
    from mlflow.utils import logging_utils

    client = MlflowClient()
    # mlflow.register_model announces itself on stderr (into every notebook): keep it quiet.
    logging_utils.disable_logging()
    try:
        version = mlflow.register_model(model_uri, name, tags={**(tags or {}), AUROC_TAG: f"{auroc:.6f}"}).version
    finally:
        logging_utils.enable_logging()
    if description:
        client.update_model_version(name, version, description=description)
    with champion_lock(name):
        try:
            current = client.get_model_version_by_alias(name, CHAMPION)
        except mlflow.exceptions.MlflowException:
            current = None
        best = best_version(client, name)
        if current is None or best.version != current.version:
            client.set_registered_model_alias(name, CHAMPION, best.version)
        # The file lock serializes this machine only; on a shared server another machine may have
        # registered a better version meanwhile: check after setting, and set again until stable.
        for _ in range(5):
            latest = best_version(client, name)
            if latest.version == client.get_model_version_by_alias(name, CHAMPION).version:
                break
            client.set_registered_model_alias(name, CHAMPION, latest.version)
            best = latest
    return {
        "name": name,
        "version": int(version),
        "promoted": best.version == version and (current is None or current.version != version),
        "previous_champion_version": None if current is None else int(current.version),
        "previous_champion_auroc": None if current is None else _version_auroc(current),
    }


def _version_auroc(version) -> float:
    value = float(version.tags.get(AUROC_TAG, "nan"))
    return value if np.isfinite(value) else float("-inf")


def best_version(client: MlflowClient, name: str, kinds=None):
    """The registered version the champion rule picks: the highest tuning AUROC tag, the older on a
    tie; with ``kinds``, only among versions of those model kinds (None when there is none)."""
    versions = client.search_model_versions(f"name='{name}'", max_results=10_000)
    if kinds is not None:
        versions = [v for v in versions if v.tags.get("model_kind") in kinds]
    return max(versions, key=lambda v: (_version_auroc(v), -int(v.version))) if versions else None


@contextmanager
def champion_lock(name: str):
    """Serialize champion updates of one registered model on this machine (concurrent runs of a
    sweep register at the same time); the rule itself recomputes the best of all versions, so
    whoever moves the alias last still moves it to the best one."""
    import fcntl

    path = project_home() / "runs" / ".locks" / f"champion-{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.meta_dataset import MetaDataset

    # The local-files source named directly: resolving a path finds two registered candidates and warns.
    local = next(s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource")
    source = local(str(Path(dataset_root).resolve()))
    name = f"{task}:{Path(dataset_root).name}"
    dataset = MetaDataset(source, name=name, digest=fingerprint[:40])
    # MLflow finds-or-creates the experiment's dataset row in two statements: two model runs of a
    # matrix logging the same data at the same moment collide on its unique key. The loser's
    # transaction is rolled back; on the next try the row exists and is reused.
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context="training")
            return
        except mlflow.exceptions.MlflowException as exc:
            duplicate = "UNIQUE constraint failed: datasets" in str(exc) or "duplicate key value" in str(exc)
            if not duplicate or attempt == 2:
                raise


def log_cohort_report(report) -> None:
    """The cohort report (counts per rule and split) into the active run: metrics and artifacts."""
    mlflow.log_metrics(report.to_metrics())
    mlflow.log_dict(report.to_dict(), COHORT_REPORT_ARTIFACT)
    mlflow.log_text(report.to_markdown(), COHORT_REPORT_MARKDOWN)


def log_cohort(run_id: str, cohort) -> None:
    """A cohort step's record in its run: the report and the resolved task spec."""
    with mlflow.start_run(run_id=run_id):
        log_cohort_report(cohort.report)
        mlflow.log_dict(cohort.task.model_dump(mode="json"), TASK_ARTIFACT)


def log_frame(frame, artifact_file: str) -> None:
    """Log a polars frame as a parquet artifact at ``artifact_file``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        frame.write_parquet(path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact_file).parent))


def runs_table(experiment: str, parent_run_id: str | None = None, run_ids=None, latest_per_model: bool = False,
               metrics=("auroc", "auprc", "brier", "ece")) -> pl.DataFrame:
    """The model runs of an experiment with their held-out metrics, best AUROC first.

    Which runs: ``run_ids`` (e.g. a pipeline's train steps, cached ones included), else one
    pipeline run's children (``parent_run_id``), else every run; ``latest_per_model`` keeps the
    most recent run of each model kind. One row per run that logged held-out metrics: run id,
    model, start time, and each metric with its CI. The compare notebook and the demo read it.
    """
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise WorkbenchError(f"no MLflow experiment named {experiment!r} at {mlflow.get_tracking_uri()}")
    query = f"metrics.{HELD_OUT_AUROC} >= 0"
    if parent_run_id:
        query += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=5000, order_by=["attributes.start_time DESC"])
    if run_ids is not None:
        wanted = set(run_ids)
        runs = [r for r in runs if r.info.run_id in wanted]
    rows, seen = [], set()
    for run in runs:
        model = run.data.tags.get(MODEL_TAG, run.info.run_name)
        if latest_per_model and model in seen:
            continue
        seen.add(model)
        row = {"run_id": run.info.run_id, "model": model, "started": run.info.start_time,
               "tuning_auroc": run.data.metrics.get(TUNING_AUROC)}
        for m in metrics:
            for suffix in ("", "_ci_low", "_ci_high"):
                row[f"{m}{suffix}"] = run.data.metrics.get(f"{HELD_OUT}{m}{suffix}")
        rows.append(row)
    schema = {"run_id": pl.String, "model": pl.String, "started": pl.Int64, "tuning_auroc": pl.Float64,
              **{f"{m}{s}": pl.Float64 for m in metrics for s in ("", "_ci_low", "_ci_high")}}
    return pl.DataFrame(rows, schema=schema).sort("auroc", descending=True, nulls_last=True)


def held_out_predictions(table: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """``{model: subject_id, prediction_time, label, risk}`` on the held-out split for each run of a ``runs_table``."""
    return {row["model"]: pl.read_parquet(download_artifact(row["run_id"], PREDICTIONS_ARTIFACT))
            for row in table.iter_rows(named=True)}


def runs_markdown(table, metrics=("auroc", "auprc", "brier", "ece"), digits: int = 3) -> str:
    """A ``runs_table`` as a Markdown table: tuning AUROC (what choices look at), then each held-out
    metric as ``value (low-high)``."""
    from workbench.evaluation import format_with_ci

    header = "| model | tuning AUROC | " + " | ".join(f"held-out {m.upper()}" for m in metrics) + " | run |\n"
    header += "|---|---|" + "---|" * (len(metrics) + 1) + "\n"
    rows = []
    for r in table.iter_rows(named=True):
        cells = [format_with_ci({"value": r[m], "ci_low": r[f"{m}_ci_low"], "ci_high": r[f"{m}_ci_high"]}, digits)
                 for m in metrics]
        tuning = "n/a" if r.get("tuning_auroc") is None else f"{r['tuning_auroc']:.{digits}f}"
        rows.append(f"| {r['model']} | {tuning} | " + " | ".join(cells) + f" | `{r['run_id']}` |")
    return header + "\n".join(rows) + "\n"
