"""Shared fixtures: small, hand-made MEDS datasets written as real parquet files."""

from __future__ import annotations

import datetime as dt
import os
import tempfile

# The package's default project home is its checkout (tracking.project_home): no test may write
# runs or MLflow data there. Tests that need a home set their own; everything else lands here.
os.environ.setdefault("WORKBENCH_HOME", tempfile.mkdtemp(prefix="workbench-test-home-"))

import polars as pl
import pytest

from workbench.data.meds_io import write_dataset


def events_frame(rows: list[tuple]) -> pl.DataFrame:
    """Rows of (subject_id, time, code, numeric_value) as a MEDS-typed frame."""
    return pl.DataFrame(
        rows,
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32},
        orient="row",
    )


@pytest.fixture
def small_meds(tmp_path):
    """A valid two-shard dataset of four subjects with codes and splits metadata."""
    t = dt.datetime(2020, 1, 1)
    day = dt.timedelta(days=1)
    rows = []
    for sid in (1, 2, 3, 4):
        rows += [
            (sid, None, "SEX//F", None),
            (sid, t - 20000 * day, "MEDS_BIRTH", None),
            (sid, t + sid * day, "LAB//x", float(sid)),
            (sid, t + 2 * sid * day, "DX//y", None),
        ]
    codes = pl.DataFrame({"code": ["SEX//F", "MEDS_BIRTH", "LAB//x", "DX//y"], "description": ["sex", "birth", "x [mg]", "y"]})
    splits = pl.DataFrame({"subject_id": [1, 2, 3, 4], "split": ["train", "train", "tuning", "held_out"]})
    root = tmp_path / "meds"
    write_dataset(root, events_frame(rows), codes=codes, splits=splits, n_shards=2)
    return root


def write_notebook(path, params_source: str, cells: list[str]):
    """A notebook with a ``parameters``-tagged cell, as Jupyter would save it."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(
        cells=[new_code_cell(params_source, metadata={"tags": ["parameters"]})] + [new_code_cell(c) for c in cells],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(nb, str(path))
    return path


def pipeline_project(tmp_path, monkeypatch, notebooks: dict, name: str, pipeline_yaml: str):
    """A project home (own MLflow store) with notebooks under nb/ and pipelines/<name>.yaml.

    ``notebooks`` maps a file name to (parameters source, cells); returns the YAML path.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "nb").mkdir()
    for file, (params, cells) in notebooks.items():
        write_notebook(tmp_path / "nb" / file, params, cells)
    (tmp_path / "pipelines").mkdir()
    path = tmp_path / "pipelines" / f"{name}.yaml"
    path.write_text(pipeline_yaml)
    return path


def wait_for(condition, timeout: float, what: str, every: float = 0.2):
    """Poll ``condition`` until it returns something truthy (returned), or fail naming ``what``."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def one_torch_thread():
    """Tiny tensors run fastest (and least disturbed by other processes) on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
