"""Synthetic MEDS data with a planted, documented risk signal.

``generate(out, SynthConfig(...))`` writes a MEDS 0.4 dataset shard by shard (memory is bounded
by one shard, so 1,000,000 subjects / ~100 million events fit in well under 4 GB), fully
vectorized with numpy per shard and deterministic for a seed: shard ``i`` draws from its own
generator seeded with ``(seed, i)``, so the output never depends on timing or on how many
shards came before.

Each subject has
  * static ``SEX//F`` or ``SEX//M`` (time null) and ``MEDS_BIRTH`` (age 30-85 at enrollment);
  * an enrollment ``VISIT`` between 2015 and 2022 (the first event after ``MEDS_BIRTH``), then
    irregular ``VISIT`` events (a Poisson process with a per-subject rate) until follow-up ends;
  * at visits: labs (``LAB//...``, numeric value in the unit named in ``codes.parquet``, within
    plausible ranges), diagnoses (``DX//...``) and medications (``MED//...``);
  * ``MEDS_DEATH`` for those who die, and ``END_OF_FOLLOWUP`` for everyone as the last event
    (at the death time for those who die, written after ``MEDS_DEATH``).

Intended task (the planted signal is built for it):
  * prediction time = enrollment (first event after ``MEDS_BIRTH``, i.e. the first ``VISIT``)
    + 365 days; every subject is alive and under follow-up at that time;
  * outcome = ``MEDS_DEATH`` within (prediction time, prediction time + 365 days];
  * censoring by ``END_OF_FOLLOWUP``: a subject without the outcome whose follow-up ends before
    prediction time + 365 days is censored (``censored_fraction`` of subjects, default 5%, are
    censored inside the horizon; everyone else is followed at least 400 days past prediction time).

Planted signal: a ``planted_fraction`` of subjects (default 0.3) get the diagnosis
``DX//planted_event`` exactly once, at a uniformly random time in [enrollment + 30 days,
enrollment + 360 days], i.e. before the prediction time. Their outcome probability is
``outcome_prob_planted`` (default 0.7) against ``outcome_prob_baseline`` (default 0.05) for the
others; nothing else about a subject before the prediction time depends on the outcome, so a
model (and SHAP) can only learn the outcome from the planted event. The code never occurs in
non-planted subjects.

``metadata/ground_truth.parquet`` (one row per subject) lets explanation tests check that
attributions concentrate on the planted event's time step: ``subject_id``, ``planted`` (bool),
``planted_code`` and ``planted_time`` (null unless planted), ``enrollment_time``,
``prediction_time``, ``outcome`` (observed death inside the horizon), ``outcome_time``,
``death_time`` (any observed death), ``end_of_followup`` and ``censored`` (no outcome and follow-up
ends inside the horizon). ``metadata/dataset.json`` holds the config, seed and counts under
``"synth"``. The data pass ``workbench.data.validate`` with no errors and no warnings (no
duplicate rows, no event after the ``data_freeze`` date).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import meds
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from workbench.data.meds_io import MedsDataset, ShardWriter, open_dataset
from workbench.config import validated
from workbench.errors import WorkbenchError

GENERATOR_NAME = "workbench.data.synth"
GROUND_TRUTH_FILE = Path("metadata") / "ground_truth.parquet"

BIRTH_CODE = meds.birth_code
DEATH_CODE = meds.death_code
END_CODE = "END_OF_FOLLOWUP"
VISIT_CODE = "VISIT"
PLANTED_CODE = "DX//planted_event"
SEX_CODES = ("SEX//F", "SEX//M")

US_PER_MINUTE = 60 * 1_000_000
US_PER_DAY = 24 * 60 * US_PER_MINUTE
PREDICTION_OFFSET_DAYS = 365
HORIZON_DAYS = 365
#: Window (days after enrollment) in which the planted event may occur: before the prediction time.
PLANTED_WINDOW_DAYS = (30, 360)
#: Uncensored follow-up lasts this long after enrollment (so >= 400 days past the prediction time).
ADMIN_FOLLOWUP_DAYS = (PREDICTION_OFFSET_DAYS + 400, 4 * 365)
#: Visits of one subject start at least this many minutes apart (labs and medications are
#: recorded up to 120 minutes after a visit starts, so windows of two visits never overlap).
MIN_VISIT_GAP_MIN = 180
#: Share of subjects without the outcome who die after the horizon (seen if still followed).
LATE_DEATH_PROB = 0.10

class Lab(NamedTuple):
    """A lab test: its code, description with unit, LOINC parent and value distribution."""

    code: str
    description: str
    parent: str
    median: float
    sd_between: float  #: spread of subjects' baselines (log scale when ``log``)
    sd_within: float  #: visit-to-visit noise around a subject's baseline (same scale)
    log: bool  #: log-normal (skewed, positive) rather than normal
    low: float  #: plausible range: values are clipped to [low, high]
    high: float
    decimals: int  #: reported precision
    p_per_visit: float  #: share of visits at which the lab is drawn


LABS = (
    Lab("LAB//creatinine", "Serum creatinine [mg/dL]", "LOINC/2160-0", 1.0, 0.25, 0.10, True, 0.3, 12.0, 2, 0.6),
    Lab("LAB//hemoglobin", "Blood hemoglobin [g/dL]", "LOINC/718-7", 13.5, 1.2, 0.6, False, 6.0, 19.0, 1, 0.6),
    Lab("LAB//sodium", "Serum sodium [mmol/L]", "LOINC/2951-2", 139.0, 2.0, 2.0, False, 120.0, 160.0, 0, 0.7),
    Lab("LAB//potassium", "Serum potassium [mmol/L]", "LOINC/2823-3", 4.2, 0.3, 0.3, False, 2.5, 7.0, 1, 0.7),
    Lab("LAB//glucose", "Serum glucose [mg/dL]", "LOINC/2345-7", 100.0, 0.15, 0.15, True, 40.0, 600.0, 0, 0.7),
    Lab("LAB//hba1c", "Hemoglobin A1c [%]", "LOINC/4548-4", 5.8, 0.12, 0.05, True, 4.0, 15.0, 1, 0.2),
    Lab("LAB//wbc", "White blood cell count [10*3/uL]", "LOINC/6690-2", 7.0, 0.20, 0.15, True, 1.0, 40.0, 1, 0.5),
)

# Diagnoses and medications: code, description, parent, relative frequency at visits.
DIAGNOSES = (
    ("DX//htn", "Essential hypertension", "ICD10CM/I10", 0.22),
    ("DX//hyperlipidemia", "Hyperlipidemia", "ICD10CM/E78", 0.16),
    ("DX//t2dm", "Type 2 diabetes mellitus", "ICD10CM/E11", 0.12),
    ("DX//ckd", "Chronic kidney disease", "ICD10CM/N18", 0.08),
    ("DX//cad", "Coronary artery disease", "ICD10CM/I25", 0.08),
    ("DX//chf", "Congestive heart failure", "ICD10CM/I50", 0.06),
    ("DX//afib", "Atrial fibrillation", "ICD10CM/I48", 0.06),
    ("DX//copd", "Chronic obstructive pulmonary disease", "ICD10CM/J44", 0.07),
    ("DX//depression", "Major depressive disorder", "ICD10CM/F32", 0.08),
    ("DX//obesity", "Obesity", "ICD10CM/E66", 0.07),
)
MEDICATIONS = (
    ("MED//lisinopril", "Lisinopril (ACE inhibitor)", "ATC/C09AA03", 0.18),
    ("MED//atorvastatin", "Atorvastatin (statin)", "ATC/C10AA05", 0.18),
    ("MED//metformin", "Metformin (biguanide)", "ATC/A10BA02", 0.14),
    ("MED//metoprolol", "Metoprolol (beta blocker)", "ATC/C07AB02", 0.12),
    ("MED//furosemide", "Furosemide (loop diuretic)", "ATC/C03CA01", 0.08),
    ("MED//insulin_glargine", "Insulin glargine", "ATC/A10AE04", 0.06),
    ("MED//apixaban", "Apixaban (anticoagulant)", "ATC/B01AF02", 0.07),
    ("MED//sertraline", "Sertraline (SSRI)", "ATC/N06AB06", 0.09),
    ("MED//albuterol", "Albuterol inhaler", "ATC/R03AC02", 0.08),
)

#: Every code the generator can emit; an event's code is an index into this tuple.
VOCAB: tuple[str, ...] = (
    *SEX_CODES,
    BIRTH_CODE,
    VISIT_CODE,
    *(lab.code for lab in LABS),
    *(dx[0] for dx in DIAGNOSES),
    *(med[0] for med in MEDICATIONS),
    PLANTED_CODE,
    DEATH_CODE,
    END_CODE,
)
_CODE_INDEX = {code: i for i, code in enumerate(VOCAB)}
_LAB0 = _CODE_INDEX[LABS[0].code]
_DX0 = _CODE_INDEX[DIAGNOSES[0][0]]
_MED0 = _CODE_INDEX[MEDICATIONS[0][0]]

_LAB_P = np.array([lab.p_per_visit for lab in LABS])
_DX_P = np.array([dx[3] for dx in DIAGNOSES])
_MED_P = np.array([med[3] for med in MEDICATIONS])


class SynthConfig(BaseModel):
    """Settings of the synthetic generator (every field has a default)."""

    model_config = ConfigDict(extra="forbid")

    n_subjects: int = Field(1000, ge=1, description="Number of subjects to generate.")
    seed: int = Field(0, ge=0, description="Random seed; the same seed and config give identical files.")
    subjects_per_shard: int = Field(10_000, ge=1, description="Subjects per parquet shard (bounds memory).")
    mean_events_per_subject: float = Field(
        100.0, ge=20.0, le=10_000.0, description="Target mean number of events per subject (all codes)."
    )
    dx_per_visit: float = Field(0.8, ge=0.0, le=20.0, description="Mean diagnoses recorded per visit.")
    meds_per_visit: float = Field(0.6, ge=0.0, le=20.0, description="Mean medications recorded per visit.")
    planted_fraction: float = Field(0.3, ge=0.0, le=1.0, description="Share of subjects given DX//planted_event.")
    outcome_prob_planted: float = Field(
        0.7, ge=0.0, le=1.0, description="P(death within the horizon) for planted subjects."
    )
    outcome_prob_baseline: float = Field(
        0.05, ge=0.0, le=1.0, description="P(death within the horizon) for the other subjects."
    )
    censored_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Share of subjects whose follow-up ends inside the horizon."
    )
    enrollment_start: dt.date = Field(dt.date(2015, 1, 1), description="Earliest enrollment date.")
    enrollment_end: dt.date = Field(dt.date(2022, 12, 31), description="Latest enrollment date.")
    data_freeze: dt.date = Field(
        dt.date(2025, 6, 30),
        description="No follow-up past this date (keeps every event in the past); must leave room for "
        f"{ADMIN_FOLLOWUP_DAYS[0]} days of follow-up after enrollment_end.",
    )

    @model_validator(mode="after")
    def _check_dates(self) -> "SynthConfig":
        if self.enrollment_end <= self.enrollment_start:
            raise ValueError(
                f"enrollment_end ({self.enrollment_end}) must be after enrollment_start ({self.enrollment_start})"
            )
        earliest_freeze = self.enrollment_end + dt.timedelta(days=ADMIN_FOLLOWUP_DAYS[0] + 1)
        if self.data_freeze < earliest_freeze:
            raise ValueError(f"data_freeze ({self.data_freeze}) must be on or after {earliest_freeze}")
        return self

    @property
    def n_shards(self) -> int:
        """How many shards ``generate`` writes."""
        return -(-self.n_subjects // self.subjects_per_shard)


def make_config(**values) -> SynthConfig:
    """A :class:`SynthConfig` from keyword values; a bad value is a WorkbenchError naming the field."""
    return validated(SynthConfig, values, "invalid synth config")


# --------------------------------------------------------------------------------------------
# Per-subject draws


def _expected_visits(config: SynthConfig) -> float:
    """Mean visits per subject that makes the mean event count come out near the target."""
    per_visit = 1.0 + _LAB_P.sum() + config.dx_per_visit + config.meds_per_visit
    p_death = _outcome_rate(config) + LATE_DEATH_PROB / 2
    fixed = 3.0 + config.planted_fraction + p_death  # sex, birth, end of follow-up, planted, death
    return max(1.0, (config.mean_events_per_subject - fixed) / per_visit)


def _outcome_rate(config: SynthConfig) -> float:
    f = config.planted_fraction
    return f * config.outcome_prob_planted + (1 - f) * config.outcome_prob_baseline


def _expected_followup_days(config: SynthConfig) -> float:
    """Approximate mean follow-up (enrollment to end), used to turn visits into a visit rate."""
    # Mean administrative follow-up over a grid of enrollment days (uniform, capped by the freeze).
    enroll = np.linspace(0, (config.enrollment_end - config.enrollment_start).days, 512)
    to_freeze = (config.data_freeze - config.enrollment_start).days - enroll
    lo = ADMIN_FOLLOWUP_DAYS[0]
    hi = np.maximum(lo, np.minimum(ADMIN_FOLLOWUP_DAYS[1], to_freeze))
    admin = float(np.mean((lo + hi) / 2))
    short = PREDICTION_OFFSET_DAYS + HORIZON_DAYS / 2  # died or censored inside the horizon
    p_short = min(1.0, _outcome_rate(config) + config.censored_fraction)
    return p_short * short + (1 - p_short) * admin


def _subjects(rng: np.random.Generator, n: int, config: SynthConfig) -> dict[str, np.ndarray]:
    """Draw every per-subject quantity (times in microseconds since the epoch)."""
    start, end, freeze = (_us(d) for d in (config.enrollment_start, config.enrollment_end, config.data_freeze))
    # Enrollment visits fall in office hours (08:00-18:00), on a whole minute.
    day = rng.integers(0, (end - start) // US_PER_DAY + 1, n)
    minute = rng.integers(8 * 60, 18 * 60, n)
    enroll = start + day * US_PER_DAY + minute * US_PER_MINUTE
    age_days = rng.uniform(30 * 365.25, 85 * 365.25, n).astype(np.int64)
    birth = enroll - age_days * US_PER_DAY - minute * US_PER_MINUTE  # birth at midnight
    prediction = enroll + PREDICTION_OFFSET_DAYS * US_PER_DAY

    planted = rng.random(n) < config.planted_fraction
    lo, hi = PLANTED_WINDOW_DAYS
    planted_time = enroll + _minutes(rng.uniform(lo, hi, n) * US_PER_DAY)

    p_outcome = np.where(planted, config.outcome_prob_planted, config.outcome_prob_baseline)
    latent_outcome = rng.random(n) < p_outcome
    # Deaths in (prediction, prediction + horizon]: at least one minute after the prediction time.
    horizon_death = prediction + _minutes(rng.uniform(1 / 1440, HORIZON_DAYS, n) * US_PER_DAY)
    late = ~latent_outcome & (rng.random(n) < LATE_DEATH_PROB)
    late_death = prediction + _minutes(rng.uniform(HORIZON_DAYS + 1, HORIZON_DAYS + 1100, n) * US_PER_DAY)
    death = np.where(latent_outcome, horizon_death, np.where(late, late_death, np.iinfo(np.int64).max))

    censored = rng.random(n) < config.censored_fraction
    censor_time = prediction + _minutes(rng.uniform(1, HORIZON_DAYS - 1, n) * US_PER_DAY)
    # Administrative end: 2-4 years after enrollment, but never past the data freeze.
    admin_lo = enroll + ADMIN_FOLLOWUP_DAYS[0] * US_PER_DAY
    admin_hi = np.maximum(admin_lo, np.minimum(enroll + ADMIN_FOLLOWUP_DAYS[1] * US_PER_DAY, freeze))
    admin_end = admin_lo + _minutes(rng.random(n) * (admin_hi - admin_lo))
    follow_end = np.where(censored, censor_time, admin_end)
    died = death <= follow_end  # a death after follow-up ends is never observed
    end = np.where(died, death, follow_end)

    return {
        "enroll": enroll,
        "birth": birth,
        "prediction": prediction,
        "planted": planted,
        "planted_time": planted_time,
        "died": died,
        "death": death,
        "end": end,
        "female": rng.random(n) < 0.52,
        # Visit intensity varies between subjects (gamma, shape 2) but not with the outcome.
        "visit_rate": rng.gamma(2.0, 0.5, n) * (_expected_visits(config) - 1) / _expected_followup_days(config),
    }


def _us(day: dt.date) -> int:
    """Microseconds since the epoch at midnight of ``day``."""
    return (day - dt.date(1970, 1, 1)).days * US_PER_DAY


def _minutes(us: np.ndarray) -> np.ndarray:
    """Round float microseconds down to whole minutes (int64)."""
    return (us // US_PER_MINUTE).astype(np.int64) * US_PER_MINUTE


# --------------------------------------------------------------------------------------------
# Events of one shard. Each helper returns (subject index, time, code index, value) arrays.

Block = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _block(subj: np.ndarray, time: np.ndarray, code: np.ndarray | int, value: np.ndarray | None = None) -> Block:
    code_arr = np.broadcast_to(np.asarray(code, dtype=np.uint8), subj.shape)
    if value is None:
        value = np.full(subj.shape, np.nan, dtype=np.float32)
    return subj, time.astype(np.int64), code_arr, value.astype(np.float32)


def _visits(rng: np.random.Generator, s: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Visit times: one at enrollment, then a Poisson process until a day before follow-up ends."""
    n = s["enroll"].size
    span = (s["end"] - s["enroll"]) - US_PER_DAY  # keep same-day lab/med offsets before the end
    extra = rng.poisson(s["visit_rate"] * np.maximum(span, 0) / US_PER_DAY)
    subj = np.concatenate([np.arange(n), np.repeat(np.arange(n), extra)])
    offset = np.concatenate([np.zeros(n, np.int64), _minutes(rng.random(subj.size - n) * span[subj[n:]])])
    # Sort by (subject, minutes since enrollment), packed into one int64 (follow-up is far below
    # 2**32 minutes), and drop a visit starting within MIN_VISIT_GAP_MIN of the subject's previous
    # one: events recorded up to two hours after two overlapping visits could be duplicate rows.
    key = np.sort(subj.astype(np.int64) << 32 | offset // US_PER_MINUTE)
    subj, minute = key >> 32, key & 0xFFFFFFFF
    keep = np.ones(key.size, dtype=bool)
    keep[1:] = (subj[1:] != subj[:-1]) | (np.diff(minute) >= MIN_VISIT_GAP_MIN)
    subj, minute = subj[keep], minute[keep]
    return subj, s["enroll"][subj] + minute * US_PER_MINUTE


def _labs(rng: np.random.Generator, n: int, visit_subj: np.ndarray, visit_time: np.ndarray) -> Block:
    """Labs drawn at visits: subject baseline plus visit noise, clipped to a plausible range."""
    median, sd_between, sd_within, log, lo, hi, decimals = (
        np.array([getattr(lab, name) for lab in LABS])
        for name in ("median", "sd_between", "sd_within", "log", "low", "high", "decimals")
    )

    center = np.where(log, np.log(median), median)
    baseline = center + rng.standard_normal((n, len(LABS))) * sd_between
    visit_idx, lab_idx = np.nonzero(rng.random((visit_subj.size, len(LABS))) < _LAB_P)
    subj = visit_subj[visit_idx]
    raw = baseline[subj, lab_idx] + rng.standard_normal(subj.size) * sd_within[lab_idx]
    value = np.where(log[lab_idx], np.exp(raw), raw)
    scale = 10.0 ** decimals[lab_idx]
    value = np.clip(np.round(value * scale) / scale, lo[lab_idx], hi[lab_idx])
    # Results come back 10-90 minutes after the visit starts.
    time = visit_time[visit_idx] + rng.integers(10, 91, subj.size) * US_PER_MINUTE
    return _block(subj, time, _LAB0 + lab_idx, value)


def _coded_at_visits(
    rng: np.random.Generator,
    visit_subj: np.ndarray,
    visit_time: np.ndarray,
    per_visit: float,
    weights: np.ndarray,
    first_code: int,
    max_delay_min: int,
) -> Block:
    """About ``per_visit`` codes per visit, each code at most once per visit (so no duplicate rows),
    in proportion to ``weights``, recorded up to ``max_delay_min`` minutes after the visit."""
    p = np.minimum(1.0, per_visit * weights / weights.sum())
    visit_idx, code_idx = np.nonzero(rng.random((visit_subj.size, weights.size)) < p)
    delay = rng.integers(0, max_delay_min + 1, visit_idx.size) * US_PER_MINUTE
    return _block(visit_subj[visit_idx], visit_time[visit_idx] + delay, first_code + code_idx)


def _shard_events(rng: np.random.Generator, s: dict[str, np.ndarray], config: SynthConfig) -> Block:
    """All timed events of one shard, in an order where MEDS_DEATH precedes END_OF_FOLLOWUP."""
    n = s["enroll"].size
    everyone = np.arange(n)
    visit_subj, visit_time = _visits(rng, s)
    planted = np.flatnonzero(s["planted"])
    died = np.flatnonzero(s["died"])
    blocks = [
        _block(everyone, s["birth"], _CODE_INDEX[BIRTH_CODE]),
        _block(visit_subj, visit_time, _CODE_INDEX[VISIT_CODE]),
        _labs(rng, n, visit_subj, visit_time),
        _coded_at_visits(rng, visit_subj, visit_time, config.dx_per_visit, _DX_P, _DX0, 0),
        _coded_at_visits(rng, visit_subj, visit_time, config.meds_per_visit, _MED_P, _MED0, 120),
        _block(planted, s["planted_time"][planted], _CODE_INDEX[PLANTED_CODE]),
        _block(died, s["death"][died], _CODE_INDEX[DEATH_CODE]),
        _block(everyone, s["end"], _CODE_INDEX[END_CODE]),
    ]
    return tuple(np.concatenate(parts) for parts in zip(*blocks))  # type: ignore[return-value]


def _events_frame(subject_ids: np.ndarray, s: dict[str, np.ndarray], events: Block) -> pl.DataFrame:
    """The shard as a MEDS event frame: static sex rows first, then timed events."""
    subj, time, code, value = events
    vocab = pl.Series("code", VOCAB, dtype=pl.String)
    static = pl.DataFrame(
        {
            "subject_id": pl.Series(subject_ids, dtype=pl.Int64),
            "time": pl.repeat(None, subject_ids.size, dtype=pl.Datetime("us"), eager=True),
            "code": vocab.gather(np.where(s["female"], 0, 1)),
            "numeric_value": pl.repeat(None, subject_ids.size, dtype=pl.Float32, eager=True),
        }
    )
    timed = pl.DataFrame(
        {
            "subject_id": pl.Series(subject_ids[subj], dtype=pl.Int64),
            "time": pl.Series(time, dtype=pl.Int64).cast(pl.Datetime("us")),
            "code": vocab.gather(code),
            "numeric_value": pl.Series(value, dtype=pl.Float32).fill_nan(None),
        }
    )
    return pl.concat([static, timed], how="vertical")


def _ground_truth(subject_ids: np.ndarray, s: dict[str, np.ndarray]) -> pl.DataFrame:
    """One row per subject: the planted event, prediction time and observed outcome."""
    pred = s["prediction"]
    outcome = s["died"] & (s["death"] > pred) & (s["death"] <= pred + HORIZON_DAYS * US_PER_DAY)
    censored = ~outcome & (s["end"] < pred + HORIZON_DAYS * US_PER_DAY)

    def ts(values: np.ndarray, mask: np.ndarray | None = None) -> pl.Series:
        """Microseconds as a Datetime series, null where ``mask`` is false (NaT converts to null)."""
        stamps = values.astype("datetime64[us]")
        if mask is not None:
            stamps = np.where(mask, stamps, np.datetime64("NaT", "us"))
        return pl.Series(stamps, dtype=pl.Datetime("us"))

    return pl.DataFrame(
        {
            "subject_id": pl.Series(subject_ids, dtype=pl.Int64),
            "planted": pl.Series(s["planted"], dtype=pl.Boolean),
            "planted_code": pl.Series("planted_code", [PLANTED_CODE, None], dtype=pl.String).gather(
                np.where(s["planted"], 0, 1)
            ),
            "planted_time": ts(s["planted_time"], s["planted"]),
            "enrollment_time": ts(s["enroll"]),
            "prediction_time": ts(pred),
            "outcome": pl.Series(outcome, dtype=pl.Boolean),
            "outcome_time": ts(s["death"], outcome),
            "death_time": ts(s["death"], s["died"]),
            "end_of_followup": ts(s["end"]),
            "censored": pl.Series(censored, dtype=pl.Boolean),
        }
    )


def _splits(rng: np.random.Generator, subject_ids: np.ndarray) -> pl.DataFrame:
    """train/tuning/held_out in 0.6/0.2/0.2, exact within each shard, random by subject."""
    n = subject_ids.size
    cuts = np.array([0, round(0.6 * n), round(0.8 * n), n])
    labels = np.repeat(np.array(["train", "tuning", "held_out"]), np.diff(cuts))
    return pl.DataFrame({"subject_id": subject_ids, "split": rng.permutation(labels)})


def generate_shard(config: SynthConfig, shard: int) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Events, ground truth and splits of shard ``shard`` (deterministic in ``(seed, shard)``)."""
    first = shard * config.subjects_per_shard
    n = min(config.subjects_per_shard, config.n_subjects - first)
    if n <= 0:
        raise ValueError(f"shard {shard} is past the last shard ({config.n_shards - 1})")
    rng = np.random.default_rng([config.seed, shard])
    subject_ids = np.arange(first + 1, first + n + 1, dtype=np.int64)
    s = _subjects(rng, n, config)
    events = _events_frame(subject_ids, s, _shard_events(rng, s, config))
    return events, _ground_truth(subject_ids, s), _splits(rng, subject_ids)


# --------------------------------------------------------------------------------------------
# Dataset


def codes_metadata() -> pl.DataFrame:
    """``codes.parquet`` content: every code with a description (units for labs) and parents."""
    rows = [
        (SEX_CODES[0], "Administrative sex: female (static)", None),
        (SEX_CODES[1], "Administrative sex: male (static)", None),
        (BIRTH_CODE, "Date of birth", None),
        (VISIT_CODE, "Outpatient or inpatient visit (start time)", None),
        *((lab.code, lab.description, [lab.parent]) for lab in LABS),
        *((dx[0], dx[1], [dx[2]]) for dx in DIAGNOSES),
        *((med[0], med[1], [med[2]]) for med in MEDICATIONS),
        (
            PLANTED_CODE,
            "Synthetic planted risk event: recorded once, 30-360 days after enrollment, in the "
            "planted subjects only; raises the probability of death within 365 days after the "
            "prediction time (enrollment + 365 days). See metadata/ground_truth.parquet.",
            None,
        ),
        (DEATH_CODE, "Death", None),
        (END_CODE, "End of follow-up (last event of every subject; censoring time if alive)", None),
    ]
    return pl.DataFrame(
        {
            "code": [r[0] for r in rows],
            "description": [r[1] for r in rows],
            "parent_codes": [r[2] for r in rows],
        },
        schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)},
    )


def _dataset_metadata(config: SynthConfig, n_events: int, n_planted: int) -> dict:
    return {
        "dataset_name": f"synthetic-{config.n_subjects}-seed{config.seed}",
        "dataset_version": "1",
        "etl_name": GENERATOR_NAME,
        "synth": {
            "generator": GENERATOR_NAME,
            "seed": config.seed,
            "config": config.model_dump(mode="json"),
            "n_subjects": config.n_subjects,
            "n_events": n_events,
            "n_shards": config.n_shards,
            "n_planted": n_planted,
            "ground_truth": str(GROUND_TRUTH_FILE),
            "task": {
                "prediction_time": "first event after MEDS_BIRTH (enrollment VISIT) + 365 days",
                "outcome": f"{DEATH_CODE} within (prediction_time, prediction_time + 365 days]",
                "censoring": f"{END_CODE} before prediction_time + 365 days without the outcome",
                "planted_code": PLANTED_CODE,
            },
        },
    }


def generate(
    out: str | os.PathLike, config: SynthConfig | None = None, *, overwrite: bool = False, progress: bool = True
) -> MedsDataset:
    """Write a synthetic MEDS dataset to ``out`` shard by shard and return it opened.

    Memory stays bounded by one shard of events plus the per-subject ground truth and splits.
    The dataset appears at ``out`` only once complete (see :class:`ShardWriter`).
    """
    config = config or SynthConfig()
    truths: list[pl.DataFrame] = []
    splits: list[pl.DataFrame] = []
    with ShardWriter(out, overwrite=overwrite) as writer:
        for shard in tqdm(range(config.n_shards), desc="synth shards", unit="shard", disable=not progress):
            events, truth, split = generate_shard(config, shard)
            writer.write_shard(events, name=f"{shard:05d}")
            truths.append(truth)
            splits.append(split)
            del events  # release the shard before drawing the next one
        truth = pl.concat(truths)
        truth.write_parquet(writer.tmp / GROUND_TRUTH_FILE)
        writer.write_metadata(
            codes=codes_metadata(),
            splits=pl.concat(splits),
            dataset=_dataset_metadata(config, writer.n_events, int(truth["planted"].sum())),
        )
    return open_dataset(out)


def read_ground_truth(root: str | os.PathLike) -> pl.DataFrame:
    """The ground truth written by :func:`generate` (one row per subject)."""
    path = Path(root) / GROUND_TRUTH_FILE
    if not path.exists():
        raise WorkbenchError(f"{path}: no ground truth (was this dataset made by `workbench synth`?)")
    return pl.read_parquet(path)
