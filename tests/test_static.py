"""The static checks `make lint` runs, in the test command so that CI holds them: ruff on the code and
tests, mypy on the package (its settings in pyproject.toml). A finding fails with the tool's own report."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    proc = _run("ruff", "check", "medseg", "tests", "benchmarks", "workflows")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_mypy_finds_nothing_in_the_package(tmp_path):
    # a cache of its own: the first run reads every stub (about 20 s on 2 cores)
    proc = _run("mypy", "--cache-dir", str(tmp_path / "mypy"), "medseg")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Success: no issues found" in proc.stdout
