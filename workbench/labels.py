"""The one reader of labels: every labels parquet or frame the workbench uses passes through here.

Labels follow the MEDS label schema (``subject_id`` int64, ``prediction_time`` timestamp[us],
``boolean_value`` bool; other MEDS label columns are ignored). :func:`read_labels` checks the
schema and values on their own (integer ids, real booleans, no nulls, no duplicate prediction
times); :func:`check_labels_in_data` checks them against the events they will be read from
(every subject present, every prediction time inside that subject's record). Each refusal is a
:class:`WorkbenchError` naming the file, the column, how many rows and an example row.
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


def _example(frame: pl.DataFrame) -> str:
    row = frame.row(0, named=True)
    return ", ".join(f"{k}={v}" for k, v in row.items() if k in LABEL_SCHEMA or k.startswith("first") or k.startswith("last"))


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
