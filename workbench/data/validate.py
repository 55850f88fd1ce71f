"""Validation of a MEDS dataset: every problem found, each with file, column, rows and an example.

Errors (exit code 2) make a dataset unusable downstream; warnings (exit 0) are listed but do not
block. Schema checks read only parquet footers; data checks are a few lazy polars passes over all
shards, so validating ten million events takes seconds. Commands that only need the gate call
:func:`require_valid_cached`, which remembers a passing validation per version of the files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workbench.data.meds_io import (
    CODES_FILE,
    DATA_DIR,
    INT64_MAX,
    SPLIT_NAMES,
    SPLITS_FILE,
    MedsDataset,
    open_dataset,
)
from workbench.errors import DataValidationError
from workbench.files import path_fingerprint, write_text_atomic

ERROR, WARNING = "error", "warning"
_MEDS_TYPES = {name: meds.DataSchema.schema().field(name).type for name in ("subject_id", "time", "code", "numeric_value")}
_REQUIRED = ("subject_id", "time", "code")
_EARLIEST = dt.datetime(1900, 1, 1)
_FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max: MEDS stores numeric_value as float32


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
    # One bounded pass per shard (MEDS keeps a subject in one shard, so the per-subject checks
    # are shard-local); only small per-shard results are combined across shards.
    shards = [_scan_shard(f, today or dt.date.today()) for f in readable]
    per_subject = pl.concat([s.subjects for s in shards])
    if per_subject.height == 0:
        report.add(ERROR, "empty_dataset", ds.root / DATA_DIR, None, 0, None, "the shards hold no events")
        return report
    _report_shard_findings(shards, report)
    _check_subject_shards(per_subject, report)
    splits = _check_splits(ds, per_subject, report)
    codes = _combine_codes(shards)
    _check_codes(ds, codes, report)
    report.summary = _summarise(shards, per_subject, codes, splits)
    return report


def require_valid(root: str | Path) -> ValidationReport:
    """Validate and raise DataValidationError listing every error, so nothing is written downstream."""
    report = validate_dataset(root)
    if not report.ok:
        lines = "\n  ".join(str(p) for p in report.errors)
        raise DataValidationError(f"{report.root}: {len(report.errors)} validation error(s):\n  {lines}", report)
    return report


def require_valid_cached(root: str | Path) -> ValidationReport:
    """:func:`require_valid`, run once per version of a dataset: a passing validation is remembered
    under ``<project home>/runs/.validated/<fingerprint>.json`` (never inside the dataset, which may
    be read-only), keyed by the dataset's path, its data/ and metadata/ files (names, sizes,
    modification times) and the validation code, so the gate costs nothing on unchanged data.
    Failing validations are never cached; raises DataValidationError (a WorkbenchError) on errors."""
    ds_root = open_dataset(root).root
    key = _validation_key(ds_root)
    marker = None if key is None else _validated_dir() / f"{key}.json"
    if marker is not None and marker.is_file():
        try:
            return _report_from_json(json.loads(marker.read_text()), ds_root)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged marker: validate again
    report = require_valid(root)
    if marker is not None:
        try:
            write_text_atomic(marker, json.dumps(_report_to_json(report), default=str) + "\n")
        except OSError:
            pass  # an unwritable project home only costs the next call a validation
    return report


def _validated_dir() -> Path:
    from workbench.files import project_home

    return project_home() / "runs" / ".validated"


def _validation_key(root: Path) -> str | None:
    """Digest of what a validation depends on; None when data/ is missing (nothing worth caching)."""
    data = path_fingerprint(root / DATA_DIR)
    if data is None:
        return None
    digest = hashlib.sha256()
    for part in (str(root.resolve()), data, path_fingerprint(root / "metadata") or "-"):
        digest.update(part.encode() + b"\0")
    for module in (Path(__file__), Path(__file__).with_name("meds_io.py")):  # a new check invalidates the cache
        digest.update(module.read_bytes())
    return digest.hexdigest()


def _report_to_json(report: ValidationReport) -> dict:
    return {"root": str(report.root), "problems": [asdict(p) for p in report.problems], "summary": report.summary}


def _report_from_json(data: dict, root: Path) -> ValidationReport:
    summary = dict(data["summary"])
    for key in ("time_min", "time_max"):
        if summary.get(key) is not None:
            summary[key] = dt.datetime.fromisoformat(summary[key])
    summary["top_codes"] = [tuple(row) for row in summary.get("top_codes", [])]
    if "splits" in summary:
        summary["splits"] = {k: tuple(v) for k, v in summary["splits"].items()}
    return ValidationReport(root, [Problem(**p) for p in data["problems"]], summary)


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
    if ok and "subject_id" in schema.names and pa.types.is_uint64(schema.field("subject_id").type):
        ids = pq.read_table(path, columns=["subject_id"]).column(0)
        over = pc.filter(ids, pc.greater(ids, pa.scalar(INT64_MAX, pa.uint64())))
        if len(over):
            report.add(
                ERROR, "subject_id_out_of_range", path, "subject_id", len(over), over[0].as_py(),
                f"uint64 value(s) above the int64 maximum {INT64_MAX} (MEDS subject ids are int64)",
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
        if not len(col):
            return None
        value = col[0].as_py()
        return value if isinstance(value, int) else int(float(value))  # no float round trip for huge ids
    except (KeyError, ValueError, TypeError, pa.ArrowException):
        return None


def _scan_file(path: Path) -> pl.LazyFrame:
    """One shard, cast to the MEDS types (schema already checked), ``numeric_value`` added if absent.

    ``numeric_value`` is read as float64, so a value beyond float32 is reported as such, not as infinite."""
    value = pl.col("numeric_value") if _has_column(path, "numeric_value") else pl.lit(None)
    return pl.scan_parquet(path).select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(pl.Datetime("us")),
        pl.col("code").cast(pl.String),
        value.cast(pl.Float64).alias("numeric_value"),
    )


def _has_column(path: Path, name: str) -> bool:
    return name in pq.read_schema(path).names


@dataclass
class _ShardScan:
    """What one shard contributes: row-check hits, per-subject counts, per-code counts, time stats."""

    file: str
    hits: dict  # check index -> (rows, example subject); DUPLICATES is the last index
    subjects: pl.DataFrame  # subject_id, events, file
    codes: pl.DataFrame  # code, n, subject_id (example)
    stats: dict


def _row_checks(today: dt.date) -> list[tuple]:
    """(severity, check, column, condition, message) evaluated on every row of every shard."""
    sid, t, value = pl.col("subject_id"), pl.col("time"), pl.col("numeric_value")
    latest = dt.datetime.combine(today + dt.timedelta(days=1), dt.time())
    # Null times (static events) sort first in MEDS; compare them as the earliest instant.
    tf = t.fill_null(dt.datetime(1, 1, 1))
    backwards = (sid == sid.shift(1)) & (tf < tf.shift(1))
    return [
        (ERROR, "null_value", "subject_id", sid.is_null(), "subject_id is null"),
        (ERROR, "null_value", "code", pl.col("code").is_null(), "code is null"),
        (ERROR, "nan_value", "numeric_value", value.is_nan(), "numeric_value is NaN (use null for missing)"),
        (ERROR, "infinite_value", "numeric_value", value.is_infinite(), "numeric_value is infinite"),
        (ERROR, "value_out_of_range", "numeric_value", value.is_finite() & (value.abs() > _FLOAT32_MAX),
         f"numeric_value is outside the float32 range (|value| > {_FLOAT32_MAX:.4g}; MEDS stores float32)"),
        (ERROR, "unsorted_times", "time", backwards.fill_null(False),
         "time goes backwards within a subject (MEDS: sorted by time within a subject)"),
        (WARNING, "time_out_of_range", "time", t < _EARLIEST, "time is before 1900-01-01"),
        (WARNING, "time_out_of_range", "time", t >= latest, f"time is after today ({today})"),
    ]


DUPLICATES = len(_row_checks(dt.date.today()))  # the duplicate check's index, after the row checks


def _scan_shard(path: Path, today: dt.date) -> _ShardScan:
    lf = _scan_file(path)
    checks = _row_checks(today)
    aggs = [pl.len().alias("rows")]
    for i, (_, _, _, cond, _) in enumerate(checks):
        aggs += [cond.sum().alias(f"n{i}"), pl.col("subject_id").filter(cond).first().alias(f"s{i}")]
    aggs += [
        pl.col("time").min().alias("time_min"),
        pl.col("time").max().alias("time_max"),
        pl.col("time").is_null().sum().alias("static_events"),
        pl.col("numeric_value").is_not_null().sum().alias("numeric_events"),
    ]
    rows, subjects, codes, dups = pl.collect_all(
        [
            lf.select(aggs),
            lf.drop_nulls("subject_id").group_by("subject_id").agg(pl.len().alias("events")),
            lf.group_by("code").agg(pl.len().alias("n"), pl.col("subject_id").first()),
            lf.group_by(pl.all()).agg(pl.len().alias("n")).filter(pl.col("n") > 1).sort("subject_id"),
        ]
    )
    row = rows.row(0, named=True)
    hits = {i: (row[f"n{i}"], row[f"s{i}"]) for i in range(len(checks)) if row[f"n{i}"]}
    if dups.height:
        hits[DUPLICATES] = (int((dups["n"] - 1).sum()), dups["subject_id"][0])
    stats = {k: row[k] for k in ("rows", "time_min", "time_max", "static_events", "numeric_events")}
    return _ShardScan(str(path), hits, subjects.with_columns(pl.lit(str(path)).alias("file")), codes, stats)


def _report_shard_findings(shards: list[_ShardScan], report: ValidationReport) -> None:
    """Row checks summed over shards; the first shard with a hit names the file and example."""
    checks = [(sev, check, col, msg) for sev, check, col, _, msg in _row_checks(dt.date.today())]
    checks.append((WARNING, "duplicate_rows", None, "exact duplicate rows"))
    for i, (severity, check, column, message) in enumerate(checks):
        found = [(s.file, *s.hits[i]) for s in shards if i in s.hits]
        if found:
            total = sum(n for _, n, _ in found)
            file, _, example = found[0]
            more = f" (and {len(found) - 1} more shard(s))" if len(found) > 1 else ""
            report.add(severity, check, file + more, column, total, example, message)


def _check_subject_shards(per_subject: pl.DataFrame, report: ValidationReport) -> None:
    """A subject must live in exactly one shard."""
    spread = (
        per_subject.group_by("subject_id")
        .agg(pl.col("file").n_unique().alias("n_files"), pl.col("file").sort().alias("files"))
        .filter(pl.col("n_files") > 1)
        .sort("subject_id")
    )
    if spread.height:
        first = spread.row(0, named=True)
        report.add(
            ERROR, "subject_in_several_shards", " + ".join(first["files"]), "subject_id", spread.height,
            first["subject_id"], f"{spread.height} subject(s) appear in more than one shard (MEDS: one shard per subject)",
        )


def _combine_codes(shards: list[_ShardScan]) -> pl.DataFrame:
    return (
        pl.concat([s.codes for s in shards])
        .group_by("code")
        .agg(pl.col("n").sum(), pl.col("subject_id").first())
        .sort(["n", "code"], descending=[True, False])
    )


def _check_splits(ds: MedsDataset, per_subject: pl.DataFrame, report: ValidationReport) -> pl.DataFrame | None:
    path = ds.root / SPLITS_FILE
    if not path.exists():
        report.add(WARNING, "no_splits", path, None, None, None, "no subject_splits.parquet: every subject is unsplit")
        return None
    schema = _metadata_schema(path, report)
    if schema is None:
        return None
    missing = [c for c in ("subject_id", "split") if c not in schema.names]
    if missing:
        report.add(ERROR, "missing_column", path, missing[0], None, None,
                   f"required split column is missing (found {', '.join(schema.names) or 'no columns'})")
        return None
    wrong = [(c, t) for c, t in (("subject_id", pa.int64()), ("split", pa.string()))
             if not _type_compatible(schema.field(c).type, t)]
    for column, expected in wrong:
        first = pq.read_table(path, columns=[column]).column(0).drop_null()
        example = f" (e.g. {first[0].as_py()!r})" if len(first) else ""
        report.add(ERROR, "wrong_type", path, column, pq.ParquetFile(path).metadata.num_rows, None,
                   f"type is {schema.field(column).type}, MEDS requires {expected}{example}")
    if wrong:
        return None
    splits = pl.read_parquet(path, columns=["subject_id", "split"])
    if splits["subject_id"].dtype == pl.UInt64 and (splits["subject_id"] > INT64_MAX).any():
        over = splits.filter(pl.col("subject_id") > INT64_MAX)
        report.add(ERROR, "subject_id_out_of_range", path, "subject_id", over.height, over["subject_id"][0],
                   f"uint64 value(s) above the int64 maximum {INT64_MAX} (MEDS subject ids are int64)")
        return None
    splits = splits.with_columns(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))
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
    data_subjects = per_subject.select(pl.col("subject_id").unique())
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


def _check_codes(ds: MedsDataset, codes: pl.DataFrame, report: ValidationReport) -> None:
    path = ds.root / CODES_FILE
    missing = codes.drop_nulls("code")
    if path.exists():
        schema = _metadata_schema(path, report)
        if schema is None:
            return
        if "code" not in schema.names:
            report.add(ERROR, "missing_column", path, "code", pq.ParquetFile(path).metadata.num_rows, None,
                       f"codes metadata has no code column (found {', '.join(schema.names) or 'no columns'})")
            return
        if not _type_compatible(schema.field("code").type, pa.string()):
            report.add(ERROR, "wrong_type", path, "code", pq.ParquetFile(path).metadata.num_rows, None,
                       f"type is {schema.field('code').type}, MEDS requires string")
            return
        known = pl.read_parquet(path, columns=["code"]).select(pl.col("code").cast(pl.String))
        missing = missing.join(known, on="code", how="anti")
    if missing.height:
        shown = ", ".join(missing["code"].head(5).to_list()) + (" ..." if missing.height > 5 else "")
        report.add(
            WARNING, "code_not_in_metadata", path, "code", int(missing["n"].sum()), missing["subject_id"][0],
            f"{missing.height} code(s) missing from codes.parquet: {shown}",
        )


def _metadata_schema(path: Path, report: ValidationReport) -> pa.Schema | None:
    """A metadata file's parquet schema; None (and an error) when it is not a readable parquet file."""
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        report.add(ERROR, "unreadable_file", path, None, None, None, f"not a readable parquet file ({exc})")
        return None


def _summarise(shards: list[_ShardScan], per_subject: pl.DataFrame, codes: pl.DataFrame, splits) -> dict:
    def total(key):
        return sum(s.stats[key] for s in shards)

    def extreme(key, fn):
        values = [s.stats[key] for s in shards if s.stats[key] is not None]
        return fn(values) if values else None

    stats = {
        "subjects": per_subject["subject_id"].n_unique(),
        "events": total("rows"),
        "codes": codes.height,
        "time_min": extreme("time_min", min),
        "time_max": extreme("time_max", max),
        "static_events": total("static_events"),
        "numeric_events": total("numeric_events"),
        "top_codes": codes.head(10).select("code", "n").rows(),
    }
    if splits is not None:
        per_split = (
            per_subject.join(splits, on="subject_id", how="left")
            .group_by("split")
            .agg(pl.col("subject_id").n_unique().alias("subjects"), pl.col("events").sum())
            .sort("split", nulls_last=True)
        )
        stats["splits"] = {r["split"] or "(none)": (r["subjects"], r["events"]) for r in per_split.iter_rows(named=True)}
    return stats
