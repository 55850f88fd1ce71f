"""Bad input at the command line: each case exits 2 with a message naming the file, the column (or
field) and what is wrong, never with a traceback. Small hand-made datasets; no training."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from workbench.cli import app
from workbench.data.meds_io import open_dataset
from workbench.data.validate import validate_dataset
from workbench.errors import WorkbenchError

runner = CliRunner()
INT64_MAX = 2**63 - 1


def refused(args, *parts):
    """Run the CLI: exit 2 from a WorkbenchError (no other exception), each part in the output."""
    result = runner.invoke(app, [str(a) for a in args])
    out = " ".join(result.output.split())
    assert result.exit_code == 2, out
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a traceback would be another type
    assert "Traceback" not in result.output
    for part in parts:
        assert str(part) in out, f"{part!r} not in: {out}"
    return out


def first_shard(root):
    return sorted((root / "data").glob("*.parquet"))[0]


def huge_subject_ids(root):
    """Rewrite the first shard with uint64 subject ids beyond int64 (order kept); returns (shard, first id)."""
    path = first_shard(root)
    table = pq.read_table(path)
    old = table.column("subject_id").to_pylist()
    ids = pa.array([INT64_MAX + 1 + v for v in old], pa.uint64())
    pq.write_table(table.set_column(0, "subject_id", ids), path)
    return path, INT64_MAX + 1 + old[0]


def test_uint64_subject_ids_beyond_int64_in_validate(small_meds):
    path, first = huge_subject_ids(small_meds)
    refused(["validate", small_meds], "subject_id_out_of_range", path.name, "column subject_id", "int64", first)


def test_uint64_subject_ids_beyond_int64_when_reading_events(small_meds, tmp_path):
    path, first = huge_subject_ids(small_meds)
    with pytest.raises(WorkbenchError, match="column subject_id.*int64"):
        open_dataset(small_meds).events()
    refused(["label", "--task", "pbc_mortality", "--data", small_meds, "--out", tmp_path / "labels.parquet"],
            path.name, "column subject_id", "int64", f"e.g. subject_id {first}")


def test_uint64_subject_ids_real_process_prints_no_traceback(small_meds):
    path, first = huge_subject_ids(small_meds)
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "validate", str(small_meds)],
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out and "subject_id_out_of_range" in out and str(first) in out


@pytest.mark.parametrize("name", ["subject_splits.parquet", "codes.parquet"])
def test_metadata_file_that_is_not_parquet(small_meds, name):
    (small_meds / "metadata" / name).write_text("subject_id,split\n1,train\n")
    refused(["validate", small_meds], "unreadable_file", name, "not a readable parquet file")


def test_splits_file_that_is_not_parquet_when_reading(small_meds, tmp_path):
    (small_meds / "metadata" / "subject_splits.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(WorkbenchError, match="subject_splits.parquet: not a readable parquet file"):
        open_dataset(small_meds).splits()


def test_splits_with_string_subject_ids(small_meds):
    pl.DataFrame({"subject_id": ["1", "2", "3", "4"], "split": ["train", "train", "tuning", "held_out"]}).write_parquet(
        small_meds / "metadata" / "subject_splits.parquet")
    refused(["validate", small_meds], "wrong_type", "subject_splits.parquet", "column subject_id",
            "MEDS requires int64", "e.g. '1'")


def test_splits_with_unreadable_string_subject_ids_when_reading(small_meds):
    pl.DataFrame({"subject_id": ["a1"], "split": ["train"]}).write_parquet(small_meds / "metadata" / "subject_splits.parquet")
    with pytest.raises(WorkbenchError, match="subject_splits.parquet: column subject_id .*'a1'"):
        open_dataset(small_meds).splits()


def test_codes_without_code_column(small_meds):
    pl.DataFrame({"name": ["LAB//x"], "description": ["x"]}).write_parquet(small_meds / "metadata" / "codes.parquet")
    refused(["validate", small_meds], "missing_column", "codes.parquet", "column code", "found name, description")
    with pytest.raises(WorkbenchError, match="codes.parquet: column code is missing"):
        open_dataset(small_meds).codes()


def test_float64_value_beyond_float32_is_out_of_range_not_infinite(small_meds):
    path = first_shard(small_meds)
    table = pq.read_table(path)
    values = table.column("numeric_value").to_pylist()
    i = next(k for k, v in enumerate(values) if v is not None)
    values[i] = 1e300
    pq.write_table(table.set_column(3, "numeric_value", pa.array(values, pa.float64())), path)
    sid = table.column("subject_id")[i].as_py()
    out = refused(["validate", small_meds], "value_out_of_range", path.name, "column numeric_value", "float32 range",
                  f"e.g. subject_id {sid}")
    assert "infinite" not in out
    assert [p.check for p in validate_dataset(small_meds).errors] == ["value_out_of_range"]


@pytest.mark.parametrize("section, field, value", [
    ("outcome", "horizon_days", ".inf"),
    ("outcome", "horizon_days", "1e12"),
    ("outcome", "gap_days", ".nan"),
    ("prediction_times", "offset_days", "40000"),
    ("inclusion", "min_history_days", "-.inf"),
])
def test_task_with_absurd_day_count(small_meds, tmp_path, section, field, value):
    extra = "  kind: offset\n" if section == "prediction_times" else ""
    task = tmp_path / "bad_task.yaml"
    task.write_text(f"name: bad\n{section}:\n{extra}  {field}: {value}\n")
    refused(["label", "--task", task, "--data", small_meds, "--out", tmp_path / "labels.parquet"],
            task.name, f"{section}.{field}", "days", "100 years")
    assert not (tmp_path / "labels.parquet").exists()


# --- explain ---


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty project home and MLflow store of its own."""
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def logged_run(kind: str) -> str:
    """A model run as a train step tags it (no model logged: the refusal must come before loading one)."""
    import mlflow

    from workbench import record, tracking

    tracking.setup()
    with mlflow.start_run(experiment_id=tracking.experiment_id("bad_input")) as run:
        mlflow.set_tags({record.MODEL_TAG: kind, record.DATA_ROOT_TAG: "/nowhere", record.TASK_TAG: "pbc_mortality"})
    return run.info.run_id


def test_explain_a_logistic_run_and_an_unknown_run(store):
    run_id = logged_run("logistic")
    refused(["explain", "--run", run_id], run_id, "'logistic' model run", "SHAP per time step needs a sequence model run",
            "lstm, gru, rnn")
    refused(["explain", "--run", "0123456789abcdef0123456789abcdef"], "run 0123456789abcdef0123456789abcdef: not found")
    sequence = logged_run("lstm")  # a sequence run without its artifacts: still a message
    refused(["explain", "--run", sequence], sequence, "feature_spec.json")


@pytest.mark.parametrize("text, parts", [
    (None, ["missing.yaml", "cannot read ExplainConfig YAML"]),
    ("n_backgroundz: 3\n", ["n_backgroundz", "Extra inputs are not permitted"]),
    ("n_background: many\n", ["n_background", "valid integer", "'many'"]),
    ("- 1\n- 2\n", ["expected a mapping of ExplainConfig fields"]),
])
def test_explain_bad_config(tmp_path, text, parts):
    """The YAML is checked first, before any run is looked up (so no store is needed here)."""
    path = tmp_path / ("missing.yaml" if text is None else "explain.yaml")
    if text is not None:
        path.write_text(text)
    refused(["explain", "--run", "any", "--config", path], path.name, *parts)
