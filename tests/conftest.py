"""Shared fixtures: tiny synthetic volumes and datasets, the real scans in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, REQUIRE_SHARED_DATA, SHARED_DATA, run_cli  # noqa: F401  (re-exported)

# As the CLI does (medseg.tracking.no_usage_telemetry): MLflow imported while tests are collected would
# otherwise start its usage telemetry, whose config thread, failing offline, then edits os.environ at
# a moment of its choosing (test_tracker_leaves_no_process_wide_state saw its session id vanish).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Tests never write to the user's mlflow.db or bundle cache: each gets its own in tmp.

    medseg never sets MLflow's process-wide tracking URI, so the variable decides for every test.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


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
        if REQUIRE_SHARED_DATA:
            pytest.fail(f"real scans not present at {SHARED_DATA} (MEDSEG_REQUIRE_SHARED_DATA is set)")
        pytest.skip(f"real scans not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _logging_as_found():
    """``medseg.cli.main`` run in-process sets up the CLI's logging (handlers, levels, no propagation):
    restore every logger afterwards so that later tests see records as a library user would."""
    import logging

    manager = logging.Logger.manager
    names = ["medseg", *[n for n in list(manager.loggerDict) if not n.startswith("medseg")]]
    saved = {}
    for name in names:
        lg = logging.getLogger(name)
        saved[name] = (lg.level, lg.propagate, list(lg.handlers))
    yield
    for name, (level, propagate, handlers) in saved.items():
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.propagate = propagate
        lg.handlers[:] = handlers

