"""Task specs and labels: semantics on hand-made subjects, bad input, CLI, shipped tasks."""

from __future__ import annotations

import datetime as dt
import tempfile
import warnings
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from workbench.cli import app
from workbench.data.meds_io import write_dataset
from workbench.errors import WorkbenchError
from workbench.tasks import LABEL_SCHEMA, TaskSpec, load_task, make_labels, shipped_tasks, task_from_dict

# Small fixtures often lack the competing code TX: that is a warning by design, not a failure.
pytestmark = pytest.mark.filterwarnings("ignore:task field censoring.competing_codes:UserWarning")

T0 = dt.datetime(2020, 1, 1)
DAY = dt.timedelta(days=1)
BIRTH = T0 - 40 * 365 * DAY


def frame(rows: list[tuple]) -> pl.DataFrame:
    """Rows of (subject_id, time, code) as MEDS events."""
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String}, orient="row")


def subject(sid: int, *, visits=(0,), death=None, transplant=None, end=None, birth=BIRTH, extra=()) -> list[tuple]:
    """One subject: birth, visits (days after T0), optional death/transplant, END_OF_FOLLOWUP last."""
    rows = [(sid, None, "SEX//F"), (sid, birth, "MEDS_BIRTH")]
    rows += [(sid, T0 + d * DAY, "VISIT") for d in visits]
    rows += [(sid, T0 + d * DAY, code) for d, code in extra]
    if transplant is not None:
        rows.append((sid, T0 + transplant * DAY, "TX"))
    if death is not None:
        rows.append((sid, T0 + death * DAY, "MEDS_DEATH"))
    end = end if end is not None else (death if death is not None else max(visits) + 1000)
    rows.append((sid, T0 + end * DAY, "END_OF_FOLLOWUP"))
    return rows


def spec(**overrides) -> TaskSpec:
    """Every-visit task, death within 100 days, END_OF_FOLLOWUP ends follow-up, TX competes."""
    base = {
        "name": "t",
        "prediction_times": {"kind": "every_event", "codes": ["VISIT"]},
        "outcome": {"codes": ["MEDS_DEATH"], "horizon_days": 100},
        "censoring": {"end_codes": ["END_OF_FOLLOWUP"], "competing_codes": ["TX"]},
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return task_from_dict(base)


#: subject_id -> (events, expected {visit day: label or excluding rule})
CASES = {
    1: (subject(1, death=50), {0: True}),
    2: (subject(2, end=200), {0: False}),
    3: (subject(3, end=60), {0: "censored_followup"}),  # lost to follow-up inside the horizon
    4: (subject(4, transplant=30, death=60), {0: "censored_competing"}),  # transplant before death
    5: (subject(5, visits=(0, 150), death=180), {0: False, 150: True}),
    6: (subject(6, visits=(0, 0, 300), end=300, extra=((0, "LAB//x"),)), {0: False, 300: "no_followup"}),
    7: (subject(7, visits=(10,), death=0, end=10), {10: "prior_outcome"}),
    8: (subject(8, death=100), {0: True}),  # window end is inclusive
    9: (subject(9, end=100), {0: False}),  # followed exactly to the horizon: observed negative
    10: (subject(10, transplant=40, death=40), {0: True}),  # same instant: the outcome was observed
    11: (subject(11, visits=(0, 50), transplant=20, end=400), {0: "censored_competing", 50: "prior_competing"}),
}
SPLITS = {1: "train", 2: "train", 3: "train", 4: "train", 5: "train", 6: "tuning", 7: "tuning", 8: "held_out",
          9: "held_out", 10: "held_out", 11: "train"}


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks") / "meds"
    events = frame([row for rows, _ in CASES.values() for row in rows])
    splits = pl.DataFrame({"subject_id": list(SPLITS), "split": list(SPLITS.values())})
    write_dataset(root, events, splits=splits, n_shards=3)
    return root


def expected_frame() -> pl.DataFrame:
    return pl.DataFrame(
        [(sid, T0 + day * DAY, want) for sid, (_, exp) in CASES.items() for day, want in exp.items()],
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "want": pl.Object}, orient="row",
    )


def test_labels_follow_window_and_censoring_semantics(cases_root):
    result = make_labels(cases_root, spec())
    got = {
        (r["subject_id"], (r["prediction_time"] - T0).days): r["boolean_value"] if r["excluded_by"] is None else r["excluded_by"]
        for r in result.candidates.iter_rows(named=True)
    }
    want = {(sid, day): w for sid, (_, exp) in CASES.items() for day, w in exp.items()}
    assert got == want


def test_censored_subjects_are_never_negative(cases_root):
    """Done-when (d): follow-up ending inside the horizon and competing events exclude, never label negative."""
    result = make_labels(cases_root, spec())
    labelled = set(result.labels["subject_id"].to_list())
    assert 3 not in labelled and 4 not in labelled  # lost to follow-up; transplant before death
    assert not result.labels.filter((pl.col("subject_id") == 11) & (pl.col("prediction_time") == T0)).height
    # Without declaring the competing event, subject 4's death at day 60 makes it positive, not negative.
    plain = make_labels(cases_root, spec(censoring={"end_codes": ["END_OF_FOLLOWUP"], "competing_codes": []}))
    assert plain.labels.filter(pl.col("subject_id") == 4)["boolean_value"].to_list() == [True]


def test_labels_carry_each_subjects_split_once(cases_root):
    """Done-when (c): every labelled subject has exactly its dataset split, so none spans two splits."""
    with_split = make_labels(cases_root, spec()).labels_with_split
    per_subject = with_split.group_by("subject_id").agg(pl.col("split").n_unique().alias("n"), pl.col("split").first())
    assert per_subject["n"].max() == 1
    assert dict(per_subject.select("subject_id", "split").iter_rows()) == {s: SPLITS[s] for s in per_subject["subject_id"]}


def test_subject_in_two_splits_is_an_error(tmp_path):
    splits = pl.DataFrame({"subject_id": [1, 1, 2], "split": ["train", "held_out", "train"]})
    root = tmp_path / "m"
    write_dataset(root, frame(subject(1, death=50) + subject(2)), splits=splits)
    with pytest.raises(WorkbenchError, match=r"subject_splits.*listed more than once.*subject_id 1"):
        make_labels(root, spec())


def test_report_counts_add_up_and_match_labels(cases_root):
    result = make_labels(cases_root, spec())
    rep = result.report
    assert rep.candidates == sum(len(exp) for _, exp in CASES.values())
    assert rep.candidates - sum(r.rows_dropped for r in rep.rules) == rep.labels == result.labels.height
    for a, b in zip(rep.rules, rep.rules[1:]):
        assert a.rows_out == b.rows_in
    dropped = {r.rule: r.rows_dropped for r in rep.rules}
    assert dropped == {"no_prior_data": 0, "prior_competing": 1, "prior_outcome": 1, "no_followup": 1,
                       "censored_competing": 2, "censored_followup": 1}
    train = {s.split: s for s in rep.splits}["train"]
    direct = result.labels_with_split.filter(pl.col("split") == "train")
    assert (train.labels, train.positives) == (direct.height, direct["boolean_value"].sum())
    assert rep.positives == result.labels["boolean_value"].sum()
    frame_ = rep.to_frame()
    assert frame_["rule"].to_list()[0] == "candidates" and frame_.height == len(rep.rules) + 1
    assert "| train |" in rep.to_markdown()
    assert rep.to_metrics()["cohort_labels"] == rep.labels


def test_saved_labels_follow_meds_label_schema_exactly(cases_root, tmp_path):
    path = make_labels(cases_root, spec()).save(tmp_path / "out" / "labels.parquet")
    schema = pq.read_schema(path)
    assert schema.names == list(LABEL_SCHEMA)
    meds.LabelSchema.validate(pq.read_table(path))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_gap_excludes_outcome_inside_it(tmp_path):
    root = tmp_path / "m"
    write_dataset(root, frame(subject(1, death=5) + subject(2, death=50) + subject(3, end=500)),
                  splits=pl.DataFrame({"subject_id": [1, 2, 3], "split": ["train"] * 3}))
    result = make_labels(root, spec(outcome={"gap_days": 10}))
    cands = dict(result.candidates.select("subject_id", pl.coalesce(pl.col("excluded_by"), pl.col("boolean_value").cast(pl.String))).iter_rows())
    assert cands == {1: "outcome_in_gap", 2: "true", 3: "false"}


def test_inclusion_rules_history_events_and_age(tmp_path):
    young = T0 - 10 * 365 * DAY
    rows = (subject(1, visits=(0, 30, 60), death=100) + subject(2, visits=(0, 100, 200), birth=young, end=600)
            + subject(3, visits=(0, 100), end=600))
    root = tmp_path / "m"
    write_dataset(root, frame(rows), splits=pl.DataFrame({"subject_id": [1, 2, 3], "split": ["train"] * 3}))
    result = make_labels(root, spec(inclusion={"min_history_days": 20, "min_events": 3, "min_age_years": 18}))
    excluded = {(r["subject_id"], (r["prediction_time"] - T0).days): r["excluded_by"] for r in result.candidates.iter_rows(named=True)}
    assert excluded == {
        (1, 0): "min_history", (1, 30): "min_events", (1, 60): None,  # 3rd visit is the 3rd event
        (2, 0): "min_history", (2, 100): "min_events", (2, 200): "age",
        (3, 0): "min_history", (3, 100): "min_events",
    }
    assert result.labels["boolean_value"].to_list() == [True]


def test_offset_prediction_time_after_first_event_or_anchor(tmp_path):
    rows = subject(1, visits=(10, 20), extra=((5, "LAB//x"),), death=300) + subject(2, visits=(0,), end=900)
    root = tmp_path / "m"
    write_dataset(root, frame(rows), splits=pl.DataFrame({"subject_id": [1, 2], "split": ["train"] * 2}))
    first = make_labels(root, spec(prediction_times={"kind": "offset", "offset_days": 250}))
    assert [(t - T0).days for t in first.labels["prediction_time"]] == [255, 250]  # LAB at day 5 is first, not birth
    anchored = make_labels(root, spec(prediction_times={"kind": "offset", "offset_days": 250, "anchor_codes": ["VISIT"]}))
    assert [(t - T0).days for t in anchored.labels["prediction_time"]] == [260, 250]
    assert anchored.labels["boolean_value"].to_list() == [True, False]


def write_labels(path: Path, rows: list[tuple]) -> Path:
    pl.DataFrame(rows, schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean},
                 orient="row").write_parquet(path)
    return path


def test_labels_file_times_relabelled_or_kept(cases_root, tmp_path):
    path = write_labels(tmp_path / "aces.parquet", [(1, T0 + DAY, False), (2, T0 + DAY, True), (3, T0 + DAY, False)])
    relabelled = make_labels(cases_root, spec(prediction_times={"kind": "labels_file", "labels_path": str(path)}))
    assert relabelled.labels.rows() == [(1, T0 + DAY, True), (2, T0 + DAY, False)]  # 3 is censored
    kept = make_labels(cases_root, spec(prediction_times={"kind": "labels_file", "labels_path": str(path)}, outcome=None))
    assert kept.labels.rows() == [(1, T0 + DAY, False), (2, T0 + DAY, True), (3, T0 + DAY, False)]


def test_labels_file_relative_path_resolves_against_spec_file(cases_root, tmp_path):
    write_labels(tmp_path / "aces.parquet", [(1, T0 + DAY, True), (2, T0 + DAY, False)])
    data = spec().model_dump(mode="json") | {"prediction_times": {"kind": "labels_file", "labels_path": "aces.parquet"}}
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(data))
    assert make_labels(cases_root, tmp_path / "task.yaml").labels.height == 2


def test_labels_file_with_unknown_subjects_or_times_outside_data_fails(cases_root, tmp_path):
    unknown = write_labels(tmp_path / "u.parquet", [(1, T0 + DAY, True), (999, T0 + DAY, True)])
    with pytest.raises(WorkbenchError, match=r"u.parquet: column 'subject_id': 1 subject.*no timed events.*999"):
        make_labels(cases_root, spec(prediction_times={"kind": "labels_file", "labels_path": str(unknown)}))
    early = write_labels(tmp_path / "e.parquet", [(1, dt.datetime(1900, 1, 1), True)])
    with pytest.raises(WorkbenchError, match=r"e.parquet: column 'prediction_time': prediction times before the "
                       r"subject's first event .* \(1 row\(s\); e.g. subject_id=1, prediction_time=1900-01-01"):
        make_labels(cases_root, spec(prediction_times={"kind": "labels_file", "labels_path": str(early)}))
    late = write_labels(tmp_path / "l.parquet", [(1, dt.datetime(2220, 1, 1), True)])
    with pytest.raises(WorkbenchError, match=r"l.parquet: column 'prediction_time': prediction times after the last "
                       r"event of .*no such future"):
        make_labels(cases_root, spec(prediction_times={"kind": "labels_file", "labels_path": str(late)}))


def test_outcome_code_matching_nothing_suggests_closest(cases_root):
    with pytest.raises(WorkbenchError, match=r"outcome\.codes: code 'MEDS_DAETH' matches no event.*closest codes: MEDS_DEATH"):
        make_labels(cases_root, spec(outcome={"codes": ["MEDS_DAETH"]}))
    with pytest.raises(WorkbenchError, match=r"outcome\.patterns: pattern '\^DX//' matches no code"):
        make_labels(cases_root, spec(outcome={"codes": [], "patterns": ["^DX//"]}))


def test_outcome_regex_matches_like_exact_code(cases_root):
    exact = make_labels(cases_root, spec())
    regex = make_labels(cases_root, spec(outcome={"codes": [], "patterns": ["^MEDS_DEA"]}))
    assert regex.labels.equals(exact.labels)


def test_zero_train_positives_is_an_error(tmp_path):
    root = tmp_path / "m"
    write_dataset(root, frame(subject(1, end=500) + subject(2, death=50)),
                  splits=pl.DataFrame({"subject_id": [1, 2], "split": ["train", "held_out"]}))
    with pytest.raises(WorkbenchError, match="zero positive labels in the train split"):
        make_labels(root, spec())
    assert make_labels(root, spec(require_train_positives=False)).report.positives == 1


def test_low_prevalence_warns_and_is_recorded(tmp_path):
    rows = subject(1, death=50) + [r for sid in range(2, 120) for r in subject(sid, end=500)]
    root = tmp_path / "m"
    write_dataset(root, frame(rows))
    with pytest.warns(UserWarning, match=r"prevalence 0\.840% is below 1%"):
        result = make_labels(root, spec())
    assert result.report.splits[0].split == "(none)" and result.report.warnings


@pytest.mark.parametrize(
    "override, field",
    [
        ({"outcome": {"horizon_days": 0}}, "outcome.horizon_days: Input should be greater than 0"),
        ({"outcome": {"horizon_days": -5}}, "outcome.horizon_days: Input should be greater than 0"),
        ({"outcome": {"gap_days": 200}}, "gap_days (200.0) must be < horizon_days (100.0)"),
        ({"inclusion": {"min_age_years": 200}}, "inclusion.min_age_years: Input should be less than or equal to 150"),
        ({"prediction_times": {"kind": "weekly"}}, "prediction_times.kind: Input should be 'every_event', 'offset' or 'labels_file'"),
        ({"outcome": {"patterns": ["(unclosed"]}}, "outcome.patterns: invalid regular expression"),
        ({"outcome": {"horizon": 30}}, "outcome.horizon: Extra inputs are not permitted"),
    ],
)
def test_invalid_spec_fails_at_load_naming_the_field(tmp_path, override, field):
    data = spec().model_dump(mode="json")
    for key, value in override.items():
        data[key] = {**data[key], **value}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(WorkbenchError) as info:
        load_task(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_shipped_specs_load_by_name():
    assert {"pbc_mortality", "synth_planted"} <= set(shipped_tasks())
    pbc = load_task("pbc_mortality")
    assert (pbc.outcome.horizon_days, pbc.censoring.competing_codes) == (730, ["PBC//TRANSPLANT"])
    assert load_task("synth_planted").prediction_times.kind == "offset"
    with pytest.raises(WorkbenchError, match="did you mean pbc_mortality"):
        load_task("pbc_mortalty")


def test_cli_label_writes_labels_and_prints_report(cases_root, tmp_path):
    spec_path = tmp_path / "task.yaml"
    spec_path.write_text(spec().to_yaml())
    out = tmp_path / "labels.parquet"
    res = CliRunner().invoke(app, ["label", "--task", str(spec_path), "--data", str(cases_root), "--out", str(out),
                                   "--report", str(tmp_path / "report.json")])
    assert res.exit_code == 0, res.output
    assert "censored_competing" in res.output and "held_out" in res.output
    assert pl.read_parquet(out).columns == list(LABEL_SCHEMA)
    assert (tmp_path / "report.json").exists()


def test_cli_label_bad_input_exits_2(cases_root, tmp_path):
    spec_path = tmp_path / "task.yaml"
    spec_path.write_text(spec(outcome={"codes": ["MEDS_DAETH"]}).to_yaml())
    out = tmp_path / "labels.parquet"
    res = CliRunner().invoke(app, ["label", "--task", str(spec_path), "--data", str(cases_root), "--out", str(out)])
    assert res.exit_code == 2 and "MEDS_DEATH" in res.output and "Traceback" not in res.output
    assert not out.exists()


# --- an independent, row-by-row reference labeller checked against make_labels on random subjects ---


def reference_labels(subjects: list[dict], horizon: int, gap: int) -> dict[tuple[int, int], object]:
    """Plain-Python statement of the semantics: label or the reason for exclusion per (subject, day)."""
    out = {}
    for s in subjects:
        deaths = [s["death"]] if s["death"] is not None else []
        txs = [s["tx"]] if s["tx"] is not None else []
        for t in sorted(set(s["visits"])):
            if any(x <= t for x in txs):
                out[(s["id"], t)] = "excluded"
            elif any(d <= t for d in deaths):
                out[(s["id"], t)] = "excluded"
            elif s["end"] <= t:
                out[(s["id"], t)] = "excluded"
            elif any(t < d <= t + gap for d in deaths):
                out[(s["id"], t)] = "excluded"
            elif any(t < x <= t + horizon and not any(t + gap < d <= x for d in deaths) for x in txs):
                out[(s["id"], t)] = "excluded"
            elif any(t + gap < d <= t + horizon for d in deaths):
                out[(s["id"], t)] = True
            elif s["end"] < t + horizon:
                out[(s["id"], t)] = "excluded"
            else:
                out[(s["id"], t)] = False
    return out


@st.composite
def random_subjects(draw):
    subjects = []
    for sid in range(1, draw(st.integers(2, 6)) + 1):
        visits = draw(st.lists(st.integers(0, 400), min_size=1, max_size=5))
        death = draw(st.none() | st.integers(0, 500))
        tx = draw(st.none() | st.integers(0, 500))
        if death is not None and draw(st.booleans()):
            tx = draw(st.sampled_from([death, death - 1]))  # ties and near-ties with the outcome matter
        end = draw(st.integers(max(visits), 600)) if death is None else death
        if tx is not None and tx > end:
            tx = None
        subjects.append({"id": sid, "visits": visits, "death": death, "tx": tx, "end": end,
                         "lab": draw(st.none() | st.integers(0, 400))})
    return subjects


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subjects=random_subjects(), horizon=st.integers(1, 300), gap=st.integers(0, 30))
def test_make_labels_matches_reference_semantics(subjects, horizon, gap):
    if gap >= horizon:
        gap = 0
    # A subject with every code and a long follow-up keeps the cohort non-empty and all codes present.
    subjects = [*subjects, {"id": 99, "visits": [0], "death": 2000, "tx": 1500, "end": 2000, "lab": None}]
    rows = []
    for s in subjects:
        extra = ((s["lab"], "LAB//x"),) if s["lab"] is not None else ()
        rows += subject(s["id"], visits=tuple(s["visits"]), death=s["death"], transplant=s["tx"], end=s["end"], extra=extra)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "m"
        write_dataset(root, frame(rows))
        task = spec(outcome={"horizon_days": horizon, "gap_days": gap}, require_train_positives=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # low prevalence is expected for random subjects
            result = make_labels(root, task)
    got = {
        (r["subject_id"], (r["prediction_time"] - T0).days): "excluded" if r["excluded_by"] else r["boolean_value"]
        for r in result.candidates.iter_rows(named=True)
    }
    assert got == reference_labels(subjects, horizon, gap)


# --- shipped tasks on the generated / bundled datasets ---


def test_synth_planted_task_reproduces_generator_ground_truth(tmp_path):
    from workbench.data.synth import SynthConfig, generate

    ds = generate(tmp_path / "synth", SynthConfig(n_subjects=300, seed=3), progress=False)
    result = make_labels(ds, "synth_planted")
    truth = pl.read_parquet(ds.root / "metadata" / "ground_truth.parquet")
    joined = truth.join(result.labels, on="subject_id", how="left")
    # Censored subjects are absent (never negative); everyone else has the generator's time and outcome.
    assert joined.filter(pl.col("censored"))["boolean_value"].null_count() == truth["censored"].sum()
    kept = joined.filter(~pl.col("censored"))
    assert kept["prediction_time"].equals(kept["prediction_time_right"], check_names=False)
    assert kept["outcome"].equals(kept["boolean_value"], check_names=False)
    assert 0 < result.report.prevalence < 1


def test_pbc_mortality_cohort_report_matches_direct_count():
    """The bundled PBC task: print the cohort report; prevalence equals a direct, row-by-row count."""
    from workbench.data.datasets import load

    root = load("pbc")
    result = make_labels(root, "pbc_mortality")
    print(result.report.to_markdown())
    events = pl.read_parquet(root / "data").filter(pl.col("time").is_not_null())
    per_subject = events.group_by("subject_id").agg(
        visits=pl.col("time").filter(pl.col("code") == "VISIT"),
        death=pl.col("time").filter(pl.col("code") == "MEDS_DEATH").min(),
        tx=pl.col("time").filter(pl.col("code") == "PBC//TRANSPLANT").min(),
        end=pl.col("time").filter(pl.col("code") == "END_OF_FOLLOWUP").min(),
    )
    subjects = [dict(r, id=r["subject_id"]) for r in per_subject.iter_rows(named=True)]
    direct = reference_labels(subjects, horizon=730 * DAY, gap=0 * DAY)
    kept = [v for v in direct.values() if v != "excluded"]
    rep = result.report
    assert rep.candidates == len(direct) == events.filter(pl.col("code") == "VISIT").select("subject_id", "time").n_unique()
    assert (rep.labels, rep.positives) == (len(kept), sum(kept))
    assert rep.prevalence == pytest.approx(sum(kept) / len(kept))
    splits = dict(pl.read_parquet(root / "metadata" / "subject_splits.parquet").iter_rows())
    for s in rep.splits:
        in_split = [v for (sid, _), v in direct.items() if v != "excluded" and splits[sid] == s.split]
        assert (s.labels, s.positives) == (len(in_split), sum(in_split))
    assert {s.split for s in rep.splits} == {"train", "tuning", "held_out"}
    dropped = {r.rule: r.rows_dropped for r in rep.rules}
    assert dropped["censored_competing"] > 0 and dropped["censored_followup"] > 0  # transplants and censoring exist


@pytest.mark.parametrize("section, field", [
    ("outcome", "horizon_days"), ("outcome", "gap_days"),
    ("prediction_times", "offset_days"), ("inclusion", "min_history_days"),
])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e12, 36_526, "inf"])
def test_day_counts_must_be_finite_and_at_most_100_years(section, field, value):
    """Every day count of a spec: .inf, NaN or more than 100 years is refused naming the field
    (a date offset of 1e12 days would otherwise overflow while labelling)."""
    body = {field: value, **({"kind": "offset"} if section == "prediction_times" else {})}
    if field == "gap_days":
        body["horizon_days"] = 100
    with pytest.raises(WorkbenchError, match=rf"{section}\.{field}: .*(finite number of days|more than 100 years)"):
        task_from_dict({section: body})


def test_day_counts_up_to_100_years_are_accepted():
    task = task_from_dict({"outcome": {"horizon_days": 36_525, "gap_days": 365},
                           "prediction_times": {"kind": "offset", "offset_days": 36_525},
                           "inclusion": {"min_history_days": 36_525}})
    assert task.outcome.horizon_days == 36_525 and task.prediction_times.offset_days == 36_525
