"""The few exception types medseg raises at its boundaries.

Every error a user can cause (a bad file, a bad config, a missing series) is a
``MedsegError``; the CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class InputError(MedsegError):
    """A file or folder given as input cannot be used.

    The message always names the file and the problem.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class ConfigError(MedsegError):
    """A configuration file or override is invalid."""


class OutputError(MedsegError):
    """An output cannot be written (exists without --overwrite, disk full, ...)."""


class TrackingError(MedsegError):
    """The MLflow tracking store cannot be reached or used."""


class StoppedError(MedsegError):
    """A signal stopped the run after it saved what it had (resumable).

    Exit codes (README): 130 for SIGINT (Ctrl-C), 143 for SIGTERM (pre-emption by a scheduler).
    """

    def __init__(self, message: str, *, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message)


def one_line(exc: BaseException | Warning | str, *, with_type: bool = False, limit: int | None = None) -> str:
    """A library's exception (or warning) text on one line: the CLI prints errors as one stderr line.

    An empty message gives the exception's type name. ``with_type``: ``"ValueError: text"``.
    ``limit``: the text is cut to that many characters, the cut marked with ``...``.
    """
    text = exc if isinstance(exc, str) else str(exc)
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    if isinstance(exc, str):
        return text
    name = type(exc).__name__
    if not text:
        return name
    return f"{name}: {text}" if with_type else text
