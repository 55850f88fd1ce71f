"""Tabular features of the references, by hand: windowed aggregates as of the prediction time, the
whole history included, nothing after it, the same codes as the sequence tensors."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
from conftest import events_frame

from workbench.data.meds_io import write_dataset
from workbench.features import FeatureConfig, fit
from workbench.tabular import feature_names, tabular_features

PT = dt.datetime(2020, 6, 1)
D = dt.timedelta(days=1)


@pytest.fixture
def dataset(tmp_path):
    rows = [
        (1, None, "SEX//F", None), (1, PT - 20000 * D, "MEDS_BIRTH", None),
        (1, PT - 800 * D, "DX//x", None),  # older than a year: only the full window sees it
        (1, PT - 400 * D, "LAB//a", 1.0), (1, PT - 100 * D, "LAB//a", 3.0), (1, PT - 10 * D, "LAB//a", 8.0),
        (1, PT + D, "LAB//a", 99.0),  # after the prediction time: never used
        (2, None, "SEX//M", None), (2, PT - 50 * D, "LAB//a", 5.0), (2, PT - 5 * D, "DX//x", None),
    ]
    splits = pl.DataFrame({"subject_id": [1, 2], "split": ["train", "train"]})
    return write_dataset(tmp_path / "meds", events_frame(rows), splits=splits)


def test_windowed_aggregates_by_hand(dataset):
    labels = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [PT, PT], "boolean_value": [True, False]})
    spec = fit(dataset, labels, FeatureConfig(min_code_frequency=1))
    X, samples = tabular_features(dataset, labels, spec)
    names = feature_names(spec)
    assert X.shape == (2, len(names)) and samples["subject_id"].to_list() == [1, 2]
    row = dict(zip(names, X[0]))
    assert row["LAB//a/last@30d"] == 8 and row["LAB//a/count@30d"] == 1
    assert row["LAB//a/last@365d"] == 8 and row["LAB//a/mean@365d"] == pytest.approx(5.5) and row["LAB//a/min@365d"] == 3
    assert row["LAB//a/last@full"] == 8 and row["LAB//a/mean@full"] == pytest.approx(4.0) and row["LAB//a/count@full"] == 3
    assert row["DX//x/count@365d"] == 0 and row["DX//x/count@full"] == 1  # an old diagnosis is not lost
    assert row["DX//x/days_since_last"] == 800 and row["LAB//a/days_since_first"] == 400
    assert row["static/SEX//F"] == 1 and row["static/age_years"] == pytest.approx(20000 / 365.25, rel=1e-6)
    other = dict(zip(names, X[1]))
    assert np.isnan(other["LAB//a/last@30d"]) and other["LAB//a/count@30d"] == 0  # not observed vs none counted
    assert other["LAB//a/last@full"] == 5 and other["DX//x/count@30d"] == 1 and np.isnan(other["static/age_years"])
