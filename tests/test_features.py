"""Tensorization: hand-computed values, as-of leakage, split hygiene, spec round trips, the CLI."""

from __future__ import annotations

import datetime as dt
import math
import warnings

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from conftest import events_frame
from workbench import features as ft
from workbench.cli import app
from workbench.data.meds_io import write_dataset
from workbench.errors import WorkbenchError

PT = dt.datetime(2020, 1, 10)
H = dt.timedelta(hours=1)
D = dt.timedelta(days=1)
US = dt.timedelta(microseconds=1)

HAND_CONFIG = ft.FeatureConfig(
    bin_width="1d", n_steps=3, numeric_aggs=["last", "mean"], min_code_frequency=1,
    add_missing_indicators=True, add_time_since_last=True, add_history=False,
)
HAND_FEATURES = [
    "LAB//a/last", "LAB//a/mean", "LAB//a/missing", "LAB//a/time_since", "DX//x/count",
    "static/age_years", "static/SEX//F", "static/SEX//M", "step/observed",
]


def hand_events() -> list[tuple]:
    """Three subjects; prediction time Jan 10 00:00 for all; steps end Jan 8, Jan 9, Jan 10."""
    return [
        # subject 1 (train): two labs in step 1, a diagnosis on the step-1/step-2 boundary and one at pt
        (1, None, "SEX//F", None),
        (1, dt.datetime(1990, 1, 10), "MEDS_BIRTH", None),
        (1, dt.datetime(2020, 1, 8, 6), "LAB//a", 2.0),
        (1, dt.datetime(2020, 1, 8, 18), "LAB//a", 4.0),
        (1, dt.datetime(2020, 1, 9), "DX//x", None),
        (1, PT, "DX//x", None),
        (1, PT + US, "LAB//a", 100.0),  # one microsecond too late: never used
        # subject 2 (train): a lab and a diagnosis before the window, a lab in step 2
        (2, None, "SEX//M", None),
        (2, dt.datetime(1980, 1, 10), "MEDS_BIRTH", None),
        (2, dt.datetime(2020, 1, 1, 12), "LAB//a", 10.0),
        (2, dt.datetime(2020, 1, 6, 12), "DX//x", None),  # before step 0 = (Jan 7, Jan 8]
        (2, dt.datetime(2020, 1, 9, 12), "LAB//a", 6.0),
        # subject 3 (held out): no birth, no lab before pt, two diagnoses in step 1, an unknown code
        (3, None, "SEX//F", None),
        (3, dt.datetime(2020, 1, 8, 12), "DX//x", None),
        (3, dt.datetime(2020, 1, 8, 13), "DX//x", None),
        (3, dt.datetime(2020, 1, 9, 1), "DX//new", None),
        (3, PT + H, "LAB//a", 1000.0),
    ]


HAND_SPLITS = pl.DataFrame({"subject_id": [1, 2, 3], "split": ["train", "train", "held_out"]})


def hand_labels(subjects=(1, 2, 3)) -> pl.DataFrame:
    return pl.DataFrame({"subject_id": list(subjects), "prediction_time": [PT] * len(subjects),
                         "boolean_value": [True, False, True][: len(subjects)]},
                        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean})


def make(tmp_path, rows, splits=HAND_SPLITS, name="meds"):
    return write_dataset(tmp_path / name, events_frame(rows), splits=splits, overwrite=True)


@pytest.fixture
def hand(tmp_path):
    return make(tmp_path, hand_events())


def test_hand_computed_fixture(hand):
    with pytest.warns(ft.UnseenCodesWarning, match="DX//new"):
        spec, st = ft.fit_transform(hand, hand_labels(), HAND_CONFIG)
    assert st.feature_names == spec.feature_names == HAND_FEATURES
    assert spec.numeric_codes == ["LAB//a"] and spec.count_codes == ["DX//x"]
    assert spec.static_codes == ["SEX//F", "SEX//M"] and "DX//new" not in spec.seen_codes
    age1 = (dt.date(2020, 1, 10) - dt.date(1990, 1, 10)).days / 365.25
    age2 = (dt.date(2020, 1, 10) - dt.date(1980, 1, 10)).days / 365.25
    nan = np.nan
    # raw values per step, by hand (NaN = nothing known: imputed with the train median)
    raw = np.array([
        [[0] * 9,  # padding: before subject 1's first event
         [4, 3, 0, 0.25, 1, age1, 1, 0, 1],  # labs 2 and 4 at 06:00/18:00; DX exactly at Jan 9 00:00
         [4, 3, 1, 1.25, 1, age1, 1, 0, 1]],  # lab carried forward; DX at pt counts; lab at pt+1us does not
        [[10, 10, 1, 6.5, 0, age2, 0, 1, 0],  # lab of Jan 1 12:00 carried into the window (not padding)
         [10, 10, 1, 7.5, 0, age2, 0, 1, 0],
         [6, 6, 0, 0.5, 0, age2, 0, 1, 1]],
        [[0] * 9,
         [nan, nan, 1, nan, 2, nan, 1, 0, 1],  # never a lab, no birth: medians
         [nan, nan, 1, nan, 0, nan, 1, 0, 0]],  # DX//new is ignored: step not observed
    ])
    # train statistics over the 5 non-padded train steps (subject 1 steps 1-2, subject 2 steps 0-2)
    train = {
        "LAB//a/last": [4, 4, 10, 10, 6], "LAB//a/mean": [3, 3, 10, 10, 6],
        "LAB//a/time_since": [0.25, 1.25, 6.5, 7.5, 0.5], "DX//x/count": [1, 1, 0, 0, 0],
        "static/age_years": [age1, age1, age2, age2, age2],
    }
    expected_median = {"LAB//a/last": 6.0, "LAB//a/mean": 6.0, "LAB//a/time_since": 1.25, "static/age_years": age2}
    expected_mean = {"LAB//a/last": 6.8, "LAB//a/mean": 6.4, "LAB//a/time_since": 3.2, "DX//x/count": 0.4,
                     "static/age_years": (2 * age1 + 3 * age2) / 5}
    expected_std = {"LAB//a/last": math.sqrt(7.36), "LAB//a/mean": math.sqrt(9.84), "DX//x/count": math.sqrt(0.24),
                    "LAB//a/time_since": float(np.std(train["LAB//a/time_since"])),
                    "static/age_years": float(np.std(train["static/age_years"]))}
    for j, name in enumerate(HAND_FEATURES):
        assert spec.median[j] == pytest.approx(expected_median.get(name, 0.0), rel=1e-6), name
        assert spec.mean[j] == pytest.approx(expected_mean.get(name, 0.0), rel=1e-6), name
        assert spec.std[j] == pytest.approx(expected_std.get(name, 1.0), rel=1e-6), name
    med = np.array([expected_median.get(n, 0.0) for n in HAND_FEATURES])
    mean = np.array([expected_mean.get(n, 0.0) for n in HAND_FEATURES])
    std = np.array([expected_std.get(n, 1.0) for n in HAND_FEATURES])
    expected = (np.where(np.isnan(raw), med, raw) - mean) / std
    expected[[0, 2], 0, :] = 0.0  # padding is exactly zero
    np.testing.assert_allclose(st.X, expected, rtol=1e-5, atol=1e-5)
    assert st.X.dtype == np.float32 and st.X.shape == (3, 3, 9)
    np.testing.assert_array_equal(st.observed, [[0, 1, 1], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(st.padded, [[1, 0, 0], [0, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(st.y, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(st.split, ["train", "train", "held_out"])
    ends = np.array([PT - 2 * D, PT - D, PT], dtype="datetime64[us]")
    np.testing.assert_array_equal(st.step_end_time, np.tile(ends, (3, 1)))
    # denormalize gives the raw values back (where not padded), for explanations
    np.testing.assert_allclose(spec.denormalize(st.X)[1], np.where(np.isnan(raw[1]), med, raw[1]), rtol=1e-5, atol=1e-6)


def test_history_channels_reach_back_before_the_window(hand):
    """ever / days since first / days since last of a count code, by hand: subject 2's diagnosis of
    Jan 6 12:00 lies before the 3-day window and still shows; subject 1's starts at Jan 9 00:00."""
    with pytest.warns(ft.UnseenCodesWarning):
        spec, st = ft.fit_transform(hand, hand_labels(), HAND_CONFIG.model_copy(update={"add_history": True}))
    names = st.feature_names
    assert names[names.index("DX//x/count") + 1:names.index("DX//x/count") + 4] == [
        "DX//x/ever", "DX//x/days_since_first", "DX//x/days_since_last"]
    raw = spec.denormalize(st.X)
    get = lambda sample, name: raw[sample, :, names.index(name)]  # noqa: E731
    # subject 2 (not padded anywhere: its lab of Jan 1 precedes the window)
    np.testing.assert_allclose(get(1, "DX//x/ever"), [1, 1, 1])
    np.testing.assert_allclose(get(1, "DX//x/days_since_first"), [1.5, 2.5, 3.5], rtol=1e-5)
    np.testing.assert_allclose(get(1, "DX//x/days_since_last"), [1.5, 2.5, 3.5], rtol=1e-5)
    # subject 1: the diagnosis at Jan 9 00:00 (end of step 1) and again at the prediction time
    np.testing.assert_allclose(get(0, "DX//x/ever")[1:], [1, 1])
    np.testing.assert_allclose(get(0, "DX//x/days_since_first")[1:], [0, 1], atol=1e-5)
    np.testing.assert_allclose(get(0, "DX//x/days_since_last")[1:], [0, 0], atol=1e-5)
    # subject 3 (held out): first at Jan 8 12:00, last at 13:00, both in step 1
    np.testing.assert_allclose(get(2, "DX//x/ever")[1:], [1, 1])
    np.testing.assert_allclose(get(2, "DX//x/days_since_first")[1:], [0.5, 1.5], rtol=1e-5)
    np.testing.assert_allclose(get(2, "DX//x/days_since_last")[1:], [11 / 24, 1 + 11 / 24], rtol=1e-5)
    assert spec.mean[names.index("DX//x/ever")] == 0.0 and spec.std[names.index("DX//x/ever")] == 1.0  # an indicator


def test_min_max_aggregations_and_frequency_selection(tmp_path):
    rows = hand_events() + [(1, dt.datetime(2020, 1, 9, 20), "LAB//a", -3.0)]
    ds = make(tmp_path, rows)
    config = HAND_CONFIG.model_copy(update={"numeric_aggs": ["min", "max"], "min_code_frequency": 2,
                                            "add_missing_indicators": False, "add_time_since_last": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.UnseenCodesWarning)
        spec, st = ft.fit_transform(ds, hand_labels(), config)
    # SEX//F and SEX//M each occur in one train subject only: below a count of 2
    assert spec.feature_names == ["LAB//a/min", "LAB//a/max", "DX//x/count", "static/age_years", "step/observed"]
    raw_s1 = spec.denormalize(st.X[0])
    np.testing.assert_allclose(raw_s1[1, :2], [2.0, 4.0], rtol=1e-5)
    np.testing.assert_allclose(raw_s1[2, :2], [-3.0, -3.0], rtol=1e-5)


def with_event_after(rows, subject, pt, code, value):
    return rows + [(subject, pt + US, code, value)]


@pytest.mark.parametrize("code,value", [("LAB//a", 1e6), ("DX//x", None), ("DX//brand_new", 5.0), ("MEDS_BIRTH", None)])
def test_leakage_event_one_microsecond_after_prediction_time(tmp_path, code, value):
    """(a) for every sample: an event at pt + 1us leaves its X bit-identical (fixed spec and refit)."""
    rows = hand_events() + [(1, dt.datetime(2020, 1, 20), "LAB//a", 7.0), (2, dt.datetime(2020, 1, 20), "DX//x", None),
                            (3, dt.datetime(1970, 1, 1), "MEDS_BIRTH", None),
                            (3, dt.datetime(2020, 3, 1), "DX//x", None)]  # the data reach past every label
    labels = pl.concat([hand_labels(), hand_labels((1, 2)).with_columns(pl.col("prediction_time") + 15 * D)])
    warnings.simplefilter("ignore", ft.UnseenCodesWarning)
    base = make(tmp_path, rows, name="base")
    spec, ref = ft.fit_transform(base, labels, HAND_CONFIG)
    for n, (subject, pt) in enumerate(labels.select("subject_id", "prediction_time").iter_rows()):
        changed = make(tmp_path, with_event_after(rows, subject, pt, code, value), name="changed")
        again = ft.transform(changed, labels, spec)
        assert again.X[n].tobytes() == ref.X[n].tobytes(), (n, code)
        assert np.array_equal(again.observed[n], ref.observed[n])
    # refit with a late event for every sample's subject at its last prediction time: nothing moves
    last = labels.group_by("subject_id").agg(pl.col("prediction_time").max())
    late = rows + [(s, pt + US, code, value) for s, pt in last.iter_rows()]
    spec2, refit = ft.fit_transform(make(tmp_path, late, name="late"), labels, HAND_CONFIG)
    assert refit.X.tobytes() == ref.X.tobytes()
    assert (spec2.median, spec2.mean, spec2.std) == (spec.median, spec.mean, spec.std)


def test_leakage_event_at_prediction_time_is_used(tmp_path):
    """The boundary is inclusive: the same event at pt itself does change X (the test above can fail)."""
    warnings.simplefilter("ignore", ft.UnseenCodesWarning)
    spec, ref = ft.fit_transform(make(tmp_path, hand_events(), name="a"), hand_labels(), HAND_CONFIG)
    at_pt = ft.transform(make(tmp_path, hand_events() + [(2, PT, "LAB//a", 1e6)], name="b"), hand_labels(), spec)
    assert not np.array_equal(at_pt.X[1], ref.X[1])
    np.testing.assert_array_equal(at_pt.X[[0, 2]], ref.X[[0, 2]])


def test_leakage_held_out_values_do_not_move_statistics(tmp_path):
    """(b) changing every held-out value (and adding held-out codes) leaves the spec unchanged."""
    warnings.simplefilter("ignore", ft.UnseenCodesWarning)
    spec = ft.fit(make(tmp_path, hand_events(), name="a"), hand_labels(), HAND_CONFIG)
    changed = [(s, t, c, (v * 1000 if v is not None else 3.0) if s == 3 else v) for s, t, c, v in hand_events()]
    changed += [(3, PT - H, "LAB//a", 1e9), (3, PT - 2 * H, "DX//x", None), (3, PT - H, "LAB//held_out_only", 1.0),
                (3, dt.datetime(1900, 1, 1), "MEDS_BIRTH", None)]
    spec2 = ft.fit(make(tmp_path, changed, name="b"), hand_labels(), HAND_CONFIG)
    assert spec2.model_dump(exclude={"fitted_on"}) == spec.model_dump(exclude={"fitted_on"})
    # ... whereas changing a train value does move them (so this test can fail)
    train_changed = [(s, t, c, v * 2 if (s == 2 and v is not None) else v) for s, t, c, v in hand_events()]
    spec3 = ft.fit(make(tmp_path, train_changed, name="c"), hand_labels(), HAND_CONFIG)
    assert spec3.mean != spec.mean


def test_leakage_subject_in_two_splits_is_rejected(tmp_path, hand):
    """(c) a subject listed in two splits is an error; otherwise every subject has exactly one split."""
    twice = pl.DataFrame({"subject_id": [1, 2, 3, 3], "split": ["train", "train", "held_out", "train"]})
    ds = make(tmp_path, hand_events(), splits=twice, name="twice")
    with pytest.raises(WorkbenchError, match=r"subject_splits.*listed more than once.*subject_id 3"):
        ft.fit(ds, hand_labels(), HAND_CONFIG)
    warnings.simplefilter("ignore", ft.UnseenCodesWarning)
    labels = pl.concat([hand_labels(), hand_labels().with_columns(pl.col("prediction_time") - D)])
    _, st = ft.fit_transform(hand, labels, HAND_CONFIG)
    pairs = pl.DataFrame({"subject_id": st.subject_id, "split": st.split}).unique()
    assert pairs["subject_id"].is_unique().all()


def test_transform_ignores_unseen_codes_with_warning(tmp_path, hand):
    warnings.simplefilter("ignore", ft.UnseenCodesWarning)
    spec, ref = ft.fit_transform(hand, hand_labels(), HAND_CONFIG)
    warnings.resetwarnings()
    new = hand_events() + [(1, PT - H, "LAB//novel", 9.0), (2, PT - H, "MED//novel", None)]
    with pytest.warns(ft.UnseenCodesWarning, match=r"LAB//novel.*MED//novel"):
        st = ft.transform(make(tmp_path, new, name="new"), hand_labels(), spec)
    assert st.feature_names == ref.feature_names
    assert st.X.tobytes() == ref.X.tobytes()


def test_no_python_state_between_fit_and_transform(hand):
    """fit + transform equals fit_transform (transform reuses the spec, never refits)."""
    warnings.simplefilter("ignore", ft.UnseenCodesWarning)
    spec, st = ft.fit_transform(hand, hand_labels(), HAND_CONFIG)
    spec2 = ft.fit(hand, hand_labels(), HAND_CONFIG)
    assert spec2 == spec
    np.testing.assert_array_equal(ft.transform(hand, hand_labels(), spec2).X, st.X)


def test_save_load_round_trip_and_hash(tmp_path, hand):
    warnings.simplefilter("ignore", ft.UnseenCodesWarning)
    spec, st = ft.fit_transform(hand, hand_labels(), HAND_CONFIG)
    spec.save(tmp_path / "spec.json")
    assert ft.FeatureSpec.load(tmp_path / "spec.json") == spec
    st.save(tmp_path / "t")
    st.save(tmp_path / "t")  # overwrite replaces atomically
    back = ft.SequenceTensors.load(tmp_path / "t")
    assert back.content_hash() == st.content_hash()
    assert back.feature_names == st.feature_names and back.prediction_time.dtype == np.dtype("datetime64[us]")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    train = st.by_split("train")
    assert len(train) == 2 and set(train.subject_id) == {1, 2}
    assert len(st.subset([2])) == 1 and st.subset([2]).split[0] == "held_out"
    data = np.load(tmp_path / "t" / ft.TENSORS_FILE)
    tampered = {k: data[k] for k in data.files}
    tampered["X"] = tampered["X"] + 1
    np.savez(tmp_path / "t" / ft.TENSORS_FILE, **tampered)
    with pytest.raises(WorkbenchError, match="content hash mismatch"):
        ft.SequenceTensors.load(tmp_path / "t")


@pytest.mark.parametrize("field,value,message", [
    ("bin_width", "0d", "bin_width.*must be > 0"),
    ("bin_width", "-1h", "bin_width.*not a duration"),
    ("bin_width", "ninety days", "bin_width.*not a duration"),
    ("n_steps", 0, "n_steps.*greater than or equal to 1"),
    ("numeric_aggs", ["median"], "numeric_aggs.*'last', 'mean', 'min' or 'max'"),
    ("colour", "red", "colour.*Extra inputs"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(WorkbenchError, match=message):
        ft.FeatureConfig.from_dict({field: value})


def test_config_from_yaml_parses_durations(tmp_path):
    (tmp_path / "f.yaml").write_text("features:\n  bin_width: 90d\n  n_steps: 8\n  numeric_aggs: [last, max]\n")
    config = ft.FeatureConfig.from_yaml(tmp_path / "f.yaml")
    assert config.bin_width_us == 90 * 86_400_000_000 and config.n_steps == 8
    assert ft.parse_duration_us("1h") == 3_600_000_000 and ft.parse_duration_us("30min") == 1_800_000_000


def test_labels_errors(tmp_path, hand):
    with pytest.raises(WorkbenchError, match=r"column 'subject_id': 1 subject\(s\) have no timed events.*subject_id 99"):
        ft.fit(hand, hand_labels().vstack(hand_labels().head(1).with_columns(pl.lit(99, pl.Int64).alias("subject_id"))))
    with pytest.raises(WorkbenchError, match=r"missing column\(s\) 'prediction_time'"):
        ft.fit(hand, pl.DataFrame({"subject_id": [1]}))
    only_held_out = hand_labels((1, 2, 3)).filter(pl.col("subject_id") == 3)
    with pytest.raises(WorkbenchError, match="no label belongs to a train-split subject"):
        ft.fit(hand, only_held_out)


def test_cli_fit_then_transform(tmp_path, hand):
    runner = CliRunner()
    hand_labels().write_parquet(tmp_path / "labels.parquet")
    (tmp_path / "f.yaml").write_text("bin_width: 1d\nn_steps: 3\nmin_code_frequency: 1\n")
    args = ["features", "--data", str(hand.root), "--labels", str(tmp_path / "labels.parquet")]
    result = runner.invoke(app, args + ["--config", str(tmp_path / "f.yaml"), "--out", str(tmp_path / "fit")])
    assert result.exit_code == 0, result.output
    assert "X [3, 3, 9]" in result.output and "DX//new" in result.output  # the unseen-code warning
    result = runner.invoke(app, args + ["--spec", str(tmp_path / "fit" / ft.SPEC_FILE), "--out", str(tmp_path / "tr")])
    assert result.exit_code == 0, result.output
    a, b = ft.SequenceTensors.load(tmp_path / "fit"), ft.SequenceTensors.load(tmp_path / "tr")
    assert a.content_hash() == b.content_hash()


@pytest.mark.parametrize("yaml_text,message", [("bin_width: 0h\n", "bin_width"), ("n_steps: 0\n", "n_steps")])
def test_cli_bad_config_exit_2(tmp_path, hand, yaml_text, message):
    hand_labels().write_parquet(tmp_path / "labels.parquet")
    (tmp_path / "f.yaml").write_text(yaml_text)
    result = CliRunner().invoke(app, ["features", "--data", str(hand.root), "--labels", str(tmp_path / "labels.parquet"),
                                      "--config", str(tmp_path / "f.yaml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "o").exists()


def test_cli_labels_subject_missing_exit_2(tmp_path, hand):
    hand_labels().with_columns(pl.col("subject_id") + 100).write_parquet(tmp_path / "labels.parquet")
    result = CliRunner().invoke(app, ["features", "--data", str(hand.root), "--labels", str(tmp_path / "labels.parquet"),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no timed events" in result.output and "101" in result.output


def test_pbc_task_tensors():
    """The bundled PBC mortality task: shapes printed and sanity-checked."""
    from workbench.data.datasets import load
    from workbench.tasks import make_labels

    root = load("pbc")
    labels = make_labels(root, "pbc_mortality").labels
    config = ft.FeatureConfig(bin_width="90d", n_steps=16, numeric_aggs=["last"], add_missing_indicators=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.UnseenCodesWarning)
        spec, st = ft.fit_transform(root, labels, config)
    print(f"PBC tensors: X {st.X.shape}, features {len(st.feature_names)}, splits {ft.split_counts(st.split)}")
    assert st.X.shape == (labels.height, 16, len(spec.feature_names))
    assert "LAB//bilirubin/last" in st.feature_names and "static/age_years" in st.feature_names
    assert st.observed.any(axis=1).all(), "every label has at least one observed step"
    assert np.isfinite(st.X).all()
    assert (st.X[st.padded] == 0).all() and not st.observed[st.padded].any()
    train = st.by_split("train")
    real = ~train.padded
    lab = st.feature_names.index("LAB//bilirubin/last")
    assert abs(train.X[:, :, lab][real].mean()) < 1e-3 and abs(train.X[:, :, lab][real].std() - 1) < 1e-3
