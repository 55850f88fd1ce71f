"""Importers: long/wide/static tables into MEDS, their errors, splits, YAML configs and the CLI."""

from __future__ import annotations

import datetime as dt
import re
import tempfile
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from workbench.cli import app
from workbench.data.importers import (
    DEFAULT_NULL_VALUES,
    ImportConfig,
    LongTableConfig,
    SplitConfig,
    StaticTableConfig,
    WideTableConfig,
    assign_splits,
    import_dataset,
    import_long,
    import_static,
    import_wide,
    split_counts,
    split_strata,
)
from workbench.data.meds_io import open_dataset
from workbench.errors import SourceTableError, WorkbenchError

EVENT_COLUMNS = ["subject_id", "time", "code", "numeric_value"]


def write_csv(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def sorted_events(df: pl.DataFrame) -> pl.DataFrame:
    return df.select(EVENT_COLUMNS).sort(EVENT_COLUMNS, nulls_last=True)


# ------------------------------------------------------------------------------------------
# Round trip (property-based)
# ------------------------------------------------------------------------------------------

_codes = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs"), exclude_characters="\r\n"),
    min_size=1,
    max_size=12,
).filter(lambda c: c not in DEFAULT_NULL_VALUES)
_rows = st.lists(
    st.tuples(
        st.integers(min_value=-(2**40), max_value=2**40),
        st.none() | st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2100, 1, 1)),
        _codes,
        st.none() | st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    min_size=1,
    max_size=40,
)
# (file type, time format): parquet keeps native types; CSV goes through text parsing.
_layouts = st.sampled_from([("parquet", None), ("csv", None), ("csv", "%d/%m/%Y %H:%M:%S")])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows, layout=_layouts)
def test_any_valid_long_table_round_trips_through_meds(rows, layout):
    kind, fmt = layout
    source = pl.DataFrame(rows, schema=EVENT_COLUMNS, orient="row").cast(
        {"subject_id": pl.Int64, "time": pl.Datetime("us"), "numeric_value": pl.Float32}
    )
    if fmt is not None:  # the format has whole seconds only
        source = source.with_columns(pl.col("time").dt.truncate("1s"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"events.{kind}"
        if kind == "parquet":
            source.write_parquet(path)
        else:
            # Float32 values written via Float64 print exactly and parse back to the same float32.
            source.with_columns(pl.col("numeric_value").cast(pl.Float64)).write_csv(
                path, datetime_format=fmt or "%Y-%m-%dT%H:%M:%S%.6f"
            )
        table = LongTableConfig(path=path, time={"column": "time", "format": fmt}, value_column="numeric_value")
        config = ImportConfig(long_tables=[table])
        events = open_dataset(import_dataset(config, Path(tmp) / "meds").root).events().collect()
    assert_frame_equal(sorted_events(events), sorted_events(source))


# ------------------------------------------------------------------------------------------
# Long tables
# ------------------------------------------------------------------------------------------


def test_unparseable_date_names_row_and_column(tmp_path):
    path = write_csv(tmp_path, "ev.csv", "pid,when,what\n1,01/02/2020,A\n2,31/02/2020,B\n3,xx,C\n")
    config = LongTableConfig(path=path, subject_column="pid", time={"column": "when", "format": "%d/%m/%Y"}, code_column="what")
    with pytest.raises(SourceTableError) as err:
        import_long(config)
    message = str(err.value)
    assert str(path) in message
    assert "row 2 (line 3), column 'when'" in message and "'31/02/2020'" in message
    assert "%d/%m/%Y" in message and "2 rows in all: rows 2, 3" in message


def test_non_numeric_value_names_row_and_column(tmp_path):
    path = write_csv(tmp_path, "ev.csv", "subject_id,time,code,val\n1,2020-01-01,A,1.5\n1,2020-01-02,A,high\n")
    with pytest.raises(SourceTableError, match=r"ev\.csv row 2 \(line 3\), column 'val': 'high' is not a number"):
        import_long(LongTableConfig(path=path, value_column="val"))


def test_missing_mapped_column_names_column_and_file(tmp_path):
    path = write_csv(tmp_path, "ev.csv", "subject_id,time,code\n1,2020-01-01,A\n")
    with pytest.raises(SourceTableError) as err:
        import_long(LongTableConfig(path=path, value_column="lab_value"))
    assert str(path) in str(err.value)
    assert "'lab_value' (value column) not found" in str(err.value)
    assert "subject_id, time, code" in str(err.value)


def test_bad_subject_id_and_missing_code_are_reported(tmp_path):
    path = write_csv(tmp_path, "ev.csv", "subject_id,time,code\n1,2020-01-01,A\nP7,2020-01-01,A\n")
    with pytest.raises(SourceTableError, match=r"row 2 \(line 3\), column 'subject_id': 'P7' is not an integer"):
        import_long(LongTableConfig(path=path))
    path = write_csv(tmp_path, "ev2.csv", "subject_id,time,code\n1,2020-01-01,A\n1,2020-01-01,\n")
    with pytest.raises(SourceTableError, match=r"row 2 \(line 3\), column 'code': missing code"):
        import_long(LongTableConfig(path=path))


def test_values_and_offsets_out_of_range_are_errors_not_infinities():
    frame = pl.DataFrame({"subject_id": [1, 2], "t": ["1", "1e30"], "code": ["A", "B"], "v": ["1", "1e39"]})
    relative = {"column": "t", "relative_unit": "days", "anchor_date": "2000-01-01"}
    with pytest.raises(SourceTableError, match=r"row 2, column 't': '1e30' is out of range as a time offset"):
        import_long(LongTableConfig(time=relative), frame)
    with pytest.raises(SourceTableError, match=r"row 2, column 'v': '1e39' is too large for a float32"):
        import_long(LongTableConfig(time=relative, value_column="v"), frame.with_columns(t=pl.lit("1")))


def test_parquet_errors_name_rows_without_lines(tmp_path):
    path = tmp_path / "ev.parquet"
    pl.DataFrame({"subject_id": [1, 2], "time": ["2020-01-01", "soon"], "code": ["A", "B"]}).write_parquet(path)
    with pytest.raises(SourceTableError, match=r"ev\.parquet row 2, column 'time': 'soon'"):
        import_long(LongTableConfig(path=path))


def test_relative_times_with_fixed_and_per_subject_anchor(tmp_path):
    events = write_csv(tmp_path, "ev.csv", "id,day,code\n1,0,A\n1,1.5,B\n2,-2,A\n2,,S\n")
    fixed = import_long(
        LongTableConfig(path=events, subject_column="id", time={"column": "day", "relative_unit": "days", "anchor_date": "2000-01-01"})
    )
    assert fixed["time"].to_list() == [
        dt.datetime(2000, 1, 1), dt.datetime(2000, 1, 2, 12), dt.datetime(1999, 12, 30), None,
    ]
    anchors = write_csv(tmp_path, "anchors.csv", "id,enrolled\n1,2010-05-01\n2,2011-01-01\n")
    per_subject = {"column": "day", "relative_unit": "days", "anchor_table": {"path": anchors, "subject_column": "id", "date_column": "enrolled"}}
    got = import_long(LongTableConfig(path=events, subject_column="id", time=per_subject))
    assert got["time"].to_list()[:3] == [dt.datetime(2010, 5, 1), dt.datetime(2010, 5, 2, 12), dt.datetime(2010, 12, 30)]
    short = write_csv(tmp_path, "short.csv", "id,enrolled\n1,2010-05-01\n")
    per_subject["anchor_table"]["path"] = short
    with pytest.raises(SourceTableError, match=r"ev\.csv row 3 \(line 4\): subject 2 has no anchor date in .*short\.csv"):
        import_long(LongTableConfig(path=events, subject_column="id", time=per_subject))


def test_code_map_constant_code_and_distinct(tmp_path):
    path = write_csv(tmp_path, "out.csv", "id,t,status\n1,10,2\n1,10,2\n2,20,0\n3,30,1\n")
    time = {"column": "t", "relative_unit": "days", "anchor_date": "2000-01-01"}
    mapped = import_long(
        LongTableConfig(path=path, subject_column="id", time=time, code_column="status",
                        code_map={"2": "MEDS_DEATH", "1": "TRANSPLANT", "0": None}, unmapped="error", distinct=True)
    )
    assert mapped.select("subject_id", "code").rows() == [(1, "MEDS_DEATH"), (3, "TRANSPLANT")]
    bad = write_csv(tmp_path, "bad.csv", "id,t,status\n1,10,2\n2,20,9\n")
    with pytest.raises(SourceTableError, match=r"row 2 \(line 3\), column 'status': '9' is not in code_map"):
        import_long(LongTableConfig(path=bad, subject_column="id", time=time, code_column="status",
                                    code_map={"2": "MEDS_DEATH"}, unmapped="error"))
    kept = import_long(LongTableConfig(path=bad, subject_column="id", time=time, code_column="status",
                                       code_prefix="STATUS", code_map={"2": "MEDS_DEATH"}))
    assert kept["code"].to_list() == ["MEDS_DEATH", "STATUS//9"]
    constant = import_long(LongTableConfig(path=path, subject_column="id", time=time, code="END", distinct=True))
    assert constant.select("subject_id", "code").rows() == [(1, "END"), (2, "END"), (3, "END")]


# ------------------------------------------------------------------------------------------
# Wide and static tables
# ------------------------------------------------------------------------------------------

WIDE = "pid,visit,bili,alb,smoker\n1,2020-01-01,1.5,3.2,yes\n1,2020-02-01,,NaN,no\n2,2020-01-05,0.7,4.1,\n"


def test_wide_table_numeric_and_categorical_columns(tmp_path):
    path = write_csv(tmp_path, "visits.csv", WIDE)
    config = WideTableConfig.model_validate(
        {
            "path": path, "subject_column": "pid", "time": {"column": "visit"},
            "groups": [
                {"prefix": "LAB", "columns": ["bili", "alb"], "rename": {"bili": "bilirubin"},
                 "units": {"bili": "mg/dl", "alb": "g/dl"}, "descriptions": {"bili": "Serum bilirubin"}},
                {"prefix": "HX", "columns": ["smoker"], "value_map": {"yes": "Y"}},
            ],
        }
    )
    events, codes = import_wide(config)
    assert events.select("subject_id", "code", "numeric_value").rows() == [
        (1, "VISIT", None), (1, "LAB//bilirubin", 1.5), (1, "LAB//alb", pytest.approx(3.2)), (1, "HX//smoker//Y", None),
        (1, "VISIT", None), (1, "HX//smoker//no", None),
        (2, "VISIT", None), (2, "LAB//bilirubin", pytest.approx(0.7)), (2, "LAB//alb", pytest.approx(4.1)),
    ]
    described = dict(codes.select("code", "description").rows())
    assert described["LAB//bilirubin"] == "Serum bilirubin [mg/dl]"
    assert described["LAB//alb"] == "alb [g/dl]"
    assert described["HX//smoker//no"] == "smoker: no"


def test_wide_numeric_group_rejects_text_and_missing_columns(tmp_path):
    path = write_csv(tmp_path, "visits.csv", WIDE)
    numeric = {"path": path, "subject_column": "pid", "time": {"column": "visit"},
               "groups": [{"prefix": "LAB", "kind": "numeric", "columns": ["bili", "smoker"]}]}
    with pytest.raises(SourceTableError, match=r"visits\.csv row 1 \(line 2\), column 'smoker': 'yes' is not a number"):
        import_wide(WideTableConfig.model_validate(numeric))
    numeric["groups"][0]["columns"] = ["bili", "creat", "urea"]
    with pytest.raises(SourceTableError, match=r"'creat' \(LAB measurement\), 'urea' \(LAB measurement\) not found"):
        import_wide(WideTableConfig.model_validate(numeric))


def test_static_table_sex_age_and_index_date_events(tmp_path):
    # Subject 1 repeats on two rows with the same values (as in per-visit exports).
    path = write_csv(tmp_path, "people.csv", "id,sex,age,arm\n1,f,50.0,1\n1,f,50.0,1\n2,m,,0\n")
    config = StaticTableConfig.model_validate(
        {
            "path": path, "subject_column": "id", "index_date": "2000-01-01", "age_column": "age",
            "attributes": [
                {"column": "sex", "prefix": "SEX", "value_map": {"f": "F", "m": "M"}},
                {"column": "arm", "prefix": "ARM", "value_map": {"1": "drug", "0": "placebo"}, "at_index_date": True},
            ],
        }
    )
    events, codes = import_static(config)
    birth = dt.datetime(2000, 1, 1) - dt.timedelta(days=50 * 365.25)
    assert sorted_events(events).select("subject_id", "time", "code").rows() == [
        (1, birth, "MEDS_BIRTH"), (1, dt.datetime(2000, 1, 1), "ARM//drug"), (1, None, "SEX//F"),
        (2, dt.datetime(2000, 1, 1), "ARM//placebo"), (2, None, "SEX//M"),
    ]
    assert set(codes["code"]) == {"MEDS_BIRTH", "SEX//F", "SEX//M", "ARM//drug", "ARM//placebo"}


def test_static_table_birth_date_column_and_conflicts(tmp_path):
    path = write_csv(tmp_path, "people.csv", "id,dob\n1,1950-03-04\n2,1960-07-08\n")
    events, _ = import_static(StaticTableConfig(path=path, subject_column="id", birth_date_column="dob"))
    assert events["time"].to_list() == [dt.datetime(1950, 3, 4), dt.datetime(1960, 7, 8)]
    conflict = write_csv(tmp_path, "conflict.csv", "id,sex\n1,f\n2,m\n1,m\n")
    config = StaticTableConfig.model_validate(
        {"path": conflict, "subject_column": "id", "attributes": [{"column": "sex", "prefix": "SEX"}]}
    )
    with pytest.raises(SourceTableError, match=r"subject 1 has conflicting values in column 'sex': 'f' at row 1 \(line 2\) and 'm' at row 3 \(line 4\)"):
        import_static(config)


def test_static_config_needs_index_date_for_age():
    with pytest.raises(ValueError, match="need index_date"):
        StaticTableConfig(age_column="age")


# ------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------


def test_splits_are_deterministic_exact_and_order_independent():
    ids = pl.Series(range(1000, 1500), dtype=pl.Int64)
    config = SplitConfig(train=0.6, tuning=0.2, held_out=0.2, seed=42)
    first = assign_splits(ids, config)
    assert_frame_equal(first, assign_splits(ids.reverse().append(ids), config))  # order and repeats don't matter
    assert dict(first.group_by("split").len().rows()) == {"train": 300, "tuning": 100, "held_out": 100}
    other = assign_splits(ids, config.model_copy(update={"seed": 7}))
    assert (other["split"] != first["split"]).sum() > 100


def test_stratified_splits_give_every_split_the_same_share_of_a_code():
    """A rare outcome (30 of 500 subjects die) lands 18 / 6 / 6 in a 60/20/20 split, not by luck."""
    ids = list(range(500))
    dead = set(range(0, 500, 17)[:30])
    events = pl.DataFrame({"subject_id": ids + sorted(dead), "code": ["VISIT"] * 500 + ["MEDS_DEATH"] * len(dead)})
    config = SplitConfig(train=0.6, tuning=0.2, held_out=0.2, seed=3, stratify_codes=["MEDS_DEATH"])
    splits = assign_splits(events["subject_id"], config, split_strata(events, config.stratify_codes))
    deaths = dict(splits.filter(pl.col("subject_id").is_in(sorted(dead))).group_by("split").len().rows())
    assert deaths == {"train": 18, "tuning": 6, "held_out": 6}
    assert dict(splits.group_by("split").len().rows()) == {"train": 300, "tuning": 100, "held_out": 100}
    plain = assign_splits(events["subject_id"], config.model_copy(update={"stratify_codes": []}))
    assert splits.height == plain.height and (splits["split"] != plain["split"]).any()


def test_split_counts_sum_to_n_and_fractions_must_sum_to_one():
    assert split_counts(312, SplitConfig(train=0.6, tuning=0.2, held_out=0.2)) == [187, 63, 62]
    assert split_counts(7, SplitConfig(train=1, tuning=0, held_out=0)) == [7, 0, 0]
    assert sum(split_counts(11, SplitConfig())) == 11
    with pytest.raises(ValueError, match="must sum to 1"):
        SplitConfig(train=0.5, tuning=0.1, held_out=0.1)


# ------------------------------------------------------------------------------------------
# YAML configs and the CLI
# ------------------------------------------------------------------------------------------


def test_yaml_config_resolves_paths_and_records_seed(tmp_path):
    (tmp_path / "src").mkdir()
    write_csv(tmp_path / "src", "ev.csv", "subject_id,time,code\n1,2020-01-01,A\n2,2020-01-01,B\n3,2020-01-01,C\n")
    yaml_path = tmp_path / "import.yaml"
    yaml_path.write_text("dataset_name: demo\nlong_tables:\n  - path: src/ev.csv\nsplits: {train: 0.34, tuning: 0.33, held_out: 0.33, seed: 5}\n")
    dataset = import_dataset(ImportConfig.from_yaml(yaml_path), tmp_path / "out")
    meta = dataset.metadata()
    assert meta["dataset_name"] == "demo" and meta["splits"]["seed"] == 5
    assert meta["splits"]["subjects"] == {"train": 1, "tuning": 1, "held_out": 1}
    assert dataset.splits().height == 3


def test_yaml_config_rejects_unknown_keys(tmp_path):
    yaml_path = tmp_path / "import.yaml"
    yaml_path.write_text("long_tables:\n  - path: ev.csv\n    subjet_column: id\n")
    with pytest.raises(WorkbenchError, match=r"long_tables\.0\.subjet_column: Extra inputs"):
        ImportConfig.from_yaml(yaml_path)


def test_cli_import_long_and_exit_code_2_on_bad_input(tmp_path):
    good = write_csv(tmp_path, "ev.csv", "pid,t,c,v\n1,2020-01-01,A,1\n2,2020-01-02,B,\n")
    runner = CliRunner()
    result = runner.invoke(
        app, ["import", "long", str(good), str(tmp_path / "out"), "--subject-col", "pid", "--time-col", "t",
              "--code-col", "c", "--value-col", "v", "--seed", "3"],
    )
    assert result.exit_code == 0, result.output
    assert open_dataset(tmp_path / "out").events().collect().height == 2
    bad = write_csv(tmp_path, "bad.csv", "pid,t,c,v\n1,2020-01-01,A,1\n2,2020-01-02,B,lots\n")
    result = runner.invoke(
        app, ["import", "long", str(bad), str(tmp_path / "out2"), "--subject-col", "pid", "--time-col", "t",
              "--code-col", "c", "--value-col", "v"],
    )
    assert result.exit_code == 2
    assert re.search(r"row 2 \(line 3\), column 'v': 'lots' is not a number", " ".join(result.output.split()))
    assert not (tmp_path / "out2").exists()


def test_cli_import_config_reports_bad_config(tmp_path):
    yaml_path = tmp_path / "import.yaml"
    yaml_path.write_text("splits: {train: 2}\n")
    result = CliRunner().invoke(app, ["import", "config", str(yaml_path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "splits.train" in result.output
