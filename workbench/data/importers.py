"""Importers: source tables (CSV or parquet) into a MEDS dataset.

Three shapes of source table are supported, each described by a typed config:

* **long** (:class:`LongTableConfig`): one event per row, columns mapped onto subject, time,
  code and value. The code may come from a column (optionally prefixed or mapped through
  ``code_map``) or be one constant for the whole table (e.g. ``END_OF_FOLLOWUP``).
* **wide** (:class:`WideTableConfig`): one row per visit with many measurement columns; each
  column becomes the code ``PREFIX//name`` (numeric) or ``PREFIX//name//value`` (categorical),
  with units recorded in the codes metadata descriptions.
* **static** (:class:`StaticTableConfig`): per-subject facts: birth date or age at an index
  date (-> ``MEDS_BIRTH``) and categorical attributes such as sex, either static (null time) or
  timed at the index date.

Times are absolute (parsed with a ``strftime`` format, ISO 8601 by default) or relative
(offsets in days/hours/... from a per-subject anchor: one fixed date, or a date per subject
from an anchor table). :class:`ImportConfig` combines tables, splits and ``dataset.json``
fields and loads from YAML; :func:`import_dataset` writes the MEDS dataset.

Every parse error is a :class:`SourceTableError` naming the file, the row (data rows counted
from 1, header excluded; for a CSV also the line) and the column. All parsing is done with
polars expressions over whole columns; nothing loops over rows or subjects.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import meds
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from workbench.data.meds_io import SPLIT_NAMES, MedsDataset, write_dataset
from workbench.config import load_yaml_config, validated
from workbench.errors import SourceTableError, WorkbenchError

#: Name of the 1-based data-row number column carried through parsing for error messages.
ROW = "_row"
#: Julian year, as used by R's survival datasets for age in years (days / 365.25).
DAYS_PER_YEAR = 365.25
_MICROSECONDS = {
    "seconds": 1e6,
    "minutes": 60e6,
    "hours": 3_600e6,
    "days": 86_400e6,
    "weeks": 7 * 86_400e6,
    "years": DAYS_PER_YEAR * 86_400e6,
}
TimeUnit = Literal["seconds", "minutes", "hours", "days", "weeks", "years"]
FLOAT32_MAX = float(np.finfo(np.float32).max)
DEFAULT_NULL_VALUES = ["", "NA", "N/A", "NaN", "nan", "NULL", "null", "None"]
BIRTH_CODE = meds.birth_code
_EVENT_COLUMNS = ["subject_id", "time", "code", "numeric_value"]


class _Config(BaseModel):
    """Base for importer configs: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


class AnchorTable(_Config):
    """A table giving each subject's anchor (index) date for relative times."""

    path: Path = Field(description="CSV or parquet file with one row per subject.")
    subject_column: str = Field("subject_id", description="Column holding the subject id.")
    date_column: str = Field("index_date", description="Column holding the anchor date/time.")
    date_format: str | None = Field(None, description="strftime format of date_column; None: ISO 8601.")


class TimeConfig(_Config):
    """How a time column is read: absolute dates, or offsets from a per-subject anchor."""

    column: str = Field("time", description="Source column holding the time (or the offset).")
    format: str | None = Field(
        None, description="strftime format for absolute times (e.g. '%d/%m/%Y %H:%M'); None: ISO 8601."
    )
    relative_unit: TimeUnit | None = Field(
        None, description="Set when the column holds numeric offsets from an anchor, in this unit."
    )
    anchor_date: dt.datetime | None = Field(
        None, description="Relative times: one anchor date shared by every subject."
    )
    anchor_table: AnchorTable | None = Field(
        None, description="Relative times: a table with each subject's own anchor date."
    )

    @model_validator(mode="after")
    def _anchor_matches_mode(self) -> "TimeConfig":
        anchors = (self.anchor_date is not None) + (self.anchor_table is not None)
        if self.relative_unit is None and anchors:
            raise ValueError("anchor_date/anchor_table need relative_unit (the column holds offsets)")
        if self.relative_unit is not None and anchors != 1:
            raise ValueError("relative_unit needs exactly one of anchor_date or anchor_table")
        return self


class _TableConfig(_Config):
    path: Path | None = Field(None, description="CSV or parquet file (None when a frame is passed).")
    subject_column: str = Field("subject_id", description="Column holding the integer subject id.")
    null_values: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NULL_VALUES),
        description="Strings read as missing in text columns.",
    )


class LongTableConfig(_TableConfig):
    """A long table: one event per row."""

    time: TimeConfig = Field(default_factory=TimeConfig, description="The event time column.")
    code_column: str | None = Field("code", description="Column holding the code (None: use `code`).")
    code: str | None = Field(None, description="One constant code for every row (instead of code_column).")
    code_prefix: str | None = Field(
        None, description="Prefix for codes taken from code_column: PREFIX//value (not for code_map hits)."
    )
    code_map: dict[str, str | None] = Field(
        default_factory=dict,
        description="Maps raw code values to codes; a value mapped to null drops those rows.",
    )
    unmapped: Literal["keep", "drop", "error"] = Field(
        "keep", description="What to do with code values absent from code_map (when code_map is set)."
    )
    value_column: str | None = Field(None, description="Column holding numeric values (None: no values).")
    text_value_column: str | None = Field(None, description="Column holding text values (None: none).")
    allow_static: bool = Field(True, description="Rows with a missing time become static events (null time).")
    distinct: bool = Field(
        False, description="Drop repeated identical events (for tables that repeat per-subject facts)."
    )

    @model_validator(mode="after")
    def _one_code_source(self) -> "LongTableConfig":
        if self.code is not None:
            self.code_column = None
        if self.code_column is None and self.code is None:
            raise ValueError("give code_column or a constant code")
        return self


class MeasurementGroup(_Config):
    """Columns of a wide table that share a code prefix (e.g. all labs under LAB)."""

    prefix: str = Field(description="Code prefix: column 'bili' becomes PREFIX//bili.")
    columns: list[str] = Field(description="Source columns, one code each.")
    rename: dict[str, str] = Field(default_factory=dict, description="Source column -> name used in the code.")
    units: dict[str, str] = Field(default_factory=dict, description="Source column -> unit (goes in descriptions).")
    descriptions: dict[str, str] = Field(default_factory=dict, description="Source column -> description.")
    kind: Literal["auto", "numeric", "categorical"] = Field(
        "auto", description="numeric: values must be numbers; categorical: PREFIX//name//value; auto: decide per column."
    )
    value_map: dict[str, str] = Field(
        default_factory=dict, description="Categorical columns: raw value -> label used in the code."
    )


class WideTableConfig(_TableConfig):
    """A wide table: one row per visit, one column per measurement."""

    time: TimeConfig = Field(default_factory=TimeConfig, description="The visit time column.")
    visit_code: str | None = Field("VISIT", description="Code of one event per row at the visit time (None: none).")
    visit_description: str = Field("Visit (one row of the source table)", description="Description of visit_code.")
    groups: list[MeasurementGroup] = Field(default_factory=list, description="Measurement columns by prefix.")


class StaticAttribute(_Config):
    """A categorical per-subject attribute, e.g. sex -> SEX//F."""

    column: str = Field(description="Source column.")
    prefix: str = Field(description="Code prefix: value v becomes PREFIX//v.")
    value_map: dict[str, str] = Field(default_factory=dict, description="Raw value -> label used in the code.")
    unmapped: Literal["keep", "error"] = Field("keep", description="Values absent from value_map: keep raw or fail.")
    at_index_date: bool = Field(False, description="Time the event at the index date instead of static (null time).")
    description: str | None = Field(None, description="Description prefix for the codes (default: the column).")


class StaticTableConfig(_TableConfig):
    """Per-subject facts. A subject may repeat over rows if its values agree on every row."""

    index_date: dt.datetime | None = Field(None, description="One index date for every subject.")
    index_date_column: str | None = Field(None, description="Column with each subject's index date.")
    index_date_format: str | None = Field(None, description="strftime format of index_date_column; None: ISO.")
    birth_date_column: str | None = Field(None, description="Column with the birth date (-> MEDS_BIRTH).")
    birth_date_format: str | None = Field(None, description="strftime format of birth_date_column; None: ISO.")
    age_column: str | None = Field(
        None, description="Column with age in years at the index date (birth = index - age * 365.25 days)."
    )
    attributes: list[StaticAttribute] = Field(default_factory=list, description="Categorical attributes.")

    @model_validator(mode="after")
    def _index_date_for_age(self) -> "StaticTableConfig":
        if self.index_date is not None and self.index_date_column is not None:
            raise ValueError("give index_date or index_date_column, not both")
        if self.birth_date_column and self.age_column:
            raise ValueError("give birth_date_column or age_column, not both")
        needs_index = self.age_column is not None or any(a.at_index_date for a in self.attributes)
        if needs_index and self.index_date is None and self.index_date_column is None:
            raise ValueError("age_column and at_index_date attributes need index_date or index_date_column")
        return self


class SplitConfig(_Config):
    """Deterministic subject-level split fractions."""

    train: float = Field(0.8, ge=0, le=1, description="Fraction of subjects in train.")
    tuning: float = Field(0.1, ge=0, le=1, description="Fraction of subjects in tuning.")
    held_out: float = Field(0.1, ge=0, le=1, description="Fraction of subjects in held_out.")
    seed: int = Field(0, ge=0, description="Seed of the subject shuffle (recorded in dataset.json).")
    stratify_codes: list[str] = Field(
        default_factory=list,
        description="Split subjects with and without each of these codes (e.g. [MEDS_DEATH]) separately, so every "
        "split holds the same share of them and an outcome's prevalence does not differ by the luck of the draw.",
    )

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.tuning + self.held_out
        if abs(total - 1) > 1e-9:
            raise ValueError(f"train + tuning + held_out must sum to 1 (got {total:g})")
        return self


class ImportConfig(_Config):
    """A whole import: source tables, splits, and metadata for dataset.json and codes.parquet."""

    dataset_name: str = Field("imported", description="dataset.json dataset_name.")
    dataset_version: str = Field("0", description="dataset.json dataset_version.")
    static_tables: list[StaticTableConfig] = Field(default_factory=list, description="Static tables.")
    wide_tables: list[WideTableConfig] = Field(default_factory=list, description="Wide (visit) tables.")
    long_tables: list[LongTableConfig] = Field(default_factory=list, description="Long (event) tables.")
    splits: SplitConfig = Field(default_factory=SplitConfig, description="Subject split fractions and seed.")
    code_descriptions: dict[str, str] = Field(
        default_factory=dict, description="Descriptions for codes (override generated ones)."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Extra dataset.json fields: provenance, citation, license."
    )

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ImportConfig":
        """Load from YAML; table paths are relative to the YAML file's directory."""
        path = Path(path)
        if not path.is_file():
            raise WorkbenchError(f"{path}: import config not found")
        return load_yaml_config(cls, path).resolve_paths(path.parent)

    def resolve_paths(self, base: Path) -> "ImportConfig":
        """Return a copy with relative table paths made relative to ``base``."""
        data = self.model_dump()
        for key in ("static_tables", "wide_tables", "long_tables"):
            for table in data[key]:
                if table["path"] is not None:
                    table["path"] = base / table["path"]
                anchor = (table.get("time") or {}).get("anchor_table")
                if anchor is not None:
                    anchor["path"] = base / anchor["path"]
        return type(self).model_validate(data)


def make_config(model: type[BaseModel], values: dict, source: str = "config") -> Any:
    """Validate ``values`` into ``model``; errors become a WorkbenchError naming each field."""
    return validated(model, values, f"{source}: invalid {model.__name__}")


# --------------------------------------------------------------------------------------------
# Reading and parsing source columns
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceTable:
    """A source table read into memory, with a 1-based ``_row`` column for error messages."""

    frame: pl.DataFrame
    name: str
    is_csv: bool

    def where(self, row: int) -> str:
        """'row N' (and the CSV line, the header being line 1)."""
        return f"row {row} (line {row + 1})" if self.is_csv else f"row {row}"


def read_source(source: str | Path | pl.DataFrame, null_values: list[str] | None = None) -> SourceTable:
    """Read a CSV/TSV (all columns as text) or parquet file, or wrap a frame."""
    nulls = DEFAULT_NULL_VALUES if null_values is None else null_values
    if isinstance(source, pl.DataFrame):
        frame, name, is_csv = source, "<DataFrame>", False
    else:
        path = Path(source)
        if not path.is_file():
            raise SourceTableError(f"{path}: source table not found")
        name, suffix = str(path), path.suffix.lower()
        try:
            if suffix in (".csv", ".tsv", ".txt"):
                # Read as text: each column is parsed below so a bad cell is reported by row.
                sep = "\t" if suffix == ".tsv" else ","
                frame, is_csv = pl.read_csv(path, infer_schema=False, separator=sep), True
            elif suffix in (".parquet", ".pq"):
                frame, is_csv = pl.read_parquet(path), False
            else:
                raise SourceTableError(f"{path}: unknown table type '{suffix}' (expected .csv, .tsv or .parquet)")
        except pl.exceptions.PolarsError as exc:
            raise SourceTableError(f"{path}: cannot read table: {exc}") from exc
    text = [c for c, t in frame.schema.items() if t == pl.String]
    frame = frame.with_columns(
        [pl.when(pl.col(c).is_in(nulls)).then(None).otherwise(pl.col(c)).alias(c) for c in text]
    ).with_row_index(ROW, offset=1)
    return SourceTable(frame, name, is_csv)


def require_columns(table: SourceTable, roles: dict[str | None, str]) -> None:
    """Fail naming every mapped column (``column -> role``) missing from the table."""
    missing = [f"'{col}' ({role})" for col, role in roles.items() if col is not None and col not in table.frame.columns]
    if missing:
        have = ", ".join(c for c in table.frame.columns if c != ROW)
        raise SourceTableError(f"{table.name}: mapped column {', '.join(missing)} not found; the table has: {have}")


def _is_missing(s: pl.Series) -> pl.Series:
    """Null, or NaN in a float column (both mean 'no value')."""
    return s.is_null() | s.is_nan() if s.dtype.is_float() else s.is_null()


def _raise_bad_rows(table: SourceTable, column: str, bad: pl.Series, problem: str) -> None:
    """Raise naming the first bad row of ``column`` (and how many more) if ``bad`` has any."""
    if not bad.any():
        return
    rows = table.frame.filter(bad).select(ROW, pl.col(column).cast(pl.String).alias("value"))
    row, value = rows.row(0)
    more = ""
    if rows.height > 1:
        shown = ", ".join(map(str, rows[ROW].head(5).to_list()))
        more = f" ({rows.height} rows in all: rows {shown}{', ...' if rows.height > 5 else ''})"
    shown_value = "missing" if value is None else repr(value)
    raise SourceTableError(f"{table.name} {table.where(row)}, column '{column}': {shown_value} {problem}{more}")


def parse_numeric(table: SourceTable, column: str) -> pl.Series:
    """A column as Float64 (missing and NaN -> null); fails on text that is not a finite number."""
    s = table.frame[column]
    if s.dtype == pl.String:
        parsed = s.str.strip_chars().cast(pl.Float64, strict=False)
    elif s.dtype.is_numeric() or s.dtype == pl.Boolean:
        parsed = s.cast(pl.Float64)
    else:
        raise SourceTableError(f"{table.name}: column '{column}' has type {s.dtype}, expected numbers")
    bad = ~_is_missing(s) & (parsed.is_null() | parsed.is_infinite())
    _raise_bad_rows(table, column, bad, "is not a number (numeric column)")
    # MEDS stores values as float32; larger magnitudes would silently become infinite.
    _raise_bad_rows(table, column, parsed.abs() > FLOAT32_MAX, "is too large for a float32 value")
    return parsed.fill_nan(None)


def parse_subject_ids(table: SourceTable, column: str) -> pl.Series:
    """The subject column as Int64; fails on missing or non-integer ids."""
    s = table.frame[column]
    if s.dtype == pl.String:
        parsed = s.str.strip_chars().cast(pl.Int64, strict=False)
    elif s.dtype.is_integer():
        parsed = s.cast(pl.Int64, strict=False)
    elif s.dtype.is_float():
        parsed = pl.select(pl.when(s == s.round()).then(s.cast(pl.Int64, strict=False))).to_series()
    else:
        raise SourceTableError(f"{table.name}: column '{column}' has type {s.dtype}, expected integer subject ids")
    _raise_bad_rows(table, column, s.is_null(), "subject id (every row needs one)")
    _raise_bad_rows(table, column, parsed.is_null(), "is not an integer subject id")
    return parsed.alias("subject_id")


def parse_datetimes(table: SourceTable, column: str, fmt: str | None) -> pl.Series:
    """An absolute date/time column as Datetime(us); fails on text that does not parse."""
    s = table.frame[column]
    if s.dtype == pl.String:
        text = s.str.strip_chars()
        if fmt:
            parsed = text.str.strptime(pl.Datetime("us"), fmt, strict=False)
        else:
            parsed = text.str.to_datetime(time_unit="us", strict=False)
    elif s.dtype == pl.Date:
        parsed = s.cast(pl.Datetime("us"))
    elif isinstance(s.dtype, pl.Datetime):
        # MEDS times are naive; a zoned column is converted to UTC first.
        parsed = s.dt.convert_time_zone("UTC").dt.replace_time_zone(None) if s.dtype.time_zone else s
        parsed = parsed.cast(pl.Datetime("us"))
    else:
        raise SourceTableError(f"{table.name}: column '{column}' has type {s.dtype}, expected dates")
    expected = f"format '{fmt}'" if fmt else "ISO 8601, e.g. 2020-01-31 or 2020-01-31T08:30:00"
    _raise_bad_rows(table, column, s.is_not_null() & parsed.is_null(), f"is not a date/time ({expected})")
    return parsed


def read_anchors(anchor: AnchorTable) -> pl.DataFrame:
    """``subject_id, _anchor`` from an anchor table (one row per subject)."""
    table = read_source(anchor.path)
    require_columns(table, {anchor.subject_column: "subject column", anchor.date_column: "anchor date column"})
    subject = parse_subject_ids(table, anchor.subject_column)
    date = parse_datetimes(table, anchor.date_column, anchor.date_format)
    _raise_bad_rows(table, anchor.date_column, date.is_null(), "anchor date (every subject needs one)")
    _raise_bad_rows(table, anchor.subject_column, subject.is_duplicated(), "appears more than once in an anchor table")
    return pl.DataFrame({"subject_id": subject, "_anchor": date})


def anchors_for(table: SourceTable, anchor: AnchorTable, subject: pl.Series) -> pl.Series:
    """Each row's anchor date, looked up by subject; fails naming a row whose subject has none."""
    anchors = read_anchors(anchor)
    found = subject.to_frame().join(anchors, on="subject_id", how="left", maintain_order="left")["_anchor"]
    if found.is_null().any():
        i = int(found.is_null().arg_true()[0])
        raise SourceTableError(
            f"{table.name} {table.where(i + 1)}: subject {subject[i]} has no anchor date in "
            f"{anchor.path} (column '{anchor.date_column}')"
        )
    return found


def parse_times(table: SourceTable, config: TimeConfig, subject: pl.Series, allow_null: bool) -> pl.Series:
    """Event times as Datetime(us): absolute, or anchor + offset for relative times."""
    if config.relative_unit is None:
        times = parse_datetimes(table, config.column, config.format)
    else:
        offsets = parse_numeric(table, config.column)
        if config.anchor_date is not None:
            anchor = pl.lit(config.anchor_date, dtype=pl.Datetime("us"))
        else:
            anchor = anchors_for(table, config.anchor_table, subject)
        step = (offsets * _MICROSECONDS[config.relative_unit]).round()
        # Offsets beyond +-2**62 us (~146,000 years) cannot be a time; they must not become static events.
        step = pl.select(pl.when(step.abs() < 2**62).then(step).cast(pl.Int64)).to_series()
        _raise_bad_rows(table, config.column, offsets.is_not_null() & step.is_null(), "is out of range as a time offset")
        times = pl.select(anchor + pl.duration(microseconds=step)).to_series()
    if not allow_null:
        _raise_bad_rows(table, config.column, times.is_null(), "time (required here)")
    return times.alias("time")


def _labels(table: SourceTable, column: str, value_map: dict[str, str], unmapped: str) -> pl.Series:
    """A categorical column as text labels, mapped through ``value_map``."""
    raw = table.frame[column].cast(pl.String).str.strip_chars()
    if not value_map:
        return raw
    if unmapped == "error":
        known = ", ".join(map(repr, value_map))
        _raise_bad_rows(table, column, raw.is_not_null() & ~raw.is_in(list(value_map)), f"is not one of {known}")
    return raw.replace(value_map)


def _event_frame(subject: pl.Series, time: pl.Series | None, code: pl.Series, value: pl.Series | None, row: pl.Series):
    """Events with the MEDS columns plus the source row (for ordering within a timestamp)."""
    n = len(subject)
    if time is None:
        time = pl.repeat(None, n, dtype=pl.Datetime("us"), eager=True)
    if value is None:
        value = pl.repeat(None, n, dtype=pl.Float32, eager=True)
    columns = {"subject_id": subject, "time": time, "code": code, "numeric_value": value.cast(pl.Float32), ROW: row}
    return pl.DataFrame({name: s.alias(name) for name, s in columns.items()})


def _codes_frame(codes: dict[str, str | None] | pl.DataFrame) -> pl.DataFrame:
    """``code, description`` rows from a mapping or frame."""
    if isinstance(codes, pl.DataFrame):
        return codes.select(pl.col("code").cast(pl.String), pl.col("description").cast(pl.String))
    return pl.DataFrame({"code": list(codes), "description": list(codes.values())}, schema={"code": pl.String, "description": pl.String})


def import_long(config: LongTableConfig, source: str | Path | pl.DataFrame | None = None) -> pl.DataFrame:
    """Events (``subject_id, time, code, numeric_value`` [+ ``text_value``]) from a long table."""
    table = read_source(_source(config, source), config.null_values)
    require_columns(
        table,
        {
            config.subject_column: "subject column",
            config.time.column: "time column",
            config.code_column: "code column",
            config.value_column: "value column",
            config.text_value_column: "text value column",
        },
    )
    subject = parse_subject_ids(table, config.subject_column)
    time = parse_times(table, config.time, subject, allow_null=config.allow_static)
    value = parse_numeric(table, config.value_column) if config.value_column else None
    if config.code is not None:
        code, keep = pl.repeat(config.code, table.frame.height, eager=True, dtype=pl.String), None
    else:
        code, keep = _long_codes(table, config)
    events = _event_frame(subject, time, code, value, table.frame[ROW])
    if config.text_value_column:
        events = events.with_columns(table.frame[config.text_value_column].cast(pl.String).alias("text_value"))
    if keep is not None:
        events = events.filter(keep)
    if config.distinct:
        events = events.unique(subset=[c for c in events.columns if c != ROW], keep="first", maintain_order=True)
    return events.drop(ROW)


def _long_codes(table: SourceTable, config: LongTableConfig) -> tuple[pl.Series, pl.Series | None]:
    """Codes from the code column, and a keep-mask (None: keep all) for dropped values."""
    column = config.code_column
    raw = table.frame[column].cast(pl.String)
    _raise_bad_rows(table, column, raw.is_null(), "code (every event needs one)")
    prefixed = raw if config.code_prefix is None else config.code_prefix + "//" + raw
    if not config.code_map:
        return prefixed, None
    in_map = raw.is_in(list(config.code_map))
    if config.unmapped == "error":
        known = ", ".join(map(repr, config.code_map))
        _raise_bad_rows(table, column, ~in_map, f"is not in code_map (known values: {known})")
    mapped = raw.replace_strict(config.code_map, default=None, return_dtype=pl.String)
    code = pl.select(pl.when(in_map).then(mapped).otherwise(prefixed)).to_series()
    # A value mapped to null is an explicit "drop"; unmapped values are dropped if asked.
    keep = code.is_not_null() & (in_map | (config.unmapped != "drop"))
    return code.fill_null(""), keep


def _source(config: _TableConfig, source: str | Path | pl.DataFrame | None) -> str | Path | pl.DataFrame:
    if source is not None:
        return source
    if config.path is None:
        raise WorkbenchError(f"{type(config).__name__}: no path given and no source table passed")
    return config.path


def import_wide(config: WideTableConfig, source: str | Path | pl.DataFrame | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Events and their codes metadata (``code, description``) from a wide (visit) table."""
    table = read_source(_source(config, source), config.null_values)
    roles = {c: f"{g.prefix} measurement" for g in config.groups for c in g.columns}
    require_columns(table, roles | {config.subject_column: "subject column", config.time.column: "time column"})
    subject = parse_subject_ids(table, config.subject_column)
    time = parse_times(table, config.time, subject, allow_null=False)
    row = table.frame[ROW]
    parts, codes = [], []
    if config.visit_code:
        parts.append(_event_frame(subject, time, pl.repeat(config.visit_code, len(row), eager=True, dtype=pl.String), None, row))
        codes.append(_codes_frame({config.visit_code: config.visit_description}))
    for group in config.groups:
        for column in group.columns:
            events, column_codes = _measurement_events(table, group, column, subject, time)
            parts.append(events)
            codes.append(column_codes)
    if not parts:
        raise WorkbenchError(f"{table.name}: wide table config has no visit_code and no measurement columns")
    # Keep each visit's events together in config order: visit first, then columns as listed.
    events = pl.concat([p.with_columns(pl.lit(i, dtype=pl.UInt32).alias("_part")) for i, p in enumerate(parts)])
    events = events.sort([ROW, "_part"], maintain_order=True).drop(ROW, "_part")
    return events, pl.concat(codes).unique("code", keep="first", maintain_order=True)


def _measurement_events(
    table: SourceTable, group: MeasurementGroup, column: str, subject: pl.Series, time: pl.Series
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One wide-table column as events (missing cells produce none) and its codes metadata."""
    name = group.rename.get(column, column)
    code = f"{group.prefix}//{name}"
    unit = group.units.get(column)
    description = group.descriptions.get(column, name) + (f" [{unit}]" if unit else "")
    row = table.frame[ROW]
    if _is_numeric_column(table.frame[column], group.kind):
        value = parse_numeric(table, column)
        codes = pl.repeat(code, len(row), eager=True, dtype=pl.String)
        events = _event_frame(subject, time, codes, value, row).filter(value.is_not_null())
        return events, _codes_frame({code: description})
    label = _labels(table, column, group.value_map, "keep")
    events = _event_frame(subject, time, code + "//" + label, None, row).filter(label.is_not_null())
    metadata = events.select(pl.col("code").unique(maintain_order=True)).with_columns(
        (pl.lit(description + ": ") + pl.col("code").str.strip_prefix(code + "//")).alias("description")
    )
    return events, metadata


def _is_numeric_column(s: pl.Series, kind: str) -> bool:
    """numeric/categorical as configured; 'auto': numbers, or text whose every value is a number."""
    if kind != "auto":
        return kind == "numeric"
    if s.dtype.is_numeric() or s.dtype == pl.Boolean:
        return True
    if s.dtype != pl.String:
        return False
    return bool((s.is_null() | s.str.strip_chars().cast(pl.Float64, strict=False).is_not_null()).all())


def import_static(config: StaticTableConfig, source: str | Path | pl.DataFrame | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Birth and attribute events, and their codes metadata, from a per-subject table."""
    table = read_source(_source(config, source), config.null_values)
    roles = {a.column: f"{a.prefix} attribute" for a in config.attributes} | {
        config.subject_column: "subject column",
        config.index_date_column: "index date column",
        config.birth_date_column: "birth date column",
        config.age_column: "age column",
    }
    require_columns(table, roles)
    subject = parse_subject_ids(table, config.subject_column)
    facts = {"subject_id": subject, ROW: table.frame[ROW]}
    if config.index_date_column:
        facts["_index"] = parse_datetimes(table, config.index_date_column, config.index_date_format)
    if config.birth_date_column:
        facts["_birth"] = parse_datetimes(table, config.birth_date_column, config.birth_date_format)
    if config.age_column:
        facts["_age"] = parse_numeric(table, config.age_column)
    for i, attribute in enumerate(config.attributes):
        facts[f"_attr{i}"] = _labels(table, attribute.column, attribute.value_map, attribute.unmapped)
    per_subject = _one_row_per_subject(table, pl.DataFrame(facts), _fact_sources(config))
    return _static_events(config, per_subject)


def _fact_sources(config: StaticTableConfig) -> dict[str, str]:
    """Internal fact column -> the source column it came from (for error messages)."""
    names = {"_index": config.index_date_column, "_birth": config.birth_date_column, "_age": config.age_column}
    names |= {f"_attr{i}": a.column for i, a in enumerate(config.attributes)}
    return {k: v for k, v in names.items() if v is not None}


def _one_row_per_subject(table: SourceTable, facts: pl.DataFrame, sources: dict[str, str]) -> pl.DataFrame:
    """Collapse repeated subjects; fails naming the subject, column and rows if their values differ."""
    columns = [c for c in facts.columns if c not in ("subject_id", ROW)]
    if not columns:
        return facts.select("subject_id").unique(maintain_order=True)
    conflicts = (
        facts.group_by("subject_id", maintain_order=True)
        .agg([pl.col(c).drop_nulls().n_unique().alias(c) for c in columns])
        .unpivot(index="subject_id", variable_name="fact", value_name="n")
        .filter(pl.col("n") > 1)
    )
    if conflicts.height:
        subject, fact = conflicts.row(0)[:2]
        rows = facts.filter(pl.col("subject_id") == subject).unique(fact, keep="first", maintain_order=True).drop_nulls(fact)
        first, second = rows.row(0, named=True), rows.row(1, named=True)
        raise SourceTableError(
            f"{table.name}: subject {subject} has conflicting values in column '{sources[fact]}': "
            f"{first[fact]!r} at {table.where(first[ROW])} and {second[fact]!r} at {table.where(second[ROW])} "
            f"(a static table needs one value per subject; {conflicts.height} conflict(s) in all)"
        )
    return facts.group_by("subject_id", maintain_order=True).agg([pl.col(c).drop_nulls().first() for c in columns])


def _static_events(config: StaticTableConfig, facts: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """MEDS_BIRTH and attribute events, with codes metadata, from one row of facts per subject."""
    index = pl.col("_index") if config.index_date_column else pl.lit(config.index_date, dtype=pl.Datetime("us"))
    parts, codes = [], []
    if config.birth_date_column or config.age_column:
        if config.birth_date_column:
            birth, note = pl.col("_birth"), f"column '{config.birth_date_column}'"
        else:
            # Age in (Julian) years at the index date; birth is the index date minus that age.
            step = (pl.col("_age") * _MICROSECONDS["years"]).round().cast(pl.Int64)
            birth, note = index - pl.duration(microseconds=step), f"index date minus age in '{config.age_column}'"
        part = facts.select("subject_id", birth.alias("time"), pl.lit(BIRTH_CODE).alias("code"))
        parts.append(part.filter(pl.col("time").is_not_null()))
        codes.append(_codes_frame({BIRTH_CODE: f"Birth (from {note})"}))
    for i, attribute in enumerate(config.attributes):
        label = pl.col(f"_attr{i}")
        time = index if attribute.at_index_date else pl.lit(None, dtype=pl.Datetime("us"))
        part = facts.filter(label.is_not_null()).select(
            "subject_id", time.alias("time"), (pl.lit(attribute.prefix + "//") + label).alias("code")
        )
        parts.append(part)
        prefix = f"{attribute.description or attribute.column}: "
        codes.append(
            part.select(pl.col("code").unique(maintain_order=True)).with_columns(
                (prefix + pl.col("code").str.strip_prefix(attribute.prefix + "//")).alias("description")
            )
        )
    if not parts:
        raise WorkbenchError("static table config produces no events (give birth date/age or attributes)")
    events = pl.concat([p.cast({"time": pl.Datetime("us")}) for p in parts])
    events = events.with_columns(pl.lit(None, dtype=pl.Float32).alias("numeric_value"))
    return events, pl.concat(codes)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fixed, version-independent 64-bit hash (uint64 wraps by design)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_counts(n: int, config: SplitConfig) -> list[int]:
    """Subjects per split (train, tuning, held_out): largest remainder, so they sum to ``n``."""
    exact = np.array([config.train, config.tuning, config.held_out]) * n
    counts = np.floor(exact).astype(int)
    # Ties go to the earlier split (stable argsort), so the result never depends on float noise order.
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def assign_splits(subject_ids: pl.Series, config: SplitConfig, strata: pl.DataFrame | None = None) -> pl.DataFrame:
    """``subject_id, split`` for each distinct subject: deterministic given the subjects and seed.

    Subjects are ordered by a seeded SplitMix64 hash of their id (a shuffle that is the same on
    every machine and library version) and cut into exact counts from :func:`split_counts`; with
    ``strata`` (``subject_id, stratum``, see :func:`split_strata`) each stratum is cut on its own.
    """
    ids = np.unique(subject_ids.drop_nulls().cast(pl.Int64).to_numpy())
    seed = _splitmix64(np.array([config.seed], dtype=np.uint64))
    keys = _splitmix64(ids.view(np.uint64) ^ seed)
    group = np.zeros(len(ids), dtype=np.int64)
    if strata is not None and strata.height:
        lookup = pl.DataFrame({"subject_id": ids}).join(strata, on="subject_id", how="left", maintain_order="left")
        group = lookup["stratum"].fill_null(0).to_numpy().astype(np.int64)
    order = np.lexsort((ids, keys, group))  # by stratum, then by the seeded hash
    labels = np.concatenate([np.repeat(np.array(SPLIT_NAMES), split_counts(int(n), config))
                             for n in np.bincount(group[order])[np.unique(group)]]) if len(ids) else np.array([], dtype=str)
    return pl.DataFrame({"subject_id": ids[order], "split": labels}).sort("subject_id")


def split_strata(events: pl.DataFrame, codes: list[str]) -> pl.DataFrame:
    """``subject_id, stratum``: which of ``codes`` each subject has, as bits (0 = none of them)."""
    bits = [pl.col("code").is_in([c]).any().cast(pl.Int64) * (1 << i) for i, c in enumerate(codes)]
    return events.group_by("subject_id").agg(pl.sum_horizontal(bits).alias("stratum"))


# --------------------------------------------------------------------------------------------
# Whole imports
# --------------------------------------------------------------------------------------------


def import_tables(config: ImportConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """All events of an import (MEDS-sorted) and the codes metadata for every code in them.

    Events at the same time keep config order (static, wide, long tables, each in row order),
    so e.g. an ``END_OF_FOLLOWUP`` table listed last sorts after a death at the same instant.
    """
    parts, codes = [], []
    for static in config.static_tables:
        events, static_codes = import_static(static)
        parts.append(events)
        codes.append(static_codes)
    for wide in config.wide_tables:
        events, wide_codes = import_wide(wide)
        parts.append(events)
        codes.append(wide_codes)
    parts += [import_long(long) for long in config.long_tables]
    if not parts:
        raise WorkbenchError("import config lists no tables (static_tables, wide_tables, long_tables)")
    events = pl.concat(parts, how="diagonal_relaxed").sort(["subject_id", "time"], nulls_last=False, maintain_order=True)
    return events, codes_metadata(events, codes, config.code_descriptions)


def codes_metadata(events: pl.DataFrame, generated: list[pl.DataFrame], overrides: dict[str, str]) -> pl.DataFrame:
    """``code, description, parent_codes`` for every code in ``events`` (overrides win)."""
    known = pl.concat([*generated, _codes_frame(overrides)]).unique("code", keep="last", maintain_order=True)
    present = events.select(pl.col("code").unique().sort())
    return present.join(known, on="code", how="left").with_columns(
        pl.lit(None, dtype=pl.List(pl.String)).alias("parent_codes")
    )


def dataset_metadata(config: ImportConfig, splits: pl.DataFrame) -> dict[str, Any]:
    """dataset.json fields: name, version, ETL, and the split method, fractions, seed and counts."""
    from workbench import __version__

    counts = dict(splits.group_by("split").len().rows())
    return {
        "dataset_name": config.dataset_name,
        "dataset_version": config.dataset_version,
        "etl_name": "workbench.data.importers",
        "etl_version": __version__,
        "splits": {
            "method": "subjects ordered by SplitMix64(subject_id XOR SplitMix64(seed)), cut by largest-remainder counts"
            + (f", separately within strata of having {config.splits.stratify_codes}" if config.splits.stratify_codes else ""),
            "stratify_codes": config.splits.stratify_codes,
            "seed": config.splits.seed,
            "fractions": {n: getattr(config.splits, n) for n in SPLIT_NAMES},
            "subjects": {name: counts.get(name, 0) for name in SPLIT_NAMES},
        },
        **config.metadata,
    }


def import_dataset(config: ImportConfig, output: str | Path, overwrite: bool = False) -> MedsDataset:
    """Import every table in ``config`` and write the MEDS dataset at ``output`` (atomically)."""
    events, codes = import_tables(config)
    strata = split_strata(events, config.splits.stratify_codes) if config.splits.stratify_codes else None
    splits = assign_splits(events["subject_id"], config.splits, strata)
    return write_dataset(
        output,
        events,
        codes=codes,
        splits=splits,
        dataset=dataset_metadata(config, splits),
        overwrite=overwrite,
    )
