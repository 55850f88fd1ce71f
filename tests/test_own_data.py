"""Your own data in one command, as a new user meets it: a MEDS dataset (the synthetic generator's),
a label file made outside any task spec with plain polars, the generic `risk_model` pipeline by
name from a clean home directory with nothing copied, then `workbench explain --run` on the best run."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def labels_made_elsewhere(data: Path, out: Path) -> Path:
    """Death within a year of the first anniversary of enrollment, by hand (as SQL or ACES would)."""
    events = pl.read_parquet(data / "data" / "*.parquet")
    first_visit = events.filter(pl.col("code") == "VISIT").group_by("subject_id").agg(pl.col("time").min().alias("enrolled"))
    death = events.filter(pl.col("code") == "MEDS_DEATH").group_by("subject_id").agg(pl.col("time").min().alias("death"))
    end = events.filter(pl.col("code") == "END_OF_FOLLOWUP").group_by("subject_id").agg(pl.col("time").max().alias("end"))
    year = dt.timedelta(days=365)
    labels = (
        first_visit.join(death, on="subject_id", how="left").join(end, on="subject_id", how="left")
        .with_columns((pl.col("enrolled") + year).alias("prediction_time"))
        .with_columns(pl.col("death").is_not_null() & (pl.col("death") <= pl.col("prediction_time") + year))
        .rename({"death": "boolean_value"})
        .filter(pl.col("boolean_value") | (pl.col("end") >= pl.col("prediction_time") + year))  # followed up a year
        .select("subject_id", "prediction_time", "boolean_value")
        .sort("subject_id")
    )
    labels.write_parquet(out)
    return out


def test_generic_pipeline_on_own_data_and_labels_then_explain(tmp_path):
    home, user = tmp_path / "home", tmp_path / "user"
    home.mkdir()
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "KERAS_BACKEND")}
    env |= {"WORKBENCH_HOME": str(home), "HOME": str(user), "PATH": f"{BIN}:{env.get('PATH', '')}"}

    def workbench(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "workbench"), *args], capture_output=True, text=True, env=env, cwd=user,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    workbench("synth", "--subjects", "600", "--seed", "5", "--out", "meds", "--no-progress")
    labels_made_elsewhere(user / "meds", user / "death_1y.parquet")
    run = workbench("run", "risk_model", "-p", "data=meds", "-p", "task=death_1y.parquet", "-p", "epochs=30", "-p", "batch_size=32",
                    "-p", "features={bin_width: 30d, n_steps: 14}", "-p", "n_explain=60")
    assert not list(home.glob("notebooks")) and not list(home.glob("pipelines")), "nothing is copied into the home"
    assert "mayo: not fitted (the Mayo PBC score needs the features" in run.stdout

    uri = f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("death_1y")  # named after the label file
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_model = {r.data.tags.get("workbench.model"): r for r in runs if "workbench.model" in r.data.tags}
    assert set(by_model) == {"lstm", "gru", "rnn", "logistic", "gbt", "mayo"}
    assert "workbench.skipped" in by_model["mayo"].data.tags and "held_out_auroc" not in by_model["mayo"].data.metrics
    assert "held_out_auroc" in by_model["logistic"].data.metrics
    for kind in ("lstm", "gru"):
        assert by_model[kind].data.metrics["held_out_auroc"] > 0.7, kind  # the planted event is learnable
    from workbench.tracking import best_version

    assert client.get_model_version_by_alias("death_1y", "champion").tags["model_kind"] in by_model
    best = best_version(client, "death_1y", kinds=("lstm", "gru"))  # the sequence model a user explains
    explained = workbench("explain", "--run", best.run_id, "--max-samples", "40")
    assert "40 samples explained" in explained.stdout and ("PASS" in explained.stdout or "WARN" in explained.stdout)
    tags = client.get_run(best.run_id).data.tags
    assert tags["workbench.explain.verdict"] in ("PASS", "WARN")
