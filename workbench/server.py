"""``workbench server``: a shared MLflow tracking server for a team.

It is ``mlflow server`` with the flags a team needs, checked before it starts::

    mlflow server --backend-store-uri postgresql://USER@HOST:PORT/DB   # runs, params, metrics, registry
                  --serve-artifacts --artifacts-destination DIR_OR_URI # clients upload through the server
                  --app-name basic-auth                                # every request needs a user
                  --host 127.0.0.1 --port 5000 --workers 2

with ``MLFLOW_AUTH_CONFIG_PATH`` pointing at a ``basic_auth.ini`` written into a state directory
(default ``<project home>/mlflow-server/``). Secrets never go into argv or that file, where any
local user could read them: the database password is taken out of the URI and handed to the
server as ``PGPASSWORD`` (libpq reads it), the admin's credentials travel as
``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD`` (defaulting to the caller's
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``), and the CSRF key the auth app
requires is kept in ``secret_key`` (mode 0600) so sessions survive a restart.

Clients need no code change: ``MLFLOW_TRACKING_URI=http://HOST:PORT`` plus their own
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``. See ``docs/teams.md``.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Mapping, Optional

from workbench import tracking
from workbench.errors import WorkbenchError
from workbench.ui import DEFAULT_HOST, MLFLOW_PORT, ServerCommand, check_host, check_port, server_url

PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
AUTH_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"


def state_dir(path: Optional[Path] = None) -> Path:
    """Where the server's auth config and CSRF key live (created, private to this user)."""
    path = Path(path) if path is not None else tracking.project_home() / "mlflow-server"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    path = directory / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {admin_username}\n"
        f"authorization_function = {AUTH_FUNCTION}\n"
    )
    return path


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
    return str(path.expanduser().resolve())  # the server creates it on the first upload


def tracking_server_command(
    backend_store_uri: str,
    artifacts_destination: Optional[str] = None,
    host: str = DEFAULT_HOST,
    port: int = MLFLOW_PORT,
    workers: int = 2,
    public: bool = False,
    auth_db_uri: Optional[str] = None,
    default_permission: str = "READ",
    allowed_hosts: Optional[str] = None,
    state: Optional[Path] = None,
    env: Optional[Mapping[str, str]] = None,
    check: bool = True,
) -> ServerCommand:
    """The ``mlflow server`` command (argv and environment) for a PostgreSQL-backed, basic-auth server.

    ``auth_db_uri`` (default: the backend store) holds users and permissions; MLflow keeps them
    in their own tables with their own migration history, so one database serves both.
    ``check`` connects to the database first.
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
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store_uri,
        "--serve-artifacts",
        "--artifacts-destination", artifacts_location(artifacts_destination),
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
