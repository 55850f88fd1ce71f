"""Run ``workbench ui`` / ``workbench lab`` as real processes for the UI tests, and stop them.

Each server starts in its own session so that stopping it signals its whole process group
(MLflow's uvicorn child, Jupyter's helpers), never anything the tests did not start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil

WORKBENCH = Path(sys.executable).with_name("workbench")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The local IP addresses with a socket listening on ``port``."""
    return {
        c.laddr.ip for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    }


def stop_process_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
    proc.wait(10)


@contextlib.contextmanager
def workbench_server(
    args: list[str], env: dict[str, str], log_path: Path, ready: Callable[[], bool], timeout: float = 240
) -> Iterator[subprocess.Popen]:
    """Start ``workbench ARGS``, wait until ``ready()``, yield the process, then stop it."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(WORKBENCH), *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if proc.poll() is not None:
                    raise AssertionError(f"workbench {args[0]} exited with {proc.returncode}:\n{log_path.read_text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"workbench {args[0]} not ready after {timeout}s:\n{log_path.read_text()}")
                time.sleep(0.5)
            yield proc
        finally:
            stop_process_group(proc)
