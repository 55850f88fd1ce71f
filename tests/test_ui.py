"""``workbench ui`` / ``workbench lab`` command lines, and the MLflow UI in headless Chromium.

The browser test (slow, ~40 s) logs three real runs to a temp MLflow store, starts
``workbench ui`` on a free port, renders the experiment's comparison view in Debian's
Chromium and reads the runs table from the DOM; the screenshot lands in test-artifacts/.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
from bs4 import BeautifulSoup
from typer.testing import CliRunner

from ui_servers import CHROMIUM_FLAGS, chromium, free_port, listening_addresses, workbench_server
from workbench import ui
from workbench.cli import app
from workbench.errors import WorkbenchError

# The held-out AUROC as workbench.experiment logs it (prefix "held_out_"); change both together.
AUROC_METRIC = "held_out_auroc"
RUNS = {"lstm": 0.83, "gru": 0.79, "rnn": 0.71}
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


# --- host refusal and command lines (fast) ---


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts_are_allowed(host):
    assert ui.check_host(host) is False


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "example.org"])
def test_non_loopback_host_is_refused_without_public(host):
    with pytest.raises(WorkbenchError, match="--public"):
        ui.check_host(host)
    assert ui.check_host(host, public=True) is True


@pytest.mark.parametrize("command", ["ui", "lab"])
def test_cli_refuses_a_public_host_and_starts_nothing(command, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    (tmp_path / "notebooks").mkdir()
    result = CliRunner().invoke(app, [command, "--host", "0.0.0.0", "--port", str(free_port())])
    assert result.exit_code == 2, result.output
    assert "refusing to bind" in result.output and "--public" in result.output


def test_mlflow_ui_command_serves_the_workbench_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    command = ui.mlflow_ui_command(port=5123)
    argv = command.argv
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    artifacts = (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()
    assert argv[argv.index("--default-artifact-root") + 1] == artifacts
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5123"
    assert command.url == "http://127.0.0.1:5123/#/experiments"


def test_mlflow_ui_refuses_a_remote_tracking_server(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org:5000")
    with pytest.raises(WorkbenchError, match="open its UI there"):
        ui.mlflow_ui_command()


def test_lab_command_keeps_a_random_token_out_of_argv(tmp_path):
    first, second = (ui.lab_command(root_dir=tmp_path, port=8899) for _ in range(2))
    token = first.env["JUPYTER_TOKEN"]
    assert len(token) >= 32 and token != second.env["JUPYTER_TOKEN"]
    assert not any(token in arg for arg in first.argv)
    assert "--ServerApp.ip=127.0.0.1" in first.argv and f"--ServerApp.root_dir={tmp_path.resolve()}" in first.argv
    assert first.url == f"http://127.0.0.1:8899/lab?token={token}"
    given = ui.lab_command(root_dir=tmp_path, token="a&b")
    assert given.env["JUPYTER_TOKEN"] == "a&b" and given.url.endswith("/lab?token=a%26b")
    with pytest.raises(WorkbenchError, match="empty"):
        ui.lab_command(root_dir=tmp_path, token=" ")


def test_lab_needs_a_notebooks_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    with pytest.raises(WorkbenchError, match="no notebooks folder"):
        ui.lab_command()


# --- the MLflow UI in a real browser (slow) ---


@pytest.fixture
def store_with_three_runs(tmp_path, monkeypatch):
    """A WORKBENCH_HOME whose SQLite store has pbc_mortality with runs lstm, gru and rnn."""
    import mlflow

    from workbench import tracking

    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.setup()
    experiment = tracking.experiment_id("pbc_mortality")
    run_ids = {}
    for name, auroc in RUNS.items():
        with mlflow.start_run(experiment_id=experiment, run_name=name) as run:
            mlflow.log_params({"model.kind": name})
            mlflow.log_metrics({AUROC_METRIC: auroc, f"{AUROC_METRIC}_ci_low": auroc - 0.05, "held_out_auprc": 0.5})
        run_ids[run.info.run_id] = name
    return home, experiment, run_ids


def render(url: str, screenshot: Path, profile: Path) -> str:
    """Load ``url`` in headless Chromium, save a screenshot, return the DOM after scripts ran.

    ``--virtual-time-budget`` lets the React app run for 30 s of page time, pausing the clock
    while requests to the server are pending, so the runs table is there when the DOM is dumped.
    """
    argv = [
        chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1920,1000", "--virtual-time-budget=30000",
        f"--screenshot={screenshot}", "--dump-dom", url,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, check=True).stdout


def runs_table(dom: str) -> dict[str, dict[str, str]]:
    """The AG Grid runs table as ``{run_id: {column id: cell text}}`` (run names: the link text)."""
    table: dict[str, dict[str, str]] = {}
    for row in BeautifulSoup(dom, "html.parser").select('[role="row"][row-id]'):
        cells = table.setdefault(row["row-id"], {})  # pinned and scrolled halves share a row-id
        for cell in row.select('[role="gridcell"][col-id]'):
            link = cell.find("a")
            cells[cell["col-id"]] = (link or cell).get_text(" ", strip=True)
    return table


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_mlflow_ui_shows_the_three_runs_with_their_auroc(store_with_three_runs, tmp_path):
    home, experiment, run_ids = store_with_three_runs
    port = free_port()
    env = {**os.environ, "WORKBENCH_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "mlflow_ui.png"
    screenshot.unlink(missing_ok=True)
    auroc_column = f"metrics.`{AUROC_METRIC}`"
    with workbench_server(
        ["ui", "--port", str(port)], env, tmp_path / "ui.log", lambda: answers(f"http://127.0.0.1:{port}/health")
    ):
        assert listening_addresses(port) == {"127.0.0.1"}
        # The command prints the link to the comparison view; open exactly that.
        url = f"http://127.0.0.1:{port}{ui.comparison_view_path(experiment)}"
        assert url in (tmp_path / "ui.log").read_text()
        for attempt in range(3):  # a loaded CI machine may need a second render
            dom = render(url, screenshot, tmp_path / f"chromium-profile-{attempt}")
            table = runs_table(dom)
            if set(table) >= set(run_ids) and all(auroc_column in table[r] for r in run_ids):
                break
    (ARTIFACTS / "mlflow_ui.html").write_text(dom)

    missing = {name for run_id, name in run_ids.items() if run_id not in table}
    assert not missing, f"runs missing from the MLflow UI table: {sorted(missing)}; table: {table}"
    for run_id, name in run_ids.items():
        row = table[run_id]
        assert row.get("attributes.`Run Name`") == name, row
        assert auroc_column in row, f"no {AUROC_METRIC} column for run {name}: {row}"
        assert float(row[auroc_column]) == pytest.approx(RUNS[name]), row
    header = BeautifulSoup(dom, "html.parser").select_one(f'[role="columnheader"][col-id="{auroc_column}"]')
    assert header is not None and AUROC_METRIC in header.get_text(), "the AUROC column has no header"
    assert screenshot.stat().st_size > 10_000, "the screenshot is empty"
