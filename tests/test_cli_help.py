"""The command line's help is a contract: ``medseg [COMMAND] --help`` as recorded in tests/golden/cli_help.

The recorded texts were printed by the parser before ``build_parser`` was split into one
function per subcommand (issue 8): every flag, help text and default must come out the same.
After a deliberate change to the help, regenerate them:
``MEDSEG_UPDATE_GOLDEN=1 pytest tests/test_cli_help.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

import pytest

from medseg.cli import build_parser
from tests.helpers import REPO

GOLDEN = REPO / "tests" / "golden" / "cli_help"
PYTHON = (3, 11)  # argparse lays out help differently from one Python minor version to another
COMMANDS = ["medseg", "demo", "synth", "series", "convert", "import-dicom", "check", "train", "augment-preview", "infer",
            "evaluate", "export", "tune"]


def _help(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*([] if command == "medseg" else [command]), "--help"])
    return out.getvalue()


def test_every_subcommand_is_recorded():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert ["medseg", *sub.choices] == COMMANDS
    assert sorted(p.stem for p in GOLDEN.glob("*.txt")) == sorted(COMMANDS)


@pytest.mark.skipif(sys.version_info[:2] != PYTHON, reason=f"help recorded with Python {PYTHON}")
@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_as_recorded(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps at the terminal's width
    text = _help(command)
    golden = GOLDEN / f"{command}.txt"
    if os.environ.get("MEDSEG_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"medseg {command} --help changed (see the module docstring)"
