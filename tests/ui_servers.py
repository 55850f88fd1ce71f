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

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

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


def chromium() -> str:
    """Debian's chromium (the CI script installs it); a clear failure where it is missing."""
    import shutil

    import pytest

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the browser test needs Chromium: apt-get install -y chromium")
    return path


def screenshot(url: str, png: Path, profile: Path, width: int = 1280, height: int = 2400) -> Path:
    """A headless Chromium screenshot of ``url`` (a page or a file:// HTML) as ``png``."""
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    argv = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--screenshot={png}", url]
    subprocess.run(argv, capture_output=True, text=True, timeout=180, check=True)
    return png


class Browser:
    """Headless Chromium driven over the DevTools protocol (websocket): navigate, evaluate JavaScript."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 900):
        import json
        import urllib.request

        import websocket

        self.port = free_port()
        self.proc = subprocess.Popen(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={self.port}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=2).read())
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > deadline:
                    self.close()
                    raise AssertionError("Chromium's DevTools endpoint did not come up in 60 s")
                time.sleep(0.3)
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        self._id = 0

    def call(self, method: str, **params) -> dict:
        import json

        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self, png: Path) -> Path:
        import base64

        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot")["data"]))
        return png

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
