"""Advisory exclusive locks on a folder, so that two runs never write into one.

``exclusive(folder)`` takes an ``fcntl.flock`` lock on ``folder/.medseg.lock``
for the duration of a ``with`` block. The kernel releases the lock when the
process dies (SIGKILL included), so a killed run never blocks the next one.
A second run that finds the folder locked is refused with one line naming the
holder's PID and start time (an ``OutputError``: exit code 2 from the CLI).

The lock file holds a small JSON record (PID, start time, what). It is removed
on release; a process that locked a file that was unlinked meanwhile retries
on the new one, so removal never lets two holders in.

Under torchrun, ``exclusive_on_every_rank(folder, dist)`` has rank 0 hold the
lock for the job and sends its verdict to every rank, so that a second
distributed run into a held folder is refused on every rank (not on rank 0
alone, leaving the others to write into the folder or wait for it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import OutputError

if TYPE_CHECKING:
    from medseg.runtime import Dist

LOCK_NAME = ".medseg.lock"

__all__ = ["LOCK_NAME", "exclusive", "exclusive_on_every_rank", "lock_holder"]


def lock_holder(folder: str | Path) -> dict | None:
    """The record of whoever holds (or last held) the lock of ``folder``, or None."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text()
        record = json.loads(text)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(record: dict | None) -> str:
    if not record:
        return "PID unknown"
    started = record.get("started")
    when = (
        datetime.fromtimestamp(float(started), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        if isinstance(started, int | float)
        else "an unknown time"
    )
    return f"PID {record.get('pid', 'unknown')}, started {when}"


def _open_locked(lock_path: Path, folder: Path, what: str) -> int:
    """Open and lock ``lock_path``; raise OutputError naming the holder when it is taken."""
    for _ in range(20):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            # the holder writes its record right after locking: give it a moment
            record = None
            for _ in range(5):
                record = lock_holder(folder)
                if record:
                    break
                time.sleep(0.02)
            msg = (
                f"{folder}: another {what} is using this folder ({_describe(record)}); "
                "wait for it to finish, or choose another folder"
            )
            raise OutputError(msg) from None
        except OSError:
            os.close(fd)
            raise
        # the previous holder may have unlinked the file between our open and our lock
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise OutputError(f"{folder}: could not take the lock {LOCK_NAME} (it keeps changing)")


@contextlib.contextmanager
def exclusive(folder: str | Path, what: str = "training run") -> Iterator[Path]:
    """Hold an exclusive advisory lock on ``folder`` for the ``with`` block.

    Args:
        folder: the run or output folder; created when missing.
        what: how the holder is named in the refusal ("training run", "inference").

    Yields:
        The path of the lock file.

    Raises:
        OutputError: another process holds the lock (its PID and start time are named),
            or the folder cannot be created or written.

    Example:
        >>> with exclusive(run_dir, what="training run"):
        ...     train(...)
    """
    folder = Path(folder)
    lock_path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(lock_path, folder, what)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{folder}: cannot lock this folder ({exc.strerror or exc})") from exc
    try:
        record = {"pid": os.getpid(), "started": time.time(), "what": what}
        with contextlib.suppress(OSError):  # a full disk must not stop the lock itself
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(record).encode())
        yield lock_path
    finally:
        # unlink while still holding the lock; a waiter that opened the old file sees the inode change
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                os.unlink(lock_path)
        os.close(fd)


@contextlib.contextmanager
def exclusive_on_every_rank(
    folder: str | Path, dist: Dist, what: str = "training run", *, wait_for_all: bool = False
) -> Iterator[Path | None]:
    """``exclusive`` for the ranks of a torchrun job (``dist``: joined in a process group).

    Rank 0 takes the lock for the whole job and broadcasts its verdict: when the folder is held
    by another run, every rank raises the same ``OutputError`` (one line each), instead of rank 0
    alone while the others go on writing into the folder or wait for rank 0 until torchrun kills
    them. Without torchrun (``dist.active`` false) this is ``exclusive``.

    Args:
        folder: the run or output folder.
        dist: this process's place in the job (``medseg.runtime.Dist``).
        what: how the holder is named in the refusal.
        wait_for_all: on leaving the block normally, the ranks meet at a barrier before rank 0
            releases the lock, so that no rank still writes into a folder another run may now take
            (a batch whose ranks finish at different times). Not for training, whose rank 0 works
            on alone (tuning, MLflow) while the others have nothing left to write.

    Yields:
        The lock file's path on rank 0, None on the other ranks.
    """
    if not dist.active:
        with exclusive(folder, what) as own:
            yield own
        return
    with contextlib.ExitStack() as stack:
        refusal: str | None = None
        lock_path: Path | None = None
        if dist.main:
            try:
                lock_path = stack.enter_context(exclusive(folder, what))
            except OutputError as exc:
                refusal = str(exc)
        refusal = dist.broadcast(refusal)  # every rank waits here for rank 0's verdict
        if refusal is not None:
            raise OutputError(refusal)
        yield lock_path
        if wait_for_all:
            dist.barrier()
