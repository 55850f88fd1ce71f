"""The two browser UIs: the MLflow UI over the workbench store, and JupyterLab in ``notebooks/``.

Both bind to 127.0.0.1 unless the user asks for a public interface explicitly: the runs and
notebooks hold patient-level data, so exposing them must be a deliberate choice. Each function
here only builds a :class:`ServerCommand`; :func:`exec_server` replaces the current process
with it, so Ctrl-C reaches the server directly and nothing is left running behind it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from workbench import record, tracking
from workbench.errors import WorkbenchError

DEFAULT_HOST = "127.0.0.1"
MLFLOW_PORT = 5000
LAB_PORT = 8888
#: Held-out metrics shown as columns of the runs table; the first one orders the runs, best first.
VIEW_METRICS = tuple(record.HELD_OUT + m for m in ("auroc", "auroc_ci_low", "auroc_ci_high", "auprc", "brier"))
VIEW_KEY = "workbench"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"  # read by the MLflow UI for ?viewStateShareKey=


@dataclass(frozen=True)
class ServerCommand:
    """A server to start: its argv, extra environment variables, and the URL to open."""

    argv: list[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def check_host(host: str, public: bool = False) -> bool:
    """Refuse a non-loopback ``host`` unless ``public``; returns True when the server is public."""
    if is_loopback(host):
        return False
    if not public:
        raise WorkbenchError(
            f"refusing to bind to {host!r}: it is not a loopback address, so other machines could "
            "reach patient data; pass --public to do this deliberately (or use 127.0.0.1)"
        )
    return True


def check_port(port: int) -> int:
    """A TCP port the server can bind (1-65535)."""
    if not 1 <= port <= 65535:
        raise WorkbenchError(f"port must be between 1 and 65535, got {port}")
    return port


def server_url(host: str, port: int, path: str = "/") -> str:
    """``http://host:port/path``; IPv6 literals in brackets, wildcard binds shown as loopback."""
    if host in ("0.0.0.0", "::"):
        host = DEFAULT_HOST
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def mlflow_ui_command(
    host: str = DEFAULT_HOST, port: int = MLFLOW_PORT, public: bool = False, workers: int = 1
) -> ServerCommand:
    """``mlflow server`` over the workbench tracking store, artifacts under ``mlruns/artifacts``.

    One worker is plenty for one analyst and keeps the footprint small; MLflow's own
    security middleware (Host and CORS checks, localhost by default) stays on.
    """
    check_host(host, public)
    check_port(port)
    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        raise WorkbenchError(
            f"MLFLOW_TRACKING_URI points at a tracking server ({uri}); open its UI there instead "
            "of starting a local one (or unset MLFLOW_TRACKING_URI for the local store)"
        )
    # The same place tracking.experiment_id() gives local experiments, so runs logged by
    # notebooks and experiments created in the UI keep their artifacts together.
    artifacts = (tracking.mlruns_dir() / "artifacts").as_uri()
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--default-artifact-root", artifacts,
        "--artifacts-destination", artifacts,
        "--host", host.strip("[]"),
        "--port", str(port),
        "--workers", str(workers),
    ]
    # MLflow's job runner (GenAI scorers, trace rollups) starts eight worker processes that
    # the workbench never uses; a UI for one analyst does not need them.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return ServerCommand(argv=argv, url=server_url(host, port, "/#/experiments"), env=env)


def _column(metric: str) -> str:
    """The MLflow UI's id for a metric column."""
    return f"metrics.`{metric}`"


def comparison_view_state() -> str:
    """The runs table state of the comparison view: held-out metrics as columns, best AUROC first."""
    columns = [_column(m) for m in VIEW_METRICS]
    return json.dumps(
        {
            "selectedColumns": columns,
            "columnOrder": ["attributes.`Run Name`", *columns],
            "columnWidths": {c: 170 for c in columns},  # wide enough for the full metric name
            "orderByKey": columns[0],
            "orderByAsc": False,
        }
    )


def comparison_view_path(experiment_id: str) -> str:
    """The UI route of an experiment's runs table in the comparison view."""
    return f"/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def install_comparison_views() -> dict[str, str]:
    """Tag every active experiment with the comparison view; returns ``{name: view path}``.

    MLflow's runs table shows no metric columns until a user picks them; a shared-view tag
    (what the UI's own Share button writes) lets ``workbench ui`` link straight to a table
    that compares models on held-out AUROC with its CI.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    state = comparison_view_state()
    paths = {}
    for exp in client.search_experiments():
        if exp.tags.get(VIEW_TAG) != state:
            client.set_experiment_tag(exp.experiment_id, VIEW_TAG, state)
        paths[exp.name] = comparison_view_path(exp.experiment_id)
    return paths


def notebooks_dir() -> Path:
    """The project's ``notebooks/`` folder (under ``WORKBENCH_HOME`` or the current directory)."""
    path = tracking.project_home() / "notebooks"
    if not path.is_dir():
        raise WorkbenchError(
            f"no notebooks folder at {path}: run from the project root or set WORKBENCH_HOME to it"
        )
    return path


def lab_command(
    host: str = DEFAULT_HOST,
    port: int = LAB_PORT,
    token: str | None = None,
    root_dir: Path | None = None,
    public: bool = False,
) -> ServerCommand:
    """JupyterLab in ``notebooks/`` with a token (random unless given), never opening a browser.

    The token travels in ``JUPYTER_TOKEN`` rather than argv, so it does not show in the process
    list; ``port_retries=0`` makes a busy port an error instead of a silently different URL.
    """
    check_host(host, public)
    check_port(port)
    if token is not None and not token.strip():
        raise WorkbenchError("--token must not be empty: an empty token disables authentication")
    token = token or secrets.token_urlsafe(32)
    root = Path(root_dir) if root_dir is not None else notebooks_dir()
    argv = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        f"--ServerApp.ip={host.strip('[]')}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root.resolve()}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Containers and CI run as root; Jupyter refuses that unless told, and the loopback
        # bind plus token are what protect the server here.
        argv.append("--allow-root")
    url = server_url(host, port, f"/lab?token={quote(token, safe='')}")
    return ServerCommand(argv=argv, url=url, env={"JUPYTER_TOKEN": token})


def exec_server(command: ServerCommand) -> None:
    """Replace this process with the server (it runs in the foreground until Ctrl-C)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command.argv[0], command.argv, {**os.environ, **command.env})
