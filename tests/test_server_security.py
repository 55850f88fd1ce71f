"""`workbench server` shares only what it is told to: a real server on a real PostgreSQL.

One server answers several users: a user reads nothing of another's experiments (experiment,
runs, artifacts, through the proxied artifact route too, ``./`` path spellings included) unless
granted; what the server writes is private to its account; SIGTERM stops every process it started.
The PostgreSQL cluster comes from ``test_postgres.postgres``.
"""

from __future__ import annotations

import base64
import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from test_postgres import ADMIN, ADMIN_PASSWORD, free_port, postgres, wait_for_server  # noqa: F401 (postgres: a fixture)

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
ALICE = ("alice", "alice-Secret-12")
BOB = ("bob", "bob-Secret-1234")


def start_server(postgres: str, tmp_path: Path, request, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    """The real ``workbench server`` CLI in its own session on a free loopback port: (process, url, artifacts)."""
    port, artifacts, log = free_port(), tmp_path / "artifacts", tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [
        Path(sys.executable).parent / "workbench", "server", "--backend-store-uri", postgres,
        "--artifacts-destination", artifacts, "--port", str(port), "--state-dir", tmp_path / "state", *extra,
    ]
    with log.open("w") as out:
        proc = subprocess.Popen([str(a) for a in argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp_path)

    def stop():
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    request.addfinalizer(stop)
    url = f"http://127.0.0.1:{port}"
    wait_for_server(url, proc, log)
    return proc, url, artifacts


def call(method: str, url: str, user: tuple[str, str], **kwargs) -> requests.Response:
    return requests.request(method, url, auth=user, timeout=30, **kwargs)


def raw_get(url: str, path: str, user: tuple[str, str]) -> int:
    """GET ``path`` byte for byte (requests would drop a ``./`` segment before sending); the status."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    token = base64.b64encode(":".join(user).encode()).decode()
    try:
        conn.request("GET", path, headers={"Authorization": f"Basic {token}"})
        return conn.getresponse().status
    finally:
        conn.close()


def ok(response: requests.Response) -> dict:
    assert response.status_code == 200, (response.status_code, response.text[:500])
    return response.json() if response.content else {}


def session_processes(sid: int) -> list[str]:
    """``pid name`` of every live (not zombie) process in session ``sid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")]
        fields = stat_line[stat_line.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            try:
                name = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120] or name
            except OSError:
                pass
            found.append(f"{entry.name} {name}")
    return found


def test_by_default_users_get_nothing_of_others_and_state_is_private(tmp_path):
    from workbench.server import claimed_users, dot_segments, tracking_server_command

    (tmp_path / "st").mkdir(mode=0o755)
    command = tracking_server_command("postgresql://mlflow@db.internal/mlflow", str(tmp_path / "art"),
                                      state=tmp_path / "st", env={"MLFLOW_TRACKING_PASSWORD": "x"}, check=False)
    ini = Path(command.env["MLFLOW_AUTH_CONFIG_PATH"])
    assert "default_permission = NO_PERMISSIONS" in ini.read_text()
    assert "authorization_function = workbench.server:authenticate_request" in ini.read_text()
    assert oct(ini.stat().st_mode & 0o777) == "0o600" and oct((tmp_path / "st").stat().st_mode & 0o777) == "0o700"
    assert not (tmp_path / "art").exists(), "--print creates nothing but the state"
    assert claimed_users({"user_id": "a", "tags": [{"key": "mlflow.user", "value": "b"}, {"key": "x", "value": "c"}]}) == {"a", "b"}
    assert claimed_users({"run_id": "r", "key": "mlflow.user", "value": "d"}) == {"d"}
    assert claimed_users(None) == set() and claimed_users({"experiment_id": "1"}) == set()
    assert dot_segments("artifacts/./1/r") and dot_segments("%252E%252E/1") and not dot_segments("artifacts/1/r/a.b")


@pytest.mark.slow
def test_users_reach_only_what_they_own_or_are_granted_and_sigterm_stops_it_all(postgres, tmp_path, request):
    # One server for every check (default --workers 2, as a team runs it), stopped by SIGTERM at the end.
    proc, url, artifacts = start_server(postgres, tmp_path, request)
    admin = (ADMIN, ADMIN_PASSWORD)
    for username, password in (ALICE, BOB):  # users come from the auth REST API, as the admin
        ok(call("POST", f"{url}{API}/users/create", admin, json={"username": username, "password": password}))

    # Alice: two experiments, a run in each, an artifact uploaded through the proxy.
    shared = {}
    for name in ("alice-private", "alice-shared"):
        exp = ok(call("POST", f"{url}{API}/experiments/create", ALICE, json={"name": name}))["experiment_id"]
        run = ok(call("POST", f"{url}{API}/runs/create", ALICE, json={"experiment_id": exp}))["run"]["info"]
        ok(call("PUT", f"{url}{ARTIFACTS}/{exp}/{run['run_id']}/artifacts/notes/secret.txt", ALICE, data=b"phi"))
        shared[name] = (exp, run["run_id"])
    exp, run_id = shared["alice-private"]
    artifact = f"{exp}/{run_id}/artifacts/notes/secret.txt"
    assert call("GET", f"{url}{ARTIFACTS}/{artifact}", ALICE).content == b"phi"
    assert raw_get(url, f"{ARTIFACTS}/{artifact}", ALICE) == 200

    # Bob, by default: nothing of Alice's, whichever way he spells it.
    def bob_refused(exp: str, run_id: str) -> None:
        artifact = f"{exp}/{run_id}/artifacts/notes/secret.txt"
        attempts = {
            "get experiment": ("GET", f"{url}{API}/experiments/get", {"params": {"experiment_id": exp}}),
            "get run": ("GET", f"{url}{API}/runs/get", {"params": {"run_id": run_id}}),
            "download": ("GET", f"{url}{ARTIFACTS}/{artifact}", {}),
            "download .//": ("GET", f"{url}{ARTIFACTS}/.//{artifact}", {}),
            "download %2E/": ("GET", f"{url}{ARTIFACTS}/%2E/{artifact}", {}),
            "list": ("GET", f"{url}{ARTIFACTS}", {"params": {"path": f"{exp}/{run_id}/artifacts"}}),
            "list ./": ("GET", f"{url}{ARTIFACTS}", {"params": {"path": f"./{exp}/{run_id}/artifacts"}}),
        }
        got = {what: call(method, u, BOB, **kw).status_code for what, (method, u, kw) in attempts.items()}
        for prefix in ("./", "././", "1/../", "%2E/", "%252E/"):  # sent as is
            got[f"raw {prefix}"] = raw_get(url, f"{ARTIFACTS}/{prefix}{artifact}", BOB)
        assert got == {what: 403 for what in got}, got
        # A search is filtered rather than refused (MLflow drops unreadable experiment ids): nothing.
        found = ok(call("POST", f"{url}{API}/runs/search", BOB, json={"experiment_ids": [exp]}))
        assert found.get("runs", []) == [], found

    bob_refused(exp, run_id)
    visible = ok(call("GET", f"{url}{API}/experiments/search", BOB, params={"max_results": 100}))
    assert {e["name"] for e in visible.get("experiments", [])} <= {"Default"}, visible

    # An explicit DENY (the grant that a `./` prefix used to slip past) holds as well.
    ok(call("POST", f"{url}/api/3.0/mlflow/users/permissions/grant", admin, json={
        "username": BOB[0], "resource_type": "experiment", "resource_id": exp, "permission": "DENY"}))
    bob_refused(exp, run_id)

    # What is granted is shared: READ on the other experiment, and no more.
    exp2, run2 = shared["alice-shared"]
    ok(call("POST", f"{url}/api/3.0/mlflow/users/permissions/grant", admin, json={
        "username": BOB[0], "resource_type": "experiment", "resource_id": exp2, "permission": "READ"}))
    ok(call("GET", f"{url}{API}/experiments/get", BOB, params={"experiment_id": exp2}))
    ok(call("GET", f"{url}{API}/runs/get", BOB, params={"run_id": run2}))
    assert call("GET", f"{url}{ARTIFACTS}/{exp2}/{run2}/artifacts/notes/secret.txt", BOB).content == b"phi"
    assert call("POST", f"{url}{API}/runs/create", BOB, json={"experiment_id": exp2}).status_code == 403

    # A run cannot claim another author (admin); a NUL in the user name is a 401, not a 500.
    spoofed = {"experiment_id": exp, "user_id": ADMIN, "tags": [{"key": "mlflow.user", "value": ADMIN}]}
    assert call("POST", f"{url}{API}/runs/create", ALICE, json=spoofed).status_code == 403
    tag = {"run_id": run_id, "key": "mlflow.user", "value": ADMIN}
    assert call("POST", f"{url}{API}/runs/set-tag", ALICE, json=tag).status_code == 403
    batch = {"run_id": run_id, "tags": [{"key": "mlflow.user", "value": ADMIN}]}
    assert call("POST", f"{url}{API}/runs/log-batch", ALICE, json=batch).status_code == 403
    own = ok(call("POST", f"{url}{API}/runs/create", ALICE, json={**spoofed, "user_id": ALICE[0], "tags": [
        {"key": "mlflow.user", "value": ALICE[0]}]}))["run"]["info"]
    assert own["user_id"] == ALICE[0]
    for user in (("adm\0in", ADMIN_PASSWORD), (ALICE[0], "x\0y")):
        assert call("GET", f"{url}{API}/experiments/search", user, params={"max_results": 1}).status_code == 401

    # Artifact folders and files the server wrote: its own account only.
    modes = {str(p.relative_to(artifacts.parent)): oct(p.stat().st_mode & 0o777) for p in [artifacts, *artifacts.rglob("*")]}
    assert any(m.endswith("secret.txt") for m in modes)
    assert {p: m for p, m in modes.items() if int(m, 8) & 0o077} == {}, modes
    state = tmp_path / "state"
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in [state, *state.iterdir()]} == {
        "state": "0o700", "basic_auth.ini": "0o600", "secret_key": "0o600"}


    # SIGTERM to the `workbench server` process only (as systemd or a shell sends it): within 5 s
    # nothing of its session is left (uvicorn and its workers, the job runner, huey consumers).
    started = session_processes(proc.pid)
    assert len(started) > 1, started
    os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (proc.poll() is None or session_processes(proc.pid)):
        time.sleep(0.1)
    assert session_processes(proc.pid) == [], f"alive 5 s after SIGTERM (of {started})"
    assert proc.poll() == 0, (proc.returncode, (tmp_path / "server.log").read_text()[-2000:])
