"""MLflow in depth, against a real ``mlflow server`` process on 127.0.0.1 (sqlite + its own artifacts)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import run_cli

TINY = [
    "--epochs",
    "2",
    *("--set", "preprocess.spacing=[2.0, 2.0, 3.0]"),
    *("--set", "train.patch_size=[16, 16, 16]"),
    *("--set", "model.features=4"),
    *("--set", "model.depth=2"),
    *("--set", "train.val_every=1"),
    *("--set", "augment.samples_per_volume=1"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--serve-artifacts",
        ],
        cwd=store,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            assert proc.poll() is None, "mlflow server exited at start"
            assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
            time.sleep(0.5)
    yield uri, store
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a loaded machine: gunicorn's workers may not stop in time
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_train_against_real_server(tiny_dataset, tmp_path, mlflow_server, monkeypatch):
    uri, store = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    proc = run_cli(
        "train",
        "--data",
        str(tiny_dataset),
        "--out",
        "run",
        *TINY,
        *("--set", "tracking.registered_model_name=tiny_seg"),
        cwd=tmp_path,
        check=True,
    )
    assert "NOT logged" not in proc.stderr

    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    params = run.data.params
    # the flattened config and plan, the fingerprint, the versions
    assert params["model.name"] == "dynunet"
    assert params["train.patch_size"] == "[16.0, 16.0, 16.0]"
    assert params["preprocess.intensity.kind"] == "ct"
    assert params["preprocess.intensity.window"] != "None"  # planned from the foreground
    assert len(params["fingerprint_hash"]) == 16
    for package in ("torch", "monai", "mlflow"):
        assert params[f"version.{package}"]
    metrics = run.data.metrics
    for key in ("train_loss", "lr", "samples_per_s", "data_wait_fraction", "val_dice", "val_dice_liver"):
        assert key in metrics, key
        assert len(client.get_metric_history(run.info.run_id, key)) == 2
    assert any(k.startswith("val_hd95_") for k in metrics)
    assert any(k.startswith("val_nsd_") for k in metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "plan.yaml",
        "plan.txt",
        "splits.json",
        "fingerprint.json",
        "curves.png",
        "bundle",
        "overlays",
    } <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "bundle")} >= {
        "bundle/model.safetensors",
        "bundle/config.yaml",
    }
    # the artifacts went through the server into its own folder
    assert any((store / "artifacts").rglob("model.safetensors"))

    # the logged model has a signature, is registered, and serves `medseg infer --model models:/...`
    model_info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
    assert model_info.signature is not None
    versions = client.search_model_versions("name='tiny_seg'")
    assert [v.version for v in versions] == ["1"]
    image = next((tiny_dataset / "imagesTs").iterdir())
    run_cli(
        "infer",
        "--model",
        "models:/tiny_seg/1",
        "--input",
        str(image),
        "--output",
        "pred",
        cwd=tmp_path,
        check=True,
    )
    assert any((tmp_path / "pred").glob("*_seg.nii.gz"))


def test_unreachable_server_fails_fast(tiny_dataset, tmp_path, monkeypatch):
    port = _free_port()  # closed: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    # MLflow's own retries held one call for 246 s here: the process limit below turns a hang into a failure
    proc = run_cli("train", "--data", str(tiny_dataset), "--out", "run", *TINY, cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    assert "cannot be reached" in lines[0]
    assert not (tmp_path / "run" / "fingerprint.json").exists(), "no work before the server check"


@pytest.mark.timeout(120)  # unbounded, MLflow's own retries would hold this for about 250 s
def test_server_lost_mid_run_goes_offline_and_says_what_was_not_logged(caplog, monkeypatch):
    from medseg.config import TrackingConfig
    from medseg.tracking import Tracker

    # a run whose server has gone away: the port is closed now
    for key in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    ):
        monkeypatch.delenv(key, raising=False)
    tracker = Tracker(
        TrackingConfig(uri=f"http://127.0.0.1:{_free_port()}", http_retries=1, http_timeout_s=5)
    )
    tracker.run_id = "0" * 32
    seen = []
    real = tracker.client.log_batch

    def log_batch(*args, **kwargs):  # what MLflow reads during the call
        seen.append(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", log_batch)
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    assert seen == ["1"]  # the bound applies during the call ...
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # ... and is gone after it
    assert tracker.offline
    tracker.log_metrics({"train_loss": 0.5}, step=2)  # not attempted: training is not held up
    tracker.log_artifact(__file__)
    tracker.end()
    assert tracker.not_logged[:3] == [
        "metrics of step 1",
        "metrics of step 2",
        "artifact test_mlflow_server.py",
    ]
    assert "NOT logged" in caplog.text
