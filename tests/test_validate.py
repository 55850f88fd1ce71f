"""Every validation error and warning, each on a deliberately broken copy of a valid dataset."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from workbench.cli import app
from workbench.data.validate import require_valid, validate_dataset
from workbench.errors import DataValidationError

runner = CliRunner()


def shard(root, name="00000"):
    return root / "data" / f"{name}.parquet"


def first_shard(root):
    return sorted((root / "data").glob("*.parquet"))[0]


def rewrite(path, fn):
    """Apply fn to the shard's table (pyarrow, so wrong types survive) and write it back."""
    pq.write_table(fn(pq.read_table(path)), path)


def run_validate(root):
    result = runner.invoke(app, ["validate", str(root)])
    return result.exit_code, result.output


def assert_reported(root, check, *, column, subject, file_part, exit_code=2):
    code, out = run_validate(root)
    assert code == exit_code, out
    report = validate_dataset(root)
    found = [p for p in report.problems if p.check == check]
    assert found, f"{check} not reported: {report.problems}"
    p = found[0]
    assert p.column == column
    assert p.example_subject == subject
    assert file_part in p.file
    assert p.n_rows is not None and p.n_rows >= 1
    # The printed message carries the same facts.
    flat = " ".join(out.split())
    assert check in flat and str(subject if subject is not None else "") in flat
    if column:
        assert f"column {column}" in flat
    return p


def test_valid_dataset_passes_and_prints_summary(small_meds):
    code, out = run_validate(small_meds)
    assert code == 0, out
    assert "subjects" in out and "4" in out and "valid" in out
    report = require_valid(small_meds)
    assert report.summary["subjects"] == 4
    assert report.summary["events"] == 16
    assert report.summary["splits"]["train"] == (2, 8)
    assert report.warnings == []


def test_missing_required_column(small_meds):
    f = first_shard(small_meds)
    first = pq.read_table(f).column("subject_id")[0].as_py()
    rewrite(f, lambda t: t.drop_columns(["code"]))
    assert_reported(small_meds, "missing_column", column="code", subject=first, file_part=f.name)


def test_time_as_string(small_meds):
    f = first_shard(small_meds)
    first = pq.read_table(f).column("subject_id")[0].as_py()
    rewrite(f, lambda t: t.set_column(1, "time", pa.array([str(v) for v in t.column("time").to_pylist()])))
    p = assert_reported(small_meds, "wrong_type", column="time", subject=first, file_part=f.name)
    assert "string" in p.message and "timestamp" in p.message


def test_subject_id_as_float(small_meds):
    f = first_shard(small_meds)
    first = pq.read_table(f).column("subject_id")[0].as_py()
    rewrite(f, lambda t: t.set_column(0, "subject_id", t.column("subject_id").cast(pa.float64())))
    p = assert_reported(small_meds, "wrong_type", column="subject_id", subject=first, file_part=f.name)
    assert "double" in p.message


@pytest.mark.parametrize("column", ["subject_id", "code"])
def test_null_subject_or_code(small_meds, column):
    f = first_shard(small_meds)
    df = pl.read_parquet(f)
    victim = df["subject_id"][2]
    df = df.with_columns(
        pl.when(pl.int_range(pl.len()) == 2).then(None).otherwise(pl.col(column)).alias(column)
    )
    df.write_parquet(f)
    expected_subject = None if column == "subject_id" else victim
    assert_reported(small_meds, "null_value", column=column, subject=expected_subject, file_part=f.name)


def test_subject_in_two_shards(small_meds):
    a, b = sorted((small_meds / "data").glob("*.parquet"))
    moved = pl.read_parquet(a).head(1)
    pl.concat([pl.read_parquet(b), moved]).write_parquet(b)
    pl.read_parquet(a).slice(1).write_parquet(a)
    sid = moved["subject_id"][0]
    p = assert_reported(small_meds, "subject_in_several_shards", column="subject_id", subject=sid, file_part=a.name)
    assert b.name in p.file


def test_unsorted_times(small_meds):
    f = first_shard(small_meds)
    df = pl.read_parquet(f)
    sid = df["subject_id"][0]
    rows = df.filter(pl.col("subject_id") == sid)
    rest = df.filter(pl.col("subject_id") != sid)
    # Swap the last two timed events of the subject.
    swapped = pl.concat([rows.head(2), rows.slice(3, 1), rows.slice(2, 1)])
    pl.concat([swapped, rest]).write_parquet(f)
    assert_reported(small_meds, "unsorted_times", column="time", subject=sid, file_part=f.name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_infinite_value(small_meds, bad):
    f = first_shard(small_meds)
    df = pl.read_parquet(f)
    idx = df["code"].to_list().index("LAB//x")
    sid = df["subject_id"][idx]
    df.with_columns(
        pl.when(pl.int_range(pl.len()) == idx).then(pl.lit(bad, pl.Float32)).otherwise(pl.col("numeric_value")).alias("numeric_value")
    ).write_parquet(f)
    check = "nan_value" if bad != bad else "infinite_value"
    assert_reported(small_meds, check, column="numeric_value", subject=sid, file_part=f.name)


def test_empty_dataset_no_shards(small_meds):
    for f in (small_meds / "data").glob("*.parquet"):
        f.unlink()
    code, out = run_validate(small_meds)
    assert code == 2 and "empty_dataset" in out and "data" in out


def test_empty_dataset_zero_rows(small_meds):
    for f in (small_meds / "data").glob("*.parquet"):
        pl.read_parquet(f).head(0).write_parquet(f)
    code, out = run_validate(small_meds)
    assert code == 2 and "empty_dataset" in out


def test_split_names_subject_absent_from_data(small_meds):
    path = small_meds / "metadata" / "subject_splits.parquet"
    splits = pl.read_parquet(path)
    pl.concat([splits, pl.DataFrame({"subject_id": [99], "split": ["train"]})]).write_parquet(path)
    assert_reported(small_meds, "split_subject_not_in_data", column="subject_id", subject=99, file_part="subject_splits")


def test_data_subject_missing_from_splits(small_meds):
    path = small_meds / "metadata" / "subject_splits.parquet"
    pl.read_parquet(path).filter(pl.col("subject_id") != 3).write_parquet(path)
    assert_reported(small_meds, "data_subject_not_in_splits", column="subject_id", subject=3, file_part="subject_splits")


def test_unknown_split_name(small_meds):
    path = small_meds / "metadata" / "subject_splits.parquet"
    pl.read_parquet(path).with_columns(
        pl.when(pl.col("subject_id") == 2).then(pl.lit("validation")).otherwise(pl.col("split")).alias("split")
    ).write_parquet(path)
    p = assert_reported(small_meds, "unknown_split", column="split", subject=2, file_part="subject_splits")
    assert "validation" in p.message


def test_warning_duplicate_rows(small_meds):
    f = first_shard(small_meds)
    df = pl.read_parquet(f)
    sid = df["subject_id"][2]
    pl.concat([df.slice(0, 3), df.slice(2, 1), df.slice(3)]).write_parquet(f)
    assert_reported(small_meds, "duplicate_rows", column=None, subject=sid, file_part=f.name, exit_code=0)


@pytest.mark.parametrize("when", [dt.datetime(1850, 1, 1), dt.datetime(2200, 1, 1)])
def test_warning_time_out_of_range(small_meds, when):
    f = first_shard(small_meds)
    df = pl.read_parquet(f)
    sid = df["subject_id"][0]
    # Keep the subject sorted: put the out-of-range event in time order (first if early, last if late).
    row = df.filter(pl.col("subject_id") == sid).tail(1).with_columns(pl.lit(when).cast(pl.Datetime("us")).alias("time"))
    subj = df.filter(pl.col("subject_id") == sid)
    rest = df.filter(pl.col("subject_id") != sid)
    ordered = pl.concat([subj.head(1), row, subj.slice(1)] if when.year < 1900 else [subj, row])
    pl.concat([ordered, rest]).write_parquet(f)
    p = assert_reported(small_meds, "time_out_of_range", column="time", subject=sid, file_part=f.name, exit_code=0)
    assert ("1900" in p.message) == (when.year < 1900)


def test_warning_code_missing_from_metadata(small_meds):
    path = small_meds / "metadata" / "codes.parquet"
    pl.read_parquet(path).filter(pl.col("code") != "DX//y").write_parquet(path)
    p = assert_reported(small_meds, "code_not_in_metadata", column="code", subject=1, file_part="codes.parquet", exit_code=0)
    assert "DX//y" in p.message


def test_require_valid_raises_with_every_error(small_meds):
    f = first_shard(small_meds)
    rewrite(f, lambda t: t.drop_columns(["code"]))
    with pytest.raises(DataValidationError) as info:
        require_valid(small_meds)
    assert "missing_column" in str(info.value) and f.name in str(info.value)


def test_cli_process_exit_code(small_meds):
    """The installed console script exits 2 on an invalid dataset (a real process, not CliRunner)."""
    shutil.rmtree(small_meds / "data")
    (small_meds / "data").mkdir()
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "validate", str(small_meds)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "empty_dataset" in proc.stdout + proc.stderr


def test_require_valid_cached_validates_unchanged_data_once(small_meds, tmp_path, monkeypatch):
    import os

    import workbench.data.validate as V

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    calls = []
    inner = V.validate_dataset
    monkeypatch.setattr(V, "validate_dataset", lambda root, today=None: calls.append(root) or inner(root, today))
    first = V.require_valid_cached(small_meds)
    second = V.require_valid_cached(small_meds)
    assert len(calls) == 1
    assert second.ok and second.summary == first.summary and second.problems == first.problems
    markers = list((tmp_path / "home" / "runs" / ".validated").glob("*.json"))
    assert len(markers) == 1 and not list(small_meds.glob(".*"))  # nothing written into the dataset
    # A changed file (new size or modification time) is validated again.
    path = small_meds / "metadata" / "subject_splits.parquet"
    pl.read_parquet(path).write_parquet(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    V.require_valid_cached(small_meds)
    assert len(calls) == 2
    V.require_valid_cached(small_meds)
    assert len(calls) == 2


def test_require_valid_cached_never_caches_a_failure(small_meds, tmp_path, monkeypatch):
    import workbench.data.validate as V

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    calls = []
    inner = V.validate_dataset
    monkeypatch.setattr(V, "validate_dataset", lambda root, today=None: calls.append(root) or inner(root, today))
    f = first_shard(small_meds)
    rewrite(f, lambda t: t.drop_columns(["code"]))
    for _ in range(2):
        with pytest.raises(DataValidationError, match="missing_column"):
            V.require_valid_cached(small_meds)
    assert len(calls) == 2
    assert not (tmp_path / "home" / "runs" / ".validated").exists() or not list((tmp_path / "home" / "runs" / ".validated").iterdir())
