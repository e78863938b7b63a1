"""Shared fixtures: tiny synthetic volumes and datasets, the real scans in ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "totalsegmentator"


def run_cli(*args: str, cwd: Path, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m medseg ARGS`` as a user would, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "medseg", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"medseg {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Tests never write to the user's mlflow.db: each gets its own store in tmp."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow also keeps a process-wide URI (set_tracking_uri) that would outlive a test and shadow the
    # variable above: clear it, so that each test's environment decides.
    from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

    monkeypatch.setattr(mlflow_tracking_utils, "_tracking_uri", None)


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory):
    """medseg's per-user cache (backend measurements, on-the-fly exports) in a folder of this test session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user_cache")))
        yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from medseg.synthetic import make_dataset

    root = tmp_path_factory.mktemp("tiny_dataset")
    make_dataset(root, cases=6, size=32, seed=3, test_fraction=0.34)
    return root


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real scans not present at {SHARED_DATA}")
    return SHARED_DATA
