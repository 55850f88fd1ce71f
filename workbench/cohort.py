"""The cohort hand-off: a task's labels and fitted tensors on one dataset, the input of every model run.

``notebooks/01_cohort`` builds one with :func:`prepare_cohort` and saves it for the model runs of a
pipeline; a notebook run on its own (``02_train`` without an upstream cohort) calls
:func:`cached_cohort`, which builds the same cohort once and reuses it while its inputs (task,
data, feature settings, workbench code) are unchanged.

Which settings apply: ``FeatureConfig``'s defaults, then the task spec's ``features`` (the time
scale its author chose), then the cohort's own ``features`` (a notebook or pipeline parameter).
A task may be a labels parquet made elsewhere (ACES, SQL): its prediction times and outcomes are
used as they are, and the file's name names the task.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from workbench.errors import WorkbenchError
from workbench.record import COHORT_FILE, upstream_cohort
from workbench.features import FeatureConfig, SequenceTensors
from workbench.files import (
    code_fingerprint,
    path_fingerprint,
    replace_directory,
    temporary_directory_for,
    write_parquet_atomic,
    write_text_atomic,
)
from workbench.tasks import CohortReport, TaskSpec, load_task



@dataclass
class Cohort:
    """Labels, cohort report and fitted tensors of one task on one dataset."""

    task: TaskSpec
    data_root: str
    report: CohortReport
    labels: pl.DataFrame  # subject_id, prediction_time, boolean_value, split
    tensors: SequenceTensors

    @property
    def name(self) -> str:
        """The task's name: it names the MLflow experiment and the registered model."""
        return self.task.name

    def tensors_markdown(self) -> str:
        """One line: the tensors' shape, samples per split and feature names."""
        from workbench.features import split_counts

        X = self.tensors.X
        return (f"**{X.shape[0]:,} samples × {X.shape[1]} steps × {X.shape[2]} features**; "
                f"samples per split: {split_counts(self.tensors.split)}; features: `{', '.join(self.tensors.feature_names)}`")

    def timelines_figure(self, n_positive: int = 4, n_negative: int = 2):
        """Event timelines of the first few patients with a positive label and a few without."""
        from workbench.data.meds_io import open_dataset
        from workbench.plots import patient_timelines_plot

        positive = self.labels["boolean_value"]
        ids = (self.labels.filter(positive)["subject_id"].unique().sort().head(n_positive).to_list()
               + self.labels.filter(~positive)["subject_id"].unique().sort().head(n_negative).to_list())
        events = open_dataset(self.data_root).events().filter(pl.col("subject_id").is_in(ids)).collect()
        return patient_timelines_plot(
            events, ids, title=f"Event timelines (first {n_positive} with a positive label, {n_negative} without)")

    def save(self, directory) -> Path:
        """Write labels, tensors and ``cohort.json`` under ``directory``, all of it at once (a rename)."""
        directory = Path(directory)
        tmp = temporary_directory_for(directory)
        write_parquet_atomic(self.labels, tmp / "labels.parquet")
        self.tensors.save(tmp / "tensors")
        info = {"task": self.task.model_dump(mode="json"), "data_root": self.data_root, "report": self.report.to_dict()}
        write_text_atomic(tmp / COHORT_FILE, json.dumps(info, indent=2))
        replace_directory(tmp, directory)
        return directory


def feature_config(task: TaskSpec, features: dict | FeatureConfig | None = None) -> FeatureConfig:
    """FeatureConfig defaults, overridden by the task's ``features``, overridden by ``features``."""
    if isinstance(features, FeatureConfig):
        return features
    if features is not None and not isinstance(features, dict):
        raise WorkbenchError(f"features: expected a mapping of FeatureConfig fields, got {type(features).__name__}")
    return FeatureConfig.from_dict({**task.features, **(features or {})}, source="features")


def prepare_cohort(task, data, features: dict | FeatureConfig | None = None) -> Cohort:
    """Validate the data, label the task, and fit tensors on its train split.

    ``task`` is a shipped task name, a YAML path, a labels parquet made elsewhere or a TaskSpec;
    ``data`` a bundled dataset name or a MEDS directory; ``features`` FeatureConfig fields.
    """
    from workbench.data.datasets import resolve
    from workbench.data.validate import require_valid_cached
    from workbench.features import fit_transform
    from workbench.tasks import make_labels

    root = resolve(data)
    require_valid_cached(root)
    spec = load_task(task)
    config = feature_config(spec, features)
    labelled = make_labels(root, spec)
    _, tensors = fit_transform(root, labelled.labels, config)
    return Cohort(spec, str(Path(root).resolve()), labelled.report, labelled.labels_with_split, tensors)


def load_cohort(directory) -> Cohort:
    """A cohort written by :meth:`Cohort.save` (e.g. the cohort step's output dir)."""
    directory = Path(directory)
    try:
        info = json.loads((directory / COHORT_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"{directory}: not a saved cohort ({exc})") from None
    return Cohort(
        load_task(info["task"]), info["data_root"], CohortReport.model_validate(info["report"]),
        pl.read_parquet(directory / "labels.parquet"), SequenceTensors.load(directory / "tensors"),
    )


def cohort_key(task: TaskSpec, root: Path, config: FeatureConfig) -> str:
    """What a cohort depends on: the task, the data (names, sizes, times), the settings, the code."""
    ingredients = {
        "task": task.model_dump(mode="json"),
        "labels": path_fingerprint(task.prediction_times.labels_path or ""),
        "data": [str(root), path_fingerprint(root)],
        "features": config.model_dump(mode="json"),
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()[:20]


def cached_cohort(task, data, features=None) -> Cohort:
    """The cohort :func:`prepare_cohort` would build, from ``runs/cohorts/`` when already built."""
    from workbench.data.datasets import resolve
    from workbench.files import project_home

    spec = load_task(task)
    root = Path(resolve(data)).resolve()
    directory = project_home() / "runs" / "cohorts" / f"{spec.name}-{cohort_key(spec, root, feature_config(spec, features))}"
    if (directory / COHORT_FILE).is_file():
        return load_cohort(directory)
    cohort = prepare_cohort(spec, root, features)
    cohort.save(directory)
    return cohort


def handed_over(cohort_dir=None, upstream: dict | None = None, task=None, data=None, features=None) -> Cohort:
    """A model step's cohort: ``cohort_dir``, else the pipeline's cohort step output, else the
    cached cohort of ``task`` on ``data`` (a notebook run on its own)."""
    directory = cohort_dir or upstream_cohort(upstream)
    return load_cohort(directory) if directory else cached_cohort(task, data, features)


def settings_markdown(task: TaskSpec, features: dict | None = None) -> str:
    """The feature settings in force, each with where it came from (default, task, parameter)."""
    config = feature_config(task, features)
    lines = ["| setting | value | from |", "|---|---|---|"]
    for name, value in config.model_dump(mode="json").items():
        source = "parameter" if name in (features or {}) else f"task {task.name}" if name in task.features else "default"
        lines.append(f"| `{name}` | `{value}` | {source} |")
    return "\n".join(lines)
