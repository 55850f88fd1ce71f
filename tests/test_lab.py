"""``workbench lab`` smoke test (slow, ~30 s): a real JupyterLab, its REST API and a kernel.

Starts ``workbench lab`` in a temp project, lists its notebooks over the REST API, starts the
project's ``workbench`` kernel, runs one cell over the kernel's websocket channel, and checks
that the server listens on 127.0.0.1 only and refuses requests without the token.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import shutil
from pathlib import Path

import nbformat
import psutil
import pytest
import requests
import websocket

from conftest import wait_for
from ui_servers import Browser, free_port, listening_addresses, workbench_server

TOKEN = "lab-test-" + uuid.uuid4().hex
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture
def lab(tmp_path):
    """A running ``workbench lab`` over a project whose notebooks/ holds hello.ipynb."""
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nbformat.write(nb, project / "notebooks" / "hello.ipynb")
    shutil.copy(NOTEBOOKS / "02_train.ipynb", project / "notebooks")
    port = free_port()
    env = {
        **os.environ,
        "WORKBENCH_HOME": str(project),
        # Keep the user's Jupyter config, runtime files and workspaces out of the test.
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"),
    }
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "lab.log"
    with workbench_server(["lab", "--port", str(port), "--token", TOKEN], env, log, lambda: status_ok(base)) as proc:
        yield base, port, proc, log


def status_ok(base: str) -> bool:
    try:
        return api("GET", base, "/api/status", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def api(method: str, base: str, path: str, token: str | None = TOKEN, **kwargs) -> requests.Response:
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.request(method, base + path, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)


def execute(base: str, kernel_id: str, code: str, timeout: float = 120) -> str:
    """Run ``code`` in a kernel over Jupyter's websocket channel; returns its stdout."""
    ws = websocket.create_connection(
        f"ws://{base.removeprefix('http://')}/api/kernels/{kernel_id}/channels",
        header=[f"Authorization: token {TOKEN}"], timeout=timeout,
    )
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "session": uuid.uuid4().hex, "username": "test", "msg_type": "execute_request", "version": "5.3"}
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False}
    ws.send(json.dumps({"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell"}))
    stdout, replied, idle = [], False, False
    deadline = time.monotonic() + timeout
    try:
        while not (replied and idle):
            assert time.monotonic() < deadline, f"no reply from the kernel in {timeout}s"
            msg = json.loads(ws.recv())
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream" and msg["content"]["name"] == "stdout":
                stdout.append(msg["content"]["text"])
            elif kind == "error":
                raise AssertionError("\n".join(msg["content"]["traceback"]))
            elif kind == "execute_reply":
                assert msg["content"]["status"] == "ok", msg["content"]
                replied = True
            elif kind == "status":
                idle = msg["content"]["execution_state"] == "idle"
    finally:
        ws.close()
    return "".join(stdout)


@pytest.mark.slow
def test_lab_lists_notebooks_and_runs_a_cell_in_the_workbench_kernel(lab):
    base, port, proc, log = lab
    assert listening_addresses(port) == {"127.0.0.1"}
    # The token reaches the server through its environment, not its (world-readable) argv.
    assert not any(TOKEN in arg for arg in psutil.Process(proc.pid).cmdline())
    assert f"{base}/lab?token={TOKEN}" in log.read_text()

    assert api("GET", base, "/api/contents", token=None).status_code in (401, 403)
    assert api("GET", base, "/api/contents", token="wrong").status_code in (401, 403)

    listing = api("GET", base, "/api/contents").json()
    assert {(item["name"], item["type"]) for item in listing["content"]} == {("hello.ipynb", "notebook"), ("02_train.ipynb", "notebook")}
    assert "workbench" in api("GET", base, "/api/kernelspecs").json()["kernelspecs"]

    started = api("POST", base, "/api/kernels", json={"name": "workbench"})
    assert started.status_code == 201, started.text
    kernel_id = started.json()["id"]
    answer, pid = execute(base, kernel_id, "import os, workbench\nprint(6 * 7, os.getpid())").split()
    assert answer == "42"

    assert api("DELETE", base, f"/api/kernels/{kernel_id}").status_code == 204
    gone = time.monotonic() + 30
    while psutil.pid_exists(int(pid)) and time.monotonic() < gone:
        time.sleep(0.2)
    assert not psutil.pid_exists(int(pid)), "the kernel outlived its DELETE"


@pytest.mark.slow
def test_jupyterlab_opens_a_project_notebook_without_marking_it_modified(lab, tmp_path):
    """In a real browser: open 02_train.ipynb, let its workbench kernel start; the tab must not turn dirty
    (JupyterLab rewrites kernelspec / language_info metadata that differ from the running kernel's)."""
    base, _, _, _ = lab
    browser = Browser(tmp_path / "chromium-profile")
    try:
        browser.call("Page.navigate", url=f"{base}/lab/tree/02_train.ipynb?token={TOKEN}")
        tab = "[...document.querySelectorAll('.lm-TabBar-tab')].find(t => t.textContent.includes('02_train.ipynb'))"
        kernel = "(document.querySelector('.jp-NotebookPanel-toolbar .jp-Toolbar-kernelName') || {}).textContent"
        status = "(document.querySelector('.jp-Notebook-ExecutionIndicator') || {getAttribute: () => null}).getAttribute('data-status')"
        wait_for(lambda: browser.evaluate(f"!!{tab}") and browser.evaluate(kernel) == "Python (workbench)"
                 and browser.evaluate(status) == "idle", 180, "the notebook open with its kernel idle")
        # Metadata updates follow the kernel's info reply; give them a few polls to land.
        for _ in range(10):
            assert "jp-mod-dirty" not in browser.evaluate(f"{tab}.className"), "opening the notebook modified it"
            time.sleep(0.5)
        browser.screenshot(tmp_path / "lab.png")
    finally:
        browser.close()
