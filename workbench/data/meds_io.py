"""Reading and writing MEDS 0.4 datasets.

A dataset root holds ``data/**/*.parquet`` (events, each subject in exactly one shard, sorted
by time) and ``metadata/`` (``codes.parquet``, ``subject_splits.parquet``, ``dataset.json``).
Reading is lazy (polars ``scan_parquet``); writing goes to a temporary sibling directory that
is renamed into place only once complete, so a crash never leaves a half-written dataset.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import meds
import polars as pl

from workbench.errors import WorkbenchError
from workbench.files import replace_directory, temporary_directory_for

DATA_DIR = meds.data_subdirectory
CODES_FILE = meds.code_metadata_filepath
SPLITS_FILE = meds.subject_splits_filepath
DATASET_FILE = meds.dataset_metadata_filepath
SPLIT_NAMES = (meds.train_split, meds.tuning_split, meds.held_out_split)

#: polars dtypes of the MEDS data schema (meds.DataSchema), in column order.
EVENT_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "time": pl.Datetime("us"),
    "code": pl.String(),
    "numeric_value": pl.Float32(),
}
REQUIRED_COLUMNS = ("subject_id", "time", "code")
CODES_SCHEMA = {"code": pl.String(), "description": pl.String(), "parent_codes": pl.List(pl.String())}
SPLITS_SCHEMA = {"subject_id": pl.Int64(), "split": pl.String()}
INT64_MAX = 2**63 - 1  # the largest MEDS subject_id


@dataclass(frozen=True)
class MedsDataset:
    """A MEDS dataset on disk, opened lazily."""

    root: Path

    @property
    def data_files(self) -> list[Path]:
        """The event shards, sorted by path."""
        return sorted((self.root / DATA_DIR).rglob("*.parquet"))

    def events(self) -> pl.LazyFrame:
        """All events as one lazy frame with the MEDS columns (``numeric_value`` added if absent)."""
        files = self.data_files
        if not files:
            raise WorkbenchError(f"{self.root / DATA_DIR}: no parquet shards found (empty dataset)")
        for path in files:
            check_subject_ids_fit(path, read_schema(path))
        lf = pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore", schema=None)
        names = lf.collect_schema().names()
        if "numeric_value" not in names:
            lf = lf.with_columns(pl.lit(None, dtype=pl.Float32).alias("numeric_value"))
        # Validation accepts any integer / timestamp unit / string encoding; downstream reads one schema.
        return lf.select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()])

    def splits(self) -> pl.DataFrame:
        """``subject_id, split`` (empty if the dataset has no split file)."""
        path = self.root / SPLITS_FILE
        if not path.exists():
            return pl.DataFrame(schema=SPLITS_SCHEMA)
        schema = read_schema(path)
        missing = [c for c in SPLITS_SCHEMA if c not in schema]
        if missing:
            raise WorkbenchError(f"{path}: column {missing[0]} is missing (a split file has subject_id, split; "
                                 f"found {', '.join(schema) or 'no columns'})")
        splits = pl.read_parquet(path, columns=list(SPLITS_SCHEMA))
        for column, dtype in SPLITS_SCHEMA.items():
            try:
                splits = splits.with_columns(pl.col(column).cast(dtype, strict=True))
            except (pl.exceptions.PolarsError, OverflowError):
                bad = splits.filter(pl.col(column).cast(dtype, strict=False).is_null() & pl.col(column).is_not_null())
                example = f" (e.g. {bad[column][0]!r})" if bad.height else ""
                raise WorkbenchError(f"{path}: column {column} is {schema[column]}, not readable as {dtype}{example}") from None
        return splits

    def codes(self) -> pl.DataFrame:
        """Codes metadata: ``code, description, parent_codes`` (empty if absent)."""
        path = self.root / CODES_FILE
        if not path.exists():
            return pl.DataFrame(schema=CODES_SCHEMA)
        schema = read_schema(path)
        if "code" not in schema:
            raise WorkbenchError(f"{path}: column code is missing (codes metadata needs one row per code; "
                                 f"found {', '.join(schema) or 'no columns'})")
        return pl.read_parquet(path)

    def metadata(self) -> dict:
        """The parsed ``metadata/dataset.json`` (empty dict if absent)."""
        path = self.root / DATASET_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def events_with_split(self) -> pl.LazyFrame:
        """Events joined to their subject's split (``split`` null where a subject has none)."""
        return self.events().join(self.splits().lazy(), on="subject_id", how="left")


@dataclass(frozen=True)
class EventFrame:
    """MEDS events held in memory (a frame sent to a served model), read like a dataset.

    ``root`` only names the source in error messages; there are no splits or metadata.
    """

    frame: pl.DataFrame
    root: str = "<events frame>"

    def events(self) -> pl.LazyFrame:
        return to_event_frame(self.frame).lazy().select(list(EVENT_SCHEMA))

    def splits(self) -> pl.DataFrame:
        return pl.DataFrame(schema=SPLITS_SCHEMA)


def read_schema(path: Path) -> dict[str, pl.DataType]:
    """The column types of a parquet file, from its footer; a clear error for a file that is not parquet."""
    try:
        return dict(pl.read_parquet_schema(path))
    except Exception as exc:  # polars raises several error types for a non-parquet file
        raise WorkbenchError(f"{path}: not a readable parquet file ({exc})") from None


def subject_ids_above_int64(path: Path, schema: dict | None = None) -> tuple[int, int] | None:
    """(rows, first such id) of a shard's ``subject_id`` values too large for MEDS' int64 (only an
    unsigned 64-bit column can hold them); None when every id fits."""
    schema = read_schema(path) if schema is None else schema
    if schema.get("subject_id") != pl.UInt64:
        return None
    ids = pl.read_parquet(path, columns=["subject_id"])["subject_id"]
    over = ids.filter(ids > INT64_MAX)
    return (over.len(), int(over[0])) if over.len() else None


def check_subject_ids_fit(path: Path, schema: dict | None = None) -> None:
    """Raise a WorkbenchError naming the shard, the column and an example id that exceeds int64."""
    over = subject_ids_above_int64(path, schema)
    if over:
        raise WorkbenchError(
            f"{path}: column subject_id holds {over[0]:,} value(s) above the int64 maximum {INT64_MAX} "
            f"(MEDS subject ids are int64), e.g. subject_id {over[1]}"
        )


def open_dataset(root: str | os.PathLike) -> MedsDataset:
    """Open the MEDS dataset at ``root`` (checks only that the directory exists)."""
    path = Path(root)
    if not path.is_dir():
        raise WorkbenchError(f"{path}: not a directory (expected a MEDS dataset root with data/ and metadata/)")
    return MedsDataset(path)


def to_event_frame(df: pl.DataFrame) -> pl.DataFrame:
    """Cast a frame to the MEDS event schema, keeping ``text_value`` and extra columns."""
    if "numeric_value" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.Float32).alias("numeric_value"))
    extra = [c for c in df.columns if c not in EVENT_SCHEMA]
    return df.select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()] + extra)


def sort_events(df: pl.DataFrame) -> pl.DataFrame:
    """Sort as MEDS requires: by subject, then time with static (null-time) rows first."""
    return df.sort(["subject_id", "time"], nulls_last=False, maintain_order=True)


class ShardWriter:
    """Write a MEDS dataset shard by shard into a temp dir, renamed into place on success.

    Use as a context manager; on an exception the temp dir is removed and ``root`` is untouched.
    Callers guarantee that each subject appears in one shard only (pass whole subjects).
    """

    def __init__(self, root: str | os.PathLike, overwrite: bool = False):
        self.root = Path(root)
        if self.root.exists() and not overwrite:
            raise WorkbenchError(f"{self.root}: already exists (pass overwrite to replace it)")
        self.overwrite = overwrite
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_directory_for(self.root)
        (self.tmp / DATA_DIR).mkdir()
        (self.tmp / "metadata").mkdir()
        self.n_shards = 0
        self.n_events = 0

    def write_shard(self, events: pl.DataFrame, name: str | None = None) -> Path:
        """Write one shard (sorted, cast to the MEDS schema)."""
        name = name or f"{self.n_shards:05d}"
        path = self.tmp / DATA_DIR / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        sort_events(to_event_frame(events)).write_parquet(path, statistics=True)
        self.n_shards += 1
        self.n_events += events.height
        return path

    def write_metadata(
        self,
        *,
        codes: pl.DataFrame | None = None,
        splits: pl.DataFrame | None = None,
        dataset: dict | None = None,
    ) -> None:
        """Write codes.parquet, subject_splits.parquet and dataset.json (each optional)."""
        if codes is not None:
            for col, dtype in CODES_SCHEMA.items():
                if col not in codes.columns:
                    codes = codes.with_columns(pl.lit(None, dtype=dtype).alias(col))
            codes.sort("code").write_parquet(self.tmp / CODES_FILE)
        if splits is not None:
            splits.select(list(SPLITS_SCHEMA)).cast(SPLITS_SCHEMA).sort("subject_id").write_parquet(
                self.tmp / SPLITS_FILE
            )
        meta = {
            "meds_version": meds.__version__,
            "etl_name": "workbench",
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            **(dataset or {}),
        }
        (self.tmp / DATASET_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")

    def commit(self) -> MedsDataset:
        """Move the finished dataset into place (replacing an old one only now)."""
        if not (self.tmp / DATASET_FILE).exists():
            self.write_metadata()
        replace_directory(self.tmp, self.root)
        return MedsDataset(self.root)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self.tmp.exists():
            self.commit()


def write_dataset(
    root: str | os.PathLike,
    events: pl.DataFrame,
    *,
    codes: pl.DataFrame | None = None,
    splits: pl.DataFrame | None = None,
    dataset: dict | None = None,
    n_shards: int = 1,
    overwrite: bool = False,
) -> MedsDataset:
    """Write ``events`` as a MEDS dataset with ``n_shards`` shards (subjects hashed to shards)."""
    events = to_event_frame(events)
    with ShardWriter(root, overwrite=overwrite) as writer:
        if n_shards <= 1:
            writer.write_shard(events)
        else:
            shard = (pl.col("subject_id").hash(seed=0) % n_shards).alias("_shard")
            for (i,), part in events.with_columns(shard).partition_by("_shard", as_dict=True).items():
                writer.write_shard(part.drop("_shard"), name=f"{int(i):05d}")
        writer.write_metadata(codes=codes, splits=splits, dataset=dataset)
    return MedsDataset(Path(root))
