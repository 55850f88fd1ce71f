"""The run record, declared once: every name one step writes and another step or tool reads back.

MLflow tag keys, metric names, artifact paths of a run, and the hand-off files a pipeline step
leaves in its output folder for the steps after it. It imports no MLflow and only the two leaf
modules (errors, files), so every module can depend on it without a circle.
See docs/architecture.md ("The run record") for who writes and who reads each name.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.files import write_text_atomic

# --- tags of a model run (set by experiment.run_model, read by explain, compare, report, monitor)
TASK_TAG = "workbench.task"  # the task's name (also the MLflow experiment and registered model)
TASK_KIND_TAG = "workbench.task_kind"  # "survival" on survival model runs (absent: binary)
MODEL_TAG = "workbench.model"  # the model kind: lstm, gru, rnn, logistic, gbt, mayo
DATA_ROOT_TAG = "workbench.data_root"  # the MEDS folder the cohort was built from
SKIPPED_TAG = "workbench.skipped"  # why a reference was not fitted on this cohort
ARCHITECTURE_TAG = "workbench.architecture"
DATA_FINGERPRINT_TAG = "workbench.data_fingerprint"
TENSORS_HASH_TAG = "workbench.tensors_hash"
REGISTERED_VERSION_TAG = "workbench.registered_version"
CHAMPION_TAG = "workbench.champion"  # "true" when registering this run made it the champion
EXPLAIN_OUTPUT_TAG = "workbench.explain.output"  # which output SHAP explained
EXPLAIN_VERDICT_TAG = "workbench.explain.verdict"  # PASS / WARN over every explanation check
EXPLAIN_CHECK_TAG_PREFIX = "workbench.explain.check."  # one verdict tag per check
CV_MODEL_TAG = "workbench.cv_model"  # the model kind of a cross-validation run
EVALUATION_TAG = "workbench.evaluation"  # "cross-validation" on those runs
MONITOR_PREVIOUS_TAG = "workbench.monitor.previous_run_id"  # the pipeline run a rerun was compared with

# --- tags of a pipeline run (the parent) and of its steps (children)
PIPELINE_TAG = "workbench.pipeline"  # the pipeline's name, on parent and children
PIPELINE_RUN_TAG = "workbench.pipeline_run_id"  # the run folder's name, on parent and children
PIPELINE_YAML_TAG = "workbench.pipeline_yaml"  # only parent runs carry it
OVERRIDES_TAG = "workbench.overrides"
STEP_TAG = "workbench.step"  # a child's step name, e.g. train
MATRIX_TAG_PREFIX = "workbench.matrix."  # a child's matrix values, e.g. workbench.matrix.model=lstm
CACHED_TAG_PREFIX = "workbench.cached."  # on the parent: workbench.cached.<label>=<run id it reuses>
PIPELINE_YAML_SHA256_TAG = "workbench.pipeline_yaml_sha256"
NOTEBOOK_TAG = "workbench.notebook"
OWNER_TAG = "workbench.owner"  # host, pid and start time of the process that owns the run
KILLED_TAG = "workbench.killed"  # how, when and by which command a dead owner's run was closed
ERROR_TAG = "workbench.error"  # the one-line failure of a FAILED run
SCHEDULE_TAG = "workbench.schedule"  # on every run a scheduled run creates: the schedule's name
SCHEDULE_ENTRY_TAG = "workbench.schedule_entry"  # ... and the id of its history entry

# --- the model registry
CHAMPION = "champion"  # the alias of the best registered version
AUROC_TAG = "tuning_auroc"  # version tag: the tuning-split AUROC the champion rule compares

# --- metrics of an evaluated model run
HELD_OUT = "held_out_"  # prefix of every held-out metric (reported, never used to choose)
TUNING = "tuning_"  # prefix of the tuning-split metrics (early stopping, recalibration, champion)
HELD_OUT_AUROC = HELD_OUT + "auroc"
HELD_OUT_ECE = HELD_OUT + "ece"
TUNING_AUROC = TUNING + "auroc"

# --- artifacts of a model run (paths inside the run's artifact root)
MODEL_PATH = "model"  # the pyfunc: raw MEDS events in, risks out
FEATURE_SPEC_ARTIFACT = "feature_spec.json"  # the FeatureSpec fitted on the train split
TASK_ARTIFACT = "task/spec.json"  # the resolved task spec
COHORT_REPORT_ARTIFACT = "cohort/report.json"
COHORT_REPORT_MARKDOWN = "cohort/report.md"
RECALIBRATION_ARTIFACT = "calibration/recalibration.json"
PREDICTIONS_ARTIFACT = "predictions/held_out.parquet"
PLOTS_DIR = "plots"
EVALUATION_DIR = "evaluation"  # held_out.md, subgroups.csv, calibration.csv, thresholds.csv, decision_curve.csv
EXPLANATIONS_DIR = "explanations"  # checks.csv, config.json, explanations.parquet, by_step.csv, by_feature.csv
COMPARISON_DIR = "comparison"
REPORT_ARTIFACT = "report/model_report.html"
CV_PREDICTIONS_ARTIFACT = "cross_validation/out_of_fold.parquet"

# --- hand-off files a step leaves in its output folder
COHORT_FILE = "cohort.json"  # cohort step: with labels.parquet and tensors/ (cohort.Cohort.save)
MODEL_RUN_FILE = "model_run.json"  # train step: run_id, kind, skipped, registry, tuning_auroc
EXPLANATIONS_FILE = "explanations.parquet"  # explain step: the long SHAP table
CHECKS_FILE = "checks.parquet"  # explain step: the checks and their verdicts
COMPARISON_FILE = "comparison.csv"  # compare step
MANIFEST_FILE = "run.json"  # a pipeline run's folder: every step, its status, outputs and MLflow run

# --- the upstream mapping a pipeline injects into a step: {step name: [output folders]}
COHORT_STEP = "cohort"
TRAIN_STEP = "train"


def upstream_cohort(upstream: dict | None) -> str | None:
    """The cohort step's output folder among a step's upstream outputs, if there is one."""
    return ((upstream or {}).get(COHORT_STEP) or [None])[0]


def upstream_train(upstream: dict | None) -> list[str]:
    """The train steps' output folders (one per model of the matrix) among a step's upstream outputs."""
    return list((upstream or {}).get(TRAIN_STEP) or [])


def write_model_run(directory, info: dict) -> Path:
    """Write a train step's ``model_run.json`` (atomically)."""
    return write_text_atomic(Path(directory) / MODEL_RUN_FILE, json.dumps(info, indent=2))


def read_model_runs(train_outputs) -> list[dict]:
    """The ``model_run.json`` of each train output folder."""
    runs = []
    for directory in train_outputs:
        path = Path(directory) / MODEL_RUN_FILE
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise WorkbenchError(f"{path}: not a train step's hand-off file ({exc})") from None
    return runs


def handed_model_runs(train_outputs) -> list[dict]:
    """The ``model_run.json`` of the train output folders that wrote one (a custom notebook
    in a step named train may write none)."""
    return read_model_runs(d for d in train_outputs if (Path(d) / MODEL_RUN_FILE).is_file())
