"""Tabular features for the reference models: one row per sample, aggregates over look-back windows.

What MEDS users compare sequence models against (MEDS-Tab: gradient-boosted trees on windowed
aggregates). For every sample (subject, prediction time) and every selected code, over each
look-back window ending at the prediction time (``30d``, ``365d``, ``full`` = all history;
only events at or before the prediction time):

* numeric codes: ``{code}/last@{w}``, ``/mean@{w}``, ``/min@{w}``, ``/max@{w}``, ``/count@{w}``;
* count codes (diagnoses, visits, ...): ``{code}/count@{w}``;
* every timed code: ``{code}/days_since_last`` and ``{code}/days_since_first`` (whole history);
* ``static/age_years`` and ``static/{code}`` (0/1), as in the sequence tensors.

NaN means "not observed" (trees handle it; the logistic reference imputes and flags it). The
codes are the FeatureSpec's (chosen on the train split), so a tabular model and a sequence model
of one cohort see the same codes, and scoring new data needs nothing but the saved spec. The
whole history reaches these features, however long ago an event was.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from workbench.features import (
    AGE_FEATURE,
    US_PER_DAY,
    FeatureSpec,
    age_query,
    collect_queries,
    parse_duration_us,
    prepare_samples,
    static_query,
)

WINDOWS = ("30d", "365d", "full")
NUMERIC_AGGS = ("last", "mean", "min", "max", "count")


def _window_us(window: str) -> int | None:
    return None if window == "full" else parse_duration_us(window)


def feature_names(spec: FeatureSpec, windows=WINDOWS) -> list[str]:
    """Column names in matrix order (see the module docstring)."""
    names = []
    for code in spec.numeric_codes:
        names += [f"{code}/{agg}@{w}" for w in windows for agg in NUMERIC_AGGS]
    for code in spec.count_codes:
        names += [f"{code}/count@{w}" for w in windows]
    for code in [*spec.numeric_codes, *spec.count_codes]:
        names += [f"{code}/days_since_last", f"{code}/days_since_first"]
    if spec.include_age:
        names.append(AGE_FEATURE)
    names += [f"static/{c}" for c in spec.static_codes]
    return names


def _aggregates_query(events: pl.LazyFrame, samples: pl.LazyFrame, codes: list[str], windows) -> pl.LazyFrame:
    """One row per (sample, code) with every window's aggregates and the first / last event time."""
    value = pl.col("numeric_value")
    elapsed = (pl.col("prediction_time") - pl.col("time")).dt.total_microseconds()
    aggs = [pl.col("time").max().alias("t_last"), pl.col("time").min().alias("t_first")]
    for w in windows:
        width = _window_us(w)
        inside = None if width is None else elapsed <= width
        valued = value.is_not_null() if inside is None else inside & value.is_not_null()
        aggs += [
            (pl.len() if inside is None else inside.sum()).alias(f"count@{w}"),
            value.filter(valued).max_by(pl.struct("time", "numeric_value").filter(valued)).alias(f"last@{w}"),
            value.filter(valued).mean().alias(f"mean@{w}"),
            value.filter(valued).min().alias(f"min@{w}"),
            value.filter(valued).max().alias(f"max@{w}"),
        ]
    return (
        events.select("subject_id", "time", "code", "numeric_value")
        .filter(pl.col("time").is_not_null() & pl.col("code").is_in(codes))
        .join(samples.select("_sample", "subject_id", "prediction_time"), on="subject_id", how="inner")
        .filter(pl.col("time") <= pl.col("prediction_time"))
        .group_by("_sample", "code")
        .agg(aggs)
    )


def tabular_features(dataset, labels, spec: FeatureSpec, windows=WINDOWS) -> tuple[np.ndarray, pl.DataFrame]:
    """(X [N, F] float32 with NaN for "not observed", the samples in label order with their split)."""
    dataset, samples = prepare_samples(dataset, labels)
    codes = [*spec.numeric_codes, *spec.count_codes]
    lazy = samples.lazy()
    events = dataset.events()
    aggregates, static, age = collect_queries(
        _aggregates_query(events, lazy, codes, windows), static_query(events, lazy),
        age_query(events, lazy, spec.config.birth_code),
    )
    names = feature_names(spec, windows)
    column = {name: j for j, name in enumerate(names)}
    X = np.full((samples.height, len(names)), np.nan, dtype=np.float32)
    numeric_codes = set(spec.numeric_codes)
    by_kind = aggregates.with_columns(pl.col("code").is_in(list(numeric_codes)).alias("numeric"))
    for numeric, part in by_kind.partition_by("numeric", as_dict=True).items():
        rows = part["_sample"].to_numpy()
        code_names = part["code"].to_list()
        aggs = [(a, w) for w in windows for a in (NUMERIC_AGGS if numeric[0] else ("count",))]
        for agg, w in aggs:
            cols = np.array([column[f"{c}/{agg}@{w}"] for c in code_names])
            X[rows, cols] = part[f"{agg}@{w}"].cast(pl.Float64).to_numpy()
        pt = samples["prediction_time"].to_numpy().astype("datetime64[us]").astype(np.int64)[rows]
        for which, field in (("last", "t_last"), ("first", "t_first")):
            cols = np.array([column[f"{c}/days_since_{which}"] for c in code_names])
            t = part[field].to_numpy().astype("datetime64[us]").astype(np.int64)
            X[rows, cols] = (pt - t) / US_PER_DAY
    # counts of a code never seen in a window are 0, not unknown
    count_cols = [j for name, j in column.items() if "/count@" in name]
    X[:, count_cols] = np.nan_to_num(X[:, count_cols], nan=0.0)
    if spec.include_age:
        X[age["_sample"].to_numpy(), column[AGE_FEATURE]] = age["age"].to_numpy()
    if spec.static_codes:
        static_cols = [column[f"static/{c}"] for c in spec.static_codes]
        X[:, static_cols] = 0.0
        pairs = static.filter(pl.col("code").is_in(spec.static_codes)).join(
            samples.select("_sample", "subject_id"), on="subject_id", how="inner")
        index = {c: column[f"static/{c}"] for c in spec.static_codes}
        X[pairs["_sample"].to_numpy(), [index[c] for c in pairs["code"].to_list()]] = 1.0
    return X, samples.drop("_sample")
