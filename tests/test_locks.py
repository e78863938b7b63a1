"""medseg.locks: one holder per folder, refused with the holder's PID, released when the holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.errors import OutputError
from medseg.locks import LOCK_NAME, exclusive, lock_holder

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from medseg.locks import exclusive
with exclusive(sys.argv[1], what="training run"):
    print("locked", flush=True)
    time.sleep(120)
"""


def _start_holder(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_holder_is_refused_with_pid_and_start_time(tmp_path):
    with (
        exclusive(tmp_path, what="training run"),
        pytest.raises(OutputError) as err,
        exclusive(tmp_path, what="training run"),
    ):
        pass
    msg = str(err.value)
    assert "\n" not in msg
    assert f"PID {os.getpid()}" in msg
    assert "started 20" in msg
    assert "UTC" in msg
    assert "another training run" in msg
    assert str(tmp_path) in msg


def test_lock_is_released_and_removed_after_the_block(tmp_path):
    with exclusive(tmp_path) as lock:
        assert lock.exists()
        assert lock_holder(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()
    with exclusive(tmp_path):  # free again
        pass


def test_lock_is_released_on_exception(tmp_path):
    with pytest.raises(RuntimeError), exclusive(tmp_path):
        raise RuntimeError("boom")
    with exclusive(tmp_path):
        pass


def test_other_process_is_refused_and_sigkill_releases(tmp_path):
    folder = tmp_path / "run"  # created by the holder
    proc = _start_holder(folder)
    try:
        with (
            pytest.raises(OutputError, match=f"PID {proc.pid}, started"),
            exclusive(folder, what="inference"),
        ):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # the kernel dropped the lock with the process: the stale file does not block the next run
    assert (folder / LOCK_NAME).exists()
    with exclusive(folder, what="inference"):
        assert lock_holder(folder)["pid"] == os.getpid()


def test_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot lock"), exclusive(blocker / "sub"):
        pass


def test_many_contenders_one_winner(tmp_path):
    """Released-and-unlinked lock files never let two processes in at once."""
    code = """
import sys, time, os
from medseg.locks import exclusive
from medseg.errors import OutputError
folder, marker = sys.argv[1], sys.argv[2]
wins = 0
deadline = time.time() + 3
while time.time() < deadline:
    try:
        with exclusive(folder):
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            time.sleep(0.001)
            os.close(fd); os.unlink(marker)
            wins += 1
    except OutputError:
        pass
print(wins)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    marker = tmp_path / "inside"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "f"), str(marker)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err  # a FileExistsError on the marker would mean two holders at once
    assert sum(int(o) for o, _ in outs) > 0
