"""The one reader of labels: every labels parquet or frame the workbench uses passes through here.

Labels follow the MEDS label schema (``subject_id`` int64, ``prediction_time`` timestamp[us],
``boolean_value`` bool; other MEDS label columns are ignored). :func:`read_labels` checks the
schema and values on their own (integer ids, real booleans, no nulls, no duplicate prediction
times); :func:`check_labels_in_data` checks them against the events they will be read from
(every subject present, every prediction time inside that subject's record). Each refusal is a
:class:`WorkbenchError` naming the file, the column, how many rows and an example row.

Survival labels (:func:`read_survival_labels`) add the MEDS label columns ``float_value`` (days
from the prediction time to the event or censoring, > 0) and ``integer_value`` (the event type:
:data:`EVENT_CENSORED`, :data:`EVENT_OUTCOME` or :data:`EVENT_COMPETING`); their
``boolean_value`` is ``integer_value == EVENT_OUTCOME``.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from workbench.errors import WorkbenchError

#: Columns (and polars dtypes) of a labels file: exactly meds.LabelSchema's boolean task.
LABEL_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "prediction_time": pl.Datetime("us"),
    "boolean_value": pl.Boolean(),
}
INT64_MAX = 2**63 - 1

#: Survival labels: the MEDS label column holding the days to the event or censoring (> 0) ...
SURVIVAL_TIME_COLUMN = "float_value"
#: ... and the one holding the event type (one of the EVENT_* codes below).
SURVIVAL_EVENT_COLUMN = "integer_value"
#: Event types of a survival label: censored (end of follow-up or the horizon came first), the
#: outcome came first, a competing event came first.
EVENT_CENSORED, EVENT_OUTCOME, EVENT_COMPETING = 0, 1, 2
#: Columns (and polars dtypes) of survival labels in memory: the MEDS label schema's columns in its
#: order. On disk ``float_value`` is float32, as ``meds.LabelSchema`` requires.
SURVIVAL_LABEL_SCHEMA: dict[str, pl.DataType] = {
    **LABEL_SCHEMA,
    SURVIVAL_EVENT_COLUMN: pl.Int64(),
    SURVIVAL_TIME_COLUMN: pl.Float64(),
}


def _example(frame: pl.DataFrame) -> str:
    row = frame.row(0, named=True)
    return ", ".join(f"{k}={v}" for k, v in row.items()
                     if k in SURVIVAL_LABEL_SCHEMA or k.startswith("first") or k.startswith("last"))


def _refuse(source: str, column: str | None, what: str, rows: pl.DataFrame | None = None, n: int | None = None) -> WorkbenchError:
    where = f"{source}: column {column!r}: " if column else f"{source}: "
    count = f" ({n:,} row(s)" if n is not None else ""
    example = f"; e.g. {_example(rows)})" if rows is not None and rows.height else (")" if count else "")
    return WorkbenchError(f"{where}{what}{count}{example}")


def _read_file(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise WorkbenchError(f"{path}: labels file not found (a parquet of subject_id, prediction_time, boolean_value)")
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # polars and pyarrow raise several error types for a non-parquet file
        raise WorkbenchError(f"{path}: not a readable parquet file ({type(exc).__name__}: {str(exc)[:200]})") from None


def _check_subject_ids(df: pl.DataFrame, source: str) -> pl.Series:
    dtype = df.schema["subject_id"]
    if not dtype.is_integer():
        bad = df
        if dtype.is_float():
            bad = df.filter(pl.col("subject_id").is_not_null() & (pl.col("subject_id") != pl.col("subject_id").floor()))
            hint = f"{bad.height:,} are fractional" if bad.height else "all values are whole numbers: cast the column to int64"
        else:
            hint = "cast the column to int64"
        raise _refuse(source, "subject_id", f"is {dtype}, but MEDS subject ids are int64 ({hint})",
                      bad.head(1) if bad.height else None)
    if dtype == pl.UInt64:
        big = df.filter(pl.col("subject_id") > INT64_MAX)
        if big.height:
            raise _refuse(source, "subject_id", f"values above the int64 maximum {INT64_MAX}", big.head(1), big.height)
    return df["subject_id"].cast(pl.Int64)


def _check_times(df: pl.DataFrame, source: str) -> pl.Series:
    dtype = df.schema["prediction_time"]
    if not isinstance(dtype, pl.Datetime):
        raise _refuse(source, "prediction_time", f"is {dtype}, but MEDS prediction times are timestamps (datetime[us], no time zone)")
    if dtype.time_zone is not None:
        raise _refuse(source, "prediction_time", f"has time zone {dtype.time_zone}; MEDS times are naive local "
                      "timestamps (convert with .dt.replace_time_zone(None))")
    return df["prediction_time"].cast(pl.Datetime("us"))


def _check_values(df: pl.DataFrame, source: str) -> pl.Series:
    dtype = df.schema["boolean_value"]
    if dtype != pl.Boolean:
        bad = df
        if dtype.is_numeric():
            value = pl.col("boolean_value")
            bad = df.filter(value.is_not_null() & (value != 0) & (value != 1))
        raise _refuse(source, "boolean_value", f"is {dtype}, but MEDS binary labels are booleans (true / false)"
                      + (f"; {bad.height:,} value(s) are not 0 or 1" if dtype.is_numeric() and bad.height else ""),
                      bad.head(1) if bad.height else None)
    return df["boolean_value"]


def read_labels(labels: pl.DataFrame | str | os.PathLike, *, source: str | None = None,
                need_values: bool = False) -> pl.DataFrame:
    """Labels as ``subject_id Int64, prediction_time Datetime(us), boolean_value Boolean``, checked.

    ``labels`` is a parquet path or a frame; without a ``boolean_value`` column the values are
    null (prediction times only), unless ``need_values``. Refuses: a missing column, a column of
    the wrong type (fractional or out-of-range ids, non-boolean labels, times that are not
    timestamps), nulls, duplicate (subject_id, prediction_time) rows, no rows at all.
    """
    if isinstance(labels, pl.DataFrame):
        df, source = labels, source or "labels"
    else:
        path = Path(labels)
        df, source = _read_file(path), source or str(path)
    missing = [c for c in ("subject_id", "prediction_time") if c not in df.columns]
    if need_values and "boolean_value" not in df.columns:
        missing.append("boolean_value")
    if missing:
        raise WorkbenchError(f"{source}: missing column(s) {', '.join(map(repr, missing))} (has {', '.join(df.columns) or 'none'}; "
                             "MEDS label schema: subject_id int64, prediction_time datetime[us], boolean_value bool)")
    out = pl.DataFrame({
        "subject_id": _check_subject_ids(df, source),
        "prediction_time": _check_times(df, source),
        "boolean_value": _check_values(df, source) if "boolean_value" in df.columns
        else pl.Series("boolean_value", [None] * df.height, dtype=pl.Boolean),
    })
    for column in LABEL_SCHEMA if "boolean_value" in df.columns else ("subject_id", "prediction_time"):
        nulls = out.filter(pl.col(column).is_null())
        if nulls.height:
            raise _refuse(source, column, "null values", nulls.head(1), nulls.height)
    if out.height == 0:
        raise WorkbenchError(f"{source}: no labels (0 rows)")
    dup = out.filter(pl.struct("subject_id", "prediction_time").is_duplicated())
    if dup.height:
        raise _refuse(source, "prediction_time", "the same (subject_id, prediction_time) appears more than once; "
                      "each prediction time must have one label", dup.sort("subject_id", "prediction_time").head(1), dup.height)
    return out


def read_survival_labels(labels: pl.DataFrame | str | os.PathLike, *, source: str | None = None) -> pl.DataFrame:
    """Survival labels as :data:`SURVIVAL_LABEL_SCHEMA` (``boolean_value`` = ``integer_value == 1``), checked.

    Besides :func:`read_labels`' checks, refuses a missing ``float_value`` / ``integer_value``,
    nulls in them, a time that is not a finite number of days > 0, an event type other than 0
    (censored), 1 (outcome) or 2 (competing), and a ``boolean_value`` column that disagrees with
    ``integer_value == 1``.
    """
    if isinstance(labels, pl.DataFrame):
        df, source = labels, source or "labels"
    else:
        path = Path(labels)
        df, source = _read_file(path), source or str(path)
    needed = ("subject_id", "prediction_time", SURVIVAL_TIME_COLUMN, SURVIVAL_EVENT_COLUMN)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise WorkbenchError(f"{source}: missing column(s) {', '.join(map(repr, missing))} (has "
                             f"{', '.join(df.columns) or 'none'}; survival labels: subject_id int64, prediction_time "
                             "datetime[us], float_value (days to the event or censoring, > 0), integer_value "
                             "(0 censored, 1 outcome, 2 competing))")
    base = read_labels(df, source=source)
    time, event = df[SURVIVAL_TIME_COLUMN], df[SURVIVAL_EVENT_COLUMN]
    if not time.dtype.is_numeric():
        raise _refuse(source, SURVIVAL_TIME_COLUMN, f"is {time.dtype}, but survival times are numbers of days (float)")
    if not event.dtype.is_integer():
        raise _refuse(source, SURVIVAL_EVENT_COLUMN, f"is {event.dtype}, but survival event types are integers "
                      "(0 censored, 1 outcome, 2 competing)")
    out = base.with_columns(pl.Series(SURVIVAL_EVENT_COLUMN, event).cast(pl.Int64, strict=False),
                            pl.Series(SURVIVAL_TIME_COLUMN, time).cast(pl.Float64))
    t, e = pl.col(SURVIVAL_TIME_COLUMN), pl.col(SURVIVAL_EVENT_COLUMN)
    checks = [
        (SURVIVAL_TIME_COLUMN, t.is_null(), "null values"),
        (SURVIVAL_EVENT_COLUMN, pl.Series(event.is_null()), "null values"),
        (SURVIVAL_TIME_COLUMN, ~t.is_finite() | (t <= 0), "times must be finite numbers of days > 0"),
        (SURVIVAL_EVENT_COLUMN, e.is_null() | ~e.is_in([EVENT_CENSORED, EVENT_OUTCOME, EVENT_COMPETING]),
         "event types must be 0 (censored), 1 (outcome) or 2 (competing)"),
    ]
    for column, is_bad, what in checks:
        bad = out.filter(is_bad)
        if bad.height:
            raise _refuse(source, column, what, bad.head(1), bad.height)
    derived = pl.col(SURVIVAL_EVENT_COLUMN) == EVENT_OUTCOME
    if "boolean_value" in df.columns:
        bad = out.filter(pl.col("boolean_value") != derived)
        if bad.height:
            raise _refuse(source, "boolean_value", "disagrees with integer_value == 1 (the outcome came first)",
                          bad.head(1), bad.height)
    return out.with_columns(boolean_value=derived).select(list(SURVIVAL_LABEL_SCHEMA))


def check_labels_in_data(labels: pl.DataFrame, events: pl.LazyFrame, where: str, source: str = "labels") -> None:
    """Every labelled subject has events in ``where``; no prediction time lies before that subject's
    first event (the features would be empty) or after the last event of the whole dataset (a
    future the data does not hold: 200 years on, every "days since" feature changes meaning)."""
    timed = events.filter(pl.col("time").is_not_null())
    span, end = pl.collect_all([
        timed.join(labels.select("subject_id").unique().lazy(), on="subject_id", how="semi")
        .group_by("subject_id").agg(first_event=pl.col("time").min()),
        timed.select(data_end=pl.col("time").max()),
    ])
    joined = labels.join(span, on="subject_id", how="left")
    missing = joined.filter(pl.col("first_event").is_null())
    if missing.height:
        ids = missing["subject_id"].unique().sort()
        raise WorkbenchError(
            f"{source}: column 'subject_id': {ids.len():,} subject(s) have no timed events in {where} "
            f"(e.g. subject_id {', '.join(map(str, ids.head(5).to_list()))}); labels must come from this dataset"
        )
    early = joined.filter(pl.col("prediction_time") < pl.col("first_event"))
    if early.height:
        raise _refuse(source, "prediction_time", f"prediction times before the subject's first event in {where} "
                      "(no history to predict from)", early.sort("subject_id").head(1), early.height)
    data_end = end["data_end"][0]
    late = joined.filter(pl.col("prediction_time") > data_end)
    if late.height:
        raise _refuse(source, "prediction_time", f"prediction times after the last event of {where} ({data_end}): "
                      "the data holds no such future", late.sort("subject_id").head(1), late.height)
