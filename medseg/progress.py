"""Progress display: a rich progress bar on an interactive terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("medseg")


def interactive() -> bool:
    return sys.stderr.isatty()


def track(items: Iterable[T], description: str, *, total: int | None = None) -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if interactive():
        from rich.progress import track as rich_track

        yield from rich_track(items, description=description, total=total, transient=True)
        return
    for i, item in enumerate(items):
        yield item
        if total:
            log.debug("%s %d/%d", description, i + 1, total)


class TrainingProgress:
    """A rich progress bar over all training steps, with loss, last validation Dice and ETA.

    Disabled (does nothing) when ``enabled`` is false: training then logs one line per epoch.
    """

    def __init__(self, *, total_steps: int, enabled: bool) -> None:
        self._progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self._task = self._progress.add_task("training", total=total_steps, status="")
        self._progress.start()

    def set_total(self, total_steps: int) -> None:
        """A new number of steps (the time budget re-planned the epochs)."""
        if self._progress is not None:
            self._progress.update(self._task, total=total_steps)

    def update(self, *, completed: int, epoch: int, epochs: int, loss: float, dice: float | None) -> None:
        if self._progress is None:
            return
        status = f"loss {loss:.4f}" + (f" Dice {dice:.3f}" if dice is not None else "")
        self._progress.update(
            self._task, completed=completed, description=f"epoch {epoch}/{epochs}", status=status
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class CaseProgress:
    """Inference progress: cases done, and inside the current case its stage and windows with an ETA.

    A rich display on an interactive terminal when ``enabled``; otherwise stages go to the debug log.
    """

    def __init__(self, *, total_cases: int, enabled: bool) -> None:
        self._progress = None
        self._case = ""
        if not (enabled and interactive()):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=True,
        )
        self._cases = self._progress.add_task("cases", total=total_cases)
        self._windows = self._progress.add_task("", total=None, visible=False)
        self._progress.start()

    def start_case(self, name: str) -> None:
        self._case = name
        if self._progress is not None:
            self._progress.reset(self._windows, total=None, description=f"{name}: starting", visible=True)

    def update(self, stage: str, done: int, total: int) -> None:
        """``stage`` of the current case; while the network runs, ``done`` of ``total`` windows."""
        if self._progress is None:
            if not done:
                log.debug("%s: %s", self._case, stage)
            return
        if total:
            self._progress.update(
                self._windows, description=f"{self._case}: {stage} (windows)", total=total, completed=done
            )
        else:
            self._progress.update(self._windows, description=f"{self._case}: {stage}")

    def end_case(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._cases)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
