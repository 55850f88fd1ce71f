"""The synthetic MEDS generator: structure, determinism and the planted signal's ground truth."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
from typer.testing import CliRunner

from workbench.cli import app
from workbench.data.meds_io import open_dataset
from workbench.data.synth import (
    DEATH_CODE,
    END_CODE,
    LABS,
    PLANTED_CODE,
    VISIT_CODE,
    SynthConfig,
    generate,
    generate_shard,
    make_config,
    read_ground_truth,
)
from workbench.errors import WorkbenchError

CONFIG = SynthConfig(n_subjects=300, seed=7, subjects_per_shard=100)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate(out, CONFIG, progress=False)
    return out


@pytest.fixture(scope="module")
def events(root):
    """Events with the shard file each row came from."""
    return pl.concat(
        [pl.read_parquet(f).with_columns(pl.lit(f.name).alias("file")) for f in open_dataset(root).data_files]
    )


@pytest.fixture(scope="module")
def truth(root):
    return read_ground_truth(root)


def test_same_seed_writes_identical_files_and_another_seed_does_not(root, tmp_path):
    again = generate(tmp_path / "again", CONFIG, progress=False)
    first = open_dataset(root)
    assert [f.name for f in again.data_files] == [f.name for f in first.data_files]
    for a, b in zip(first.data_files, again.data_files):
        assert pl.read_parquet(a).equals(pl.read_parquet(b))
    assert read_ground_truth(root).equals(read_ground_truth(tmp_path / "again"))
    assert first.splits().equals(again.splits())
    other = generate(tmp_path / "other", CONFIG.model_copy(update={"seed": 8}), progress=False)
    assert not pl.read_parquet(other.data_files[0]).equals(pl.read_parquet(first.data_files[0]))


def test_a_shard_depends_only_on_seed_and_shard_index():
    small = generate_shard(CONFIG, 1)
    large = generate_shard(CONFIG.model_copy(update={"n_subjects": 5000}), 1)
    for a, b in zip(small, large):
        assert a.equals(b)


def test_each_subject_in_one_shard_sorted_with_end_of_followup_last(events, truth):
    per_subject = events.group_by("subject_id").agg(pl.col("file").n_unique().alias("files"))
    assert per_subject["files"].max() == 1
    assert sorted(per_subject["subject_id"].to_list()) == list(range(1, CONFIG.n_subjects + 1))
    assert truth.height == CONFIG.n_subjects
    # Within a subject: static rows first, then non-decreasing times, and END_OF_FOLLOWUP last.
    t = pl.col("time").fill_null(dt.datetime(1, 1, 1))
    backwards = events.select((t.diff().over("subject_id") < dt.timedelta(0)).sum()).item()
    assert backwards == 0
    last = events.group_by("subject_id", maintain_order=True).agg(pl.col("code").last())
    assert last["code"].unique().to_list() == [END_CODE]
    static = events.filter(pl.col("time").is_null())
    assert sorted(static["code"].unique().to_list()) == ["SEX//F", "SEX//M"]
    assert static.height == CONFIG.n_subjects


def test_no_duplicate_rows_and_visits_at_least_three_hours_apart(events):
    assert not events.select("subject_id", "time", "code", "numeric_value").is_duplicated().any()
    visits = events.filter(pl.col("code") == VISIT_CODE).sort("subject_id", "time")
    gaps = visits.select(pl.col("time").diff().over("subject_id").alias("gap"))["gap"].drop_nulls()
    assert gaps.min() >= dt.timedelta(minutes=180)


def test_mean_events_per_subject_is_near_the_target(events):
    assert 80 <= events.height / CONFIG.n_subjects <= 120


def test_birth_gives_an_age_of_30_to_85_at_enrollment(events, truth):
    birth = events.filter(pl.col("code") == "MEDS_BIRTH").select("subject_id", pl.col("time").alias("birth"))
    age = truth.join(birth, on="subject_id").select(
        ((pl.col("enrollment_time") - pl.col("birth")).dt.total_days() / 365.25).alias("age")
    )["age"]
    assert age.len() == CONFIG.n_subjects
    assert 30 <= age.min() and age.max() <= 85.1


def test_planted_code_only_in_planted_subjects_once_before_prediction_time(events, truth):
    planted_events = events.filter(pl.col("code") == PLANTED_CODE)
    assert planted_events["subject_id"].is_unique().all()
    planted = truth.filter("planted")
    assert 0 < planted.height < CONFIG.n_subjects
    assert sorted(planted_events["subject_id"].to_list()) == sorted(planted["subject_id"].to_list())
    joined = planted.join(planted_events, on="subject_id")
    assert (joined["time"] == joined["planted_time"]).all()
    assert (joined["planted_code"] == PLANTED_CODE).all()
    assert (joined["time"] >= joined["enrollment_time"] + 30 * DAY).all()
    assert (joined["time"] <= joined["enrollment_time"] + 360 * DAY).all()
    assert (joined["time"] < joined["prediction_time"]).all()
    assert truth.filter(~pl.col("planted"))["planted_time"].null_count() == CONFIG.n_subjects - planted.height


def test_prediction_time_is_first_event_after_birth_plus_365_days(events, truth):
    first = (
        events.filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH"))
        .group_by("subject_id")
        .agg(pl.col("time").min().alias("first"), pl.col("code").sort_by("time").first().alias("first_code"))
    )
    joined = truth.join(first, on="subject_id")
    assert (joined["first_code"] == VISIT_CODE).all()
    assert (joined["prediction_time"] == joined["first"] + 365 * DAY).all()
    assert (joined["enrollment_time"] == joined["first"]).all()


def test_ground_truth_matches_death_and_end_of_followup_events(events, truth):
    deaths = events.filter(pl.col("code") == DEATH_CODE).select("subject_id", pl.col("time").alias("death"))
    ends = events.filter(pl.col("code") == END_CODE).select("subject_id", pl.col("time").alias("end"))
    assert deaths["subject_id"].is_unique().all() and ends.height == CONFIG.n_subjects
    joined = truth.join(deaths, on="subject_id", how="left").join(ends, on="subject_id")
    assert joined["death"].equals(joined["death_time"], check_names=False)
    assert (joined["end"] == joined["end_of_followup"]).all()
    dead = joined.filter(pl.col("death").is_not_null())
    assert (dead["end"] == dead["death"]).all()  # follow-up ends at death
    horizon_end = pl.col("prediction_time") + 365 * DAY
    expected_outcome = (pl.col("death") > pl.col("prediction_time")) & (pl.col("death") <= horizon_end)
    check = joined.select(
        expected_outcome.fill_null(False).alias("expected"),
        "outcome",
        pl.when("outcome").then(pl.col("death")).alias("expected_time"),
        "outcome_time",
        ((pl.col("end") < horizon_end) & ~pl.col("outcome")).alias("expected_censored"),
        "censored",
    )
    assert check["expected"].equals(check["outcome"], check_names=False)
    assert check["expected_time"].equals(check["outcome_time"], check_names=False)
    assert check["expected_censored"].equals(check["censored"], check_names=False)
    # Nobody dies or leaves before the prediction time; the uncensored are followed >= 400 days past it.
    assert (joined["end"] > joined["prediction_time"]).all()
    followed = joined.filter(~pl.col("censored") & pl.col("death").is_null())
    assert (followed["end"] >= followed["prediction_time"] + 400 * DAY).all()
    assert truth["censored"].sum() > 0  # censoring inside the horizon occurs, to exercise it downstream


def test_outcome_rate_is_much_higher_in_planted_subjects(truth):
    rates = truth.group_by("planted").agg(pl.col("outcome").mean()).sort("planted")["outcome"].to_list()
    baseline, planted = rates
    assert baseline < 0.15 and planted > 0.5


def test_no_events_after_end_of_followup_or_before_birth(events):
    bounds = events.group_by("subject_id").agg(
        pl.col("time").filter(pl.col("code") == "MEDS_BIRTH").first().alias("birth"),
        pl.col("time").filter(pl.col("code") == END_CODE).first().alias("end"),
        pl.col("time").min().alias("min"),
        pl.col("time").max().alias("max"),
    )
    assert (bounds["min"] == bounds["birth"]).all()
    assert (bounds["max"] == bounds["end"]).all()
    assert events["time"].max() < dt.datetime.combine(CONFIG.data_freeze, dt.time()) + DAY


def test_labs_have_values_in_their_plausible_ranges_and_other_codes_none(events):
    labs = events.filter(pl.col("code").str.starts_with("LAB//"))
    assert labs["numeric_value"].null_count() == 0
    for lab in LABS:
        values = labs.filter(pl.col("code") == lab.code)["numeric_value"]
        assert values.len() > 0, lab.code
        assert lab.low <= values.min() and values.max() <= lab.high, lab.code
        # Medians sit near the physiological centre, not at a clipping bound.
        assert abs(values.median() - lab.median) / lab.median < 0.15, lab.code
    assert events.filter(~pl.col("code").str.starts_with("LAB//"))["numeric_value"].null_count() == (
        events.height - labs.height
    )


def test_codes_metadata_lists_every_code_and_lab_units(root, events):
    codes = open_dataset(root).codes()
    assert set(events["code"].unique()) <= set(codes["code"])
    lab_descriptions = codes.filter(pl.col("code").str.starts_with("LAB//"))["description"]
    assert lab_descriptions.len() == len(LABS)
    assert lab_descriptions.str.contains(r"\[[^\]]+\]$").all()
    assert "Serum creatinine [mg/dL]" in lab_descriptions.to_list()
    planted = codes.filter(pl.col("code") == PLANTED_CODE)["description"].item()
    assert "planted" in planted.lower()


def test_splits_cover_every_subject_in_60_20_20(root):
    splits = open_dataset(root).splits()
    assert sorted(splits["subject_id"].to_list()) == list(range(1, CONFIG.n_subjects + 1))
    counts = dict(splits["split"].value_counts().iter_rows())
    assert counts == {"train": 180, "tuning": 60, "held_out": 60}


def test_dataset_json_records_generator_config_and_seed(root):
    meta = open_dataset(root).metadata()
    assert meta["synth"]["generator"] == "workbench.data.synth"
    assert meta["synth"]["seed"] == CONFIG.seed
    assert SynthConfig(**meta["synth"]["config"]) == CONFIG
    assert meta["synth"]["n_shards"] == 3


def test_validate_dataset_finds_no_problems(root):
    from workbench.data.validate import validate_dataset

    report = validate_dataset(root)
    assert report.errors == [] and report.warnings == []
    assert report.summary["subjects"] == CONFIG.n_subjects


def test_existing_output_is_refused_unless_overwrite(root, tmp_path):
    out = tmp_path / "ds"
    generate(out, SynthConfig(n_subjects=20, seed=1), progress=False)
    with pytest.raises(WorkbenchError, match="already exists"):
        generate(out, SynthConfig(n_subjects=20, seed=1), progress=False)
    generate(out, SynthConfig(n_subjects=30, seed=1), overwrite=True, progress=False)
    assert read_ground_truth(out).height == 30


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"n_subjects": 0}, "n_subjects"),
        ({"planted_fraction": 1.5}, "planted_fraction"),
        ({"enrollment_end": dt.date(2030, 1, 1)}, "data_freeze"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_config_names_the_field(values, field):
    with pytest.raises(WorkbenchError, match=field):
        make_config(**values)


def test_cli_writes_dataset_and_prints_summary(tmp_path):
    out = tmp_path / "cli"
    args = ["synth", "--subjects", "50", "--seed", "3", "--out", str(out), "--shard-size", "20", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "50 subjects" in result.output and "3 shard(s)" in result.output
    assert "ground_truth.parquet" in result.output
    assert len(open_dataset(out).data_files) == 3
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    bad = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "x"), "--planted-fraction", "2"])
    assert bad.exit_code == 2 and "planted_fraction" in bad.output
