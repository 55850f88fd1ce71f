"""Shared tracking: a real PostgreSQL server behind a real `workbench server` (MLflow, basic auth).

PostgreSQL comes from Debian's package (``apt-get install -y postgresql``); the fixture makes a
throwaway cluster in a temp dir, listening on 127.0.0.1 only, and stops it with ``pg_ctl``.
As root the cluster runs as the ``postgres`` system user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import write_notebook
from test_pipelines import PIPELINE, PREP_CELLS, PREP_PARAMS, REPORT_FIXED, REPORT_PARAMS, REPORT_PLOT
from workbench.cli import app

ADMIN, ADMIN_PASSWORD = "admin", "wb-admin-Secret-1"
DB_USER, DB_PASSWORD = "mlflow", "wb-db-Secret-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir() -> Path:
    """Debian's /usr/lib/postgresql/<version>/bin (newest), or wherever initdb is on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None:
        message = "PostgreSQL is not installed: apt-get install -y postgresql"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: its absence there is a broken CI script
        pytest.skip(message)
    return Path(initdb).parent


def run_as_postgres(argv: list, **kwargs) -> subprocess.CompletedProcess:
    """Run a PostgreSQL binary as the ``postgres`` user when we are root (it refuses root)."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + [str(a) for a in argv], check=True, capture_output=True, text=True, **kwargs)


@pytest.fixture
def postgres(request):
    """A fresh PostgreSQL cluster on 127.0.0.1 with an ``mlflow`` role and database; yields its URI."""
    import psycopg2

    bindir = postgres_bindir()
    # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="wb-pg-"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    superuser_password = "wb-super-Secret-1"
    (root / "pwfile").write_text(superuser_password + "\n")
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (root, root / "pwfile"):
            os.chown(path, user.pw_uid, user.pw_gid)
    data, port = root / "data", free_port()
    run_as_postgres([
        bindir / "initdb", "-D", data, "-U", "postgres", "--pwfile", root / "pwfile", "-E", "UTF8",
        "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
    ])
    # Socket in the temp dir (not /run/postgresql), TCP on loopback only, no fsync: a test cluster.
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off"
    run_as_postgres([bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-o", options, "-w", "-t", "60", "start"])
    request.addfinalizer(
        lambda: run_as_postgres([bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"])
    )
    admin = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=superuser_password, dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE {DB_USER} LOGIN PASSWORD %s", (DB_PASSWORD,))
        cur.execute(f"CREATE DATABASE mlflow OWNER {DB_USER}")
    admin.close()
    return f"postgresql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{port}/mlflow"


def wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until the server answers HTTP at all (401 counts: it is up and guarding)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"workbench server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            requests.get(f"{url}/health", timeout=2)
            return
        except requests.RequestException:  # not listening yet, or busy importing its app
            time.sleep(0.5)
    raise AssertionError(f"workbench server not up after {timeout}s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def tracking_server(postgres, tmp_path, request):
    """``workbench server`` (the real CLI, one worker) on a free loopback port; yields (url, artifacts dir)."""
    port, artifacts, log = free_port(), tmp_path / "artifacts", tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [
        Path(sys.executable).parent / "workbench", "server", "--backend-store-uri", postgres,
        "--artifacts-destination", artifacts, "--port", str(port), "--workers", "1", "--state-dir", tmp_path / "state",
    ]
    with log.open("w") as out:
        # Own session: the server execs into mlflow, which forks uvicorn; one killpg ends them all.
        proc = subprocess.Popen([str(a) for a in argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp_path)

    def stop():
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)  # the whole group: uvicorn workers may outlive the leader
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass  # a test server need not drain: kill what is left

    request.addfinalizer(stop)
    url = f"http://127.0.0.1:{port}"
    wait_for_server(url, proc, log)
    return url, artifacts


@pytest.mark.slow
def test_pipeline_logs_to_postgres_backed_server_with_basic_auth(tracking_server, postgres, tmp_path, monkeypatch):
    url, artifacts = tracking_server
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
    # 1. No credentials, or wrong ones: refused.
    assert requests.get(search, timeout=10).status_code == 401
    assert requests.get(search, auth=(ADMIN, "wrong"), timeout=10).status_code == 401
    assert requests.get(search, auth=(ADMIN, ADMIN_PASSWORD), timeout=10).status_code == 200

    # 2. A pipeline run through the CLI logs there: MLFLOW_TRACKING_URI and the client's credentials only.
    home = tmp_path / "project"
    (home / "nb").mkdir(parents=True)
    write_notebook(home / "nb" / "prep.ipynb", PREP_PARAMS, PREP_CELLS)
    write_notebook(home / "nb" / "report.ipynb", REPORT_PARAMS, [REPORT_PLOT, REPORT_FIXED])
    (home / "demo.yaml").write_text(PIPELINE)
    monkeypatch.chdir(home)
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    out = CliRunner().invoke(app, ["run", str(home / "demo.yaml"), "-p", "model=ab"])
    assert out.exit_code == 0, out.output
    assert not (home / "mlruns").exists(), "nothing went to the local store"

    # 3. Runs read back through the server.
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("demo-exp")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = next(r for name, r in runs.items() if name.startswith("demo "))
    assert parent.info.status == "FINISHED"
    children = {n: r for n, r in runs.items() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {n: r.info.status for n, r in children.items()} == {"prep-model=ab": "FINISHED", "report": "FINISHED"}
    assert children["prep-model=ab"].data.metrics["score"] == 2.0, "the kernel logged with the client's credentials"
    report_id = children["report"].info.run_id
    assert children["report"].info.artifact_uri.startswith("mlflow-artifacts:/"), "artifacts go through the server"
    assert {a.path for a in client.list_artifacts(report_id, "notebook")} == {"notebook/report.ipynb", "notebook/report.html"}
    html = Path(client.download_artifacts(report_id, "notebook/report.html", str(tmp_path))).read_text()
    assert "data:image/png;base64" in html
    assert len(list(artifacts.rglob("report.html"))) == 1, "the server stored the upload in --artifacts-destination"

    # 4. The rows are in PostgreSQL (runs) next to MLflow's auth tables (users).
    import psycopg2

    with psycopg2.connect(postgres) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (report_id,))
        assert cur.fetchone() == ("FINISHED",)
        cur.execute("SELECT username, is_admin FROM users")
        assert cur.fetchall() == [(ADMIN, True)]
    conn.close()


def test_server_refuses_bad_settings_before_starting(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()

    def refused(uri: str, *extra: str) -> str:
        out = runner.invoke(app, ["server", "--backend-store-uri", uri, "--state-dir", str(tmp_path), *extra])
        assert out.exit_code == 2, out.output
        return out.output

    assert "expected postgresql://" in refused("sqlite:///x.db", "--print")
    assert "no admin password" in refused("postgresql://u@127.0.0.1:9/db", "--print")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "x")
    assert "refusing to bind" in refused("postgresql://u@127.0.0.1:9/db", "--print", "--host", "0.0.0.0")
    # A closed port: one clear line instead of a server crash loop, and no password in it.
    output = refused(f"postgresql://u:pw-Secret@127.0.0.1:{free_port()}/db")
    assert "cannot connect to the backend store postgresql+psycopg2://u@127.0.0.1" in output
    assert "pw-Secret" not in output


def test_print_shows_flags_and_keeps_secrets_out_of_argv_and_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "alice-Secret")
    from workbench.server import tracking_server_command

    command = tracking_server_command(
        "postgresql://mlflow:db-Secret@db.internal:5432/mlflow", str(tmp_path / "art"), state=tmp_path / "st", check=False
    )
    argv = " ".join(command.argv)
    assert "--backend-store-uri postgresql+psycopg2://mlflow@db.internal:5432/mlflow" in argv
    for flag in ("--serve-artifacts", f"--artifacts-destination {tmp_path / 'art'}", "--app-name basic-auth", "--host 127.0.0.1"):
        assert flag in argv
    ini = (tmp_path / "st" / "basic_auth.ini").read_text()
    assert "database_uri = postgresql+psycopg2://mlflow@db.internal:5432/mlflow" in ini and "admin_username = alice" in ini
    assert command.env["PGPASSWORD"] == "db-Secret" and command.env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "alice-Secret"
    assert "Secret" not in argv + ini, "passwords travel in the environment only"
    key = tmp_path / "st" / "secret_key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    again = tracking_server_command("postgresql://mlflow@db.internal/mlflow", state=tmp_path / "st", check=False)
    assert again.env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == command.env["MLFLOW_FLASK_SERVER_SECRET_KEY"], "kept across restarts"
