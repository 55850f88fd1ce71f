"""Validation of a MEDS dataset: every problem found, each with file, column, rows and an example.

Errors (exit code 2) make a dataset unusable downstream; warnings (exit 0) are listed but do not
block. Schema checks read only parquet footers; data checks are a few lazy polars passes over all
shards, so validating ten million events takes seconds.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from workbench.data.meds_io import (
    CODES_FILE,
    DATA_DIR,
    SPLIT_NAMES,
    SPLITS_FILE,
    MedsDataset,
    open_dataset,
)
from workbench.errors import DataValidationError

ERROR, WARNING = "error", "warning"
_MEDS_TYPES = {name: meds.DataSchema.schema().field(name).type for name in ("subject_id", "time", "code", "numeric_value")}
_REQUIRED = ("subject_id", "time", "code")
_EARLIEST = dt.datetime(1900, 1, 1)


@dataclass(frozen=True)
class Problem:
    """One finding: what is wrong, where (file, column), how many rows, and one example subject."""

    severity: str
    check: str
    file: str
    column: str | None
    n_rows: int | None
    example_subject: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}" + (f" [column {self.column}]" if self.column else "")
        rows = f"; {self.n_rows:,} row(s)" if self.n_rows is not None else ""
        example = f"; e.g. subject_id {self.example_subject}" if self.example_subject is not None else ""
        return f"{self.severity.upper()} {self.check}: {where}: {self.message}{rows}{example}"


@dataclass
class ValidationReport:
    """The outcome of validating one dataset."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, severity, check, file, column, n_rows, example, message) -> None:
        example = None if example is None else int(example)
        n_rows = None if n_rows is None else int(n_rows)
        self.problems.append(Problem(severity, check, str(file), column, n_rows, example, message))


def validate_dataset(root: str | Path, today: dt.date | None = None) -> ValidationReport:
    """Check a MEDS dataset and summarise it; never raises for data problems (see ``require_valid``)."""
    ds = open_dataset(root)
    report = ValidationReport(ds.root)
    files = ds.data_files
    if not files:
        report.add(ERROR, "empty_dataset", ds.root / DATA_DIR, None, 0, None, "no parquet shards under data/")
        return report
    readable = [f for f in files if _check_file_schema(f, report)]
    if len(readable) < len(files):
        return report  # typed checks below would only repeat the schema errors
    events = _scan_with_file(readable)
    counts = events.select(pl.len()).collect().item()
    if counts == 0:
        report.add(ERROR, "empty_dataset", ds.root / DATA_DIR, None, 0, None, "the shards hold no events")
        return report
    _check_rows(events, report, today or dt.date.today())
    _check_subjects(events, report)
    splits = _check_splits(ds, events, report)
    _check_codes(ds, events, report)
    report.summary = _summarise(events, splits)
    return report


def require_valid(root: str | Path) -> ValidationReport:
    """Validate and raise DataValidationError listing every error, so nothing is written downstream."""
    report = validate_dataset(root)
    if not report.ok:
        lines = "\n  ".join(str(p) for p in report.errors)
        raise DataValidationError(f"{report.root}: {len(report.errors)} validation error(s):\n  {lines}", report)
    return report


def _check_file_schema(path: Path, report: ValidationReport) -> bool:
    """Missing required columns and wrong types, from the parquet footer alone."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        report.add(ERROR, "unreadable_file", path, None, None, None, f"not a readable parquet file ({exc})")
        return False
    n_rows = pq.ParquetFile(path).metadata.num_rows
    ok = True
    for name in _REQUIRED:
        if name not in schema.names:
            report.add(ERROR, "missing_column", path, name, n_rows, _first_subject(path), "required MEDS column is missing")
            ok = False
    for name, expected in _MEDS_TYPES.items():
        if name in schema.names and not _type_compatible(schema.field(name).type, expected):
            report.add(
                ERROR, "wrong_type", path, name, n_rows, _first_subject(path),
                f"type is {schema.field(name).type}, MEDS requires {expected}",
            )
            ok = False
    return ok


def _type_compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Accept the MEDS type and lossless relatives (other timestamp units, int32 ids, float64 values)."""
    if actual == expected:
        return True
    if pa.types.is_timestamp(expected):
        return pa.types.is_timestamp(actual) and actual.tz is None
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual) or pa.types.is_dictionary(actual)
    return False


def _first_subject(path: Path) -> int | None:
    """The first subject id of a shard, as an example for schema errors (None if unreadable)."""
    try:
        col = pq.read_table(path, columns=["subject_id"]).column(0).drop_null()
        return int(float(col[0].as_py())) if len(col) else None
    except (KeyError, ValueError, TypeError, pa.ArrowException):
        return None


def _scan_with_file(files: list[Path]) -> pl.LazyFrame:
    lf = pl.concat(
        [
            pl.scan_parquet(f, missing_columns="insert", extra_columns="ignore")
            .select(
                pl.col("subject_id").cast(pl.Int64),
                pl.col("time").cast(pl.Datetime("us")),
                pl.col("code").cast(pl.String),
                (pl.col("numeric_value") if _has_column(f, "numeric_value") else pl.lit(None))
                .cast(pl.Float32)
                .alias("numeric_value"),
            )
            .with_columns(pl.lit(str(f)).alias("_file"))
            for f in files
        ],
        how="vertical",
    )
    return lf.with_row_index("_row")


def _has_column(path: Path, name: str) -> bool:
    return name in pq.read_schema(path).names


def _report_row_conditions(events: pl.LazyFrame, report: ValidationReport, checks: list[tuple]) -> None:
    """Evaluate (severity, check, column, condition, message) in one pass; report those with hits."""
    aggs = []
    for i, (_, _, _, cond, _) in enumerate(checks):
        aggs += [
            cond.sum().alias(f"n{i}"),
            pl.col("subject_id").filter(cond).first().alias(f"s{i}"),
            pl.col("_file").filter(cond).first().alias(f"f{i}"),
        ]
    row = events.select(aggs).collect(engine="streaming").row(0)
    for i, (severity, check, column, _, message) in enumerate(checks):
        n, subject, file = row[3 * i], row[3 * i + 1], row[3 * i + 2]
        if n:
            report.add(severity, check, file, column, n, subject, message)


def _check_rows(events: pl.LazyFrame, report: ValidationReport, today: dt.date) -> None:
    value = pl.col("numeric_value")
    latest = dt.datetime.combine(today + dt.timedelta(days=1), dt.time())
    _report_row_conditions(
        events,
        report,
        [
            (ERROR, "null_value", "subject_id", pl.col("subject_id").is_null(), "subject_id is null"),
            (ERROR, "null_value", "code", pl.col("code").is_null(), "code is null"),
            (ERROR, "nan_value", "numeric_value", value.is_nan(), "numeric_value is NaN (use null for missing)"),
            (ERROR, "infinite_value", "numeric_value", value.is_infinite(), "numeric_value is infinite"),
            (WARNING, "time_out_of_range", "time", pl.col("time") < _EARLIEST, "time is before 1900-01-01"),
            (WARNING, "time_out_of_range", "time", pl.col("time") >= latest, f"time is after today ({today})"),
        ],
    )
    dup = (
        events.group_by(["subject_id", "time", "code", "numeric_value"], maintain_order=False)
        .agg(pl.len().alias("n"), pl.col("_file").first())
        .filter(pl.col("n") > 1)
        .select(
            (pl.col("n") - 1).sum().alias("extra"),
            pl.col("subject_id").first(),
            pl.col("_file").first(),
        )
        .collect(engine="streaming")
        .row(0)
    )
    if dup[0]:
        report.add(WARNING, "duplicate_rows", dup[2], None, dup[0], dup[1], "exact duplicate rows")


def _check_subjects(events: pl.LazyFrame, report: ValidationReport) -> None:
    """A subject in two shards, or a subject whose times go backwards within its shard."""
    # Null times (static events) sort first in MEDS; compare them as the earliest instant.
    t = pl.col("time").fill_null(dt.datetime(1, 1, 1))
    backwards = (t.diff().over(["_file", "subject_id"], order_by="_row") < dt.timedelta(0)).fill_null(False)
    per_subject = (
        events.filter(pl.col("subject_id").is_not_null())
        .with_columns(backwards.alias("_back"))
        .group_by("subject_id")
        .agg(
            pl.col("_file").n_unique().alias("n_files"),
            pl.col("_file").unique().sort().alias("files"),
            pl.col("_back").sum().alias("n_back"),
            pl.col("_file").filter(pl.col("_back")).first().alias("back_file"),
        )
    )
    found = (
        per_subject.filter((pl.col("n_files") > 1) | (pl.col("n_back") > 0))
        .sort("subject_id")
        .collect(engine="streaming")
    )
    split = found.filter(pl.col("n_files") > 1)
    if split.height:
        first = split.row(0, named=True)
        report.add(
            ERROR, "subject_in_several_shards", " + ".join(first["files"]), "subject_id", split.height,
            first["subject_id"], f"{split.height} subject(s) appear in more than one shard (MEDS: one shard per subject)",
        )
    back = found.filter(pl.col("n_back") > 0)
    if back.height:
        first = back.row(0, named=True)
        report.add(
            ERROR, "unsorted_times", first["back_file"], "time", int(back["n_back"].sum()), first["subject_id"],
            f"times go backwards within {back.height} subject(s) (MEDS: sorted by time within a subject)",
        )


def _check_splits(ds: MedsDataset, events: pl.LazyFrame, report: ValidationReport) -> pl.DataFrame | None:
    path = ds.root / SPLITS_FILE
    if not path.exists():
        report.add(WARNING, "no_splits", path, None, None, None, "no subject_splits.parquet: every subject is unsplit")
        return None
    schema = pq.read_schema(path)
    missing = [c for c in ("subject_id", "split") if c not in schema.names]
    if missing:
        report.add(ERROR, "missing_column", path, missing[0], None, None, "required split column is missing")
        return None
    splits = pl.read_parquet(path, columns=["subject_id", "split"])
    unknown = splits.filter(~pl.col("split").is_in(SPLIT_NAMES) | pl.col("split").is_null())
    if unknown.height:
        names = sorted(str(s) for s in unknown["split"].unique().to_list())
        report.add(
            ERROR, "unknown_split", path, "split", unknown.height, unknown["subject_id"][0],
            f"unknown split name(s) {names}; allowed: {list(SPLIT_NAMES)}",
        )
    doubled = splits.filter(pl.col("subject_id").is_duplicated())
    if doubled.height:
        report.add(
            ERROR, "subject_in_several_splits", path, "subject_id", doubled.height, doubled["subject_id"][0],
            "subject listed more than once in the split file",
        )
    data_subjects = events.select(pl.col("subject_id").unique()).drop_nulls().collect(engine="streaming")
    absent = splits.join(data_subjects, on="subject_id", how="anti")
    if absent.height:
        report.add(
            ERROR, "split_subject_not_in_data", path, "subject_id", absent.height, absent["subject_id"].min(),
            "split file names subject(s) absent from the data",
        )
    unsplit = data_subjects.join(splits, on="subject_id", how="anti")
    if unsplit.height:
        report.add(
            ERROR, "data_subject_not_in_splits", path, "subject_id", unsplit.height, unsplit["subject_id"].min(),
            "data subject(s) missing from the split file",
        )
    return splits


def _check_codes(ds: MedsDataset, events: pl.LazyFrame, report: ValidationReport) -> None:
    path = ds.root / CODES_FILE
    codes = events.group_by("code").agg(pl.len().alias("n"), pl.col("subject_id").first())
    if path.exists():
        known = pl.read_parquet(path, columns=["code"])
        missing = codes.join(known.lazy(), on="code", how="anti").sort("n", descending=True).collect()
    else:
        missing = codes.sort("n", descending=True).collect()
    missing = missing.drop_nulls("code")
    if missing.height:
        shown = ", ".join(missing["code"].head(5).to_list()) + (" ..." if missing.height > 5 else "")
        report.add(
            WARNING, "code_not_in_metadata", path, "code", int(missing["n"].sum()), missing["subject_id"][0],
            f"{missing.height} code(s) missing from codes.parquet: {shown}",
        )


def _summarise(events: pl.LazyFrame, splits: pl.DataFrame | None) -> dict:
    stats = (
        events.select(
            pl.col("subject_id").n_unique().alias("subjects"),
            pl.len().alias("events"),
            pl.col("code").n_unique().alias("codes"),
            pl.col("time").min().alias("time_min"),
            pl.col("time").max().alias("time_max"),
            pl.col("time").is_null().sum().alias("static_events"),
            pl.col("numeric_value").is_not_null().sum().alias("numeric_events"),
        )
        .collect(engine="streaming")
        .row(0, named=True)
    )
    top = events.group_by("code").agg(pl.len().alias("n")).sort(["n", "code"], descending=[True, False]).head(10)
    stats["top_codes"] = top.collect().rows()
    if splits is not None:
        per_split = (
            events.join(splits.lazy(), on="subject_id", how="left")
            .group_by("split")
            .agg(pl.col("subject_id").n_unique().alias("subjects"), pl.len().alias("events"))
            .sort("split", nulls_last=True)
            .collect(engine="streaming")
        )
        stats["splits"] = {r["split"] or "(none)": (r["subjects"], r["events"]) for r in per_split.iter_rows(named=True)}
    return stats
