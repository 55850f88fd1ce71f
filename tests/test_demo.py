"""The main job as a user meets it: `workbench demo` runs the pbc_mortality pipeline on the bundled data
in a real kernel with a real MLflow store, and then

* every executed notebook (and its HTML) shows its plots, with nothing on stderr;
* the champion loads with plain ``mlflow.pyfunc.load_model`` in a fresh Python process that set
  nothing up, scores raw MEDS events, and agrees with ``workbench predict``;
* ``mlflow models serve`` answers a REST request with the same risks, on 127.0.0.1;
* each notebook also runs on its own with plain Papermill (no parameters), from another folder,
  logging to the project's store;
* headless Chromium renders the executed notebooks (the README's screenshots come from here).

One demo run (module fixture) feeds every test; everything is read back through files and MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from ui_servers import free_port, listening_addresses, screenshot, stop_process_group

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = ROOT / "test-artifacts"
PBC_EVENTS = ROOT / "workbench" / "data" / "datasets" / "pbc" / "data"
MODEL = "models:/pbc_mortality@champion"


def clean_env(home: Path) -> dict[str, str]:
    """The environment of a user's shell: the project home, and nothing the tests set for themselves."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "KERAS_BACKEND")}
    return {**env, "WORKBENCH_HOME": str(home), "PATH": f"{BIN}:{env.get('PATH', '')}"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    proc = subprocess.run(
        [str(BIN / "workbench"), "demo", "-p", "epochs=6", "-p", "n_explain=60"],
        capture_output=True, text=True, env=clean_env(home), timeout=1500, cwd=home,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = next((home / "runs" / "pbc_mortality").glob("2*"))
    return home, run_dir, proc.stdout


def client(home: Path) -> MlflowClient:
    uri = f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the registry another test pointed mlflow at


def test_demo_runs_the_whole_pipeline(demo):
    home, run_dir, stdout = demo
    mlflow = client(home)
    exp = mlflow.get_experiment_by_name("pbc_mortality")
    runs = mlflow.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert all(r.info.status == "FINISHED" for r in children)
    models = {r.data.tags.get("workbench.model"): r for r in children if "workbench.model" in r.data.tags}
    assert {"lstm", "gru", "rnn", "logistic", "mayo"} <= set(models)
    for kind, run in models.items():
        assert 0.5 < run.data.metrics["held_out_auroc"] <= 1.0, kind
        assert run.data.metrics["held_out_auroc_ci_low"] <= run.data.metrics["held_out_auroc"]
        assert 0.5 < run.data.metrics["tuning_auroc"] <= 1.0, kind
        notebook = {a.path for a in mlflow.list_artifacts(run.info.run_id, "notebook")}
        assert any(p.endswith(".ipynb") for p in notebook) and any(p.endswith(".html") for p in notebook), kind
        # The terminal summary: every model with its held-out AUROC and CI, and its full run id.
        m = run.data.metrics
        shown = f"{m['held_out_auroc']:.3f} ({m['held_out_auroc_ci_low']:.3f}-{m['held_out_auroc_ci_high']:.3f})"
        assert any(run.info.run_id in li and kind in li and shown in li for li in stdout.splitlines()), (kind, shown)
    assert "…" not in stdout, "the terminal summary cut an id or a path"
    assert str(run_dir) in stdout
    explained = [r for r in models.values() if "explain_additivity_mean_rel_error" in r.data.metrics]
    assert len(explained) == 1 and explained[0].data.tags["workbench.model"] in ("lstm", "gru", "rnn")
    assert explained[0].data.tags["workbench.explain.verdict"] in ("PASS", "WARN")
    artifacts = {a.path for a in mlflow.list_artifacts(explained[0].info.run_id, "explanations")}
    assert "explanations/explanations.parquet" in artifacts
    champion = mlflow.get_model_version_by_alias("pbc_mortality", "champion")
    assert champion.run_id in {r.info.run_id for r in models.values()}
    assert f"models:/pbc_mortality@champion = version {champion.version}" in stdout
    # The registry tells versions apart: task, kind, architecture, data, metrics, a description.
    for key in ("task", "model_kind", "architecture", "data_fingerprint", "tuning_auroc", "held_out_auroc", "run_id"):
        assert champion.tags.get(key), (key, champion.tags)
    assert champion.tags["run_id"] == champion.run_id
    assert "held-out" in champion.description and champion.tags["architecture"] in champion.description
    steps = {r.data.tags.get("workbench.step") for r in children}
    assert {"cohort", "train", "explain", "compare"} <= steps
    # Every kind is registered; the champion has the best tuning AUROC (held-out is never used to choose).
    versions = mlflow.search_model_versions("name='pbc_mortality'")
    assert {v.tags["model_kind"] for v in versions} == {"lstm", "gru", "rnn", "logistic", "gbt", "mayo"}
    assert float(champion.tags["tuning_auroc"]) == max(float(v.tags["tuning_auroc"]) for v in versions)
    assert "Best sequence model by tuning AUROC" in stdout and "paired bootstrap" in stdout
    # The champion's model report, linked from its version.
    assert champion.tags["report"] == f"runs:/{champion.run_id}/report/model_report.html"
    report = Path(mlflow.download_artifacts(champion.run_id, "report/model_report.html", str(home))).read_text()
    for heading in ("Title and intended use", "Outcome (item 7)", "Performance (item 23)", "Decision curve",
                    "Comparison with the references", "Limitations and interpretation"):
        assert heading in report, heading
    assert report.count("<img") == 3 and "calibration slope" in report


def notebook_images(path: Path) -> tuple[int, list[str]]:
    """(image outputs, problems) of an executed notebook: figure cells without an image, stderr, errors."""
    nb = json.loads(path.read_text())
    images, problems = 0, []
    for index, cell in enumerate(nb["cells"]):
        outputs = cell.get("outputs", [])
        shown = sum("image/png" in o.get("data", {}) for o in outputs)
        images += shown
        if "figure" in cell.get("metadata", {}).get("tags", []) and not shown:
            problems.append(f"cell {index} is meant to show a figure and shows none")
        for o in outputs:
            if o.get("name") == "stderr":
                problems.append(f"cell {index} wrote to stderr: {''.join(o['text'])[:300]}")
            if o["output_type"] == "error":
                problems.append(f"cell {index} raised {o['ename']}")
            if "<Figure size" in "".join(o.get("data", {}).get("text/plain", "")):
                problems.append(f"cell {index} prints a figure's repr")
    return images, problems


def test_executed_notebooks_show_every_figure_and_nothing_on_stderr(demo):
    _, run_dir, _ = demo
    notebooks = sorted(run_dir.glob("*.ipynb"))
    assert {p.stem for p in notebooks} >= {"cohort", "explain", "compare"} | {f"train-model={m}" for m in ("lstm", "gru", "rnn", "logistic", "mayo")}
    for path in notebooks:
        images, problems = notebook_images(path)
        assert not problems, f"{path.name}: {problems}"
        assert images >= 1, path.name
        html = path.with_suffix(".html").read_text()
        assert html.count("<img") == images, f"{path.name}: {images} images in the notebook, {html.count('<img')} in its HTML"
    assert notebook_images(run_dir / "compare.ipynb")[0] == 6  # forest plot, ROC, PR, calibration, decision curve, all metrics


def test_rendered_notebooks_in_a_browser(demo, tmp_path):
    """Headless Chromium renders the executed notebooks' HTML (these are the README's screenshots)."""
    _, run_dir, _ = demo
    for name, html in (("notebook_train_lstm", "train-model=lstm.html"), ("notebook_compare", "compare.html"),
                       ("notebook_explain", "explain.html")):
        png = screenshot((run_dir / html).as_uri(), ARTIFACTS / f"{name}.png", tmp_path / f"profile-{name}",
                         width=1100, height=4200)
        assert png.stat().st_size > 100_000, f"{png} looks empty"


def fresh_python(code: str, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    """A new interpreter that imports nothing of ours and sets nothing: only the store's address."""
    env = {k: v for k, v in clean_env(home).items() if k != "WORKBENCH_HOME"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


PYFUNC = f"""
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("{MODEL}")
events = pd.read_parquet(sys.argv[1] if len(sys.argv) > 1 else "{PBC_EVENTS}")
risks = model.predict(events)
import workbench
print(json.dumps({{"code": workbench.__file__, "columns": list(risks.columns),
                  "risks": risks.assign(prediction_time=risks.prediction_time.astype(str)).to_dict("records")}}))
"""


def test_champion_loads_with_plain_mlflow_and_scores_raw_events_like_workbench_predict(demo, tmp_path):
    home, _, _ = demo
    proc = fresh_python(PYFUNC, home, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["columns"] == ["subject_id", "prediction_time", "risk"]
    assert "/artifacts/code/workbench/" in out["code"], "the model should carry the workbench code it needs"
    pyfunc = pl.DataFrame(out["risks"]).with_columns(pl.col("prediction_time").str.to_datetime())

    predicted = tmp_path / "predictions.parquet"
    cli = subprocess.run([str(BIN / "workbench"), "predict", "--model", MODEL, "--data", str(PBC_EVENTS.parent),
                          "--out", str(predicted)], capture_output=True, text=True, env=clean_env(home), timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    cli_risks = pl.read_parquet(predicted)
    # every visit the task predicts at, before death / end of follow-up (not each subject's last event)
    assert pyfunc.height == cli_risks.height > 1000 and cli_risks["subject_id"].n_unique() == 312
    assert pyfunc["subject_id"].to_list() == cli_risks["subject_id"].to_list()
    np.testing.assert_allclose(pyfunc["risk"].to_numpy(), cli_risks["risk"].to_numpy(), rtol=1e-6)
    assert ((cli_risks["risk"] > 0) & (cli_risks["risk"] < 1)).all()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_mlflow_models_serve_answers_with_the_same_risks(demo, tmp_path):
    home, _, _ = demo
    events = pl.read_parquet(PBC_EVENTS).filter(pl.col("subject_id") <= 5)
    request = {"dataframe_split": json.loads(events.to_pandas().to_json(orient="split", date_format="iso", index=False))}
    port = free_port()
    env = {**clean_env(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"}
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", MODEL, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
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
        bad = {"dataframe_split": {"columns": ["subject_id", "code"], "data": [[1, None]]}}
        status, error = post(f"http://127.0.0.1:{port}/invocations", bad)
        assert status == 400 and "'code' is null" in error["message"], error
    finally:
        stop_process_group(server)
    events.write_parquet(tmp_path / "five.parquet")
    local = fresh_python(PYFUNC, home, tmp_path)
    expected = pl.DataFrame(json.loads(local.stdout.strip().splitlines()[-1])["risks"]).filter(pl.col("subject_id") <= 5)
    assert served["subject_id"].to_list() == expected["subject_id"].to_list()
    assert sorted(set(served["subject_id"].to_list())) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(served["risk"].to_numpy(), expected["risk"].to_numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["01_cohort", "02_train", "03_explain", "04_compare"])
def test_each_notebook_runs_on_its_own_with_plain_papermill(demo, tmp_path, name):
    """`papermill notebooks/0N_*.ipynb out.ipynb` with no parameters, started elsewhere, logs to the project's store."""
    home, _, _ = demo
    mlflow = client(home)
    exp = mlflow.get_experiment_by_name("pbc_mortality")
    before = {r.info.run_id for r in mlflow.search_runs([exp.experiment_id], max_results=500)}
    out = tmp_path / f"{name}.ipynb"
    proc = subprocess.run([str(BIN / "papermill"), str(ROOT / "notebooks" / f"{name}.ipynb"), str(out)],
                          capture_output=True, text=True, env=clean_env(home), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images, problems = notebook_images(out)
    assert not problems and images >= 1, problems
    assert not (tmp_path / "mlruns").exists(), "logged to a new store where papermill was started"
    text = out.read_text()
    assert str(home / "mlruns" / "mlflow.db") in text, "the notebook says where it logs"
    if name == "02_train":
        new = [r for r in mlflow.search_runs([exp.experiment_id], max_results=500) if r.info.run_id not in before]
        assert [r.data.tags["workbench.model"] for r in new] == ["lstm"] and "held_out_auroc" in new[0].data.metrics
    if name == "03_explain":
        from workbench import tracking

        best = tracking.best_version(mlflow, "pbc_mortality", kinds=("lstm", "gru", "rnn"))
        assert best.run_id in text and mlflow.get_run(best.run_id).data.tags["workbench.explain.verdict"]
