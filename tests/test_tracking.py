"""Tracking without process-wide side effects: MlflowClient bound to one URI, nothing left in the
environment or in MLflow's globals, disabled means no MLflow at all, an unusable store is one line;
MLflow model URIs (runs:/, models:/NAME/VERSION, models:/NAME@ALIAS) resolved through the registry
and fetched into one reusable, size-capped cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from medseg.config import TrackingConfig
from medseg.errors import TrackingError
from tests.conftest import REPO, run_cli


def _bundle(path: Path, seed: int = 0) -> Path:
    """A small bundle folder with untrained weights (enough for storage and provenance)."""
    import torch

    from medseg.bundle import save_bundle
    from medseg.config import load_config
    from medseg.models import build_model

    cfg = load_config(
        None,
        [
            "preprocess.spacing=[2.0, 2.0, 3.0]",
            "preprocess.intensity.kind=zscore",
            "train.patch_size=[16, 16, 16]",
            "model.features=4",
            "model.depth=2",
        ],
    )
    cfg = cfg.model_copy(update={"labels": {0: "background", 1: "organ"}})
    torch.manual_seed(seed)
    return save_bundle(path, build_model(cfg.model, out_channels=2), cfg, {"note": "test"})


def test_disabled_tracking_imports_and_writes_nothing(tmp_path):
    code = (
        "import sys\n"
        "from medseg.config import TrackingConfig\n"
        "from medseg.tracking import Tracker\n"
        "t = Tracker(TrackingConfig(enabled=False))\n"
        "t.start(run_name='x'); t.log_params({'a': 1}); t.log_metrics({'m': 1.0}, step=1)\n"
        "t.log_artifact(__file__ if '__file__' in dir() else '.'); t.log_bundle_model('.'); t.end()\n"
        "assert t.logged_steps('m') == set()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'sqlalchemy', 'pandas')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns


def test_tracker_leaves_no_process_wide_state(tmp_path, monkeypatch):
    import mlflow

    from medseg.tracking import Tracker

    monkeypatch.chdir(tmp_path)  # MLflow puts a new experiment's artifacts in ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    env_before = dict(os.environ)
    default_before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    tracker = Tracker(TrackingConfig(uri=uri, experiment="scoped"))
    tracker.start(run_name="r")
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 0.5}, step=1)
    (tmp_path / "note.txt").write_text("x")
    tracker.log_artifact(tmp_path / "note.txt")
    assert dict(os.environ) == env_before  # during the run too
    tracker.end()
    assert dict(os.environ) == env_before
    assert mlflow.get_tracking_uri() == default_before
    assert mlflow.active_run() is None
    run = mlflow.MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a": "1"}
    assert run.data.metrics == {"loss": 0.5}
    assert tracker.logged_steps("loss") == {1}
    assert not hasattr(Tracker, "set_tags")


_TELEMETRY_PROBE = """
import os, sys
from medseg.cli import main
main(sys.argv[1:])
print("telemetry:", os.environ.get("MLFLOW_DISABLE_TELEMETRY"))
if os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true":  # importing MLflow with it on would call out
    import mlflow.telemetry
    from mlflow.telemetry.utils import is_telemetry_disabled
    print("telemetry:", is_telemetry_disabled(), mlflow.telemetry.get_telemetry_client())
"""


def _said(stdout: str) -> list[str]:
    return [line.removeprefix("telemetry: ") for line in stdout.splitlines() if line.startswith("telemetry: ")]


def test_the_command_line_turns_mlflow_usage_telemetry_off_unless_the_user_said(tmp_path):
    """MLflow 3 fetches a config from the internet at import and reports API usage: the CLI sets
    MLFLOW_DISABLE_TELEMETRY=true where the environment does not say; a user's value is kept. Run in
    an environment without the CI and pytest variables that MLflow itself reads as "do not report"."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "XDG_CACHE_HOME", "MLFLOW_TRACKING_URI")
           if key in os.environ}
    env["PYTHONPATH"] = str(REPO)
    args = ["check", str(tmp_path / "no_dataset")]  # any command: one line on stderr, exit 2
    plain = subprocess.run([sys.executable, "-c", _TELEMETRY_PROBE, *args], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, check=True)
    assert _said(plain.stdout) == ["true", "True None"]
    kept = subprocess.run([sys.executable, "-c", _TELEMETRY_PROBE, *args],
                          env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=True)
    assert _said(kept.stdout) == ["false"]


def test_a_local_store_keeps_its_artifacts_beside_its_database(tmp_path, monkeypatch):
    from medseg.tracking import Tracker

    elsewhere, store = tmp_path / "cwd", tmp_path / "store"
    elsewhere.mkdir()
    store.mkdir()
    monkeypatch.chdir(elsewhere)
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{store / 'mlflow.db'}", experiment="beside"))
    tracker.start(run_name="r")
    (tmp_path / "note.txt").write_text("x")
    tracker.log_artifact(tmp_path / "note.txt")
    tracker.end()
    assert list(elsewhere.iterdir()) == []  # not ./mlruns of the folder the run started in
    assert list(store.glob("mlruns/*/artifacts/note.txt"))  # <run id>/artifacts


def test_bounded_http_is_scoped_and_keeps_user_values(monkeypatch):
    from medseg.tracking import bounded_http

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    with bounded_http(TrackingConfig(http_timeout_s=3, http_retries=1)):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"  # the user's choice wins
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"


def _read_only_uri(tmp_path: Path) -> str:
    import mlflow

    db = tmp_path / "ro.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()  # a valid store, schema created
    return f"sqlite:///file:{db}?mode=ro&uri=true"


def test_read_only_store_is_one_error_line(tmp_path, capfd, monkeypatch):
    from medseg.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    tracker = Tracker(TrackingConfig(uri=_read_only_uri(tmp_path), experiment="new"))
    capfd.readouterr()
    with pytest.raises(TrackingError, match="readonly database"):
        tracker.start(run_name="r")
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err
    assert "SQLAlchemy" not in out + err, err


def test_read_only_store_in_train_is_one_line(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _read_only_uri(tmp_path))
    proc = run_cli(
        "train", "--data", str(tiny_dataset), "--out", "run", "--epochs", "1", cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "readonly" in proc.stderr
    assert "tracking.enabled=false" in proc.stderr


def test_missing_store_folder_is_refused_before_mlflow(tmp_path):
    from medseg.tracking import Tracker

    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}"))
    with pytest.raises(TrackingError, match="does not exist"):
        tracker.start()
    assert not (tmp_path / "absent").exists()


@pytest.fixture
def registry(tmp_path):
    """A sqlite store with two runs that logged bundles, registered as versions 1 and 2 of "seg";
    alias "champion" points at version 1."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("reg", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model("seg")
    runs = []
    for seed in (0, 1):
        run = client.create_run(experiment)
        bundle = _bundle(tmp_path / f"b{seed}", seed=seed)
        client.log_artifacts(run.info.run_id, str(bundle), "bundle")
        client.create_model_version("seg", f"{run.info.artifact_uri}/bundle", run_id=run.info.run_id)
        runs.append(run.info.run_id)
    client.set_registered_model_alias("seg", "champion", "1")
    return uri, runs


def test_model_uris_resolve_through_the_registry(registry):
    from medseg.tracking import resolve_model_uri

    uri, (run1, run2) = registry
    assert resolve_model_uri("models:/seg@champion", tracking_uri=uri).run_id == run1
    assert resolve_model_uri("models:/seg@champion", tracking_uri=uri).version == "1"
    assert resolve_model_uri("models:/seg/2", tracking_uri=uri).run_id == run2
    assert resolve_model_uri("models:/seg/latest", tracking_uri=uri).version == "2"
    assert resolve_model_uri(f"runs:/{run2}/model", tracking_uri=uri).run_id == run2
    with pytest.raises(TrackingError, match="models:/seg@nobody"):
        resolve_model_uri("models:/seg@nobody", tracking_uri=uri)


def test_downloads_are_cached_by_run_and_leave_no_temp_folders(registry, tmp_path, monkeypatch):
    from medseg.bundle import bundle_hash, load_bundle, provenance
    from medseg.tracking import download_bundle

    uri, (run1, _) = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    temp = tmp_path / "systemp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    cache = tmp_path / "cache" / "medseg" / "models"

    bundle = load_bundle("models:/seg@champion")
    assert bundle.path == cache / f"{run1}-bundle"
    assert bundle_hash(bundle.path) == bundle_hash(tmp_path / "b0")
    again = load_bundle(f"runs:/{run1}/model")
    assert again.path == bundle.path  # one copy per run, reused
    info = provenance(bundle)
    assert info["model"] == "models:/seg@champion"
    assert info["model_version"] == "1"
    assert info["model_run_id"] == run1
    assert info["bundle_hash"] == bundle_hash(tmp_path / "b0")
    assert provenance(load_bundle(tmp_path / "b1"))["model"] == str((tmp_path / "b1").resolve())
    assert list(temp.iterdir()) == []  # nothing in the system temp folder

    # a failed download leaves nothing behind either
    import mlflow

    empty = mlflow.MlflowClient(uri).create_run("0").info.run_id
    with pytest.raises(TrackingError):
        download_bundle(f"runs:/{empty}/model")
    assert sorted(p.name for p in cache.iterdir()) == [f"{run1}-bundle"]
    assert list(temp.iterdir()) == []

    # the cache is capped: the least recently used bundle goes first
    path2, _ = download_bundle("models:/seg/2", max_cache_bytes=1)
    assert [p.name for p in cache.iterdir()] == [path2.name]


def test_train_cli_register_and_alias_flags(tmp_path):
    proc = run_cli("train", "--data", "x", "--alias", "champion", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--alias needs --register" in proc.stderr


def test_infer_sidecar_records_the_uri_version_and_bundle_hash(registry, tmp_path, tiny_dataset, monkeypatch):
    import json

    from medseg.bundle import bundle_hash

    uri, (run1, _) = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    image = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    run_cli("infer", "-m", "models:/seg@champion", "-i", str(image), "-o", "out", cwd=tmp_path, check=True)
    sidecar = json.loads(next((tmp_path / "out").glob("*_seg.json")).read_text())
    assert sidecar["model"] == ["models:/seg@champion"]  # not the cache folder
    record = sidecar["provenance"]
    assert record["medseg_version"]
    assert record["timestamp"].endswith("Z")
    assert record["models"] == [
        {
            "model": "models:/seg@champion",
            "bundle_hash": bundle_hash(tmp_path / "b0"),
            "model_run_id": run1,
            "model_name": "seg",
            "model_version": "1",
        }
    ]


def test_a_bundle_and_a_run_record_the_same_versions(tmp_path):
    """One collector: the bundle's metadata.json ``versions`` are the run's ``version.*`` parameters."""
    import json
    from importlib import metadata

    from medseg import __version__
    from medseg.tracking import package_versions

    versions = json.loads((_bundle(tmp_path / "bundle") / "metadata.json").read_text())["versions"]
    assert versions == package_versions()
    assert versions["medseg"] == __version__
    for name in ("torch", "monai", "numpy"):  # what mlflow_model.requirements pins a served model to
        assert versions[name] == metadata.version(name)
