"""Survival tasks: (prediction time, days to event or censoring, event type) labels from the task
spec language, their labels-file form, the interval report, and the bundled PBC survival task."""

from __future__ import annotations

import datetime as dt
import re
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
from workbench.data.meds_io import open_dataset, write_dataset
from workbench.errors import WorkbenchError
from workbench.tasks import (
    EVENT_CENSORED,
    EVENT_COMPETING,
    EVENT_OUTCOME,
    SURVIVAL_EVENT_COLUMN,
    SURVIVAL_TIME_COLUMN,
    TaskSpec,
    check_before_end_of_record,
    labels_file_task,
    load_task,
    make_labels,
    scoring_times,
    task_from_dict,
)

pytestmark = pytest.mark.filterwarnings("ignore:task field censoring.competing_codes:UserWarning")

T0 = dt.datetime(2020, 1, 1)
DAY = dt.timedelta(days=1)
BIRTH = T0 - 40 * 365 * DAY
HORIZON = 100
C, O, K = EVENT_CENSORED, EVENT_OUTCOME, EVENT_COMPETING


def frame(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String}, orient="row")


def subject(sid: int, *, visits=(0,), death=None, transplant=None, end=None) -> list[tuple]:
    """One subject: birth, visits (days after T0), optional death/transplant, END_OF_FOLLOWUP."""
    rows = [(sid, None, "SEX//F"), (sid, BIRTH, "MEDS_BIRTH")]
    rows += [(sid, T0 + d * DAY, "VISIT") for d in visits]
    if transplant is not None:
        rows.append((sid, T0 + transplant * DAY, "TX"))
    if death is not None:
        rows.append((sid, T0 + death * DAY, "MEDS_DEATH"))
    end = end if end is not None else (death if death is not None else max(visits) + 1000)
    rows.append((sid, T0 + end * DAY, "END_OF_FOLLOWUP"))
    return rows


def spec(**overrides) -> TaskSpec:
    """Every-visit survival task: death up to 100 days, END_OF_FOLLOWUP ends follow-up, TX competes."""
    base = {
        "name": "s", "kind": "survival",
        "prediction_times": {"kind": "every_event", "codes": ["VISIT"]},
        "outcome": {"codes": ["MEDS_DEATH"], "horizon_days": HORIZON},
        "censoring": {"end_codes": ["END_OF_FOLLOWUP"], "competing_codes": ["TX"]},
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return task_from_dict(base)


#: subject_id -> (events, {visit day: (float_value, integer_value) or the excluding rule})
CASES = {
    1: (subject(1, death=50), {0: (50.0, O)}),  # outcome within the horizon
    2: (subject(2, transplant=30, death=60), {0: (30.0, K)}),  # competing event first
    3: (subject(3, end=60), {0: (60.0, C)}),  # end of follow-up before the horizon
    4: (subject(4, end=500), {0: (100.0, C)}),  # followed beyond the horizon: censored at it
    5: (subject(5, transplant=40, death=40), {0: (40.0, O)}),  # tie: the outcome wins
    6: (subject(6, visits=(10,), death=0, end=10), {10: "prior_outcome"}),
    7: (subject(7, visits=(0, 150), death=180), {0: (100.0, C), 150: (30.0, O)}),  # death after the horizon, then in it
    8: (subject(8, death=100), {0: (100.0, O)}),  # outcome exactly at the horizon is inside it
    9: (subject(9, transplant=70, end=70), {0: (70.0, K)}),  # competing at the end of follow-up: observed
    10: (subject(10, end=30, death=50), {0: (50.0, O)}),  # recorded after the end of follow-up: seen, as in binary
    15: (subject(15, end=30, transplant=45, death=50), {0: (45.0, K)}),  # likewise a competing event
    11: (subject(11, visits=(0, 50), transplant=20, end=400), {0: (20.0, K), 50: "prior_competing"}),
    12: (subject(12, death=10.5), {0: (10.5, O)}),  # fractional days
    13: (subject(13, visits=(0, 300), end=300), {0: (100.0, C), 300: "no_followup"}),
    14: (subject(14, visits=(0,), transplant=150, death=120, end=200), {0: (100.0, C)}),  # both after the horizon
}
SPLITS = {sid: ("held_out" if sid in (3, 9) else "tuning" if sid == 13 else "train") for sid in CASES}


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("survival") / "meds"
    events = frame([row for rows, _ in CASES.values() for row in rows])
    splits = pl.DataFrame({"subject_id": list(SPLITS), "split": list(SPLITS.values())})
    write_dataset(root, events, splits=splits, n_shards=3)
    return root


def test_survival_labels_follow_the_semantics_row_by_row(cases_root):
    result = make_labels(cases_root, spec())
    got = {}
    for r in result.candidates.iter_rows(named=True):
        key = (r["subject_id"], (r["prediction_time"] - T0) / DAY)
        if r["excluded_by"] is None:
            got[key] = (r[SURVIVAL_TIME_COLUMN], r[SURVIVAL_EVENT_COLUMN])
            assert r["boolean_value"] == (r[SURVIVAL_EVENT_COLUMN] == EVENT_OUTCOME)
        else:
            got[key] = r["excluded_by"]
            assert r["boolean_value"] is None and r[SURVIVAL_TIME_COLUMN] is None and r[SURVIVAL_EVENT_COLUMN] is None
    assert got == {(sid, day): want for sid, (_, exp) in CASES.items() for day, want in exp.items()}


def test_survival_labels_frame_is_the_meds_label_schema(cases_root, tmp_path):
    result = make_labels(cases_root, spec())
    labels = result.labels
    assert labels.schema == pl.Schema({"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"),
                                       "boolean_value": pl.Boolean, "integer_value": pl.Int64,
                                       "float_value": pl.Float64})
    assert labels.equals(labels.sort("subject_id", "prediction_time"))
    assert labels["float_value"].min() > 0 and labels.null_count().sum_horizontal()[0] == 0
    kept = sum(1 for _, exp in CASES.values() for w in exp.values() if not isinstance(w, str))
    assert labels.height == kept == result.report.labels
    assert dict(result.labels_with_split.select("subject_id", "split").unique().iter_rows()) == {
        s: SPLITS[s] for s in labels["subject_id"].unique()}
    # Written as MEDS labels: float_value is float32 on disk, as meds.LabelSchema requires.
    out = result.save(tmp_path / "labels.parquet")
    table = pq.read_table(out)
    meds.LabelSchema.validate(table)
    assert str(table.schema.field("float_value").type) == "float"
    back = pl.read_parquet(out).with_columns(pl.col("float_value").cast(pl.Float64))
    assert back.equals(labels)


def test_binary_kind_of_the_same_spec_is_unchanged(cases_root):
    """kind binary keeps the censoring rules and the three-column labels."""
    binary = make_labels(cases_root, spec(kind="binary"))
    assert binary.labels.columns == ["subject_id", "prediction_time", "boolean_value"]
    assert {"censored_competing", "censored_followup"} <= {r.rule for r in binary.report.rules}
    assert binary.report.intervals == [] and binary.report.intervals_frame().height == 0
    survival = make_labels(cases_root, spec())
    assert not {"censored_competing", "censored_followup", "outcome_in_gap"} & {r.rule for r in survival.report.rules}
    # Every binary label is in the survival labels, positive exactly when the outcome came first in the horizon.
    joined = binary.labels.join(survival.labels, on=["subject_id", "prediction_time"], how="left", suffix="_s")
    assert joined["integer_value"].null_count() == 0
    assert joined["boolean_value"].equals(joined["boolean_value_s"], check_names=False)


def test_interval_report_adds_up(cases_root):
    result = make_labels(cases_root, spec(outcome={"horizon_days": 400}))
    labels, rep = result.labels, result.report
    frame_ = rep.intervals_frame()
    assert frame_["start_days"].to_list() == [0.0, 365.25] and frame_["end_days"].to_list() == [365.25, 400.0]
    assert frame_.select(pl.sum_horizontal("events", "competing", "censored")).to_series().sum() == labels.height
    assert frame_["events"].sum() == rep.positives == labels["boolean_value"].sum()
    for i in rep.intervals:
        inside = labels.filter((pl.col("float_value") > i.start_days) & (pl.col("float_value") <= i.end_days))
        assert i.at_risk == labels.filter(pl.col("float_value") > i.start_days).height
        assert (i.events, i.competing, i.censored) == tuple(
            inside.filter(pl.col("integer_value") == code).height for code in (O, K, C))
    first, second = rep.intervals
    assert first.at_risk == labels.height
    assert second.at_risk == first.at_risk - first.events - first.competing - first.censored
    assert second.censored > 0  # subject 4 is censored at the 400-day horizon
    metrics = rep.to_metrics()
    assert (metrics["cohort_events"], metrics["cohort_competing"], metrics["cohort_censored"]) == (
        frame_["events"].sum(), frame_["competing"].sum(), frame_["censored"].sum())
    text = rep.to_markdown()
    assert "| follow-up (days) | at risk | events | competing | censored |" in text and "| 365.25-400 |" in text
    assert type(rep).model_validate(rep.to_dict()) == rep  # the JSON report keeps the intervals


def test_survival_needs_a_train_outcome_event(tmp_path):
    root = tmp_path / "m"
    rows = subject(1, transplant=20, end=20) + subject(2, end=500) + subject(3, death=50)
    write_dataset(root, frame(rows), splits=pl.DataFrame({"subject_id": [1, 2, 3],
                                                          "split": ["train", "train", "held_out"]}))
    with pytest.raises(WorkbenchError, match=r"zero outcome events \(integer_value 1\) in the train split"):
        make_labels(root, spec())
    assert make_labels(root, spec(require_train_positives=False)).report.positives == 1


def test_scoring_helpers_work_for_survival_tasks(cases_root):
    events = open_dataset(cases_root).events()
    times = scoring_times(events, spec())
    assert times.equals(scoring_times(events, spec(kind="binary")))
    check_before_end_of_record(times, events, spec(), "times.parquet")
    late = pl.DataFrame({"subject_id": [1], "prediction_time": [T0 + 50 * DAY]})
    with pytest.raises(WorkbenchError, match="end of record"):
        check_before_end_of_record(late, events, spec(), "times.parquet")


# --- the labels-file form ---


def write_survival(path: Path, rows: list[tuple], **dtypes) -> Path:
    schema = {"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "float_value": pl.Float64,
              "integer_value": pl.Int64, **dtypes}
    pl.DataFrame(rows, schema=schema, orient="row").write_parquet(path)
    return path


def test_labels_file_round_trip(cases_root, tmp_path):
    made = make_labels(cases_root, spec())
    path = made.save(tmp_path / "survival_labels.parquet")
    task = load_task(str(path))  # a parquet with non-null float_value and integer_value: survival
    assert (task.kind, task.outcome, task.name) == ("survival", None, "survival_labels")
    assert labels_file_task(path).kind == "survival"
    again = make_labels(cases_root, task)
    assert again.labels.equals(made.labels)
    assert sum(i.events + i.competing + i.censored for i in again.report.intervals) == made.labels.height
    # Read as binary, the same file gives its boolean_value (the outcome within the horizon).
    binary = make_labels(cases_root, labels_file_task(path, kind="binary"))
    assert binary.labels.equals(made.labels.select("subject_id", "prediction_time", "boolean_value"))
    # A file of times and event types only (no boolean_value) is survival too, and cannot be read as binary.
    bare = tmp_path / "bare.parquet"
    made.labels.drop("boolean_value").write_parquet(bare)
    assert make_labels(cases_root, str(bare)).labels.equals(made.labels)
    with pytest.raises(WorkbenchError, match="needs a boolean_value column"):
        make_labels(cases_root, labels_file_task(bare, kind="binary"))


def test_labels_file_times_relabelled_with_survival_semantics(cases_root, tmp_path):
    path = tmp_path / "times.parquet"
    pl.DataFrame({"subject_id": [1, 3, 4], "prediction_time": [T0 + DAY] * 3}).write_parquet(path)
    result = make_labels(cases_root, spec(prediction_times={"kind": "labels_file", "labels_path": str(path)}))
    assert result.labels.select("subject_id", "float_value", "integer_value").rows() == [
        (1, 49.0, O), (3, 59.0, C), (4, 100.0, C)]


@pytest.mark.parametrize("rows, dtypes, column, what", [
    ([(1, T0, 5.0, 1)], {"integer_value": None}, "integer_value", "missing column"),
    ([(1, T0, None, 1)], {}, "float_value", "null values"),
    ([(1, T0, 0.0, 1)], {}, "float_value", "> 0"),
    ([(1, T0, -3.0, 0)], {}, "float_value", "> 0"),
    ([(1, T0, float("nan"), 0)], {}, "float_value", "> 0"),
    ([(1, T0, 5.0, 3)], {}, "integer_value", r"0 \(censored\), 1 \(outcome\) or 2 \(competing\)"),
    ([(1, T0, 5.0, None)], {}, "integer_value", "null values"),
    ([(1, T0, 5.0, 1.0)], {"integer_value": pl.Float64}, "integer_value", "integers"),
])
def test_bad_survival_labels_file_names_file_and_column(cases_root, tmp_path, rows, dtypes, column, what):
    path = tmp_path / "bad.parquet"
    if dtypes.get("integer_value", 0) is None:
        pl.DataFrame([r[:3] for r in rows], schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"),
                                                     "float_value": pl.Float64}, orient="row").write_parquet(path)
        task = labels_file_task(path, kind="survival")
    else:
        write_survival(path, rows, **dtypes)
        task = labels_file_task(path, kind="survival")  # nulls would make the guess binary
    with pytest.raises(WorkbenchError) as info:
        make_labels(cases_root, task)
    message = str(info.value)
    assert str(path) in message and f"'{column}'" in message
    assert re.search(what, message), message


def test_survival_file_with_disagreeing_boolean_value_is_refused(cases_root, tmp_path):
    path = write_survival(tmp_path / "b.parquet", [(1, T0, 5.0, 2, True)], boolean_value=pl.Boolean)
    task = labels_file_task(path, kind="survival")
    with pytest.raises(WorkbenchError, match=r"b.parquet: column 'boolean_value': disagrees with integer_value == 1"):
        make_labels(cases_root, task)
    assert labels_file_task(path).kind == "survival"
    # A binary file whose other MEDS value columns are null (as ACES may write them) stays binary.
    aces = tmp_path / "aces.parquet"
    pl.DataFrame({"subject_id": [1], "prediction_time": [T0], "boolean_value": [True],
                  "integer_value": pl.Series([None], dtype=pl.Int64),
                  "float_value": pl.Series([None], dtype=pl.Float32)}).write_parquet(aces)
    assert labels_file_task(aces).kind == "binary"
    assert make_labels(cases_root, labels_file_task(aces)).labels.rows() == [(1, T0, True)]


# --- spec validation and the shipped task ---


@pytest.mark.parametrize("override, field", [
    ({"outcome": {"gap_days": 10}}, "outcome.gap_days must be 0 for kind 'survival'"),
    ({"kind": "cox"}, "kind: Input should be 'binary' or 'survival'"),
])
def test_invalid_survival_spec_fails_at_load(tmp_path, override, field):
    data = spec().model_dump(mode="json")
    for key, value in override.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(WorkbenchError) as info:
        load_task(path)
    assert str(path) in str(info.value) and field in str(info.value)
    assert spec(kind="binary", outcome={"gap_days": 10}).outcome.gap_days == 10  # binary tasks may have a gap


def test_shipped_pbc_survival_spec():
    surv, mort = load_task("pbc_survival"), load_task("pbc_mortality")
    assert (surv.kind, mort.kind) == ("survival", "binary")
    assert (surv.outcome.horizon_days, surv.outcome.gap_days) == (1826.25, 0)
    assert surv.outcome.codes == mort.outcome.codes == ["MEDS_DEATH"]
    assert surv.censoring == mort.censoring and surv.prediction_times == mort.prediction_times
    assert surv.features == mort.features == {"bin_width": "90d", "n_steps": 16}
    assert "survival" in surv.description.lower() or "days to" in surv.description


def test_pbc_survival_keeps_censored_visits_and_agrees_with_pbc_mortality():
    from workbench.data.datasets import resolve

    root = resolve("pbc")
    surv, mort = make_labels(root, "pbc_survival"), make_labels(root, "pbc_mortality")
    print(surv.report.to_markdown())
    dropped = {r.rule: r.rows_dropped for r in mort.report.rules}
    censored_in_binary = dropped["censored_competing"] + dropped["censored_followup"]
    assert censored_in_binary > 150
    assert surv.report.candidates == mort.report.candidates
    assert surv.report.labels == mort.report.labels + censored_in_binary > mort.report.labels
    s = surv.labels
    assert s["float_value"].min() > 0 and s["float_value"].max() == 1826.25
    assert set(s["integer_value"].unique()) == {C, O, K}
    assert s["boolean_value"].equals(s["integer_value"] == O, check_names=False)

    # Every pbc_mortality sample is a pbc_survival sample; a 2-year positive is a death within 730 days,
    # a 2-year negative was followed at least 730 days with no death or transplant before.
    joined = mort.labels.join(s, on=["subject_id", "prediction_time"], how="left", suffix="_binary")
    assert joined["integer_value"].null_count() == 0
    want = (pl.col("integer_value") == O) & (pl.col("float_value") <= 730)
    assert joined.select(pl.col("boolean_value") == want).to_series().all()
    assert joined.filter(~pl.col("boolean_value"))["float_value"].min() >= 730
    # The visits pbc_mortality excludes for censoring: transplant or end of follow-up inside 730 days.
    cand = mort.candidates.select("subject_id", "prediction_time", "excluded_by")
    ex = cand.join(s, on=["subject_id", "prediction_time"])
    comp = ex.filter(pl.col("excluded_by") == "censored_competing")
    assert comp.height == dropped["censored_competing"]
    assert (comp["integer_value"] == K).all() and comp["float_value"].max() <= 730
    lost = ex.filter(pl.col("excluded_by") == "censored_followup")
    assert (lost["integer_value"] == C).all() and lost["float_value"].max() < 730

    # Independent count from the raw events: deaths within 5 years of a visit, before any transplant.
    events = pl.read_parquet(root / "data").filter(pl.col("time").is_not_null())
    per = events.group_by("subject_id").agg(
        death=pl.col("time").filter(pl.col("code") == "MEDS_DEATH").min(),
        tx=pl.col("time").filter(pl.col("code") == "PBC//TRANSPLANT").min())
    direct = (s.join(per, on="subject_id")
              .with_columns(days=(pl.col("death") - pl.col("prediction_time")).dt.total_days())
              .filter((pl.col("days") > 0) & (pl.col("days") <= 1826.25)
                      & (pl.col("tx").is_null() | (pl.col("tx") >= pl.col("death")))))
    assert direct.height == surv.report.positives == sum(i.events for i in surv.report.intervals)
    assert direct["days"].cast(pl.Float64).equals(direct["float_value"], check_names=False)
    assert surv.report.intervals[0].at_risk == surv.report.labels
    assert sum(i.events + i.competing + i.censored for i in surv.report.intervals) == surv.report.labels


def test_cli_label_survival_writes_meds_labels_and_interval_table(cases_root, tmp_path):
    spec_path = tmp_path / "task.yaml"
    spec_path.write_text(spec().to_yaml())
    out = tmp_path / "labels.parquet"
    res = CliRunner().invoke(app, ["label", "--task", str(spec_path), "--data", str(cases_root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "Events and censorings per interval" in res.output
    table = pq.read_table(out)
    meds.LabelSchema.validate(table)
    assert table.column_names == ["subject_id", "prediction_time", "boolean_value", "integer_value", "float_value"]


# --- an independent, row-by-row reference labeller checked against make_labels on random subjects ---


def reference_survival(subjects: list[dict], horizon: int) -> dict[tuple[int, int], object]:
    """Plain-Python statement of the survival semantics: (days, event type) or 'excluded' per visit."""
    out = {}
    for s in subjects:
        for t in sorted(set(s["visits"])):
            death, tx, end = s["death"], s["tx"], s["end"]
            if (tx is not None and tx <= t) or (death is not None and death <= t) or end <= t:
                out[(s["id"], t)] = "excluded"
                continue
            if death is not None and death <= t + horizon and (tx is None or death <= tx):
                out[(s["id"], t)] = (float(death - t), O)
            elif tx is not None and tx <= t + horizon:
                out[(s["id"], t)] = (float(tx - t), K)
            else:
                out[(s["id"], t)] = (float(min(end, t + horizon) - t), C)
    return out


@st.composite
def random_subjects(draw):
    subjects = []
    for sid in range(1, draw(st.integers(2, 6)) + 1):
        visits = draw(st.lists(st.integers(0, 400), min_size=1, max_size=5))
        death = draw(st.none() | st.integers(0, 500))
        tx = draw(st.none() | st.integers(0, 500))
        if death is not None and draw(st.booleans()):
            tx = draw(st.sampled_from([death, death - 1, death + 1]))  # ties and near-ties matter
        end = draw(st.integers(max(visits), 600))
        if death is not None and draw(st.booleans()):
            end = death  # otherwise the death may be recorded after the end of follow-up
        if tx is not None and tx > end and draw(st.booleans()):
            tx = None
        subjects.append({"id": sid, "visits": visits, "death": death, "tx": tx, "end": end})
    return subjects


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subjects=random_subjects(), horizon=st.integers(1, 300))
def test_make_labels_matches_reference_survival_semantics(subjects, horizon):
    subjects = [*subjects, {"id": 99, "visits": [0], "death": 2000, "tx": 1500, "end": 2000}]
    rows = [r for s in subjects for r in subject(s["id"], visits=tuple(s["visits"]), death=s["death"],
                                                 transplant=s["tx"], end=s["end"])]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "m"
        write_dataset(root, frame(rows))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = make_labels(root, spec(outcome={"horizon_days": horizon}, require_train_positives=False))
    got = {
        (r["subject_id"], (r["prediction_time"] - T0).days):
            "excluded" if r["excluded_by"] else (r["float_value"], r["integer_value"])
        for r in result.candidates.iter_rows(named=True)
    }
    assert got == reference_survival(subjects, horizon)
