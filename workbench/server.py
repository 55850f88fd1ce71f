"""``workbench server``: a shared MLflow tracking server for a team.

It is ``mlflow server`` with the flags a team needs, checked before it starts::

    mlflow server --backend-store-uri postgresql://USER@HOST:PORT/DB   # runs, params, metrics, registry
                  --serve-artifacts --artifacts-destination DIR_OR_URI # clients upload through the server
                  --app-name basic-auth                                # every request needs a user
                  --host 127.0.0.1 --port 5000 --workers 2

with ``MLFLOW_AUTH_CONFIG_PATH`` pointing at a ``basic_auth.ini`` written into a state directory
(default ``<project home>/mlflow-server/``). Users see only their own experiments unless granted
more (``default_permission = NO_PERMISSIONS``; ``--default-permission READ`` opens every experiment
to every user). The server runs with umask 077 (artifact files 0600, folders 0700, the state and
artifact folders themselves 0700) in its own process group, which ``serve`` stops as a whole on
SIGTERM/SIGINT/SIGHUP. Secrets never go into argv or that file, where any
local user could read them: the database password is taken out of the URI and handed to the
server as ``PGPASSWORD`` (libpq reads it), the admin's credentials travel as
``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD`` (defaulting to the caller's
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``), and the CSRF key the auth app
requires is kept in ``secret_key`` (mode 0600) so sessions survive a restart.

Clients need no code change: ``MLFLOW_TRACKING_URI=http://HOST:PORT`` plus their own
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``. See ``docs/teams.md``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from workbench import tracking
from workbench.errors import WorkbenchError
from workbench.ui import DEFAULT_HOST, MLFLOW_PORT, ServerCommand, check_host, check_port, server_url

PERMISSIONS = ("NO_PERMISSIONS", "READ", "EDIT", "MANAGE")
DEFAULT_PERMISSION = "NO_PERMISSIONS"
AUTH_FUNCTION = "workbench.server:authenticate_request"  # MLflow's basic auth plus three checks, below
USER_TAG = "mlflow.user"
RUN_WRITES = ("/mlflow/runs/create", "/mlflow/runs/set-tag", "/mlflow/runs/log-batch")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def state_dir(path: Optional[Path] = None) -> Path:
    """Where the server's auth config and CSRF key live (created, private to this user)."""
    path = Path(path) if path is not None else tracking.project_home() / "mlflow-server"
    return private_dir(path)


def private_dir(path: Path) -> Path:
    """``path`` created if missing, and mode 0700 (also when it already existed)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> Path:
    """``text`` into ``path``, mode 0600 (also when it already existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)
    return path


def split_password(uri: str) -> tuple[str, Optional[str]]:
    """A PostgreSQL URI without its password, and the password (None when it has none).

    A URI that names no driver gets ``+psycopg2`` (the driver the workbench installs): SQLAlchemy
    2.1 would otherwise pick psycopg 3.
    """
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except ArgumentError as exc:
        raise WorkbenchError(f"--backend-store-uri {uri!r}: not a database URI ({exc})") from exc
    if url.get_backend_name() != "postgresql":
        raise WorkbenchError(
            f"--backend-store-uri: expected postgresql://USER@HOST:PORT/DB, got a {url.get_backend_name()!r} "
            "URI (for a one-person store use `workbench ui`)"
        )
    driver = url.drivername if "+" in url.drivername else "postgresql+psycopg2"
    bare = URL.create(driver, url.username, None, url.host, url.port, url.database, url.query)
    return bare.render_as_string(hide_password=False), url.password


def check_database(uri: str, password: Optional[str]) -> None:
    """Connect once, so a wrong host, password or database name is one clear line, not a worker crash loop."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    url = make_url(uri).set(password=password) if password else make_url(uri)
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5}, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise WorkbenchError(f"cannot connect to the backend store {uri}: {reason}") from exc
    finally:
        engine.dispose()


def admin_credentials(env: Mapping[str, str]) -> tuple[str, str]:
    """The admin user created on the first start: MLFLOW_AUTH_ADMIN_*, else MLFLOW_TRACKING_*."""
    username = env.get("MLFLOW_AUTH_ADMIN_USERNAME") or env.get("MLFLOW_TRACKING_USERNAME") or "admin"
    password = env.get("MLFLOW_AUTH_ADMIN_PASSWORD") or env.get("MLFLOW_TRACKING_PASSWORD")
    if not password:
        raise WorkbenchError(
            "no admin password: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD); MLflow creates that admin "
            "on the first start against an empty user store"
        )
    return username, password


def write_auth_config(directory: Path, database_uri: str, admin_username: str, default_permission: str) -> Path:
    """``basic_auth.ini`` for MLflow's auth app (no secrets in it: those come from the environment)."""
    if default_permission not in PERMISSIONS:
        raise WorkbenchError(f"--default-permission must be one of {', '.join(PERMISSIONS)}, got {default_permission!r}")
    return write_private(
        directory / "basic_auth.ini",
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {admin_username}\n"
        f"authorization_function = {AUTH_FUNCTION}\n",
    )


def secret_key(directory: Path, env: Mapping[str, str]) -> str:
    """MLFLOW_FLASK_SERVER_SECRET_KEY when set, else one generated once and kept (0600) in ``directory``."""
    if env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    path = directory / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def artifacts_location(destination: Optional[str]) -> str:
    """Where proxied artifacts go: a URI (s3://...) as is, a local path made absolute (default ./mlartifacts)."""
    if destination and "://" in destination:
        return destination
    path = Path(destination) if destination else tracking.project_home() / "mlartifacts"
    return str(path.expanduser().resolve())  # created (0700) by tracking_server_command(check=True)


def tracking_server_command(
    backend_store_uri: str,
    artifacts_destination: Optional[str] = None,
    host: str = DEFAULT_HOST,
    port: int = MLFLOW_PORT,
    workers: int = 2,
    public: bool = False,
    auth_db_uri: Optional[str] = None,
    default_permission: str = DEFAULT_PERMISSION,
    allowed_hosts: Optional[str] = None,
    state: Optional[Path] = None,
    env: Optional[Mapping[str, str]] = None,
    check: bool = True,
) -> ServerCommand:
    """The ``mlflow server`` command (argv and environment) for a PostgreSQL-backed, basic-auth server.

    ``auth_db_uri`` (default: the backend store) holds users and permissions; MLflow keeps them
    in their own tables with their own migration history, so one database serves both.
    ``check`` (a real start, not ``--print``) connects to the database first and creates a local
    artifact folder, mode 0700.
    """
    env = os.environ if env is None else env
    check_host(host, public)
    check_port(port)
    if workers < 1:
        raise WorkbenchError(f"--workers must be at least 1, got {workers}")
    store_uri, password = split_password(backend_store_uri)
    auth_uri, auth_password = split_password(auth_db_uri or backend_store_uri)
    if auth_password not in (None, password):
        raise WorkbenchError("--auth-db-uri and --backend-store-uri must share one password (passed as PGPASSWORD)")
    password = password or env.get("PGPASSWORD")
    if check:
        check_database(store_uri, password)
    username, admin_password = admin_credentials(env)
    directory = state_dir(state)
    artifacts = artifacts_location(artifacts_destination)
    if check and "://" not in artifacts:
        private_dir(Path(artifacts))
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store_uri,
        "--serve-artifacts",
        "--artifacts-destination", artifacts,
        "--app-name", "basic-auth",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]
    if allowed_hosts:
        argv += ["--allowed-hosts", allowed_hosts]
    server_env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(directory, auth_uri, username, default_permission)),
        "MLFLOW_AUTH_ADMIN_USERNAME": username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key(directory, env),
    }
    if password:
        server_env["PGPASSWORD"] = password
    return ServerCommand(argv=argv, url=server_url(host, port), env=server_env)


def authenticate_request() -> Any:
    """MLflow's basic auth (``authorization_function`` in basic_auth.ini), plus three checks.

    A NUL byte in the user name or password is a 401 (PostgreSQL cannot take it in a query:
    MLflow's own function answers 500). A proxied-artifact path with a ``.`` or ``..`` segment
    is a 403: MLflow finds no experiment id in ``./1/...`` and falls back to the default
    permission, past an experiment's DENY. And a user cannot stamp a run with another user:
    a ``runs/create`` whose ``user_id`` or ``mlflow.user`` tag, or a ``set-tag`` / ``log-batch``
    whose ``mlflow.user`` tag, names someone else is a 403, unless the caller is an admin.
    """
    from flask import request
    from mlflow.server import auth
    from werkzeug.datastructures import Authorization

    credentials = request.authorization
    if credentials is not None and "\0" in f"{credentials.username}{credentials.password}":
        return auth.make_basic_auth_response()
    result = auth.authenticate_request_basic_auth()
    if isinstance(result, Authorization) and "/mlflow-artifacts/" in request.path and (
        dot_segments(request.path.split("/mlflow-artifacts/", 1)[1]) or dot_segments(request.args.get("path", ""))
    ):
        return auth.make_forbidden_response()
    if isinstance(result, Authorization) and request.method == "POST" and request.path.endswith(RUN_WRITES):
        body = request.get_json(force=True, silent=True)  # as MLflow's handlers read it (and cached)
        if isinstance(body, str):  # older clients double-encode
            try:
                body = json.loads(body)
            except ValueError:
                body = None
        if claimed_users(body) - {result.username} and not auth.store.get_user(result.username).is_admin:
            return auth.make_forbidden_response()
    return result


def dot_segments(path: str) -> bool:
    """Whether ``path``, percent-decoded until it stops changing, has a ``.`` or ``..`` segment."""
    from urllib.parse import unquote

    for _ in range(5):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    return any(segment in (".", "..") for segment in path.replace("\\", "/").split("/"))


def claimed_users(body: Any) -> set[str]:
    """The users a run-write request body names: ``user_id`` and ``mlflow.user`` tags."""
    if not isinstance(body, dict):
        return set()
    claimed = {str(body["user_id"])} if body.get("user_id") else set()
    tags = body.get("tags") if isinstance(body.get("tags"), list) else []
    if body.get("key") is not None:  # runs/set-tag
        tags = [*tags, body]
    return claimed | {str(t.get("value")) for t in tags if isinstance(t, dict) and t.get("key") == USER_TAG}


def serve(command: ServerCommand, grace: float = 3.0) -> int:
    """Run the server until it exits or this process gets SIGTERM, SIGINT or SIGHUP; its exit status.

    The server runs with umask 077 in a process group of its own, which is stopped as a whole:
    ``mlflow server`` forwards SIGTERM to uvicorn only, and its job runner and huey consumers
    would outlive it. The group gets SIGTERM, then SIGKILL for what is left after ``grace`` s.
    A stop asked for by a signal exits 0.
    """
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in STOP_SIGNALS}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        proc = subprocess.Popen(command.argv, env={**os.environ, **command.env}, process_group=0, umask=0o077)
        try:
            while proc.poll() is None and not received:
                time.sleep(0.1)
        finally:
            stop_group(proc, grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if received else proc.returncode


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL to what is left of it after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        if not group_alive(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(proc.pid):
            proc.poll()  # reap the leader: a zombie still counts for killpg
            time.sleep(0.05)
    proc.poll()


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a live member (from /proc, where zombies do not count)."""
    proc_root = Path("/proc")
    if not (proc_root / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    for stat in proc_root.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            return True
    return False
