"""Tensorization: MEDS events + labels -> ``SequenceTensors`` [N, T, F] for sequence models.

The verbs follow scikit-learn: :func:`fit` learns a :class:`FeatureSpec` (selected codes, train
medians, normalization statistics) from the **train split only**; :func:`transform` applies a
saved spec to any data and never refits; :func:`fit_transform` does both in one pass.
:func:`fit_transform_chunked` and :func:`transform_chunked` do the same a chunk of subjects at a
time, for data whose tensor does not fit in memory (:mod:`workbench.shards` keeps it on disk).

Time axis (for every sample ``n`` with prediction time ``pt`` and bin width ``w``):

* only events with ``time <= pt`` are ever read (as-of semantics, also when fitting);
* step ``t`` (0..T-1) covers ``(end_t - w, end_t]`` with ``end_t = pt - (T-1-t) * w``, so the
  last step ends at the prediction time, inclusive;
* events older than the window are not binned, but the latest value of each numeric code among
  them is carried into the window by the forward fill (so a lab drawn just before the window
  is not lost).

Channels, in this order (``feature_names``):

1. ``{code}/{agg}`` for each numeric code and aggregation (last, mean, min, max over the bin),
   forward-filled within the sample, then imputed with the train median;
2. ``{code}/missing`` (optional): 1 where the code has no value *in this bin* (carried or imputed);
3. ``{code}/time_since`` (optional): days from the code's latest value to the step's end time
   (train median where the code was never observed);
4. ``{code}/count``: number of events of each count code in the bin (0 where none);
   with ``add_history`` (default) also ``{code}/ever`` (1 once the code occurred, even long before
   the window), ``{code}/days_since_first`` and ``{code}/days_since_last`` (days from its first and
   latest occurrence to the step's end; the train median where it never occurred), so a
   diagnosis from years ago still reaches the model;
5. ``static/age_years`` (age at the prediction time, from ``MEDS_BIRTH``) and ``static/{code}``
   (1 if the subject has that static, null-time code), repeated on every non-padded step;
6. ``step/observed``: 1 if the bin holds any event of a selected code.

Continuous channels (1, 3, 4, age) are standardized with the train mean and (population)
standard deviation; indicator channels (2, static codes, observed) are left as 0/1 (their stored
mean is 0 and std 1, so :meth:`FeatureSpec.denormalize` is uniform).

Padding: steps before the sample's first event of a selected code (the window is left-padded
when the history is shorter than T bins) contain **exactly 0.0 in every channel** after
normalization, and ``observed`` is False there. Steps after the first event without events of
their own are *not* padding: they hold forward-filled values and ``step/observed`` = 0.

Codes that the spec does not know are ignored (a warning lists them); they never add a column,
change a value, or mark a step observed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import meds
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workbench.data.meds_io import SPLITS_FILE, EventFrame, MedsDataset, open_dataset
from workbench.config import check_regexes
from workbench.errors import WorkbenchError
from workbench.config import load_yaml_config, validated, validation_message
from workbench.files import replace_directory, temporary_directory_for, write_text_atomic

Agg = Literal["last", "mean", "min", "max"]
US_PER_DAY = 86_400_000_000
US_PER_YEAR = 365.25 * US_PER_DAY
_UNIT_US = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "min": 60_000_000, "h": 3_600_000_000,
            "d": US_PER_DAY, "w": 7 * US_PER_DAY}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|min|m|h|d|w)\s*$")
OBSERVED_FEATURE = "step/observed"
#: Per count code with ``add_history``: occurred yet, days since its first and its latest occurrence.
HISTORY_CHANNELS = ("ever", "days_since_first", "days_since_last")
AGE_FEATURE = "static/age_years"
TENSORS_FILE = "tensors.npz"
SPEC_FILE = "feature_spec.json"
MANIFEST_FILE = "manifest.json"


class UnseenCodesWarning(UserWarning):
    """Data holds codes the FeatureSpec never saw when fitting; they are ignored."""


def parse_duration_us(text: str) -> int:
    """``"90d"``, ``"1h"``, ``"30min"``, ``"2w"`` -> microseconds (``m`` is minutes)."""
    match = _DURATION_RE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration like '1h', '30min', '90d' or '2w' (units: {', '.join(_UNIT_US)})")
    return int(round(float(match.group(1)) * _UNIT_US[match.group(2)]))


# --------------------------------------------------------------------------------------- config


class FeatureConfig(BaseModel):
    """How events become a [T, F] sequence per sample (every field has a default)."""

    model_config = ConfigDict(extra="forbid")

    bin_width: str = Field("1d", description="Width of one time step, e.g. '1h' (ICU), '90d' (PBC); must be > 0.")
    n_steps: int = Field(48, ge=1, description="T: number of bins before (and ending at) the prediction time; >= 1.")
    numeric_aggs: list[Agg] = Field(
        default_factory=lambda: ["last"], min_length=1,
        description="Per-bin aggregations of numeric codes, any of last, mean, min, max.",
    )
    codes: list[str] | None = Field(
        None, description="Explicit code list (overrides min_code_frequency and exclude_code_patterns); None selects by frequency."
    )
    min_code_frequency: float = Field(
        0.01, ge=0.0,
        description="Keep codes seen (as of prediction time) in at least this many train subjects: a fraction if < 1, a count if >= 1.",
    )
    count_code_patterns: list[str] = Field(
        default_factory=lambda: [r"^DX//", r"^MED//", r"^PROC//", r"^VISIT"],
        description="Regexes of codes that are always counted per bin (diagnoses, medications), even with values.",
    )
    numeric_min_fraction: float = Field(
        0.5, gt=0.0, le=1.0,
        description="Other codes are numeric when at least this share of their train events has a numeric_value, else counted.",
    )
    exclude_code_patterns: list[str] = Field(
        default_factory=lambda: [r"^MEDS_BIRTH$", r"^MEDS_DEATH$", r"^END_OF_FOLLOWUP$"],
        description="Regexes of codes never used as features (birth feeds the age feature; death/end are outcomes/markers).",
    )
    add_missing_indicators: bool = Field(False, description="Add '{code}/missing' (no value in this bin) per numeric code.")
    add_time_since_last: bool = Field(False, description="Add '{code}/time_since' (days since the latest value) per numeric code.")
    add_history: bool = Field(
        True,
        description="Add, per count code, '{code}/ever' (occurred at or before the step's end, however long ago), "
        "'{code}/days_since_first' and '{code}/days_since_last': what lies before the window reaches the model.",
    )
    static_features: bool = Field(True, description="Add static/age_years and static/{code} for static (null-time) codes.")
    birth_code: str = Field(meds.birth_code, description="Code whose time is the birth date (for static/age_years).")

    @field_validator("bin_width")
    @classmethod
    def _positive_width(cls, value: str) -> str:
        if parse_duration_us(value) <= 0:
            raise ValueError(f"must be > 0, got {value!r}")
        return value

    @field_validator("numeric_aggs")
    @classmethod
    def _unique_aggs(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"aggregations must be unique, got {value}")
        return value

    _valid_regexes = field_validator("count_code_patterns", "exclude_code_patterns")(check_regexes)

    @property
    def bin_width_us(self) -> int:
        """The bin width in microseconds."""
        return parse_duration_us(self.bin_width)

    @classmethod
    def from_dict(cls, data: dict | None, source: str = "feature config") -> "FeatureConfig":
        """Validate a mapping; errors become a WorkbenchError naming each bad field."""
        return validated(cls, data or {}, source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "FeatureConfig":
        """Load from a YAML file (a mapping of field names; a top-level ``features:`` key is accepted)."""
        return load_yaml_config(cls, path, unwrap="features")


# ----------------------------------------------------------------------------------------- spec


class FitInfo(BaseModel):
    """What a FeatureSpec was fitted on."""

    data_fingerprint: str = Field("", description="Hash of the dataset's shard names and sizes and its split file.")
    n_train_subjects: int = Field(0, description="Train subjects with at least one label.")
    n_train_samples: int = Field(0, description="Train labels (samples) used for the statistics.")


class FeatureSpec(BaseModel):
    """A FeatureConfig plus everything learned from the train split (JSON round trip)."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(1, description="Spec format version.")
    config: FeatureConfig = Field(default_factory=FeatureConfig, description="The configuration it was fitted with.")
    numeric_codes: list[str] = Field(default_factory=list, description="Codes aggregated as values per bin.")
    count_codes: list[str] = Field(default_factory=list, description="Codes counted per bin.")
    static_codes: list[str] = Field(default_factory=list, description="Static (null-time) codes used as 0/1 features.")
    include_age: bool = Field(False, description="Whether static/age_years is a channel.")
    seen_codes: list[str] = Field(default_factory=list, description="Every code in the train data (as of prediction time).")
    feature_names: list[str] = Field(default_factory=list, description="Channel names, in tensor order.")
    median: list[float] = Field(default_factory=list, description="Train median per channel (imputation; 0 for non-imputed).")
    mean: list[float] = Field(default_factory=list, description="Normalization mean per channel (0 for indicators).")
    std: list[float] = Field(default_factory=list, description="Normalization std per channel (1 for indicators).")
    fitted_on: FitInfo = Field(default_factory=FitInfo, description="Data the statistics came from.")

    @model_validator(mode="after")
    def _aligned(self) -> "FeatureSpec":
        expected = _feature_names(self.config, self.numeric_codes, self.count_codes, self.static_codes, self.include_age)
        if self.feature_names != expected:
            raise ValueError("feature_names do not match the codes and config")
        for name in ("median", "mean", "std"):
            if len(getattr(self, name)) != len(self.feature_names):
                raise ValueError(f"{name} has {len(getattr(self, name))} values for {len(self.feature_names)} features")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON (atomically: temp file, then rename)."""
        return write_text_atomic(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureSpec":
        """Read a spec written by :meth:`save` (a clear error if the file is missing or invalid)."""
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text())
        except OSError as exc:
            raise WorkbenchError(f"{path}: cannot read feature spec: {exc}") from None
        except ValidationError as exc:
            raise WorkbenchError(validation_message(f"{path}: invalid feature spec", exc)) from None

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def normalized_mask(self) -> np.ndarray:
        """Boolean [F]: channels that are standardized (continuous), as opposed to 0/1 indicators."""
        return np.array([_is_continuous(n) for n in self.feature_names], dtype=bool)

    def denormalize(self, X: np.ndarray) -> np.ndarray:
        """Raw feature values (float64) from normalized ones; the last axis is the feature axis.

        Padded steps (all zeros) come back as the channel means: mask them with ``observed``-based
        padding if raw values there matter.
        """
        X = np.asarray(X, dtype=np.float64)
        if X.shape[-1] != self.n_features:
            raise WorkbenchError(f"denormalize: last axis has {X.shape[-1]} features, spec has {self.n_features}")
        return X * np.asarray(self.std) + np.asarray(self.mean)


def _is_continuous(name: str) -> bool:
    """Channels standardized with mean/std (the rest are 0/1 indicators)."""
    if name == AGE_FEATURE:
        return True
    return name.rsplit("/", 1)[-1] in ("last", "mean", "min", "max", "count", "time_since", "days_since_first", "days_since_last")


def _is_imputed(name: str) -> bool:
    """Channels whose NaNs (never observed) get the train median."""
    return name == AGE_FEATURE or name.rsplit("/", 1)[-1] in ("last", "mean", "min", "max", "time_since",
                                                               "days_since_first", "days_since_last")


def _feature_names(
    config: FeatureConfig, numeric: Sequence[str], count: Sequence[str], static: Sequence[str], include_age: bool
) -> list[str]:
    """Channel names in tensor order (see the module docstring)."""
    names = [f"{c}/{a}" for c in numeric for a in config.numeric_aggs]
    if config.add_missing_indicators:
        names += [f"{c}/missing" for c in numeric]
    if config.add_time_since_last:
        names += [f"{c}/time_since" for c in numeric]
    names += [f"{c}/count" for c in count]
    if config.add_history:
        names += [f"{c}/{h}" for h in HISTORY_CHANNELS for c in count]
    if include_age:
        names.append(AGE_FEATURE)
    names += [f"static/{c}" for c in static]
    names.append(OBSERVED_FEATURE)
    return names


# -------------------------------------------------------------------------------------- tensors


@dataclass
class SequenceTensors:
    """Model-ready sequences: ``X`` [N, T, F] float32 plus per-sample and per-step metadata."""

    X: np.ndarray
    y: np.ndarray
    subject_id: np.ndarray
    prediction_time: np.ndarray
    step_end_time: np.ndarray
    observed: np.ndarray
    split: np.ndarray
    feature_names: list[str]
    spec: FeatureSpec = field(repr=False)

    def __post_init__(self) -> None:
        n, t, f = self.X.shape
        if len(self.feature_names) != f:
            raise ValueError(f"{len(self.feature_names)} feature names for {f} features")
        for name, shape in (("y", (n,)), ("subject_id", (n,)), ("prediction_time", (n,)), ("split", (n,)),
                            ("step_end_time", (n, t)), ("observed", (n, t))):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {shape}")

    @property
    def padded(self) -> np.ndarray:
        """Bool [N, T]: left padding, i.e. steps with ``observed`` False and every channel exactly 0.

        (A real unobserved step holds carried-forward values, the static features and the
        imputed medians, so it is never all zeros in practice.)
        """
        return ~self.observed & np.all(self.X == 0, axis=2)

    def __len__(self) -> int:
        return self.X.shape[0]

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "X": self.X, "y": self.y, "subject_id": self.subject_id,
            "prediction_time": self.prediction_time, "step_end_time": self.step_end_time,
            "observed": self.observed, "split": self.split.astype(str),
        }

    def content_hash(self) -> str:
        """SHA-256 over every array (dtype, shape, bytes), the feature names and the spec."""
        h = hashlib.sha256()
        for name, arr in self._arrays().items():
            arr = np.ascontiguousarray(arr)
            h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
            h.update(arr.tobytes() if arr.dtype.kind != "U" else "\x00".join(arr.tolist()).encode())
        h.update(json.dumps(self.feature_names).encode())
        h.update(self.spec.model_dump_json().encode())
        return h.hexdigest()

    def save(self, directory: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write ``tensors.npz``, ``feature_spec.json`` and ``manifest.json`` (with the content hash).

        Written into a temp sibling directory that replaces ``directory`` only when complete.
        """
        directory = Path(directory)
        if directory.exists() and not overwrite:
            raise WorkbenchError(f"{directory}: already exists")
        tmp = temporary_directory_for(directory)
        try:
            np.savez(tmp / TENSORS_FILE, **self._arrays())
            self.spec.save(tmp / SPEC_FILE)
            manifest = {"content_hash": self.content_hash(), "shape": list(self.X.shape),
                        "feature_names": self.feature_names, "splits": split_counts(self.split)}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            replace_directory(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, verify: bool = True) -> "SequenceTensors":
        """Read what :meth:`save` wrote; ``verify`` recomputes the content hash and compares."""
        directory = Path(directory)
        for name in (TENSORS_FILE, SPEC_FILE, MANIFEST_FILE):
            if not (directory / name).exists():
                raise WorkbenchError(f"{directory / name}: missing (not a saved SequenceTensors directory)")
        spec = FeatureSpec.load(directory / SPEC_FILE)
        with np.load(directory / TENSORS_FILE, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        tensors = cls(**arrays, feature_names=list(spec.feature_names), spec=spec)
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        if verify and tensors.content_hash() != manifest.get("content_hash"):
            raise WorkbenchError(f"{directory}: content hash mismatch (files changed or corrupted)")
        return tensors

    def subset(self, index) -> "SequenceTensors":
        """The samples selected by a boolean mask or integer indices."""
        index = np.asarray(index)
        return SequenceTensors(
            X=self.X[index], y=self.y[index], subject_id=self.subject_id[index],
            prediction_time=self.prediction_time[index], step_end_time=self.step_end_time[index],
            observed=self.observed[index], split=self.split[index],
            feature_names=list(self.feature_names), spec=self.spec,
        )

    def by_split(self, name: str) -> "SequenceTensors":
        """The samples whose subject is in split ``name`` (e.g. 'train', 'tuning', 'held_out')."""
        return self.subset(self.split == name)


def split_counts(split: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(split.astype(str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts)}


# --------------------------------------------------------------------------------------- inputs


def as_dataset(dataset: MedsDataset | EventFrame | str | os.PathLike) -> MedsDataset | EventFrame:
    return dataset if isinstance(dataset, (MedsDataset, EventFrame)) else open_dataset(dataset)


def load_labels(labels: pl.DataFrame | str | os.PathLike) -> pl.DataFrame:
    """Labels as ``subject_id Int64, prediction_time Datetime(us), boolean_value Boolean`` (checked by
    the project's one labels reader, :func:`workbench.labels.read_labels`)."""
    from workbench.labels import read_labels

    return read_labels(labels)


def _subject_splits(dataset: MedsDataset) -> pl.DataFrame:
    """``subject_id, split`` with each subject in at most one split (else a leakage error)."""
    splits = dataset.splits()
    dup = splits.group_by("subject_id").agg(pl.col("split").n_unique().alias("n"), pl.len().alias("rows"))
    dup = dup.filter(pl.col("rows") > 1)
    if dup.height:
        ids = dup["subject_id"].sort().head(10).to_list()
        raise WorkbenchError(
            f"{dataset.root / SPLITS_FILE}: {dup.height} subject(s) listed more than once (e.g. {ids}); "
            "each subject must be in exactly one split"
        )
    return splits


def _samples(labels: pl.DataFrame, splits: pl.DataFrame) -> pl.DataFrame:
    """Labels with a sample index and the subject's split ('' where the subject has none)."""
    return (
        labels.with_row_index("_sample")
        .with_columns(pl.col("_sample").cast(pl.Int64))
        .join(splits, on="subject_id", how="left", maintain_order="left")
        .with_columns(pl.col("split").fill_null(""))
    )


def data_fingerprint(dataset: MedsDataset) -> str:
    """Cheap identity of a dataset: shard paths and sizes plus the split file's bytes."""
    h = hashlib.sha256()
    for path in dataset.data_files:
        h.update(f"{path.relative_to(dataset.root)}:{path.stat().st_size};".encode())
    splits = dataset.root / SPLITS_FILE
    if splits.exists():
        h.update(splits.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ one read of the events


@dataclass
class _Events:
    """Everything tensorization needs from the events, read in one streaming pass.

    ``bins``: one row per (sample, step, code) over **every** code as of the prediction time
    (step -1 collects everything older than the window), with ``n`` events, ``n_values`` events
    with a value and the value aggregates; ``static``: (subject, code) of null-time events;
    ``age``: (sample, age in years). Code selection (fit) and the tensor (transform) both derive
    from these, so fit_transform reads the events once.
    """

    bins: pl.DataFrame
    static: pl.DataFrame
    age: pl.DataFrame


def _bins_query(events: pl.LazyFrame, samples: pl.LazyFrame, config: FeatureConfig) -> pl.LazyFrame:
    """One row per (sample, step, code) with the bin's aggregates; step -1 = before the window.

    ``last`` is the value with the greatest (time, value): a ``max_by`` on that key gives it
    without sorting, does not trust file order (correct for unsorted shards, free for the
    streaming engine to reorder), and breaks same-time ties deterministically. Codes are a
    Categorical so the group_by hashes integers, not strings.
    """
    T, width = config.n_steps, config.bin_width_us
    value = pl.col("numeric_value")
    has_value = value.is_not_null()
    elapsed = (pl.col("prediction_time") - pl.col("time")).dt.total_microseconds()
    step = (pl.lit(T - 1, dtype=pl.Int64) - elapsed // width).clip(lower_bound=-1).cast(pl.Int32)
    aggs = [
        pl.len().alias("n"),
        value.count().alias("n_values"),
        value.max_by(pl.when(has_value).then(pl.struct("time", "numeric_value"))).alias("last"),
    ]
    aggs += [getattr(value, a)().alias(a) for a in config.numeric_aggs if a != "last"]
    if config.add_time_since_last:
        aggs.append(pl.when(has_value).then(pl.col("time")).max().dt.epoch("us").alias("tmax"))
    if config.add_history:
        aggs += [pl.col("time").min().dt.epoch("us").alias("t_first"), pl.col("time").max().dt.epoch("us").alias("t_last")]
    return (
        events.select("subject_id", "time", "code", "numeric_value")
        .filter(pl.col("time").is_not_null())
        .join(samples.select("_sample", "subject_id", "prediction_time"), on="subject_id", how="inner")
        .filter(pl.col("time") <= pl.col("prediction_time"))
        .group_by("_sample", step.alias("_step"), pl.col("code").cast(pl.Categorical))
        .agg(aggs)
    )


def static_query(events: pl.LazyFrame, samples: pl.LazyFrame) -> pl.LazyFrame:
    """(subject, code) for each static (null-time) event of a labelled subject."""
    return (
        events.filter(pl.col("time").is_null())
        .select("subject_id", "code")
        .join(samples.select("subject_id").unique(), on="subject_id", how="semi")
        .unique()
    )


def age_query(events: pl.LazyFrame, samples: pl.LazyFrame, birth_code: str) -> pl.LazyFrame:
    """(sample, age in years at the prediction time) for samples whose subject was born by then."""
    birth = events.filter((pl.col("code") == birth_code) & pl.col("time").is_not_null()).select("subject_id", "time")
    age = (pl.col("prediction_time") - pl.col("time").min()).dt.total_microseconds() / US_PER_YEAR
    return (
        birth.join(samples.select("_sample", "subject_id", "prediction_time"), on="subject_id", how="inner")
        .filter(pl.col("time") <= pl.col("prediction_time"))  # as of, like every other feature
        .group_by("_sample")
        .agg(age.first().alias("age"))
    )


def collect_queries(*queries: pl.LazyFrame) -> list[pl.DataFrame]:
    """Run all queries in one go on the streaming engine (bounded memory for large datasets)."""
    try:
        return pl.collect_all(list(queries), engine="streaming")
    except pl.exceptions.PolarsError as exc:
        raise WorkbenchError(f"reading events failed: {exc}") from None


def _read_events(dataset: MedsDataset, samples: pl.DataFrame, config: FeatureConfig) -> _Events:
    """The single pass over the events (the labels were checked against them in prepare_samples)."""
    events = dataset.events()
    lazy = samples.lazy()
    bins, static, age = collect_queries(
        _bins_query(events, lazy, config), static_query(events, lazy), age_query(events, lazy, config.birth_code),
    )
    return _Events(bins, static, age)


# ------------------------------------------------------------------------------ code selection


def _code_stats(read: _Events, train: pl.DataFrame) -> pl.DataFrame:
    """Per code over train subjects' events as of their latest prediction time: subjects, timed
    events and timed events with a value (nothing after a prediction time can influence the fit).

    A subject's latest sample sees exactly the events up to its cutoff (step -1 holds the older
    ones), so summing that sample's bins counts each event once even with several samples.
    Grouping stays on the Categorical code; only the small per-code result becomes strings.
    """
    latest = (
        train.filter(pl.col("prediction_time") == pl.col("prediction_time").max().over("subject_id"))
        .group_by("subject_id").agg(pl.col("_sample").min())
    )
    is_latest = np.zeros(int(read.bins["_sample"].max() or 0) + 1, dtype=bool)
    is_latest[latest["_sample"].to_numpy()[latest["_sample"].to_numpy() < len(is_latest)]] = True
    timed = read.bins.filter(pl.Series(is_latest[read.bins["_sample"].to_numpy()]))  # a mask, not a join
    per_code = timed.group_by("code").agg(
        pl.col("_sample").n_unique().alias("n_timed_subjects"),  # one latest sample per subject
        pl.col("n").sum().alias("n_timed"), pl.col("n_values").sum().alias("n_numeric"),
    ).with_columns(pl.col("code").cast(pl.String))
    # static codes: their subjects, less those already counted through a timed event of the code
    static = read.static.join(latest, on="subject_id", how="inner")
    overlap = sorted(set(static["code"].to_list()) & set(per_code["code"].to_list()))  # usually none
    both = pl.DataFrame(schema={"_sample": pl.Int64, "code": pl.String})
    if overlap:
        both = (
            timed.select("_sample", pl.col("code").cast(pl.String))
            .filter(pl.col("code").is_in(overlap)).unique()
        )
    static_only = (
        static.join(both, on=["_sample", "code"], how="anti").group_by("code").agg(pl.len().alias("n_static_subjects"))
    )
    return (
        per_code.join(static_only, on="code", how="full", coalesce=True)
        .select(
            "code",
            (pl.col("n_timed_subjects").fill_null(0) + pl.col("n_static_subjects").fill_null(0)).cast(pl.Int64)
            .alias("n_subjects"),
            pl.col("n_timed", "n_numeric").fill_null(0).cast(pl.Int64),
        )
        .sort("code")
    )


def _matches_any(code: pl.Expr, patterns: Sequence[str]) -> pl.Expr:
    expr = pl.lit(False)
    for pattern in patterns:
        expr = expr | code.str.contains(pattern)
    return expr


def _select_codes(stats: pl.DataFrame, config: FeatureConfig, n_train_subjects: int) -> dict[str, list[str]]:
    """Split the chosen codes into numeric, count and static (sorted, deterministic)."""
    code = pl.col("code")
    if config.codes is not None:
        absent = sorted(set(config.codes) - set(stats["code"].to_list()))
        if absent:
            warnings.warn(f"feature codes never seen in the train split (as of prediction time), dropped: {absent}",
                          UnseenCodesWarning, stacklevel=3)
        chosen = stats.filter(code.is_in(config.codes))
    else:
        threshold = config.min_code_frequency
        if threshold < 1:
            threshold = threshold * n_train_subjects
        chosen = stats.filter((pl.col("n_subjects") >= threshold) & ~_matches_any(code, config.exclude_code_patterns))
    chosen = chosen.filter(code != config.birth_code)
    kind = (
        pl.when(pl.col("n_timed") == 0).then(pl.lit("static"))
        .when(_matches_any(code, config.count_code_patterns)).then(pl.lit("count"))
        .when(pl.col("n_numeric") >= config.numeric_min_fraction * pl.col("n_timed")).then(pl.lit("numeric"))
        .otherwise(pl.lit("count"))
    )
    chosen = chosen.with_columns(kind.alias("kind"))
    pick = {k: sorted(chosen.filter(pl.col("kind") == k)["code"].to_list()) for k in ("numeric", "count", "static")}
    if not config.static_features:
        pick["static"] = []
    return pick


@dataclass
class _Layout:
    """Which codes feed which channels; built from a spec, or from a selection during fit."""

    config: FeatureConfig
    numeric: list[str]
    count: list[str]
    static: list[str]
    include_age: bool

    @property
    def dynamic(self) -> list[str]:
        return self.numeric + self.count

    @property
    def feature_names(self) -> list[str]:
        return _feature_names(self.config, self.numeric, self.count, self.static, self.include_age)


def _select(read: _Events, samples: pl.DataFrame, config: FeatureConfig) -> tuple[_Layout, list[str], pl.DataFrame]:
    """Choose the codes from the train split as of prediction time."""
    train = samples.filter(pl.col("split") == "train")
    if train.height == 0:
        raise WorkbenchError(
            "labels: no label belongs to a train-split subject (metadata/subject_splits.parquet); "
            "statistics are fitted on the train split only"
        )
    stats = _code_stats(read, train)
    return _layout_from_stats(stats, config, train["subject_id"].n_unique()), stats["code"].to_list(), train


def _layout_from_stats(stats: pl.DataFrame, config: FeatureConfig, n_train_subjects: int) -> _Layout:
    """The channels chosen from per-code train statistics (:func:`_code_stats`, or its sum over
    chunks of subjects: every column is a count over disjoint subjects, so chunks add up)."""
    pick = _select_codes(stats, config, n_train_subjects)
    include_age = config.static_features and bool(
        stats.filter((pl.col("code") == config.birth_code) & (pl.col("n_timed") > 0)).height
    )
    return _Layout(config, pick["numeric"], pick["count"], pick["static"], include_age)


def _unseen_codes(read: _Events, seen: list[str]) -> list[str]:
    """Codes in the events read (as of a prediction time, or static) that the spec never saw."""
    codes = pl.concat([read.bins.select(pl.col("code").unique().cast(pl.String)), read.static.select("code").unique()])
    return sorted(set(codes["code"].to_list()) - set(seen))


# ------------------------------------------------------------------------------ dense assembly


@dataclass
class _Sparse:
    """The layout's bins as numpy arrays, sorted by (sample, code, slot); ``code`` indexes
    ``layout.dynamic`` (numeric codes first) and slot 0 holds what precedes the window."""

    sample: np.ndarray
    slot: np.ndarray
    code: np.ndarray
    columns: pl.DataFrame  # n, the value aggregates (and tmax), in the same order


def _layout_sparse(bins: pl.DataFrame, layout: _Layout) -> _Sparse:
    """Map the Categorical codes to layout indices through their physical ids (no string work
    on the big frame), drop other codes and value-less numeric bins, and sort once.

    A numeric code's bin without a value carries nothing to aggregate or carry forward.
    """
    T, n_numeric = layout.config.n_steps, len(layout.numeric)
    index = {code: i for i, code in enumerate(layout.dynamic)}
    categories = bins.select(pl.col("code").unique())["code"]
    ids = categories.to_physical().to_numpy().astype(np.int64)
    lookup = np.full(int(ids.max()) + 1 if len(ids) else 1, -1, dtype=np.int64)
    lookup[ids] = [index.get(name, -1) for name in categories.cast(pl.String).to_list()]
    code = lookup[bins["code"].to_physical().to_numpy()]
    keep = (code >= 0) & ((code >= n_numeric) | (bins["n_values"].to_numpy() > 0))
    sample, slot, code = bins["_sample"].to_numpy()[keep], bins["_step"].to_numpy()[keep] + 1, code[keep]
    key = (sample * max(len(index), 1) + code) * (T + 1) + slot
    order = np.argsort(key)  # keys are unique, so any sort gives this order (numpy's is vectorized)
    columns = bins.select(pl.exclude("_sample", "_step", "code")).filter(pl.Series(keep))[order]
    return _Sparse(sample[order], slot[order].astype(np.int64), code[order], columns)


def _forward_filled(pos: np.ndarray, values: np.ndarray, row_length: int, total: int) -> np.ndarray:
    """Dense flat array of ``total`` slots (rows of ``row_length``) where each value at sorted
    flat position ``pos`` is repeated up to the next value of the same row or the row's end,
    and NaN before a row's first value: a forward fill written in a single ``np.repeat``.
    """
    row_end = (pos // row_length + 1) * row_length
    end = np.minimum(np.append(pos[1:], total), row_end)
    gap = pos - np.concatenate(([0], end[:-1]))  # empty slots before each value (prefix / empty rows)
    # interleave [gap_0, run_0, gap_1, run_1, ..., final gap] with values [NaN, v_0, NaN, v_1, ..., NaN]
    lengths = np.empty(2 * len(pos) + 1, dtype=np.int64)
    lengths[0:-1:2], lengths[1::2], lengths[-1] = gap, end - pos, total - (end[-1] if len(pos) else 0)
    seq = np.full(2 * len(pos) + 1, np.nan, dtype=values.dtype)
    seq[1::2] = values
    return np.repeat(seq, lengths)


def _raw_tensor(bins: pl.DataFrame, static: pl.DataFrame, age: pl.DataFrame, samples: pl.DataFrame,
                layout: _Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw X [N, T, F] (NaN where nothing is known yet), observed [N, T] and padded [N, T].

    Filled a block of samples at a time: each block of X and its temporaries stay small (in
    cache, and on heap pages that are reused instead of freshly faulted in).
    """
    N, T = samples.height, layout.config.n_steps
    X = np.empty((N, T, len(layout.feature_names)), dtype=np.float32)
    sp = _layout_sparse(bins, layout)
    any_event = np.zeros((N, T + 1), dtype=bool)
    any_event[sp.sample, sp.slot] = True
    observed = any_event[:, 1:].copy()
    padded = ~np.logical_or.accumulate(any_event, axis=1)[:, 1:]
    per_sample = _per_sample_channels(static, age, samples, layout)
    chunk = max(64, (8 << 20) // max(1, X[0].nbytes))
    bounds = np.searchsorted(sp.sample, np.arange(0, N + chunk, chunk))
    needs_end = layout.config.add_time_since_last or layout.config.add_history
    step_end = _step_end_us(samples, layout.config) if needs_end else None
    for k, i0 in enumerate(range(0, N, chunk)):  # a loop over blocks of samples, not over rows
        i1, rows = min(i0 + chunk, N), slice(bounds[k], bounds[k + 1])
        block = _Sparse(sp.sample[rows] - i0, sp.slot[rows], sp.code[rows], sp.columns[rows])
        _fill_block(X[i0:i1], block, layout, None if step_end is None else step_end[i0:i1])
        X[i0:i1, :, -1 - per_sample.shape[1]:-1] = per_sample[i0:i1, None, :]
        X[i0:i1, :, -1] = observed[i0:i1]
    return X, observed, padded


def _fill_block(X: np.ndarray, sp: _Sparse, layout: _Layout, step_end: np.ndarray | None) -> None:
    """Write the dynamic channels (numeric aggregates, missing, time_since, counts) of a block."""
    config = layout.config
    n, T = X.shape[0], config.n_steps
    C, A = len(layout.numeric), len(config.numeric_aggs)
    num = sp.code < C
    slot, code = sp.slot[num], sp.code[num]
    pos = (sp.sample[num] * C + code) * (T + 1) + slot  # flat index into the [n, C, T+1] block
    in_window = slot > 0
    numeric = sp.columns.filter(pl.Series(num))
    for a, agg in enumerate(config.numeric_aggs):
        values = numeric[agg].to_numpy().astype(np.float32, copy=False)
        if agg != "last":  # before the window only the latest value matters: it is carried forward
            values = np.where(in_window, values, numeric["last"].to_numpy())
        dense = _forward_filled(pos, values, T + 1, n * C * (T + 1)).reshape(n, C, T + 1)
        X[:, :, a:C * A:A] = dense[:, :, 1:].transpose(0, 2, 1)
    f = C * A
    if config.add_missing_indicators:
        X[:, :, f:f + C] = 1.0
        X[sp.sample[num][in_window], slot[in_window] - 1, f + code[in_window]] = 0.0
        f += C
    if config.add_time_since_last:
        tmax = numeric["tmax"].to_numpy().astype(np.float64)
        last_time = _forward_filled(pos, tmax, T + 1, n * C * (T + 1)).reshape(n, C, T + 1)[:, :, 1:]
        X[:, :, f:f + C] = ((step_end[:, None, :] - last_time) / US_PER_DAY).transpose(0, 2, 1)
        f += C
    K = len(layout.count)
    X[:, :, f:f + K] = 0.0
    cnt = ~num & (sp.slot > 0)
    X[sp.sample[cnt], sp.slot[cnt] - 1, f + sp.code[cnt] - C] = sp.columns["n"].to_numpy()[cnt]
    f += K
    if config.add_history and K:
        counted = ~num  # every bin of a count code, the one before the window (slot 0) included
        cpos = (sp.sample[counted] * K + sp.code[counted] - C) * (T + 1) + sp.slot[counted]
        columns = sp.columns.filter(pl.Series(counted))
        # the first occurrence: only each (sample, code)'s earliest bin carries it forward
        first_bin = np.ones(len(cpos), dtype=bool)
        first_bin[1:] = (cpos[1:] // (T + 1)) != (cpos[:-1] // (T + 1))
        t_first = _forward_filled(cpos[first_bin], columns["t_first"].to_numpy().astype(np.float64)[first_bin],
                                  T + 1, n * K * (T + 1)).reshape(n, K, T + 1)[:, :, 1:]
        t_last = _forward_filled(cpos, columns["t_last"].to_numpy().astype(np.float64), T + 1,
                                 n * K * (T + 1)).reshape(n, K, T + 1)[:, :, 1:]
        X[:, :, f:f + K] = (~np.isnan(t_first)).transpose(0, 2, 1)
        X[:, :, f + K:f + 2 * K] = ((step_end[:, None, :] - t_first) / US_PER_DAY).transpose(0, 2, 1)
        X[:, :, f + 2 * K:f + 3 * K] = ((step_end[:, None, :] - t_last) / US_PER_DAY).transpose(0, 2, 1)


def _per_sample_channels(static: pl.DataFrame, age: pl.DataFrame, samples: pl.DataFrame,
                         layout: _Layout) -> np.ndarray:
    """[N, age + static codes]: the channels that repeat on every step of a sample."""
    ages = np.full((samples.height, int(layout.include_age)), np.nan, dtype=np.float32)
    if layout.include_age:
        ages[age["_sample"].to_numpy(), 0] = age["age"].to_numpy()
    return np.concatenate([ages, _static_block(static, samples, layout.static)], axis=1)


def _static_block(static: pl.DataFrame, samples: pl.DataFrame, codes: list[str]) -> np.ndarray:
    """[N, S] 0/1: whether each sample's subject has each static code."""
    block = np.zeros((samples.height, len(codes)), dtype=np.float32)
    if codes:
        pairs = (
            static.filter(pl.col("code").is_in(codes))
            .join(samples.select("_sample", "subject_id"), on="subject_id", how="inner")
            .select("_sample", pl.col("code").cast(pl.Enum(codes)).to_physical())
        )
        block[pairs["_sample"].to_numpy(), pairs["code"].to_numpy()] = 1.0
    return block


def _step_end_us(samples: pl.DataFrame, config: FeatureConfig) -> np.ndarray:
    """[N, T] int64 microseconds: end (inclusive) of each step."""
    pt = samples["prediction_time"].to_numpy().astype("datetime64[us]").astype(np.int64)
    offsets = (config.n_steps - 1 - np.arange(config.n_steps, dtype=np.int64)) * config.bin_width_us
    return pt[:, None] - offsets[None, :]


# ------------------------------------------------------------------------------- statistics


def _fit_statistics(X: np.ndarray, padded: np.ndarray, rows: np.ndarray,
                    names: list[str]) -> tuple[list[float], list[float], list[float]]:
    """Train medians (before imputation), then mean/std after imputation, over the non-padded
    steps of the train ``rows``. Channels are gathered a few at a time (memory stays at one
    block's copy, and each channel is contiguous for the median)."""
    flat = X.reshape(-1, X.shape[2])
    steps = np.flatnonzero((~padded & rows[:, None]).ravel())
    medians, means, stds = [], [], []
    block = 4
    for j0 in range(0, len(names), block):  # a loop over channel blocks, not rows
        values = np.ascontiguousarray(flat[steps, j0:j0 + block].T)
        for column, name in zip(values, names[j0:j0 + block]):
            median, mean, std = _channel_statistics(column, name)
            medians.append(median)
            means.append(mean)
            stds.append(std)
    return medians, means, stds


def _channel_statistics(column: np.ndarray, name: str) -> tuple[float, float, float]:
    """(median, mean, std) of one channel's train values; indicators keep mean 0, std 1."""
    median = 0.0
    if _is_imputed(name):
        missing = np.isnan(column)
        finite = column[~missing]
        if finite.size == 0:
            _warn_no_train_value(name)
        else:
            median = float(np.median(finite))
        column[missing] = median
    if not _is_continuous(name) or column.size == 0:
        return median, 0.0, 1.0
    mean = float(np.mean(column, dtype=np.float64))
    std = float(np.std(column, dtype=np.float64))
    return median, mean, _usable_std(std)


def _usable_std(std: float) -> float:
    """The std a channel is divided by: 1 where the train values are (nearly) constant."""
    return std if std > 1e-12 and np.isfinite(std) else 1.0


def _warn_no_train_value(name: str) -> None:
    warnings.warn(f"feature {name!r} has no value in the train split; imputing 0", stacklevel=6)


_NAN_KEY = np.uint32(0xFFFFFFFF)  # above every number's key (+inf's is 0xFF800000)


def _sortable_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys ordered like the float32 ``values`` (NaN -> ``_NAN_KEY``; -0.0 just below 0.0)."""
    bits = values.view(np.uint32)
    keys = bits ^ (((bits >> 31) * np.uint32(0x7FFFFFFF)) | np.uint32(0x80000000))
    np.putmask(keys, np.isnan(values), _NAN_KEY)
    return keys


def _key_value(key: int) -> np.float32:
    """The float32 whose :func:`_sortable_keys` key is ``key``."""
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


class _StreamingStatistics:
    """The statistics of :func:`_fit_statistics` (train medians before imputation, then mean and
    std after it, over the train rows' non-padded steps), accumulated a chunk of the raw tensor
    at a time, so that the whole tensor never has to be in memory.

    Medians are exact: each channel's values are counted by the high 16 bits of an
    order-preserving uint32 key (:meth:`add`, one look at every chunk), then by the low 16 bits
    within the one or two high-bit bins that hold the middle order statistic(s); the middle
    value(s) then go through ``np.median``, so the median is the very float32 ``np.median``
    returns on the whole column. The low bits are counted in the same look for a window of
    ``WINDOW`` high bins around the first chunk's middle (the median of a few thousand samples is
    rarely more than a bin away from the final one); only a channel whose final middle falls
    outside its window needs a second look (:meth:`add_low`, when :attr:`needs_low`). Means and stds come from sums shifted by
    the first chunk's mean: numpy's up to float64 rounding (the order of summation differs), so
    after the cast to float32 in :func:`_finish` they are almost always the same number.
    """

    BITS = 16
    BLOCK = 1 << 14  # steps per block: its temporaries stay in cache
    WINDOW = 7  # high bins whose low bits are counted in the first look

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.imputed = np.flatnonzero([_is_imputed(n) for n in self.names])
        self.continuous = np.array([_is_continuous(n) for n in self.names], dtype=bool)
        F = len(self.names)
        self.steps = 0
        self.high = np.zeros((len(self.imputed), 1 << self.BITS), dtype=np.int64)
        self.missing = np.zeros(F, dtype=np.int64)  # NaN values per imputed channel
        self.shift: np.ndarray | None = None  # float32 numbers, so NaN -> shift adds exactly 0
        self.s1 = np.zeros(F)  # sum of (value - shift) over the values that are not NaN
        self.s2 = np.zeros(F)  # sum of (value - shift)**2
        self.low: dict[tuple[int, int], np.ndarray] = {}  # (imputed channel, high bin) -> low-bit counts
        self.window: list[int | None] = [None] * len(self.imputed)  # first high bin of each window
        self.window_counts = np.zeros((len(self.imputed), self.WINDOW << self.BITS), dtype=np.int64)
        self._targets: list[list[tuple[int, int]]] | None = None

    @classmethod
    def _blocks(cls, X: np.ndarray, padded: np.ndarray, rows: np.ndarray):
        """[steps, F] blocks (copies) of the train rows' non-padded steps, in order."""
        flat = X.reshape(-1, X.shape[2])
        steps = np.flatnonzero((~padded & rows[:, None]).ravel())
        for start in range(0, len(steps), cls.BLOCK):  # a loop over blocks of steps, not rows
            yield flat[steps[start:start + cls.BLOCK]]

    def add(self, X: np.ndarray, padded: np.ndarray, rows: np.ndarray) -> None:
        """First look at a chunk: X [n, T, F] raw (NaN where nothing is known), its padding, and
        which of its rows are train rows."""
        key_parts = []
        for values in self._blocks(X, padded, rows):
            self.steps += len(values)
            imputed = values[:, self.imputed]
            key_parts.append(_sortable_keys(imputed).T)
            if self.shift is None:  # the first block's mean: sums of small numbers lose nothing
                missing = np.isnan(values)
                total = np.where(missing, 0.0, values).sum(axis=0, dtype=np.float64)
                self.shift = (total / np.maximum(len(values) - missing.sum(axis=0), 1)).astype(np.float32)
            # an imputed channel's NaN becomes its shift and adds exactly 0 (their number is in
            # the last high bin); elsewhere NaN stays, and its sum says so
            np.copyto(imputed, self.shift[self.imputed], where=np.isnan(imputed))
            values[:, self.imputed] = imputed
            shifted = values.astype(np.float64)
            shifted -= self.shift
            self.s1 += shifted.sum(axis=0)
            self.s2 += np.einsum("ij,ij->j", shifted, shifted)
        if not key_parts:
            return
        keys = np.concatenate(key_parts, axis=1)
        span = np.uint32(self.WINDOW << self.BITS)
        for i, column in enumerate(keys):
            self.high[i] += np.bincount(column >> self.BITS, minlength=1 << self.BITS)
            if self.window[i] is None and self._n_values(i):  # the channel's first values
                middle = int(np.searchsorted(np.cumsum(self.high[i]), self._n_values(i) // 2, side="right"))
                self.window[i] = min(max(0, middle - self.WINDOW // 2), (1 << self.BITS) - self.WINDOW)
            if self.window[i] is not None:
                offset = column - np.uint32(self.window[i] << self.BITS)  # below the window wraps around
                self.window_counts[i] += np.bincount(offset[offset < span], minlength=int(span))
        self.missing[self.imputed] = self.high[:, -1]

    def _n_values(self, i: int) -> int:
        return int(self.high[i, :-1].sum())  # the last bin holds only NaN

    def targets(self) -> list[list[tuple[int, int]]]:
        """Per imputed channel, (high bin, rank within it) of its middle order statistic(s)."""
        if self._targets is None:
            self._targets = []
            for i in range(len(self.imputed)):
                n = self._n_values(i)
                ranks = sorted({(n - 1) // 2, n // 2}) if n else []
                cum = np.cumsum(self.high[i])
                found = []
                for k in ranks:
                    b = int(np.searchsorted(cum, k, side="right"))
                    found.append((b, k - (int(cum[b - 1]) if b else 0)))
                self._targets.append(found)
        return self._targets

    def _in_window(self, i: int, b: int) -> bool:
        return self.window[i] is not None and self.window[i] <= b < self.window[i] + self.WINDOW

    def _outside(self) -> list[tuple[int, int]]:
        """(imputed channel, high bin) of the middle values not counted in the first look."""
        return sorted({(i, b) for i, found in enumerate(self.targets()) for b, _ in found if not self._in_window(i, b)})

    @property
    def needs_low(self) -> bool:
        """Whether :meth:`add_low` must see the chunks again (a middle value fell outside its window)."""
        return bool(self._outside())

    def add_low(self, X: np.ndarray, padded: np.ndarray, rows: np.ndarray) -> None:
        """Second look at a chunk (after every chunk went through :meth:`add`), for the channels
        whose middle fell outside their window."""
        wanted = self._outside()
        if not wanted:
            return
        parts: dict[tuple[int, int], list[np.ndarray]] = {key: [] for key in wanted}
        mask = np.uint32((1 << self.BITS) - 1)
        for values in self._blocks(X, padded, rows):
            keys = _sortable_keys(values[:, self.imputed])
            for i, b in wanted:
                column = keys[:, i]
                parts[(i, b)].append((column[(column >> self.BITS) == b] & mask).astype(np.uint16))
        for key, chunks in parts.items():
            if chunks:
                counts = np.bincount(np.concatenate(chunks), minlength=1 << self.BITS)
                self.low[key] = self.low.get(key, 0) + counts

    def result(self) -> tuple[list[float], list[float], list[float]]:
        """(median, mean, std) per channel, as :func:`_fit_statistics` returns them."""
        F = len(self.names)
        median, mean, std = [0.0] * F, [0.0] * F, [1.0] * F
        for i, (j, found) in enumerate(zip(self.imputed, self.targets())):
            if not found:
                _warn_no_train_value(self.names[j])
                continue
            middle = []
            for b, rank in found:
                if self._in_window(i, b):
                    start = (b - self.window[i]) << self.BITS
                    low = np.cumsum(self.window_counts[i, start:start + (1 << self.BITS)])
                else:
                    low = np.cumsum(self.low[(i, b)])
                middle.append(_key_value((b << self.BITS) | int(np.searchsorted(low, rank, side="right"))))
            median[j] = float(middle[0]) if len(middle) == 1 else float(np.median(np.array(middle, np.float32)))
        n = self.steps
        if n == 0:
            return median, mean, std
        for j in np.flatnonzero(self.continuous):
            s1, s2, filled = float(self.s1[j]), float(self.s2[j]), int(self.missing[j])
            if np.isnan(s1):  # NaN in a channel that is not imputed stays NaN, as in np.mean
                mean[j], std[j] = float("nan"), 1.0
                continue
            if filled:  # the missing values become the median
                d = median[j] - float(self.shift[j])
                s1, s2 = s1 + filled * d, s2 + filled * d * d
            mean[j] = float(self.shift[j]) + s1 / n
            std[j] = _usable_std(float(np.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0))))
        return median, mean, std


def _finish(X: np.ndarray, padded: np.ndarray, spec: FeatureSpec, chunk: int = 1024) -> np.ndarray:
    """Impute with train medians, standardize, and zero the padding (in place).

    Done a chunk of samples at a time so each chunk stays in cache across the four steps and
    the NaN mask never exists for the whole tensor.
    """
    median = np.asarray(spec.median, dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    for i in range(0, len(X), chunk):  # a loop over blocks of samples, not rows
        part = X[i:i + chunk]
        np.copyto(part, median, where=np.isnan(part))
        part -= mean
        part /= std
        part[padded[i:i + chunk]] = 0.0
    return X


# ---------------------------------------------------------------------------------- public API


def prepare_samples(dataset, labels, splits: pl.DataFrame | None = None) -> tuple[MedsDataset, pl.DataFrame]:
    """The dataset opened and the labels as samples with their split (the dataset's, or ``splits``:
    ``subject_id, split``, e.g. one fold of a cross-validation)."""
    from workbench.labels import check_labels_in_data

    dataset = as_dataset(dataset)
    if isinstance(dataset, MedsDataset):
        from workbench.data.validate import require_valid_cached

        require_valid_cached(dataset.root)  # the MEDS checks of `workbench validate`, free when unchanged
    labels_frame = load_labels(labels)
    check_labels_in_data(labels_frame, dataset.events(), str(dataset.root),
                         source="labels" if isinstance(labels, pl.DataFrame) else str(labels))
    samples = _samples(labels_frame, _subject_splits(dataset) if splits is None else splits)
    return dataset, samples


def _layout_from_spec(spec: FeatureSpec) -> _Layout:
    return _Layout(spec.config, list(spec.numeric_codes), list(spec.count_codes), list(spec.static_codes), spec.include_age)


def _warn_unseen(codes: list[str]) -> None:
    if codes:
        shown = ", ".join(codes[:25]) + (f", ... ({len(codes) - 25} more)" if len(codes) > 25 else "")
        warnings.warn(f"{len(codes)} code(s) not seen when the feature spec was fitted are ignored: {shown}",
                      UnseenCodesWarning, stacklevel=4)


def _spec_from(layout: _Layout, seen: list[str], X: np.ndarray, padded: np.ndarray, rows: np.ndarray,
               dataset: MedsDataset, train: pl.DataFrame) -> FeatureSpec:
    median, mean, std = _fit_statistics(X, padded, rows, layout.feature_names)
    return _fitted_spec(layout, seen, (median, mean, std), dataset, train["subject_id"].n_unique(), train.height)


def _fitted_spec(layout: _Layout, seen: list[str], statistics: tuple[list[float], list[float], list[float]],
                 dataset: MedsDataset, n_train_subjects: int, n_train_samples: int) -> FeatureSpec:
    median, mean, std = statistics
    return FeatureSpec(
        config=layout.config, numeric_codes=layout.numeric, count_codes=layout.count, static_codes=layout.static,
        include_age=layout.include_age, seen_codes=seen, feature_names=layout.feature_names, median=median, mean=mean,
        std=std, fitted_on=FitInfo(data_fingerprint=data_fingerprint(dataset), n_train_subjects=n_train_subjects,
                                   n_train_samples=n_train_samples),
    )


def _tensors(X, observed, samples: pl.DataFrame, spec: FeatureSpec) -> SequenceTensors:
    step_end = _step_end_us(samples, spec.config).astype("datetime64[us]")
    return SequenceTensors(
        X=X,
        y=samples["boolean_value"].cast(pl.Float32).to_numpy().astype(np.float32),
        subject_id=samples["subject_id"].to_numpy().astype(np.int64),
        prediction_time=samples["prediction_time"].to_numpy().astype("datetime64[us]"),
        step_end_time=step_end,
        observed=observed,
        split=samples["split"].to_numpy().astype(str),
        feature_names=list(spec.feature_names),
        spec=spec,
    )


def _raw_for(read: _Events, samples: pl.DataFrame, layout: _Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The raw tensor of ``samples`` from what one read of the events returned."""
    return _raw_tensor(read.bins, read.static, read.age, samples, layout)


def fit(dataset: MedsDataset | str | os.PathLike, labels: pl.DataFrame | str | os.PathLike,
        config: FeatureConfig | None = None) -> FeatureSpec:
    """Learn a FeatureSpec from the train-split labels only (codes, medians, mean/std)."""
    config = config or FeatureConfig()
    dataset, samples = prepare_samples(dataset, labels)
    _require_train(samples, dataset)
    # only train samples are read: held-out events cannot reach the statistics
    train_samples = samples.filter(pl.col("split") == "train").with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("_sample"))
    read = _read_events(dataset, train_samples, config)
    layout, seen, train = _select(read, train_samples, config)
    X, _, padded = _raw_for(read, train_samples, layout)
    return _spec_from(layout, seen, X, padded, np.ones(len(X), dtype=bool), dataset, train)


def transform(dataset: MedsDataset | str | os.PathLike, labels: pl.DataFrame | str | os.PathLike,
              spec: FeatureSpec | str | os.PathLike) -> SequenceTensors:
    """Apply a fitted spec to (new) data: same channels in the same order; unknown codes ignored."""
    if not isinstance(spec, FeatureSpec):
        spec = FeatureSpec.load(spec)
    dataset, samples = prepare_samples(dataset, labels)
    read = _read_events(dataset, samples, spec.config)
    _warn_unseen(_unseen_codes(read, spec.seen_codes))
    X, observed, padded = _raw_for(read, samples, _layout_from_spec(spec))
    return _tensors(_finish(X, padded, spec), observed, samples, spec)


def fit_transform(dataset: MedsDataset | str | os.PathLike, labels: pl.DataFrame | str | os.PathLike,
                  config: FeatureConfig | None = None, splits: pl.DataFrame | None = None) -> tuple[FeatureSpec, SequenceTensors]:
    """:func:`fit` then :func:`transform` from a single read of the events; ``splits`` (``subject_id,
    split``) replaces the dataset's subject splits (cross-validation folds)."""
    config = config or FeatureConfig()
    dataset, samples = prepare_samples(dataset, labels, splits)
    read = _read_events(dataset, samples, config)
    _require_train(samples, dataset)
    layout, seen, train = _select(read, samples, config)
    _warn_unseen(_unseen_codes(read, seen))
    X, observed, padded = _raw_for(read, samples, layout)
    is_train = (samples["split"] == "train").to_numpy()
    spec = _spec_from(layout, seen, X, padded, is_train, dataset, train)
    return spec, _tensors(_finish(X, padded, spec), observed, samples, spec)


def _require_train(samples: pl.DataFrame, dataset: MedsDataset) -> None:
    if not (samples["split"] == "train").any():
        raise WorkbenchError(
            f"{dataset.root}: no label belongs to a train-split subject (metadata/subject_splits.parquet); "
            "statistics are fitted on the train split only"
        )


# ------------------------------------------------------------------- chunked (out of memory)
#
# fit_transform / transform run on chunks of subjects, so that the dense tensor never has to be
# in memory: every chunk goes through the same event query, code statistics and dense assembly
# as the whole data would, and the chunks add up to the same spec and the same rows.
# workbench/shards.py stores the chunks on disk; the passes are described there.


@dataclass(frozen=True)
class _Files(MedsDataset):
    """A MEDS dataset restricted to some of its event files (read exactly like the whole one)."""

    files: tuple[Path, ...] = ()

    @property
    def data_files(self) -> list[Path]:
        return list(self.files)


@dataclass(frozen=True)
class _ChunkEvents:
    """The events of subjects ``lo..hi`` (all the event reader asks of a dataset is ``events()``)."""

    source: MedsDataset | EventFrame
    lo: int
    hi: int

    def events(self) -> pl.LazyFrame:
        return self.source.events().filter(pl.col("subject_id").is_between(self.lo, self.hi))


@dataclass
class _Chunk:
    start: int  # rows of the subject-sorted samples
    stop: int
    events: _ChunkEvents


def _file_subject_ranges(dataset) -> list[tuple[Path, int, int]] | None:
    """(file, min subject_id, max subject_id) of each event file from its parquet statistics,
    sorted; None where a file has none (then every chunk scans every file, still correctly)."""
    if not isinstance(dataset, MedsDataset):
        return None
    import pyarrow.parquet as pq

    ranges = []
    for path in dataset.data_files:
        meta = pq.ParquetFile(path).metadata
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if "subject_id" not in names:
            return None
        lows, highs = [], []
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            if group.num_rows == 0:
                continue
            stats = group.column(names.index("subject_id")).statistics
            if stats is None or not stats.has_min_max:
                return None
            lows.append(int(stats.min))
            highs.append(int(stats.max))
        if lows:
            ranges.append((path, min(lows), max(highs)))
    return sorted(ranges, key=lambda r: (r[1], r[2]))


def _plan_chunks(dataset, samples: pl.DataFrame, chunk_samples: int) -> list[_Chunk]:
    """Cut the subject-sorted ``samples`` into chunks of whole subjects, at most ``chunk_samples``
    samples each (more only for one subject with more samples), ending at file ends where the files
    hold disjoint subject ranges (MEDS keeps each subject in one file), and give each chunk the files
    holding its subjects."""
    per_subject = samples.group_by("subject_id", maintain_order=True).len()
    subjects = per_subject["subject_id"].to_numpy()
    ends = np.cumsum(per_subject["len"].to_numpy())  # samples up to and including each subject
    ranges = _file_subject_ranges(dataset)
    if ranges is not None and all(a[2] < b[1] for a, b in zip(ranges, ranges[1:])):
        cuts = np.unique(np.searchsorted(subjects, [r[2] for r in ranges], side="right"))
    else:
        cuts = np.arange(1, len(subjects) + 1)  # subject ranges overlap: cut anywhere
    chunks, first = [], 0
    while first < len(subjects):
        before = int(ends[first - 1]) if first else 0
        most = int(np.searchsorted(ends, before + chunk_samples, side="right"))  # subjects that fit
        fitting = cuts[(cuts > first) & (cuts <= most)]
        last = int(fitting[-1]) if len(fitting) else max(most, first + 1)
        lo, hi = int(subjects[first]), int(subjects[last - 1])
        source = dataset
        if ranges is not None:
            files = tuple(path for path, a, b in ranges if a <= hi and b >= lo)
            source = _Files(dataset.root, files) if files else dataset
        chunks.append(_Chunk(before, int(ends[last - 1]), _ChunkEvents(source, lo, hi)))
        first = last
    return chunks


def _chunk_samples(samples: pl.DataFrame, chunk: _Chunk) -> pl.DataFrame:
    """A chunk's samples, ``_sample`` numbering its rows (what the assembly indexes)."""
    return samples[chunk.start:chunk.stop].with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("_sample"))


class RawChunkSink:
    """Where the chunked passes put each chunk's raw tensor: ``write(k, X, observed, padded)`` with
    X [n, T, F] float32 before imputation and standardization (NaN where nothing is known yet) for
    chunk ``k`` (chunks come in order, except chunks read before any train sample, which come once
    there is one; a chunk written again replaces its first version); ``read(k)`` gives chunk
    ``k``'s ``(X, padded)`` back. :mod:`workbench.shards` has the project's one."""

    def write(self, k: int, X: np.ndarray, observed: np.ndarray, padded: np.ndarray) -> None:
        raise NotImplementedError

    def read(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


SAMPLE_COLUMNS = ("sample_index", "subject_id", "prediction_time", "boolean_value", "split")
#: Samples per chunk: the raw chunk is 32,768 * T * F * 4 bytes (200 MB at T=48, F=32).
DEFAULT_CHUNK_SAMPLES = 32_768


def _sorted_samples(samples: pl.DataFrame) -> pl.DataFrame:
    return samples.rename({"_sample": "sample_index"}).sort("subject_id", maintain_order=True)


class _CodeTally:
    """The per-code train counts of the chunks read so far (they add up: disjoint subjects)."""

    def __init__(self, counts: bool = True) -> None:
        self.counts = counts  # False: only the codes seen (to warn about unseen ones)
        self.parts: list[pl.DataFrame] = []
        self.codes: set[str] = set()
        self.n_train_subjects = 0

    def add(self, read: _Events, part: pl.DataFrame) -> None:
        train = part.filter(pl.col("split") == "train") if self.counts else part.clear()
        if train.height:
            self.parts.append(_code_stats(read, train))
            self.n_train_subjects += train["subject_id"].n_unique()
        self.codes.update(_unseen_codes(read, []))

    def layout(self, config: FeatureConfig) -> tuple[_Layout, list[str]] | None:
        if not self.parts:
            return None
        stats = pl.concat(self.parts).group_by("code").agg(pl.col("n_subjects", "n_timed", "n_numeric").sum())
        stats = stats.sort("code")
        self.parts = [stats]
        return _layout_from_stats(stats, config, self.n_train_subjects), stats["code"].to_list()


def _same_layout(a: _Layout, b: _Layout) -> bool:
    return (a.numeric, a.count, a.static, a.include_age) == (b.numeric, b.count, b.static, b.include_age)


class _Assembler:
    """Assembles chunks into the sink in a worker thread while the next chunk's events are read
    (the events query runs in polars, outside the GIL): at most one chunk waits, so memory holds
    at most two chunks' bins and one raw tensor besides the sink's."""

    def __init__(self, sink: RawChunkSink, is_train: np.ndarray | None):
        from concurrent.futures import ThreadPoolExecutor

        self.sink, self.is_train = sink, is_train
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = None
        self.statistics: _StreamingStatistics | None = None
        self.layout: _Layout | None = None

    def start(self, layout: _Layout) -> None:
        self.wait()
        self.layout = layout
        self.statistics = None if self.is_train is None else _StreamingStatistics(layout.feature_names)

    def _assemble(self, k: int, chunk: _Chunk, read: _Events, part: pl.DataFrame) -> None:
        X, observed, padded = _raw_for(read, part, self.layout)
        del read
        if self.statistics is not None:
            self.statistics.add(X, padded, self.is_train[chunk.start:chunk.stop])
        self.sink.write(k, X, observed, padded)

    def submit(self, k: int, chunk: _Chunk, read: _Events, part: pl.DataFrame) -> None:
        self.wait()
        self.pending = self.pool.submit(self._assemble, k, chunk, read, part)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def _assemble_all(chunks: list[_Chunk], samples: pl.DataFrame, config: FeatureConfig, assembler: _Assembler,
                  tally: _CodeTally | None, tick) -> None:
    """One pass over the chunks' events: each chunk is tallied (when fitting) and assembled. With
    no layout yet (fitting), the layout of the first chunks holding train samples is a guess used
    meanwhile (chunks read before it are read again); the caller checks it against the final one."""
    waiting = []
    for k, chunk in enumerate(chunks):
        part = _chunk_samples(samples, chunk)
        read = _read_events(chunk.events, part, config)
        if tally is not None:
            tally.add(read, part)
        guess = tally.layout(config) if assembler.layout is None and tally is not None else None
        if guess is not None:
            assembler.start(guess[0])
            for j in waiting:  # rare: no train sample in the first chunks
                earlier = _chunk_samples(samples, chunks[j])
                assembler.submit(j, chunks[j], _read_events(chunks[j].events, earlier, config), earlier)
            waiting = []
        if assembler.layout is None:
            waiting.append(k)
        else:
            assembler.submit(k, chunk, read, part)
        del read
        tick()
    assembler.wait()


def fit_transform_chunked(dataset: MedsDataset | str | os.PathLike, labels: pl.DataFrame | str | os.PathLike,
                          sink: RawChunkSink, config: FeatureConfig | None = None,
                          splits: pl.DataFrame | None = None, chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
                          progress=None) -> tuple[FeatureSpec, pl.DataFrame]:
    """:func:`fit_transform` a chunk of subjects at a time: the raw tensor of each chunk goes to
    ``sink``; returns the spec (fit_transform's, its means and stds to float64 rounding) and the
    samples in the chunks' order (sorted by subject_id, stably), columns :data:`SAMPLE_COLUMNS`
    (``sample_index``: the label's row). ``progress``, if given, is called once per chunk read.

    The events are read once: chunks are assembled with the layout chosen from the first chunk
    holding train samples while the rest is read; if the whole train split chooses other codes
    (a code near ``min_code_frequency``, say), every chunk is read and assembled again.
    """
    config = config or FeatureConfig()
    dataset, samples = prepare_samples(dataset, labels, splits)
    _require_train(samples, dataset)
    samples = _sorted_samples(samples)
    chunks = _plan_chunks(dataset, samples, chunk_samples)
    is_train = (samples["split"] == "train").to_numpy()
    tick = progress or (lambda: None)
    tally, assembler = _CodeTally(), _Assembler(sink, is_train)
    try:
        _assemble_all(chunks, samples, config, assembler, tally, tick)
        layout, seen = tally.layout(config)
        if not _same_layout(layout, assembler.layout):  # the guess was wrong: once more, with the layout
            assembler.start(layout)
            _assemble_all(chunks, samples, config, assembler, None, tick)
    finally:
        assembler.close()
    _warn_unseen(sorted(tally.codes - set(seen)))
    statistics = assembler.statistics
    if statistics.needs_low:  # a median outside its window: the train rows once more
        for k, chunk in enumerate(chunks):
            rows = is_train[chunk.start:chunk.stop]
            if rows.any():
                X, padded = sink.read(k)
                statistics.add_low(X, padded, rows)
    spec = _fitted_spec(layout, seen, statistics.result(), dataset, tally.n_train_subjects, int(is_train.sum()))
    return spec, samples.select(SAMPLE_COLUMNS)


def transform_chunked(dataset: MedsDataset | str | os.PathLike, labels: pl.DataFrame | str | os.PathLike,
                      spec: FeatureSpec | str | os.PathLike, sink: RawChunkSink, chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
                      progress=None) -> pl.DataFrame:
    """:func:`transform` a chunk of subjects at a time into ``sink`` (one pass over the events);
    returns the samples in the chunks' order, as :func:`fit_transform_chunked` does."""
    if not isinstance(spec, FeatureSpec):
        spec = FeatureSpec.load(spec)
    dataset, samples = prepare_samples(dataset, labels)
    samples = _sorted_samples(samples)
    chunks = _plan_chunks(dataset, samples, chunk_samples)
    tally, assembler = _CodeTally(counts=False), _Assembler(sink, None)
    try:
        assembler.start(_layout_from_spec(spec))
        _assemble_all(chunks, samples, spec.config, assembler, tally, progress or (lambda: None))
    finally:
        assembler.close()
    _warn_unseen(sorted(tally.codes - set(spec.seen_codes)))
    return samples.select(SAMPLE_COLUMNS)


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk of :func:`transform_chunked`, as plain data (what another process needs to redo
    it): rows ``start..stop`` of the subject-sorted samples, subjects ``lo..hi``, read from the
    event ``files`` (None: every event file)."""

    start: int
    stop: int
    lo: int
    hi: int
    files: tuple[str, ...] | None = None


def plan_transform_chunks(dataset: MedsDataset | str | os.PathLike, labels: pl.DataFrame | str | os.PathLike,
                          chunk_samples: int = DEFAULT_CHUNK_SAMPLES) -> tuple[pl.DataFrame, list[ChunkPlan]]:
    """The samples (:data:`SAMPLE_COLUMNS`, in chunk order) and the chunks that
    :func:`transform_chunked` makes of ``labels``; :func:`transform_chunk` computes one of them."""
    dataset, samples = prepare_samples(dataset, labels)
    samples = _sorted_samples(samples)
    plans = []
    for chunk in _plan_chunks(dataset, samples, chunk_samples):
        source = chunk.events.source
        files = tuple(str(p) for p in source.files) if isinstance(source, _Files) else None
        plans.append(ChunkPlan(chunk.start, chunk.stop, chunk.events.lo, chunk.events.hi, files))
    return samples.select(SAMPLE_COLUMNS), plans


def transform_chunk(dataset: MedsDataset | str | os.PathLike, samples: pl.DataFrame, chunk: ChunkPlan,
                    spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """One chunk of :func:`transform_chunked`: its raw ``(X, observed, padded)`` (what the sink
    receives) and the codes its events hold that ``spec`` never saw. ``samples`` are the chunk's
    rows of :func:`plan_transform_chunks`'s samples."""
    dataset = dataset if isinstance(dataset, MedsDataset) else MedsDataset(Path(dataset))
    source = dataset if chunk.files is None else _Files(dataset.root, tuple(Path(f) for f in chunk.files))
    part = samples.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("_sample"))
    read = _read_events(_ChunkEvents(source, chunk.lo, chunk.hi), part, spec.config)
    X, observed, padded = _raw_for(read, part, _layout_from_spec(spec))
    return X, observed, padded, _unseen_codes(read, spec.seen_codes)


def apply_spec(X: np.ndarray, padded: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """A raw chunk (what a :class:`RawChunkSink` receives) -> model-ready values, in place: the
    train medians imputed, standardized, the padding zeroed; elementwise, so any block of rows
    gets the very values ``fit_transform`` holds."""
    return _finish(X, padded, spec)


def sequence_tensors(X: np.ndarray, observed: np.ndarray, samples: pl.DataFrame, spec: FeatureSpec) -> SequenceTensors:
    """SequenceTensors of finished rows X with their samples (``subject_id, prediction_time,
    boolean_value, split``, one row each)."""
    return _tensors(X, observed, samples, spec)
