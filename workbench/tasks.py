"""Prediction tasks: a typed task spec turns MEDS events into labels (MEDS label schema).

A :class:`TaskSpec` says *when* a prediction is made (every event of a code set, a fixed
offset after an anchor, or the prediction times of a labels parquet made elsewhere, e.g. by
ACES), *what* is predicted (outcome codes within a horizon, after an optional gap), how
follow-up ends (an end-of-follow-up code and competing events that censor), and who is
eligible (history, event count, age, no prior outcome).

Semantics (``t`` = prediction time, the inclusive end of usable data):

* outcome window = ``(t + gap, t + horizon]``; positive if an outcome event falls in it;
* excluded, never negative, if there is no outcome in the window and follow-up (the first
  end-of-follow-up event, else the subject's last event) ends before ``t + horizon``, or if a
  competing event comes in ``(t, t + horizon]`` before the first outcome (an outcome at the
  same instant as a competing event wins: it was observed);
* excluded if the outcome (or a competing event) already happened at or before ``t``, or if
  the outcome falls in the gap ``(t, t + gap]``.

A task of ``kind: survival`` labels the same prediction times with *when* and *how* follow-up
ended instead of a yes/no: ``float_value`` = days from ``t`` to the first of the next outcome,
the next competing event, the end of follow-up and ``t + horizon`` (the maximum horizon:
longer follow-up is administratively censored there), always > 0; ``integer_value`` = what came
first: :data:`EVENT_OUTCOME` (1), :data:`EVENT_COMPETING` (2) or :data:`EVENT_CENSORED` (0, end
of follow-up or the horizon). At one instant the outcome wins over a competing event, and either
wins over the end of follow-up (they were observed). As in the binary kind, an outcome or
competing event in the data counts even if recorded after the end-of-follow-up code (the end of
follow-up censors only when neither came first within the horizon), so a binary task with horizon
``h`` labels positive exactly the samples with ``integer_value == 1`` and ``float_value <= h``.
``boolean_value`` = ``integer_value == 1``: the outcome within the horizon, so binary consumers
still read a label. Censored and competing samples are kept (that is the
point), so the rules ``censored_competing``/``censored_followup`` do not apply, and ``gap_days``
must be 0; every eligibility rule does. ``categorical_value`` is not written (MEDS forbids nulls in
it and the event type is already ``integer_value``). The cohort report adds life-table counts per
year of follow-up (:class:`IntervalCount`).

:func:`make_labels` evaluates every rule lazily with polars (one ``collect``) and records, for
each candidate prediction time, the first rule that excluded it; the :class:`CohortReport`
counts are derived from that, so they always add up.
"""

from __future__ import annotations

import datetime as dt
import difflib
import importlib.resources
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import meds
import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workbench.data.meds_io import MedsDataset, open_dataset
from workbench.config import check_regexes, read_yaml, validated
from workbench.errors import WorkbenchError
from workbench.files import write_parquet_atomic
from workbench.labels import (  # the survival constants and schema are part of this module's API too
    EVENT_CENSORED,
    EVENT_COMPETING,
    EVENT_OUTCOME,
    LABEL_SCHEMA,
    SURVIVAL_EVENT_COLUMN,
    SURVIVAL_LABEL_SCHEMA,
    SURVIVAL_TIME_COLUMN,
    check_labels_in_data,
    read_labels,
    read_survival_labels,
)

SPLIT_ORDER = ("train", "tuning", "held_out")
NO_SPLIT = "(none)"
SHIPPED_SPECS_PACKAGE_DIR = "task_specs"
DAYS_PER_YEAR = 365.25
MAX_DAYS = 36_525  # 100 years: the longest day count (horizon, gap, offset, history) a spec may give


# --------------------------------------------------------------------------------------------
# Typed spec
# --------------------------------------------------------------------------------------------


class _Section(BaseModel):
    """Base of every spec section: unknown keys are errors, so a YAML typo never goes unnoticed."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _finite_days(value):
    """Field validator (before parsing) of a day count: finite and at most :data:`MAX_DAYS`, so
    ``.inf`` or ``1e12`` is refused naming the field instead of overflowing a date later."""
    if isinstance(value, bool):  # pydantic would read true as 1 day
        raise ValueError(f"must be a number of days, not {str(value).lower()}")
    try:
        days = float(value)
    except (TypeError, ValueError):
        return value  # pydantic's own error names the type
    if days != days or days in (float("inf"), float("-inf")):
        raise ValueError(f"must be a finite number of days (at most {MAX_DAYS:,} = 100 years)")
    if days > MAX_DAYS:
        raise ValueError(f"{days:g} days is more than 100 years (at most {MAX_DAYS:,} days)")
    return value


class PredictionTimes(_Section):
    """When predictions are made."""

    kind: Literal["every_event", "offset", "labels_file"] = Field(
        "every_event",
        description=(
            "every_event: at each distinct time of an event matching codes/patterns; "
            "offset: offset_days after the subject's first event (or first anchor_codes event); "
            "labels_file: the prediction times of labels_path (a MEDS labels parquet, e.g. from ACES)."
        ),
    )
    codes: list[str] = Field(
        default_factory=lambda: ["VISIT"], description="every_event: exact codes whose events are prediction times."
    )
    patterns: list[str] = Field(
        default_factory=list, description="every_event: regular expressions (search) on codes, added to codes."
    )
    anchor_codes: list[str] = Field(
        default_factory=list,
        description="offset: anchor at the subject's first event of these codes; empty = the first timed event "
        "that is not a birth code.",
    )
    offset_days: float = Field(0.0, ge=0, description="offset: days from the anchor to the prediction time (>= 0).")
    labels_path: str | None = Field(
        None,
        description="labels_file: path of a labels parquet (subject_id, prediction_time[, boolean_value], or for "
        "a survival task with outcome null float_value and integer_value); relative paths resolve against the "
        "spec file's directory.",
    )

    _check = field_validator("patterns")(check_regexes)
    _days = field_validator("offset_days", mode="before")(_finite_days)

    @model_validator(mode="after")
    def _kind_has_its_fields(self) -> "PredictionTimes":
        if self.kind == "every_event" and not (self.codes or self.patterns):
            raise ValueError("kind 'every_event' needs at least one of codes / patterns")
        if self.kind == "labels_file" and not self.labels_path:
            raise ValueError("kind 'labels_file' needs labels_path")
        return self


class Outcome(_Section):
    """What is predicted: an outcome event within a horizon, after an optional gap."""

    codes: list[str] = Field(default_factory=lambda: [meds.death_code], description="Exact outcome codes.")
    patterns: list[str] = Field(default_factory=list, description="Regular expressions (search) on outcome codes.")
    horizon_days: float = Field(
        365.0, gt=0, description="Window end, in days after the prediction time (> 0); for kind survival the maximum "
        "horizon (longer follow-up is censored at it).")
    gap_days: float = Field(
        0.0, ge=0, description="Window start, in days after the prediction time (>= 0, < horizon_days; 0 for kind "
        "survival)."
    )

    _check = field_validator("patterns")(check_regexes)
    _days = field_validator("horizon_days", "gap_days", mode="before")(_finite_days)

    @model_validator(mode="after")
    def _window_not_empty(self) -> "Outcome":
        if not (self.codes or self.patterns):
            raise ValueError("needs at least one of codes / patterns")
        if self.gap_days >= self.horizon_days:
            raise ValueError(f"gap_days ({self.gap_days}) must be < horizon_days ({self.horizon_days})")
        return self


class Censoring(_Section):
    """How follow-up ends."""

    end_codes: list[str] = Field(
        default_factory=list,
        description="Codes marking end of follow-up (first one counts); empty = the subject's last event.",
    )
    competing_codes: list[str] = Field(
        default_factory=list, description="Competing events (e.g. transplant) that censor when they come first."
    )
    competing_patterns: list[str] = Field(
        default_factory=list, description="Regular expressions (search) for competing-event codes."
    )

    _check = field_validator("competing_patterns")(check_regexes)


class Inclusion(_Section):
    """Who is eligible at a prediction time."""

    min_history_days: float = Field(
        0.0, ge=0, description="Days from the first (non-birth) event to the prediction time, at least (>= 0)."
    )
    min_events: int = Field(
        0, ge=0, description="Timed non-birth events at or before the prediction time, at least (>= 0)."
    )
    min_age_years: float | None = Field(None, ge=0, le=150, description="Youngest age at prediction time (0-150).")
    max_age_years: float | None = Field(None, ge=0, le=150, description="Oldest age at prediction time (0-150).")
    birth_codes: list[str] = Field(
        default_factory=lambda: [meds.birth_code], description="Codes giving the birth date (for age, and not history)."
    )
    exclude_prior_outcome: bool = Field(
        True, description="Drop prediction times at or after the subject's first outcome event."
    )

    _days = field_validator("min_history_days", mode="before")(_finite_days)

    @model_validator(mode="after")
    def _age_range(self) -> "Inclusion":
        lo, hi = self.min_age_years, self.max_age_years
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_age_years ({lo}) must be <= max_age_years ({hi})")
        return self


class TaskSpec(_Section):
    """A binary or survival prediction task over a MEDS dataset (see the module docstring for semantics)."""

    name: str = Field("task", min_length=1, description="Task name (MLflow experiment name, file names).")
    description: str = Field("", description="What the task predicts, in words.")
    kind: Literal["binary", "survival"] = Field(
        "binary",
        description="binary: boolean_value = outcome inside the window, censored samples excluded; survival: "
        "float_value = days to the first of outcome / competing event / end of follow-up / horizon_days (the "
        "maximum horizon), integer_value = 1 outcome, 2 competing, 0 censored, boolean_value = integer_value == 1; "
        "censored and competing samples are kept.",
    )
    prediction_times: PredictionTimes = Field(default_factory=PredictionTimes, description="When to predict.")
    outcome: Outcome | None = Field(
        default_factory=Outcome,
        description="What to predict; null with prediction_times.kind labels_file keeps the file's boolean_value "
        "(survival: its float_value and integer_value).",
    )
    censoring: Censoring = Field(default_factory=Censoring, description="How follow-up ends.")
    inclusion: Inclusion = Field(default_factory=Inclusion, description="Eligibility rules.")
    require_train_positives: bool = Field(
        True, description="Fail if the train split (or, without splits, the whole cohort) has no positive label "
        "(survival: no outcome event)."
    )
    warn_prevalence_below: float = Field(
        0.01, ge=0, le=1, description="Warn when the overall label prevalence is below this (0-1)."
    )
    features: dict = Field(
        default_factory=dict,
        description="FeatureConfig fields suited to this task's time scale, e.g. {bin_width: 90d, n_steps: 16} "
        "for yearly visits; a cohort's own feature settings override them.",
    )

    @model_validator(mode="after")
    def _outcome_or_file_labels(self) -> "TaskSpec":
        if self.outcome is None and self.prediction_times.kind != "labels_file":
            raise ValueError("outcome may be null only with prediction_times.kind 'labels_file'")
        if self.kind == "survival" and self.outcome is not None and self.outcome.gap_days != 0:
            raise ValueError(f"outcome.gap_days must be 0 for kind 'survival' (got {self.outcome.gap_days:g}): "
                             "a survival time runs from the prediction time")
        return self

    @field_validator("features")
    @classmethod
    def _features_are_a_feature_config(cls, value: dict) -> dict:
        from workbench.features import FeatureConfig

        FeatureConfig.model_validate(value)  # a typo or a bad value fails at load, naming the field
        return value

    def to_yaml(self) -> str:
        """The full resolved spec as YAML (defaults included), e.g. to log as an MLflow artifact."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def task_from_dict(data: dict, source: str = "task spec", base_dir: Path | None = None) -> TaskSpec:
    """Validate a dict as a :class:`TaskSpec`; relative ``labels_path`` resolves against ``base_dir``."""
    if not isinstance(data, dict):
        raise WorkbenchError(f"{source}: expected a mapping of task fields, got {type(data).__name__}")
    spec = validated(TaskSpec, data, f"{source}: invalid task spec")
    path = spec.prediction_times.labels_path
    if path and base_dir is not None and not Path(path).is_absolute():
        spec.prediction_times.labels_path = str((base_dir / path).resolve())
    return spec


def shipped_tasks() -> list[str]:
    """Names of the task specs bundled with the package (``workbench/task_specs/*.yaml``)."""
    folder = importlib.resources.files("workbench") / SHIPPED_SPECS_PACKAGE_DIR
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def labels_file_task(path: str | os.PathLike, kind: Literal["binary", "survival"] | None = None) -> TaskSpec:
    """The task of a labels parquet made elsewhere (ACES, SQL): its prediction times and outcomes
    as they are, named after the file (``nafld_death_5y.parquet`` -> task ``nafld_death_5y``).

    ``kind`` None reads it from the file: ``survival`` when it has ``float_value`` and
    ``integer_value`` columns without nulls (what :meth:`LabelResult.save` writes for a survival
    task; a ``boolean_value`` beside them must be ``integer_value == 1``, see
    :func:`workbench.labels.read_survival_labels`), else ``binary`` (e.g. ACES output, whose other
    value columns are absent or null)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise WorkbenchError(f"{path}: labels file not found (a parquet of subject_id, prediction_time, boolean_value)")
    if kind is None:
        kind = "survival" if _has_survival_values(path) else "binary"
    return task_from_dict({
        "name": path.stem, "description": f"{kind} labels from {path}", "kind": kind,
        "prediction_times": {"kind": "labels_file", "labels_path": str(path)}, "outcome": None,
    }, source=str(path))


def _has_survival_values(path: Path) -> bool:
    """Whether a labels parquet has non-null ``float_value`` and ``integer_value`` columns."""
    columns = (SURVIVAL_TIME_COLUMN, SURVIVAL_EVENT_COLUMN)
    try:
        if not set(columns) <= set(pl.read_parquet_schema(path)):
            return False
        nulls = pl.scan_parquet(path).select(pl.col(c).null_count() for c in columns).collect().row(0)
    except Exception:  # not a readable parquet file: reading the labels says so, naming it
        return False
    return not any(nulls)


def task_name(path_or_name: str) -> str:
    """The name of a task argument without labelling anything: a YAML's ``name``, a labels
    parquet's file name, or the (shipped) name itself. It names the experiment and the model."""
    text = str(path_or_name)
    if text.endswith(".parquet"):
        return Path(text).stem
    if text.endswith((".yaml", ".yml")):
        return load_task(text).name
    return text


def load_task(path_or_name: str | os.PathLike | TaskSpec | dict) -> TaskSpec:
    """Load a task spec from a YAML file, a shipped name (e.g. ``"pbc_mortality"``), a labels
    parquet made elsewhere (see :func:`labels_file_task`) or a dict (e.g. the ``task:`` block of
    a pipeline YAML); a TaskSpec is returned as is."""
    if isinstance(path_or_name, TaskSpec):
        return path_or_name
    if isinstance(path_or_name, dict):
        return task_from_dict(path_or_name)
    text = str(path_or_name)
    path = Path(text)
    if text.endswith(".parquet"):
        return labels_file_task(path)
    if not path.exists() and not text.endswith((".yaml", ".yml")) and os.sep not in text:
        names = shipped_tasks()
        if text not in names:
            close = difflib.get_close_matches(text, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise WorkbenchError(
                f"task {text!r}: no such file and no shipped task of that name (shipped: {', '.join(names)}){hint}"
            )
        path = Path(str(importlib.resources.files("workbench") / SHIPPED_SPECS_PACKAGE_DIR / f"{text}.yaml"))
    if not path.is_file():
        raise WorkbenchError(f"{path}: task spec file not found")
    data = read_yaml(path, "task spec")
    if data is None:
        raise WorkbenchError(f"{path}: the task spec is empty (it needs at least name, prediction_times and outcome; "
                             "see workbench/task_specs/pbc_mortality.yaml)")
    return task_from_dict(data, source=str(path), base_dir=path.parent)


# --------------------------------------------------------------------------------------------
# Cohort report
# --------------------------------------------------------------------------------------------


class RuleCount(BaseModel):
    """How one rule changed the cohort (rules apply in order; each row is dropped by its first failing rule)."""

    rule: str = Field(description="Rule name (stable identifier).")
    description: str = Field(description="What the rule drops, in words.")
    rows_in: int = Field(description="Prediction times reaching this rule.")
    rows_dropped: int = Field(description="Prediction times this rule dropped.")
    rows_out: int = Field(description="Prediction times kept after this rule.")
    subjects_out: int = Field(description="Subjects with at least one prediction time kept after this rule.")
    subjects_dropped: int = Field(description="Subjects whose last remaining prediction time this rule dropped.")


class SplitCount(BaseModel):
    """Labels and prevalence in one split."""

    split: str = Field(description="Split name ('(none)' for subjects without a split).")
    subjects: int = Field(description="Subjects with at least one label.")
    labels: int = Field(description="Labelled prediction times.")
    positives: int = Field(description="Positive labels.")
    prevalence: float = Field(description="positives / labels (0 when there are no labels).")


class IntervalCount(BaseModel):
    """Life-table counts of a survival task over one interval ``(start_days, end_days]`` of follow-up."""

    start_days: float = Field(description="Interval start, days after the prediction time (exclusive).")
    end_days: float = Field(description="Interval end, days after the prediction time (inclusive).")
    at_risk: int = Field(description="Samples still followed at the interval start (float_value > start_days).")
    events: int = Field(description="Samples whose outcome came first inside the interval.")
    competing: int = Field(description="Samples whose competing event came first inside the interval.")
    censored: int = Field(description="Samples censored (end of follow-up or the horizon) inside the interval.")


class CohortReport(BaseModel):
    """Counts kept and dropped at each rule and label prevalence per split (notebooks show it, MLflow logs it)."""

    task: str = Field(description="Task name.")
    subjects_in_data: int = Field(description="Subjects in the dataset.")
    candidates: int = Field(description="Candidate prediction times before any rule.")
    candidate_subjects: int = Field(description="Subjects with at least one candidate prediction time.")
    rules: list[RuleCount] = Field(description="Rule-by-rule counts, in the order applied.")
    splits: list[SplitCount] = Field(description="Label counts per split.")
    labels: int = Field(description="Labelled prediction times kept.")
    subjects: int = Field(description="Subjects with at least one label.")
    positives: int = Field(description="Positive labels.")
    prevalence: float = Field(description="Overall positives / labels.")
    warnings: list[str] = Field(default_factory=list, description="Warnings raised while labelling.")
    intervals: list[IntervalCount] = Field(
        default_factory=list, description="Survival tasks: life-table counts per year of follow-up (empty for binary)."
    )

    def to_dict(self) -> dict:
        """A JSON-serializable dict (e.g. ``mlflow.log_dict(report.to_dict(), 'cohort.json')``)."""
        return self.model_dump(mode="json")

    def to_frame(self) -> pl.DataFrame:
        """Rule-by-rule counts as a frame (first row: the candidates)."""
        start = pl.DataFrame(
            [{"rule": "candidates", "description": "candidate prediction times", "rows_in": self.candidates,
              "rows_dropped": 0, "rows_out": self.candidates, "subjects_out": self.candidate_subjects,
              "subjects_dropped": 0}]
        )
        rules = pl.DataFrame([r.model_dump() for r in self.rules], schema=start.schema) if self.rules else None
        return pl.concat([start, rules]) if rules is not None else start

    def splits_frame(self) -> pl.DataFrame:
        """Label counts and prevalence per split as a frame."""
        schema = {"split": pl.String, "subjects": pl.Int64, "labels": pl.Int64, "positives": pl.Int64,
                  "prevalence": pl.Float64}
        return pl.DataFrame([s.model_dump() for s in self.splits], schema=schema)

    def intervals_frame(self) -> pl.DataFrame:
        """Survival life-table counts per interval as a frame (no rows for a binary task)."""
        schema = {"start_days": pl.Float64, "end_days": pl.Float64, "at_risk": pl.Int64, "events": pl.Int64,
                  "competing": pl.Int64, "censored": pl.Int64}
        return pl.DataFrame([i.model_dump() for i in self.intervals], schema=schema)

    def to_metrics(self) -> dict[str, float]:
        """Flat numeric metrics for ``mlflow.log_metrics`` (names use only allowed characters)."""
        out: dict[str, float] = {
            "cohort_candidates": self.candidates,
            "cohort_labels": self.labels,
            "cohort_subjects": self.subjects,
            "cohort_positives": self.positives,
            "cohort_prevalence": self.prevalence,
        }
        out.update({f"cohort_dropped_{r.rule}": r.rows_dropped for r in self.rules})
        for s in self.splits:
            key = re.sub(r"[^A-Za-z0-9_]", "", s.split) or "none"
            out.update({f"cohort_{key}_labels": s.labels, f"cohort_{key}_prevalence": s.prevalence})
        if self.intervals:
            out.update({f"cohort_{what}": sum(getattr(i, what) for i in self.intervals)
                        for what in ("events", "competing", "censored")})
        return {k: float(v) for k, v in out.items()}

    def to_markdown(self) -> str:
        """Both tables as Markdown (for notebooks, READMEs and MLflow text artifacts)."""
        lines = [f"### Cohort: {self.task}", "", f"Subjects in data: {self.subjects_in_data}", "",
                 "| rule | drops | rows in | dropped | rows kept | subjects kept |", "|---|---|--:|--:|--:|--:|"]
        for r in self.to_frame().iter_rows(named=True):
            lines.append(f"| {r['rule']} | {r['description']} | {r['rows_in']} | {r['rows_dropped']} | "
                         f"{r['rows_out']} | {r['subjects_out']} |")
        lines += ["", "| split | subjects | labels | positives | prevalence |", "|---|--:|--:|--:|--:|"]
        for s in self.splits:
            lines.append(f"| {s.split} | {s.subjects} | {s.labels} | {s.positives} | {s.prevalence:.2%} |")
        lines.append(f"| **all** | {self.subjects} | {self.labels} | {self.positives} | {self.prevalence:.2%} |")
        if self.intervals:
            lines += ["", "| follow-up (days) | at risk | events | competing | censored |", "|---|--:|--:|--:|--:|"]
            for i in self.intervals:
                lines.append(f"| {i.start_days:g}-{i.end_days:g} | {i.at_risk} | {i.events} | {i.competing} | "
                             f"{i.censored} |")
        lines += ["", *(f"> warning: {w}" for w in self.warnings)]
        return "\n".join(lines).rstrip() + "\n"

    def _repr_markdown_(self) -> str:  # Jupyter displays the report as tables
        return self.to_markdown()

    def to_rich(self):
        """The report as rich tables (what ``workbench label`` prints)."""
        from rich.console import Group
        from rich.markup import escape
        from rich.table import Table

        rules = Table(title=f"Cohort: {self.task} ({self.subjects_in_data} subjects in data)")
        rules.add_column("rule", no_wrap=True)
        rules.add_column("drops", min_width=24)
        for col in ("rows in", "dropped", "rows kept", "subjects kept"):
            rules.add_column(col, justify="right", no_wrap=True)
        for r in self.to_frame().iter_rows(named=True):
            rules.add_row(escape(r["rule"]), escape(r["description"]), str(r["rows_in"]), str(r["rows_dropped"]),
                          str(r["rows_out"]), str(r["subjects_out"]))
        splits = Table(title="Labels per split")
        for col in ("split", "subjects", "labels", "positives", "prevalence"):
            splits.add_column(col, justify="left" if col == "split" else "right")
        for s in self.splits:
            splits.add_row(escape(s.split), str(s.subjects), str(s.labels), str(s.positives), f"{s.prevalence:.2%}")
        splits.add_row("all", str(self.subjects), str(self.labels), str(self.positives), f"{self.prevalence:.2%}",
                       style="bold")
        if not self.intervals:
            return Group(rules, splits)
        intervals = Table(title="Events and censorings per interval of follow-up")
        for col in ("follow-up (days)", "at risk", "events", "competing", "censored"):
            intervals.add_column(col, justify="left" if col.startswith("follow") else "right")
        for i in self.intervals:
            intervals.add_row(f"{i.start_days:g}-{i.end_days:g}", str(i.at_risk), str(i.events), str(i.competing),
                              str(i.censored))
        return Group(rules, splits, intervals)


# --------------------------------------------------------------------------------------------
# Labelling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelResult:
    """Labels and the cohort report of one task on one dataset.

    ``candidates`` holds every candidate prediction time with its split, label (null when
    excluded) and ``excluded_by`` (the first rule that dropped it, null when kept): the audit
    trail behind the report.
    """

    spec: TaskSpec
    candidates: pl.DataFrame
    report: CohortReport

    @property
    def schema(self) -> dict[str, pl.DataType]:
        """Columns of :attr:`labels`: :data:`LABEL_SCHEMA`, or :data:`SURVIVAL_LABEL_SCHEMA` for a survival task."""
        return SURVIVAL_LABEL_SCHEMA if self.spec.kind == "survival" else LABEL_SCHEMA

    @property
    def labels(self) -> pl.DataFrame:
        """Kept labels in the MEDS label schema exactly: ``subject_id, prediction_time, boolean_value``, and for a
        survival task also ``integer_value`` (event type) and ``float_value`` (days to the event or censoring)."""
        return self.labels_with_split.select(list(self.schema))

    @property
    def labels_with_split(self) -> pl.DataFrame:
        """Kept labels plus each subject's ``split`` (from the dataset's subject_splits; null if none)."""
        return (
            self.candidates.filter(pl.col("excluded_by").is_null())
            .select([*self.schema, "split"])
            .sort("subject_id", "prediction_time")
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the labels parquet atomically, checked against ``meds.LabelSchema`` (which stores a
        survival ``float_value`` as float32)."""
        import meds

        labels = self.labels
        if SURVIVAL_TIME_COLUMN in labels.columns:
            labels = labels.with_columns(pl.col(SURVIVAL_TIME_COLUMN).cast(pl.Float32))
        meds.LabelSchema.validate(labels.to_arrow())
        return write_parquet_atomic(labels, path)


def _code_match(codes: list[str], patterns: list[str]) -> pl.Expr:
    """True for events whose code is one of ``codes`` or matches any of ``patterns``."""
    expr = pl.col("code").is_in(codes)
    if patterns:
        expr = expr | pl.col("code").str.contains("|".join(f"(?:{p})" for p in patterns))
    return expr


def _check_codes_exist(
    fields: tuple[str, str], codes: list[str], patterns: list[str], present: list[str], where: str
) -> None:
    """Fail naming the field (``fields`` = codes field, patterns field) of a code or pattern that matches
    nothing, suggesting the closest codes present."""
    code_field, pattern_field = fields
    known = set(present)
    for code in codes:
        if code not in known:
            close = difflib.get_close_matches(code, present, n=3, cutoff=0.5)
            hint = f"; closest codes: {', '.join(close)}" if close else ""
            raise WorkbenchError(f"task field {code_field}: code {code!r} matches no event in {where}{hint}")
    for pattern in patterns:
        rx = re.compile(pattern)
        if not any(rx.search(c) for c in present):
            raise WorkbenchError(f"task field {pattern_field}: pattern {pattern!r} matches no code in {where}")


def _days(x: float) -> dt.timedelta:
    return dt.timedelta(days=x)


def _validate_against_data(spec: TaskSpec, present: list[str], where: str) -> list[str]:
    """Check every code the spec names against the data; returns warnings (missing competing codes)."""
    pt, out, cen = spec.prediction_times, spec.outcome, spec.censoring
    if pt.kind == "every_event":
        fields = ("prediction_times.codes", "prediction_times.patterns")
        _check_codes_exist(fields, pt.codes, pt.patterns, present, where)
    if pt.kind == "offset":
        _check_codes_exist(("prediction_times.anchor_codes", ""), pt.anchor_codes, [], present, where)
    if out is not None:
        _check_codes_exist(("outcome.codes", "outcome.patterns"), out.codes, out.patterns, present, where)
        _check_codes_exist(("censoring.end_codes", ""), cen.end_codes, [], present, where)
    if (spec.inclusion.min_age_years is not None or spec.inclusion.max_age_years is not None):
        _check_codes_exist(("inclusion.birth_codes", ""), spec.inclusion.birth_codes, [], present, where)
    warns = []
    try:
        _check_codes_exist(("censoring.competing_codes", "censoring.competing_patterns"), cen.competing_codes,
                           cen.competing_patterns, present, where)
    except WorkbenchError as exc:  # a rare competing event may simply not occur in a small dataset
        warns.append(str(exc))
    return warns


def _subject_summary(events: pl.LazyFrame, spec: TaskSpec) -> pl.LazyFrame:
    """One row per subject: first/last event, birth, follow-up end, first outcome / competing / anchor."""
    timed = pl.col("time").is_not_null()
    birth = pl.col("code").is_in(spec.inclusion.birth_codes)
    cen, out = spec.censoring, spec.outcome
    null_time = pl.lit(None, dtype=pl.Datetime("us"))
    anchor_codes = spec.prediction_times.anchor_codes
    return events.group_by("subject_id").agg(
        first_time=pl.col("time").filter(timed & ~birth).min(),
        last_time=pl.col("time").max(),
        birth_time=pl.col("time").filter(birth).min(),
        end_time=pl.col("time").filter(pl.col("code").is_in(cen.end_codes)).min() if cen.end_codes else null_time,
        first_outcome=pl.col("time").filter(_code_match(out.codes, out.patterns)).min() if out else null_time,
        first_competing=pl.col("time").filter(_code_match(cen.competing_codes, cen.competing_patterns)).min(),
        anchor_time=(pl.col("time").filter(pl.col("code").is_in(anchor_codes)).min() if anchor_codes
                     else pl.col("time").filter(timed & ~birth).min()),
    ).with_columns(followup_end=pl.coalesce("end_time", "last_time"))


def _candidate_times(events: pl.LazyFrame, summary: pl.LazyFrame, spec: TaskSpec, file_labels: pl.DataFrame | None):
    """Candidate ``subject_id, prediction_time[, file_value]`` before any rule."""
    pt = spec.prediction_times
    if pt.kind == "every_event":
        # Several matching events at one instant give a single prediction time.
        return (
            events.filter(_code_match(pt.codes, pt.patterns) & pl.col("time").is_not_null())
            .select("subject_id", pl.col("time").alias("prediction_time"))
            .unique()
        )
    if pt.kind == "offset":
        times = (pl.col("anchor_time") + _days(pt.offset_days)).alias("prediction_time")
        return summary.select("subject_id", times).drop_nulls()
    lf = file_labels.lazy()
    names = {"boolean_value": "file_value", SURVIVAL_TIME_COLUMN: "file_time", SURVIVAL_EVENT_COLUMN: "file_event"}
    return lf.rename({k: v for k, v in names.items() if k in file_labels.columns})


def _next_event_after(candidates: pl.LazyFrame, events: pl.LazyFrame, match: pl.Expr, name: str) -> pl.LazyFrame:
    """Add ``name``: the subject's first matching event strictly after the prediction time (asof join)."""
    targets = (
        events.filter(match & pl.col("time").is_not_null())
        .select("subject_id", pl.col("time").alias(name))
        .unique()
        .sort(name)
    )
    return candidates.sort("prediction_time").join_asof(
        targets, left_on="prediction_time", right_on=name, by="subject_id",
        strategy="forward", allow_exact_matches=False, coalesce=False,
        check_sortedness=False,  # both sides are sorted on the asof key above; polars cannot check with by=
    ).drop("subject_id_right", strict=False)


def _events_up_to(candidates: pl.LazyFrame, events: pl.LazyFrame, spec: TaskSpec) -> pl.LazyFrame:
    """Add ``n_events``: timed non-birth events at or before the prediction time.

    Events and prediction times go on one timeline per subject (events first at equal times,
    since the prediction time is inclusive); a running count of events read at each
    prediction time is the answer, with one sort instead of a join per candidate.
    """
    history = events.filter(pl.col("time").is_not_null() & ~pl.col("code").is_in(spec.inclusion.birth_codes))
    timeline = pl.concat([
        history.select("subject_id", "time", _is_event=pl.lit(1, dtype=pl.UInt32)),
        candidates.select("subject_id", pl.col("prediction_time").alias("time"), _is_event=pl.lit(0, dtype=pl.UInt32)),
    ])
    counts = (
        timeline.sort("subject_id", "time", "_is_event", descending=[False, False, True])
        .with_columns(n_events=pl.col("_is_event").cum_sum().over("subject_id"))
        .filter(pl.col("_is_event") == 0)
        .select("subject_id", pl.col("time").alias("prediction_time"), "n_events")
        .unique(["subject_id", "prediction_time"])
    )
    return candidates.join(counts, on=["subject_id", "prediction_time"], how="left")


def _rules(spec: TaskSpec) -> list[tuple[str, str, pl.Expr]]:
    """The rules in order: (name, what it drops, expression that is True where the row is DROPPED)."""
    t = pl.col("prediction_time")
    inc, out, cen = spec.inclusion, spec.outcome, spec.censoring
    rules = [("no_prior_data", "no event before the prediction time",
              pl.col("first_time").is_null() | (t < pl.col("first_time")))]
    if inc.min_history_days > 0:
        rules.append(("min_history", f"less than {inc.min_history_days:g} days of history",
                      t - pl.col("first_time") < _days(inc.min_history_days)))
    if inc.min_events > 0:
        rules.append(("min_events", f"fewer than {inc.min_events} events so far", pl.col("n_events") < inc.min_events))
    if inc.min_age_years is not None or inc.max_age_years is not None:
        age = (t - pl.col("birth_time")).dt.total_days(fractional=True) / DAYS_PER_YEAR
        lo = inc.min_age_years if inc.min_age_years is not None else 0.0
        hi = inc.max_age_years if inc.max_age_years is not None else float("inf")
        rules.append(("age", f"age unknown or outside [{lo:g}, {hi:g}] years",
                      pl.col("birth_time").is_null() | (age < lo) | (age > hi)))
    if cen.competing_codes or cen.competing_patterns:
        rules.append(("prior_competing", "competing event at or before the prediction time",
                      pl.col("first_competing") <= t))
    if out is None:
        return rules
    if inc.exclude_prior_outcome:
        rules.append(("prior_outcome", "outcome at or before the prediction time", pl.col("first_outcome") <= t))
    rules.append(("no_followup", "follow-up ends at or before the prediction time", pl.col("followup_end") <= t))
    if spec.kind == "survival":  # censored and competing samples are kept, with their time and event type
        return rules
    nxt = pl.col("next_outcome")
    if out.gap_days > 0:
        rules.append(("outcome_in_gap", f"outcome within the {out.gap_days:g}-day gap",
                      nxt <= t + _days(out.gap_days)))
    horizon_end = t + _days(out.horizon_days)
    if cen.competing_codes or cen.competing_patterns:
        comp = pl.col("next_competing")
        rules.append(("censored_competing", "competing event inside the horizon before any outcome",
                      (comp <= horizon_end) & (nxt.is_null() | (nxt > horizon_end) | (comp < nxt))))
    rules.append(("censored_followup", f"follow-up ends before {out.horizon_days:g} days without the outcome",
                  ~pl.col("_positive") & (pl.col("followup_end") < horizon_end)))
    return rules


def _survival_exprs(spec: TaskSpec) -> dict[str, pl.Expr]:
    """Survival ``_time`` (days from ``t`` to the first of outcome, competing event, end of follow-up and
    ``t + horizon``) and ``_event`` (what came first; ties: outcome, then competing, then censoring),
    or the file's values. Like the binary label, an outcome or competing event counts when it is
    recorded after the end of follow-up; the end of follow-up censors when neither came first."""
    if spec.outcome is None:
        return {"_time": pl.col("file_time"), "_event": pl.col("file_event")}
    t = pl.col("prediction_time")
    horizon_end = t + _days(spec.outcome.horizon_days)
    nxt, end = pl.col("next_outcome"), pl.col("followup_end")
    cen = spec.censoring
    comp = (pl.col("next_competing") if cen.competing_codes or cen.competing_patterns
            else pl.lit(None, dtype=pl.Datetime("us")))
    outcome_first = (nxt.is_not_null() & (nxt <= horizon_end) & (comp.is_null() | (nxt <= comp))).fill_null(False)
    competing_first = (comp.is_not_null() & (comp <= horizon_end)).fill_null(False)
    first = (pl.when(outcome_first).then(nxt).when(competing_first).then(comp)
             .otherwise(pl.min_horizontal(end, horizon_end)))
    return {
        "_time": (first - t).dt.total_microseconds().cast(pl.Float64) / 86_400e6,
        "_event": pl.when(outcome_first).then(pl.lit(EVENT_OUTCOME, dtype=pl.Int64))
        .when(competing_first).then(pl.lit(EVENT_COMPETING, dtype=pl.Int64))
        .otherwise(pl.lit(EVENT_CENSORED, dtype=pl.Int64)),
    }


def _label_expr(spec: TaskSpec) -> pl.Expr:
    """The label where no rule applies: outcome inside ``(t + gap, t + horizon]``, or the file's value
    (survival: the outcome came first, from ``_event``)."""
    if spec.kind == "survival":
        return pl.col("_event") == EVENT_OUTCOME
    if spec.outcome is None:
        return pl.col("file_value")
    t, nxt = pl.col("prediction_time"), pl.col("next_outcome")
    return ((nxt > t + _days(spec.outcome.gap_days)) & (nxt <= t + _days(spec.outcome.horizon_days))).fill_null(False)


def _check_labels_file(file_labels: pl.DataFrame, events: pl.LazyFrame, spec: TaskSpec, where: str) -> None:
    """Labels file subjects must exist in the data and each prediction time lie inside its subject's record."""
    path = spec.prediction_times.labels_path
    check_labels_in_data(file_labels, events, where, source=str(path))
    if spec.outcome is None and spec.kind == "binary" and file_labels["boolean_value"].null_count():
        raise WorkbenchError(f"{path}: outcome is null in the task, so the labels file needs a boolean_value column")


def _check_splits(splits: pl.DataFrame, root: Path) -> None:
    """A subject in two splits would leak between train and test."""
    dup = splits.filter(pl.col("subject_id").is_duplicated())["subject_id"].unique().sort()
    if dup.len():
        raise WorkbenchError(
            f"{root / 'metadata/subject_splits.parquet'}: {dup.len()} subject(s) appear in more than one split "
            f"(e.g. subject_id {', '.join(map(str, dup.head(5).to_list()))})"
        )


def _build_report(
    spec: TaskSpec, df: pl.DataFrame, rules: list[tuple[str, str, pl.Expr]], n_subjects: int
) -> CohortReport:
    """Rule-by-rule counts from ``excluded_by`` (index of the first failing rule), and split prevalence."""
    idx = pl.col("_rule_idx")
    aggs = []
    for i in range(len(rules)):
        aggs += [
            (idx == i).sum().alias(f"drop{i}"),
            pl.col("subject_id").filter(idx.is_null() | (idx > i)).n_unique().alias(f"subj{i}"),
        ]
    counts = df.select(aggs).row(0, named=True) if rules else {}
    rule_counts, rows_in, subj_in = [], df.height, df["subject_id"].n_unique()
    for i, (name, desc, _) in enumerate(rules):
        dropped = counts[f"drop{i}"]
        rule_counts.append(RuleCount(rule=name, description=desc, rows_in=rows_in, rows_dropped=dropped,
                                     rows_out=rows_in - dropped, subjects_out=counts[f"subj{i}"],
                                     subjects_dropped=subj_in - counts[f"subj{i}"]))
        rows_in, subj_in = rows_in - dropped, counts[f"subj{i}"]
    kept = df.filter(idx.is_null())
    per_split = (
        kept.with_columns(pl.col("split").fill_null(NO_SPLIT))
        .group_by("split")
        .agg(subjects=pl.col("subject_id").n_unique(), labels=pl.len(), positives=pl.col("boolean_value").sum())
        .with_columns(prevalence=pl.col("positives") / pl.col("labels"))
        .with_columns(_order=pl.col("split").replace_strict(
            {s: i for i, s in enumerate(SPLIT_ORDER)}, default=len(SPLIT_ORDER), return_dtype=pl.Int32))
        .sort("_order", "split")
    )
    positives = int(kept["boolean_value"].sum() or 0)
    return CohortReport(
        task=spec.name, subjects_in_data=n_subjects, candidates=df.height,
        candidate_subjects=df["subject_id"].n_unique(), rules=rule_counts,
        splits=[SplitCount(**r) for r in per_split.drop("_order").iter_rows(named=True)],
        labels=kept.height, subjects=kept["subject_id"].n_unique(), positives=positives,
        prevalence=positives / kept.height if kept.height else 0.0,
        intervals=_interval_counts(spec, kept) if spec.kind == "survival" else [],
    )


def _interval_counts(spec: TaskSpec, kept: pl.DataFrame) -> list[IntervalCount]:
    """Life-table counts per year (:data:`DAYS_PER_YEAR`) of follow-up up to the horizon (the last
    interval may be partial; a labels-file task without outcome goes up to its longest time)."""
    time, event = pl.col(SURVIVAL_TIME_COLUMN), pl.col(SURVIVAL_EVENT_COLUMN)
    if spec.outcome is not None:
        upper = float(spec.outcome.horizon_days)
    else:
        upper = float(kept[SURVIVAL_TIME_COLUMN].max() or DAYS_PER_YEAR)
    n = max(1, math.ceil(upper / DAYS_PER_YEAR - 1e-9))
    bounds = [(i * DAYS_PER_YEAR, min((i + 1) * DAYS_PER_YEAR, upper)) for i in range(n)]
    aggs = []
    for i, (lo, hi) in enumerate(bounds):
        inside = (time > lo) & (time <= hi)
        aggs += [(time > lo).sum().alias(f"at_risk{i}"), (inside & (event == EVENT_OUTCOME)).sum().alias(f"events{i}"),
                 (inside & (event == EVENT_COMPETING)).sum().alias(f"competing{i}"),
                 (inside & (event == EVENT_CENSORED)).sum().alias(f"censored{i}")]
    row = kept.select(aggs).row(0, named=True)
    return [IntervalCount(start_days=lo, end_days=hi, **{k: int(row[f"{k}{i}"] or 0) for k in
                                                          ("at_risk", "events", "competing", "censored")})
            for i, (lo, hi) in enumerate(bounds)]


def _check_result(report: CohortReport, spec: TaskSpec, where: str) -> list[str]:
    """Fail on an unusable cohort (nothing kept, no train positives); return warnings (low prevalence)."""
    if report.labels == 0:
        worst = max(report.rules, key=lambda r: r.rows_dropped, default=None)
        why = f" (most dropped by rule {worst.rule!r}: {worst.rows_dropped})" if worst and worst.rows_dropped else ""
        raise WorkbenchError(f"task {spec.name!r} on {where}: all {report.candidates} candidate prediction times "
                             f"were excluded, no labels{why}")
    if spec.require_train_positives:
        by_split = {s.split: s for s in report.splits}
        has_splits = any(s != NO_SPLIT for s in by_split)
        scope = by_split.get("train") if has_splits else by_split.get(NO_SPLIT)
        if scope is None or scope.positives == 0:
            name = "the train split" if has_splits else "the cohort (the dataset has no splits)"
            n = 0 if scope is None else scope.labels
            what = "outcome events (integer_value 1)" if spec.kind == "survival" else "positive labels"
            raise WorkbenchError(
                f"task {spec.name!r} on {where}: zero {what} in {name} ({n} labels); check outcome.codes "
                f"and outcome.horizon_days, or set require_train_positives: false"
            )
    if report.prevalence < spec.warn_prevalence_below:
        return [f"label prevalence {report.prevalence:.3%} is below {spec.warn_prevalence_below:.0%} "
                f"({report.positives} positives in {report.labels} labels)"]
    return []


def _candidate_frame(events: pl.LazyFrame, spec: TaskSpec, file_labels: pl.DataFrame | None) -> pl.LazyFrame:
    """Candidate prediction times with everything the rules read: subject summary, next outcome /
    competing event after the prediction time, and the event count so far."""
    summary = _subject_summary(events, spec)
    lf = _candidate_times(events, summary, spec, file_labels).join(summary, on="subject_id", how="left")
    out, cen = spec.outcome, spec.censoring
    if out is not None:
        lf = _next_event_after(lf, events, _code_match(out.codes, out.patterns), "next_outcome")
    if cen.competing_codes or cen.competing_patterns:
        lf = _next_event_after(lf, events, _code_match(cen.competing_codes, cen.competing_patterns), "next_competing")
    if spec.inclusion.min_events > 0:
        lf = _events_up_to(lf, events, spec)
    if spec.kind == "survival":
        lf = lf.with_columns(**_survival_exprs(spec))
    return lf.with_columns(_positive=_label_expr(spec))


def _apply_rules(lf: pl.LazyFrame, rules: list[tuple[str, str, pl.Expr]], splits: pl.DataFrame,
                 survival: bool = False) -> pl.LazyFrame:
    """Add ``_rule_idx``/``excluded_by`` (the FIRST failing rule, null if kept), ``boolean_value``
    (and for ``survival`` ``integer_value``, ``float_value``; kept rows only) and each subject's ``split``."""
    first_failing = pl.lit(None, dtype=pl.Int32)
    for i in reversed(range(len(rules))):  # built back to front so the first failing rule wins
        first_failing = pl.when(rules[i][2].fill_null(False)).then(pl.lit(i, dtype=pl.Int32)).otherwise(first_failing)
    kept = pl.col("_rule_idx").is_null()
    values = ({SURVIVAL_EVENT_COLUMN: pl.when(kept).then(pl.col("_event")).cast(pl.Int64),
               SURVIVAL_TIME_COLUMN: pl.when(kept).then(pl.col("_time")).cast(pl.Float64)} if survival else {})
    return (
        lf.with_columns(_rule_idx=first_failing)
        .join(splits.lazy(), on="subject_id", how="left")
        .with_columns(
            **values,
            boolean_value=pl.when(kept).then(pl.col("_positive")).cast(pl.Boolean),
            excluded_by=pl.col("_rule_idx").replace_strict(
                list(range(len(rules))), [name for name, _, _ in rules], default=None, return_dtype=pl.String
            ),
        )
        .sort("subject_id", "prediction_time")
    )


# --------------------------------------------------------------------------------------------
# Scoring new data: the moments a task predicts at, known without the future


#: Rules that decide whether a moment may be scored at all (none reads anything after it).
SCORING_RULES = ("no_prior_data", "min_history", "min_events", "age", "prior_competing", "prior_outcome")
#: A MEDS code that ends every record, whatever the task.
DEATH_CODE = meds.death_code


def end_of_record_match(spec: TaskSpec) -> pl.Expr:
    """Codes after which nothing may be scored: death, the end-of-follow-up codes, competing events,
    and the outcome itself unless the task allows repeated outcomes."""
    cen, out = spec.censoring, spec.outcome
    match = pl.col("code").is_in([DEATH_CODE, *cen.end_codes, *cen.competing_codes])
    if cen.competing_patterns:
        match = match | _code_match([], cen.competing_patterns)
    if out is not None and spec.inclusion.exclude_prior_outcome:
        match = match | _code_match(out.codes, out.patterns)
    return match


def _record_ends(events: pl.LazyFrame, spec: TaskSpec) -> pl.LazyFrame:
    return (events.filter(end_of_record_match(spec) & pl.col("time").is_not_null())
            .group_by("subject_id").agg(record_end=pl.col("time").min(),
                                        end_code=pl.col("code").sort_by("time").first()))


def scoring_times(events: pl.LazyFrame, spec: TaskSpec, where: str = "the data") -> pl.DataFrame:
    """``subject_id, prediction_time`` at which ``spec`` predicts on new data: its prediction times
    (every matching event, or the offset) that its eligibility rules keep, strictly before any
    end-of-record event (death, end of follow-up, a competing event). Refuses a labels-file task,
    whose times exist only in its file."""
    if spec.prediction_times.kind == "labels_file":
        raise WorkbenchError(f"task {spec.name!r} takes its prediction times from a labels file, so there is no "
                             "default moment to score: pass --times (a parquet of subject_id, prediction_time)")
    summary = _subject_summary(events, spec)
    lf = _candidate_times(events, summary, spec, None).join(summary, on="subject_id", how="left")
    if spec.inclusion.min_events > 0:
        lf = _events_up_to(lf, events, spec)
    dropped = pl.lit(False)
    for name, _, expr in _rules(spec):
        if name in SCORING_RULES:
            dropped = dropped | expr.fill_null(False)
    t = pl.col("prediction_time")
    times = (lf.join(_record_ends(events, spec), on="subject_id", how="left")
             .filter(~dropped & (pl.col("record_end").is_null() | (t < pl.col("record_end"))))
             .select("subject_id", "prediction_time").unique().sort("subject_id", "prediction_time")
             .collect(engine="streaming"))
    if times.height == 0:
        raise WorkbenchError(f"{where}: no moment to score for task {spec.name!r} (no {spec.prediction_times.kind} "
                             "prediction time before an end-of-record event); pass --times")
    return times


def check_before_end_of_record(samples: pl.DataFrame, events: pl.LazyFrame, spec: TaskSpec, source: str,
                               where: str = "the data") -> None:
    """Refuse prediction times at or after the subject's death, end of follow-up or competing event:
    a risk there reads the outcome it should predict."""
    ends = _record_ends(events.join(samples.select("subject_id").unique().lazy(), on="subject_id", how="semi"), spec)
    late = samples.join(ends.collect(), on="subject_id").filter(pl.col("prediction_time") >= pl.col("record_end"))
    if late.height:
        row = late.sort("subject_id", "prediction_time").row(0, named=True)
        raise WorkbenchError(
            f"{source}: column 'prediction_time': {late.height:,} prediction time(s) at or after the subject's "
            f"end of record in {where} (e.g. subject_id={row['subject_id']}, prediction_time={row['prediction_time']}, "
            f"{row['end_code']} at {row['record_end']}); a risk there would read the outcome it predicts"
        )


def make_labels(dataset: MedsDataset | str | os.PathLike, spec: TaskSpec | str | os.PathLike | dict) -> LabelResult:
    """Label ``dataset`` with task ``spec`` (a TaskSpec, YAML path or shipped name).

    Raises WorkbenchError on bad input (codes matching nothing, a labels file with unknown
    subjects or out-of-range times, no labels, no positives in train); warns (and records in
    the report) when prevalence is below ``spec.warn_prevalence_below``.
    """
    from workbench.data.validate import require_valid_cached

    ds = dataset if isinstance(dataset, MedsDataset) else open_dataset(dataset)
    spec = load_task(spec)
    require_valid_cached(ds.root)  # the MEDS checks of `workbench validate`, free when the data did not change
    where = str(ds.root)
    events = ds.events()
    splits = ds.splits()
    _check_splits(splits, ds.root)

    # One pass for everything validation needs: codes present, subjects.
    codes_df, subj_df = pl.collect_all([
        events.select(pl.col("code").unique()),
        events.select(pl.col("subject_id").unique()),
    ])
    notes = _validate_against_data(spec, codes_df["code"].drop_nulls().sort().to_list(), where)
    file_labels = None
    if spec.prediction_times.kind == "labels_file":
        survival_file = spec.kind == "survival" and spec.outcome is None  # the file holds times and event types
        file_labels = (read_survival_labels if survival_file else read_labels)(spec.prediction_times.labels_path)
        _check_labels_file(file_labels, events, spec, where)

    rules = _rules(spec)
    survival = spec.kind == "survival"
    df = _apply_rules(_candidate_frame(events, spec, file_labels), rules, splits, survival).collect(engine="streaming")
    report = _build_report(spec, df, rules, subj_df.height)
    notes += _check_result(report, spec, where)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    report = report.model_copy(update={"warnings": notes})
    keep = ["subject_id", "prediction_time", "split", "boolean_value",
            *([SURVIVAL_EVENT_COLUMN, SURVIVAL_TIME_COLUMN] if survival else []), "excluded_by", "first_time",
            "followup_end", "birth_time"] + [c for c in ("next_outcome", "next_competing", "n_events") if c in df.columns]
    return LabelResult(spec=spec, candidates=df.select(keep), report=report)
