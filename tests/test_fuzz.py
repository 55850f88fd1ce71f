"""Property-based: random garbage into the loaders of labels, task specs and pipeline YAML gives a
WorkbenchError (a message for the user) or a valid result, never any other exception."""

from __future__ import annotations

import datetime as dt
import io
import math

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.errors import WorkbenchError
from workbench.labels import LABEL_SCHEMA, read_labels
from workbench.pipelines import load_pipeline
from workbench.tasks import TaskSpec, load_task, make_labels, task_from_dict

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["VISIT", "MEDS_DEATH", "every_event", "offset", "labels_file", ".inf", "1e12", "[", "${x}"]),
)
json_like = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=12)

TASK_KEYS = {
    "name": st.text(max_size=8), "prediction_times": st.dictionaries(
        st.sampled_from(["kind", "codes", "patterns", "offset_days", "anchor_codes", "labels_path", "bogus"]), json_like, max_size=4),
    "outcome": st.one_of(st.none(), st.dictionaries(
        st.sampled_from(["codes", "patterns", "horizon_days", "gap_days"]), json_like, max_size=4)),
    "censoring": st.dictionaries(st.sampled_from(["end_codes", "competing_codes", "competing_patterns"]), json_like, max_size=3),
    "inclusion": st.dictionaries(st.sampled_from(["min_history_days", "min_events", "min_age_years", "max_age_years",
                                                  "exclude_prior_outcome"]), json_like, max_size=3),
    "features": json_like, "warn_prevalence_below": json_like, "require_train_positives": json_like,
}
task_dicts = st.fixed_dictionaries({}, optional=TASK_KEYS)


def fails_cleanly(fn, *args):
    """Run ``fn``; a WorkbenchError is fine, any other exception fails the test."""
    try:
        return fn(*args)
    except WorkbenchError as exc:
        assert str(exc).strip(), "an empty message"
        return None


@SETTINGS
@given(task_dicts)
def test_task_specs_from_garbage(data):
    spec = fails_cleanly(task_from_dict, data, "fuzz.yaml")
    if spec is not None:
        assert isinstance(spec, TaskSpec)
        if spec.outcome is not None:
            assert math.isfinite(spec.outcome.horizon_days)


@SETTINGS
@given(st.one_of(st.text(max_size=200), json_like.map(lambda v: yaml.safe_dump(v))))
def test_task_yaml_files_from_garbage(tmp_path, text):
    path = tmp_path / "task.yaml"
    path.write_text(text)
    fails_cleanly(load_task, path)


@SETTINGS
@given(task_dicts)
def test_labelling_with_garbage_tasks(small_meds, data):
    spec = fails_cleanly(task_from_dict, data, "fuzz.yaml")
    if spec is not None and spec.prediction_times.kind != "labels_file":
        result = fails_cleanly(make_labels, small_meds, spec)
        if result is not None:
            assert result.labels.schema == LABEL_SCHEMA


column_values = {
    "subject_id": st.one_of(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=1, max_size=6),
                            st.lists(st.floats(allow_nan=True), min_size=1, max_size=6),
                            st.lists(st.text(max_size=4), min_size=1, max_size=6),
                            st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=6)),
    "prediction_time": st.one_of(st.lists(st.datetimes(min_value=dt.datetime(1700, 1, 1)), min_size=1, max_size=6),
                                 st.lists(st.text(max_size=10), min_size=1, max_size=6),
                                 st.lists(st.integers(), min_size=1, max_size=6)),
    "boolean_value": st.one_of(st.lists(st.booleans(), min_size=1, max_size=6),
                               st.lists(st.floats(allow_nan=True), min_size=1, max_size=6),
                               st.lists(st.one_of(st.none(), st.booleans()), min_size=1, max_size=6)),
    "extra": st.lists(st.text(max_size=3), min_size=1, max_size=6),
}


def frame_of(columns: dict) -> pl.DataFrame:
    n = min(len(v) for v in columns.values())
    series = []
    for name, values in columns.items():
        try:
            series.append(pl.Series(name, values[:n], strict=False))
        except (OverflowError, pl.exceptions.PolarsError, TypeError, ValueError):
            series.append(pl.Series(name, [str(v) for v in values[:n]]))
    return pl.DataFrame(series)


labels_frames = st.dictionaries(st.sampled_from(sorted(column_values)), st.nothing(), max_size=0).flatmap(
    lambda _: st.fixed_dictionaries({}, optional=column_values)).filter(bool).map(frame_of)


@SETTINGS
@given(labels_frames)
def test_labels_frames_from_garbage(frame):
    labels = fails_cleanly(read_labels, frame)
    if labels is not None:
        assert labels.schema == LABEL_SCHEMA and labels.height and not labels["subject_id"].is_null().any()


@SETTINGS
@given(st.one_of(labels_frames.map(lambda f: ("frame", f)), st.binary(max_size=300).map(lambda b: ("bytes", b))))
def test_labels_parquet_files_from_garbage(small_meds, tmp_path, case):
    kind, content = case
    path = tmp_path / "labels.parquet"
    if kind == "bytes":
        path.write_bytes(content)
    else:
        buffer = io.BytesIO()
        content.write_parquet(buffer)
        path.write_bytes(buffer.getvalue())
    labels = fails_cleanly(read_labels, path)
    if labels is not None:
        from workbench.features import fit_transform

        fails_cleanly(fit_transform, small_meds, path)


PIPELINE_KEYS = {
    "name": json_like, "experiment": json_like, "engine": json_like, "params": json_like,
    "steps": st.one_of(json_like, st.dictionaries(st.sampled_from(["cohort", "train", "x y"]), st.fixed_dictionaries(
        {}, optional={"notebook": st.sampled_from(["nb.ipynb", "missing.ipynb", "", "../x"]) | json_like,
                      "needs": json_like, "params": json_like, "matrix": json_like}), max_size=2)),
}


@SETTINGS
@given(st.one_of(st.text(max_size=300), st.fixed_dictionaries({}, optional=PIPELINE_KEYS).map(yaml.safe_dump)),
       st.dictionaries(st.text(min_size=1, max_size=6), scalars, max_size=2))
def test_pipeline_yaml_from_garbage(tmp_path, text, overrides):
    from conftest import write_notebook

    write_notebook(tmp_path / "nb.ipynb", "x = 1\nname = 'a'\n", ["print(x)"])
    path = tmp_path / "p.yaml"
    path.write_text(text)
    fails_cleanly(load_pipeline, path, overrides)


@pytest.mark.parametrize("horizon", [".inf", "1e12", "-1", ".nan"])
def test_absurd_horizons_are_refused_by_name(tmp_path, horizon):
    path = tmp_path / "task.yaml"
    path.write_text(f"name: t\noutcome:\n  codes: [MEDS_DEATH]\n  horizon_days: {horizon}\n")
    with pytest.raises(WorkbenchError, match="horizon_days"):
        load_task(path)
