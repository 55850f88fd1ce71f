"""The one labels reader: every broken labels file is refused with exit 2, naming the file, the
column, how many rows and an example row, by `workbench features` and `workbench label` alike,
and nothing is written."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
from typer.testing import CliRunner

from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.labels import read_labels

T = dt.datetime(2020, 1, 1)
DAY = dt.timedelta(days=1)


def good() -> pl.DataFrame:
    """Valid labels on the small_meds fixture (subjects 1-4, events from T + 1 day)."""
    return pl.DataFrame({"subject_id": [1, 2, 3, 4], "prediction_time": [T + 2 * DAY, T + 4 * DAY, T + 6 * DAY, T + 8 * DAY],
                         "boolean_value": [True, False, False, True]})


CASES = {
    "fractional subject_id": (
        lambda: good().with_columns(pl.Series("subject_id", [1.5, 2.0, 3.0, 4.0])),
        ["column 'subject_id'", "is Float64", "1 are fractional", "subject_id=1.5"],
    ),
    "whole-number float subject_id": (
        lambda: good().with_columns(pl.col("subject_id").cast(pl.Float64)),
        ["column 'subject_id'", "cast the column to int64"],
    ),
    "string subject_id": (
        lambda: good().with_columns(pl.col("subject_id").cast(pl.String)),
        ["column 'subject_id'", "is String", "int64"],
    ),
    "huge uint64 subject_id": (
        lambda: good().with_columns(pl.Series("subject_id", [2**64 - 1, 2, 3, 4], dtype=pl.UInt64)),
        ["column 'subject_id'", "above the int64 maximum", "1 row(s)", f"subject_id={2**64 - 1}"],
    ),
    "duplicate rows": (
        lambda: pl.concat([good(), good().head(1)]),
        ["column 'prediction_time'", "more than once", "2 row(s)", "subject_id=1"],
    ),
    "boolean_value 2.5": (
        lambda: good().with_columns(pl.Series("boolean_value", [2.5, 0.0, 1.0, 0.0])),
        ["column 'boolean_value'", "is Float64", "1 value(s) are not 0 or 1", "boolean_value=2.5"],
    ),
    "null boolean_value": (
        lambda: good().with_columns(pl.Series("boolean_value", [True, None, False, True])),
        ["column 'boolean_value'", "null values", "1 row(s)", "subject_id=2"],
    ),
    "null prediction_time": (
        lambda: good().with_columns(pl.Series("prediction_time", [T + 2 * DAY, None, T + 6 * DAY, T + 8 * DAY])),
        ["column 'prediction_time'", "null values", "subject_id=2"],
    ),
    "string prediction_time": (
        lambda: good().with_columns(pl.col("prediction_time").dt.to_string()),
        ["column 'prediction_time'", "is String", "timestamps"],
    ),
    "200 years before the data": (
        lambda: good().with_columns(pl.col("prediction_time") - dt.timedelta(days=365 * 200)),
        ["column 'prediction_time'", "before the subject's first event", "4 row(s)", "subject_id=1"],
    ),
    "200 years after the data": (
        lambda: good().with_columns(pl.col("prediction_time") + dt.timedelta(days=365 * 200)),
        ["column 'prediction_time'", "after the last event of", "no such future", "4 row(s)"],
    ),
    "subject not in the data": (
        lambda: good().with_columns(pl.Series("subject_id", [1, 2, 3, 99])),
        ["column 'subject_id'", "1 subject(s) have no timed events", "subject_id 99"],
    ),
    "no prediction_time column": (
        lambda: good().drop("prediction_time"),
        ["missing column(s) 'prediction_time'", "has subject_id, boolean_value"],
    ),
    "no rows": (lambda: good().head(0), ["no labels (0 rows)"]),
}


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("case", sorted(CASES))
def test_features_and_label_refuse_broken_labels_with_exit_2(small_meds, tmp_path, case):
    make, expected = CASES[case]
    labels = tmp_path / "labels.parquet"
    make().write_parquet(labels)
    runner = CliRunner()
    features = runner.invoke(app, ["features", "--data", str(small_meds), "--labels", str(labels),
                                   "--out", str(tmp_path / "tensors")])
    label = runner.invoke(app, ["label", "--task", str(labels), "--data", str(small_meds),
                                "--out", str(tmp_path / "relabelled.parquet")])
    for result in (features, label):
        output = flat(result.output)
        assert result.exit_code == 2, output
        assert "Traceback" not in output and str(labels) in output, output
        for piece in expected:
            assert piece in output, (piece, output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.parquet", "meds"], "nothing written"


def test_not_a_parquet_file_is_refused(small_meds, tmp_path):
    labels = tmp_path / "labels.parquet"
    labels.write_text("subject_id,prediction_time\n1,2020-01-02\n")
    result = CliRunner().invoke(app, ["features", "--data", str(small_meds), "--labels", str(labels),
                                      "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and "not a readable parquet file" in flat(result.output)


def test_clean_labels_pass_and_keep_the_meds_schema(small_meds, tmp_path):
    labels = read_labels(good().with_columns(pl.col("subject_id").cast(pl.Int32)))
    assert labels.schema == {"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean}
    times_only = read_labels(good().drop("boolean_value"))
    assert times_only["boolean_value"].null_count() == 4
    with pytest.raises(WorkbenchError, match="missing column"):
        read_labels(good().drop("boolean_value"), need_values=True)
