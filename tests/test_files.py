"""Atomic outputs: a replaced folder never goes missing, a killed writer's leftovers are cleaned up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from conftest import wait_for

from workbench.files import remove_stale_temporaries, replace_directory, temporary_directory_for

BIN = Path(sys.executable).parent


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_replacing_a_folder_never_leaves_the_target_missing(tmp_path):
    """A reader polling the target while it is replaced 300 times always finds a complete folder."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "done").write_text("0")
    stop, missing, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            reads[0] += 1
            if not (target / "done").exists():
                missing.append(reads[0])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            tmp = temporary_directory_for(target)
            (tmp / "done").write_text(str(i + 1))
            replace_directory(tmp, target)
    finally:
        stop.set()
        thread.join()
    assert not missing, f"target missing in {len(missing)} of {reads[0]} reads"
    assert (target / "done").read_text() == "300"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary or old folder left behind"


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "data"
    dead = tmp_path / f".data.tmp-{dead_pid()}-deadbeef"
    dead_old = tmp_path / f".data.old-{dead_pid()}-deadbeef"
    live = tmp_path / f".data.tmp-{os.getpid()}-cafecafe"
    other = tmp_path / f".database.tmp-{dead_pid()}-00000000"  # another target's: not ours to touch
    for folder in (dead, dead_old, live, other):
        folder.mkdir()
        (folder / "part.parquet").write_bytes(b"x")
    assert sorted(remove_stale_temporaries(target)) == sorted([dead, dead_old])
    assert live.exists() and other.exists() and not dead.exists() and not dead_old.exists()


def test_a_killed_synth_leaves_nothing_once_the_next_one_runs(tmp_path):
    """SIGKILL `workbench synth` mid-write: its hidden temp folder is removed by the next writer."""
    out = tmp_path / "synth"
    proc = subprocess.Popen([str(BIN / "workbench"), "synth", "--out", str(out), "--subjects", "400000",
                             "--shard-size", "2000", "--no-progress"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(p.name.startswith(".synth.tmp-") and any(p.glob("data/*.parquet"))
                             for p in tmp_path.iterdir()), 300, "synth to start writing shards")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists() and any(p.name.startswith(".synth.tmp-") for p in tmp_path.iterdir())
    again = subprocess.run([str(BIN / "workbench"), "synth", "--out", str(out), "--subjects", "50", "--no-progress"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]
