"""The pbc_survival pipeline as a user meets it: `workbench run pipelines/pbc_survival.yaml` on the
bundled PBC data, in real kernels with a real MLflow store, and then

* the survival runs sit in MLflow beside the binary one, with td-AUC, concordance and
  integrated Brier score (each with its CI), calibration at 1, 2 and 5 years logged;
* every executed notebook shows its plots (nothing on stderr, no figure reprs);
* the survival champion loads with plain ``mlflow.pyfunc.load_model`` in a fresh process and
  returns one risk column per horizon (and the horizons asked for), as ``mlflow models serve`` does.

One pipeline run (module fixture, few epochs and bootstrap draws) feeds every test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_demo import ARTIFACTS, BIN, PBC_EVENTS, ROOT, clean_env, client, fresh_python, notebook_images, post
from ui_servers import free_port, listening_addresses, screenshot, stop_process_group

pytestmark = pytest.mark.slow

MODEL = "models:/pbc_survival@champion"
HORIZON_COLUMNS = ["risk_365d", "risk_730d", "risk_1096d", "risk_1461d", "risk_1826d"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    proc = subprocess.run(
        [str(BIN / "workbench"), "run", str(ROOT / "pipelines" / "pbc_survival.yaml"),
         "-p", "epochs=4", "-p", "n_explain=40", "-p", "n_bootstrap=20"],
        capture_output=True, text=True, env=clean_env(home), timeout=1500, cwd=home,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    run_dir = next((home / "runs" / "pbc_survival").glob("2*"))
    return home, run_dir, proc.stdout


def test_survival_runs_are_logged_beside_the_binary_one(pipeline):
    home, _, _ = pipeline
    mlflow = client(home)
    exp = mlflow.get_experiment_by_name("pbc_survival")
    runs = mlflow.search_runs([exp.experiment_id], max_results=200)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    models = {r.data.tags["workbench.model"]: r for r in runs if r.data.tags.get("workbench.task") == "pbc_survival"
              and "workbench.model" in r.data.tags}
    assert set(models) == {"lstm", "gru", "cox", "mayo"}
    for kind, run in models.items():
        m = run.data.metrics
        for name in ("td_auc_730d", "uno_c", "harrell_c", "ibs"):
            assert m[f"held_out_{name}_ci_low"] <= m[f"held_out_{name}"] <= m[f"held_out_{name}_ci_high"], (kind, name)
        assert 0.6 < m["held_out_uno_c"] <= 1.0 and 0.6 < m["held_out_td_auc_730d"] <= 1.0, kind
        assert 0.0 < m["held_out_ibs"] < 0.25, kind  # a coin flip's Brier score is 0.25
        assert run.data.tags["workbench.task_kind"] == "survival"
        plots = {a.path for a in mlflow.list_artifacts(run.info.run_id, "plots")}
        assert "plots/calibration_horizons.png" in plots, kind
        calibration = pl.read_csv(mlflow.download_artifacts(run.info.run_id, "evaluation/calibration_horizons.csv",
                                                            str(home)))
        assert {365.25, 730.5, 1826.25} <= set(calibration["horizon_days"].to_list())
    # The binary 2-year LSTM of the same pipeline, registered under its own task.
    binary = [r for r in runs if r.data.tags.get("workbench.task") == "pbc_mortality"]
    assert len(binary) == 1 and "held_out_auroc" in binary[0].data.metrics
    versions = mlflow.search_model_versions("name='pbc_survival'")
    assert {v.tags["model_kind"] for v in versions} == {"lstm", "gru", "cox", "mayo"}
    champion = mlflow.get_model_version_by_alias("pbc_survival", "champion")
    assert float(champion.tags["tuning_auroc"]) == max(float(v.tags["tuning_auroc"]) for v in versions)
    # The comparison with the binary model on the same held-out visits is logged by the compare step.
    compare = next(r for r in runs if r.data.tags.get("workbench.step") == "compare")
    same = compare.data.metrics
    assert same["binary_lstm_td_auc_2y_same_visits_ci_low"] <= same["binary_lstm_td_auc_2y_same_visits"]
    assert "survival_lstm_td_auc_2y_same_visits" in same
    explained = [r for r in models.values() if "explain_additivity_mean_rel_error" in r.data.metrics]
    assert len(explained) == 1 and "by 730.5 days" in explained[0].data.tags["workbench.explain.output"]


def test_executed_notebooks_show_their_figures(pipeline):
    _, run_dir, _ = pipeline
    notebooks = {p.stem: p for p in run_dir.glob("*.ipynb")}
    assert {"cohort", "explain", "compare", "binary"} | {f"train-model={m}" for m in ("lstm", "gru", "cox", "mayo")} <= set(notebooks)
    for name, path in notebooks.items():
        images, problems = notebook_images(path)
        assert not problems, f"{name}: {problems}"
        assert images >= 1, name
    # metrics, calibration at 1/2/5 y, observed vs predicted, binary vs survival, two patients' risk curves
    assert notebook_images(notebooks["compare"])[0] == 6
    for name, path in notebooks.items():
        html = path.with_suffix(".html").read_text()
        assert html.count("<img") == notebook_images(path)[0], f"{name}: its HTML does not show every figure"


def test_survival_notebooks_in_a_browser(pipeline, tmp_path):
    """Headless Chromium renders the executed compare and patient notebooks (the README's screenshots)."""
    _, run_dir, _ = pipeline
    for name, html in (("notebook_survival_compare", "compare.html"), ("notebook_survival_lstm", "train-model=lstm.html")):
        png = screenshot((run_dir / html).as_uri(), ARTIFACTS / f"{name}.png", tmp_path / f"profile-{name}",
                         width=1100, height=5200)
        assert png.stat().st_size > 100_000, f"{png} looks empty"


SURVIVAL_PYFUNC = f"""
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("{MODEL}")
events = pd.read_parquet("{PBC_EVENTS}")
events = events[events.subject_id <= 20]
default = model.predict(events)
asked = model.predict(events, params={{"horizons_days": [100.0, 500.0]}})
print(json.dumps({{"columns": list(default.columns), "asked": list(asked.columns), "n": len(default),
                  "risks": default.drop(columns="prediction_time").to_dict("records")}}))
"""


def test_survival_champion_loads_with_plain_mlflow_and_returns_a_risk_per_horizon(pipeline, tmp_path):
    home, _, _ = pipeline
    proc = fresh_python(SURVIVAL_PYFUNC, home, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["columns"] == ["subject_id", "prediction_time", *HORIZON_COLUMNS]
    assert out["asked"] == ["subject_id", "prediction_time", "risk_100d", "risk_500d"]
    risks = pl.DataFrame(out["risks"]).select(HORIZON_COLUMNS).to_numpy()
    assert out["n"] > 20 and np.all((risks > 0) & (risks < 1))
    assert np.all(np.diff(risks, axis=1) >= -1e-9), "a risk curve never decreases with the horizon"


def test_mlflow_models_serve_answers_with_a_risk_per_horizon(pipeline, tmp_path):
    home, _, _ = pipeline
    events = pl.read_parquet(PBC_EVENTS).filter(pl.col("subject_id") <= 3)
    request = {"dataframe_split": json.loads(events.to_pandas().to_json(orient="split", date_format="iso", index=False)),
               "params": {"horizons_days": [365.25, 1000.0]}}
    port = free_port()
    env = {**clean_env(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"}
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", MODEL, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 300 s"
            time.sleep(1)
        assert listening_addresses(port) == {"127.0.0.1"}
        status, answer = post(f"http://127.0.0.1:{port}/invocations", request)
        assert status == 200, answer
        served = pl.DataFrame(answer["predictions"])
        assert served.columns == ["subject_id", "prediction_time", "risk_365d", "risk_1000d"]
        assert sorted(set(served["subject_id"].to_list())) == [1, 2, 3]
        too_far = {**request, "params": {"horizons_days": [4000.0]}}
        status, error = post(f"http://127.0.0.1:{port}/invocations", too_far)
        assert status == 400 and "maximum horizon" in error["message"], error
    finally:
        stop_process_group(server)


@pytest.mark.parametrize("name", ["05_survival", "06_survival_compare"])
def test_survival_notebooks_run_on_their_own_with_plain_papermill(pipeline, tmp_path, name):
    """Outside a pipeline: 05 builds its own cohort, 06 compares the latest run of each survival model."""
    home, _, _ = pipeline
    out = tmp_path / f"{name}.ipynb"
    proc = subprocess.run([str(BIN / "papermill"), str(ROOT / "notebooks" / f"{name}.ipynb"), str(out)],
                          capture_output=True, text=True, env=clean_env(home), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images, problems = notebook_images(out)
    assert images >= 3 and not [p for p in problems if "figure" not in p], problems
    if name == "06_survival_compare":
        text = out.read_text()
        assert all(kind in text for kind in ("| gru |", "| lstm |", "| cox |", "| mayo |"))


def test_workbench_predict_returns_the_requested_horizons(pipeline, tmp_path):
    home, _, _ = pipeline
    out = tmp_path / "risk.parquet"
    base = [str(BIN / "workbench"), "predict", "--data", str(PBC_EVENTS.parent), "--out", str(out)]
    ok = subprocess.run([*base, "--model", MODEL, "--horizon-days", "365.25", "--horizon-days", "1000"],
                        capture_output=True, text=True, env=clean_env(home), timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    risks = pl.read_parquet(out)
    assert risks.columns == ["subject_id", "prediction_time", "risk_365d", "risk_1000d"]
    assert risks["subject_id"].n_unique() == 312 and (risks["risk_1000d"] >= risks["risk_365d"]).all()
    too_far = subprocess.run([*base, "--model", MODEL, "--horizon-days", "4000"], capture_output=True, text=True,
                             env=clean_env(home), timeout=600)
    binary = subprocess.run([*base, "--model", "models:/pbc_mortality@champion", "--horizon-days", "365"],
                            capture_output=True, text=True, env=clean_env(home), timeout=600)
    for proc, message in ((too_far, "maximum horizon"), (binary, "binary model with one horizon")):
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]
