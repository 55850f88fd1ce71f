"""One validation gate: `workbench label` and `workbench features` refuse each broken dataset of
the validation tests with exit 2 before writing anything; `-p` values are checked before anything runs."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from workbench.cli import app

T = dt.datetime(2020, 1, 1)
DAY = dt.timedelta(days=1)


def first_shard(root):
    return sorted((root / "data").glob("*.parquet"))[0]


def float_ids(root):
    f = first_shard(root)
    t = pq.read_table(f)
    pq.write_table(t.set_column(0, "subject_id", t.column("subject_id").cast(pa.float64())), f)


def null_code(root):
    f = first_shard(root)
    df = pl.read_parquet(f)
    df.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(None).otherwise(pl.col("code")).alias("code")).write_parquet(f)


def bad_value(value):
    def apply(root):
        f = first_shard(root)
        t = pq.read_table(f).to_pydict()
        i = t["code"].index("LAB//x")
        t["numeric_value"][i] = value
        schema = pq.read_schema(f)
        pq.write_table(pa.table(t, schema=schema.set(schema.get_field_index("numeric_value"),
                                                     pa.field("numeric_value", pa.float64()))), f)
    return apply


def unsorted(root):
    f = first_shard(root)
    df = pl.read_parquet(f)
    sid = df["subject_id"][0]
    rows, rest = df.filter(pl.col("subject_id") == sid), df.filter(pl.col("subject_id") != sid)
    pl.concat([rows.head(2), rows.slice(3, 1), rows.slice(2, 1), rest]).write_parquet(f)


def two_shards(root):
    a, b = sorted((root / "data").glob("*.parquet"))
    pl.concat([pl.read_parquet(b), pl.read_parquet(a).head(1)]).write_parquet(b)


def splits_not_parquet(root):
    (root / "metadata" / "subject_splits.parquet").write_text("subject_id,split\n1,train\n")


BROKEN = {
    "float subject ids": (float_ids, "wrong_type"),
    "null code": (null_code, "null_value"),
    "NaN value": (bad_value(float("nan")), "nan_value"),
    "infinite value": (bad_value(float("inf")), "infinite_value"),
    "1e300 value": (bad_value(1e300), "outside the float32 range"),
    "unsorted times": (unsorted, "unsorted_times"),
    "subject in two shards": (two_shards, "subject_in_several_shards"),
    "splits not parquet": (splits_not_parquet, "not a readable parquet file"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_label_and_features_refuse_a_broken_dataset_before_writing(small_meds, tmp_path, case):
    labels = tmp_path / "labels.parquet"
    pl.DataFrame({"subject_id": [1, 2, 3, 4], "prediction_time": [T + 2 * DAY, T + 4 * DAY, T + 6 * DAY, T + 8 * DAY],
                  "boolean_value": [True, False, False, True]}).write_parquet(labels)
    breaker, expected = BROKEN[case]
    breaker(small_meds)
    runner = CliRunner()
    label = runner.invoke(app, ["label", "--task", str(labels), "--data", str(small_meds), "--out", str(tmp_path / "out.parquet")])
    features = runner.invoke(app, ["features", "--data", str(small_meds), "--labels", str(labels), "--out", str(tmp_path / "t")])
    for result in (label, features):
        text = " ".join(result.output.split())
        assert result.exit_code == 2, text
        assert expected in text and "Traceback" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.parquet", "meds"], "nothing written"


@pytest.mark.parametrize("param,message", [
    ("epochs=abc", "step train-model=lstm: parameter epochs: Input should be a valid integer"),
    ("units=0", "parameter units: Input should be greater than or equal to 1 (got 0)"),
    ("early_stopping_metric=loss", "parameter early_stopping_metric: Input should be 'auroc' or 'auprc' (got 'loss')"),
    ("model=svm", "parameter model: 'svm' is not one of lstm, gru, rnn, logistic, gbt, mayo"),
    ("features={n_steps: -1}", "step cohort: parameter features: n_steps: Input should be greater than or equal to 1"),
])
def test_run_checks_parameter_types_and_ranges_before_anything_runs(tmp_path, monkeypatch, param, message):
    from workbench.cli import find_pipeline

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = CliRunner().invoke(app, ["run", str(find_pipeline("pbc_mortality")), "-p", param])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and message in text, text
    assert not (tmp_path / "runs" / "pbc_mortality").exists() and not (tmp_path / "mlflow.db").exists(), "nothing ran"


def labels_file(tmp_path, **columns):
    frame = pl.DataFrame({"subject_id": [1, 2, 3, 4], "prediction_time": [T + 2 * DAY, T + 4 * DAY, T + 6 * DAY, T + 8 * DAY],
                          "boolean_value": [True, False, False, True]})
    path = tmp_path / "labels.parquet"
    frame.drop([c for c, keep in columns.items() if not keep]).write_parquet(path)
    return path


@pytest.mark.parametrize("cast", ["int32 ids", "ms times", "dictionary codes"])
def test_what_validation_accepts_the_readers_accept(small_meds, tmp_path, cast):
    """Any integer id width, timestamp unit or string encoding that `validate` passes is read as MEDS."""
    for f in sorted((small_meds / "data").glob("*.parquet")):
        t = pq.read_table(f)
        column, dtype = {"int32 ids": ("subject_id", pa.int32()), "ms times": ("time", pa.timestamp("ms")),
                         "dictionary codes": ("code", None)}[cast]
        i = t.schema.get_field_index(column)
        t = t.set_column(i, column, t.column(column).dictionary_encode() if dtype is None else t.column(column).cast(dtype))
        pq.write_table(t, f)
    labels = labels_file(tmp_path)
    runner = CliRunner()
    label = runner.invoke(app, ["label", "--task", str(labels), "--data", str(small_meds), "--out", str(tmp_path / "l.parquet")])
    features = runner.invoke(app, ["features", "--data", str(small_meds), "--labels", str(labels), "--out", str(tmp_path / "t")])
    assert label.exit_code == 0 and features.exit_code == 0, label.output + features.output


def test_outputs_that_would_destroy_something_are_refused(small_meds, tmp_path):
    labels = labels_file(tmp_path)
    runner = CliRunner()
    (tmp_path / "isdir").mkdir()
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "important.txt").write_text("keep")
    cases = [
        (["label", "--task", str(labels), "--data", str(small_meds), "--out", str(tmp_path / "isdir")], "is a folder"),
        (["label", "--task", str(labels), "--data", str(small_meds), "--out", str(tmp_path / "new.parquet"),
          "--report", str(tmp_path / "isdir")], "--report"),
        (["label", "--task", str(labels), "--data", str(small_meds), "--out", str(small_meds / "data" / "00000.parquet")],
         "would overwrite the input"),
        (["features", "--data", str(small_meds), "--labels", str(labels), "--out", str(labels)], "would overwrite the input"),
        (["features", "--data", str(small_meds), "--labels", str(labels), "--out", str(small_meds)], "would overwrite the input"),
        (["features", "--data", str(small_meds), "--labels", str(labels), "--out", str(tmp_path / "keep")],
         "holds other things"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (args, result.output)
    assert (tmp_path / "keep" / "important.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["isdir", "keep", "labels.parquet", "meds"]
    assert not any((tmp_path / "isdir").iterdir())


def test_fitting_features_needs_the_labels_outcome(small_meds, tmp_path):
    labels = labels_file(tmp_path, boolean_value=False)
    result = CliRunner().invoke(app, ["features", "--data", str(small_meds), "--labels", str(labels), "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and "missing column(s) 'boolean_value'" in " ".join(result.output.split())


@pytest.mark.parametrize("text,message", [
    (b"\xff\xfe", "is not UTF-8 text"),
    (b"", "the task spec is empty"),
    (b"name: t\noutcome: {codes: [MEDS_DEATH], horizon_days: true}\n", "must be a number of days, not true"),
])
def test_task_files_that_are_not_a_task(small_meds, tmp_path, text, message):
    task = tmp_path / "task.yaml"
    task.write_bytes(text)
    result = CliRunner().invoke(app, ["label", "--task", str(task), "--data", str(small_meds), "--out", str(tmp_path / "l.parquet")])
    assert result.exit_code == 2 and message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "l.parquet").exists()


def test_a_boolean_is_not_a_number_of_epochs(tmp_path, monkeypatch):
    from workbench.cli import find_pipeline

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["run", str(find_pipeline("pbc_mortality")), "-p", "epochs=true"])
    assert result.exit_code == 2 and "parameter epochs: expected int (got true" in " ".join(result.output.split())
