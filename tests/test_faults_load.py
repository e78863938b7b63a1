"""Issue 11, the rest: every channel in the memory preflight, the output lock on every torchrun rank,
a SIGTERM before the training loop, and one ``medseg infer`` over a folder of mixed and broken studies
(the small load test)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from medseg.errors import InputError
from medseg.io import Volume, write_nifti
from medseg.io.nifti import write_nifti_channels
from medseg.locks import LOCK_NAME
from tests.helpers import TINY_ARGS, run_torchrun

TINY = ["train.patch_size=[16,16,16]", "model.features=4", "model.depth=2", "preprocess.spacing=[2,2,3]"]


def _volume(shape=(64, 64, 32)) -> Volume:
    return Volume(np.zeros(shape, np.float32), np.diag([1.0, 1.0, 1.5, 1.0]))


# ----------------------------------------------------------------------------- preflight: every channel


def test_preflight_counts_every_channel_of_a_case(tmp_path):
    """The estimate counted the first channel file only: a 4-channel MR case was sized as one channel."""
    from medseg.io.preflight import preflight

    one = write_nifti(_volume(), tmp_path / "one.nii.gz")
    files = [write_nifti(_volume(), tmp_path / f"case_{c:04d}.nii.gz") for c in range(3)]
    four_d = write_nifti_channels([_volume() for _ in range(3)], tmp_path / "four_d.nii.gz")
    settings = {"max_memory": 2**40, "spacing": (2.0, 2.0, 3.0), "n_classes": 3, "overhead_bytes": 0}
    single = preflight(one, **settings).parts
    split = preflight(files, n_channels=3, **settings).parts
    stacked = preflight(four_d, n_channels=3, **settings).parts
    assert split["read"] == 3 * single["read"]
    assert split["model grid"] == 3 * single["model grid"]
    # the network's output has one channel per class, whatever the input's
    assert split["network output"] == single["network output"]
    assert split["back to native grid"] == single["back to native grid"]
    assert stacked == split  # a 4D file and one file per channel are the same case
    # at least the model's in_channels are counted, even from one header
    assert preflight(one, n_channels=3, **settings).parts["model grid"] == split["model grid"]


def test_multichannel_case_over_budget_is_refused_in_the_batch(tmp_path):
    """A two-channel case whose first channel alone fits the budget, but not both: refused with the estimate."""
    import torch

    from medseg.batch import run_inference
    from medseg.bundle import load_bundle, save_bundle
    from medseg.config import load_config
    from medseg.io.preflight import preflight, preflight_inference
    from medseg.models import build_model

    cfg = load_config(
        None, [*TINY, "labels={0: bg, 1: a}", "model.in_channels=2", "preprocess.intensity.kind=mr"]
    )
    torch.manual_seed(0)
    save_bundle(tmp_path / "bundle", build_model(cfg.model, out_channels=2), cfg, {})
    bundle = load_bundle(tmp_path / "bundle")
    inputs = tmp_path / "in"
    files = [write_nifti(_volume((96, 96, 64)), inputs / f"mr_{c:04d}.nii.gz") for c in range(2)]
    both = preflight_inference(files, [bundle], max_memory=2**40).total
    first = preflight(
        files[0], max_memory=2**40, spacing=(2.0, 2.0, 3.0), n_classes=2, patch_size=(16, 16, 16), features=4
    ).total
    assert both > first
    budget = (both + first) // 2
    with pytest.raises(InputError, match="2 channels of 96x96x64 voxels"):
        preflight_inference(files, [bundle], max_memory=budget)
    summary = run_inference([bundle], [inputs], tmp_path / "out", max_memory=budget, report=False)
    assert summary.written == []
    assert [p.name for p, _ in summary.failed] == ["mr_0000.nii.gz"]
    assert "more than the memory limit" in summary.failed[0][1]
    # with the budget of both channels, the case is segmented
    summary = run_inference([bundle], [inputs], tmp_path / "out", max_memory=both + 2**20, report=False)
    assert [p.name for p in summary.written] == ["mr_seg.nii.gz"]


# ----------------------------------------------------------------------------- load: one batch, mixed and broken


@pytest.mark.slow
def test_one_batch_of_twenty_mixed_studies_two_broken(tmp_path):
    """benchmarks/load_test.py at 20 studies: every valid one exported on its own grid, every broken one
    listed with its reason in the report and on stderr, exit code 1 (the 200-study run is the benchmark)."""
    from benchmarks.load_test import load_test, untrained_bundle

    record = load_test(
        tmp_path, n_studies=20, n_broken=2, bundle=untrained_bundle(tmp_path), results=tmp_path / "load.json"
    )
    assert record["exit_code"] == 1
    assert sorted(record["broken"].values()) == ["truncated_gzip", "zero_byte"]
    assert len(record["orientations"]) == 5
    for name, check in record["checks"].items():
        assert check["passed"], (name, check["problems"])
    # the memory was sampled per case (the figure itself is the benchmark's, on a quiet machine)
    assert {"10", "20"} <= set(record["rss_at_case_mib"])
    outputs = {p.name for p in (tmp_path / "out").iterdir()}
    assert len([n for n in outputs if n.endswith("_seg.json")]) == 18


# ----------------------------------------------------------------------------- the output lock on every rank


def _tiny_bundle_and_inputs(tmp_path) -> None:
    from benchmarks.load_test import untrained_bundle
    from medseg.synthetic import make_case

    untrained_bundle(tmp_path)
    for i in range(3):
        write_nifti(make_case(i, size=16)[0], tmp_path / "in" / f"case{i}.nii.gz")


@pytest.mark.slow
def test_distributed_infer_into_a_held_folder_is_refused_on_every_rank(tmp_path):
    """Only rank 0 took the lock: a second torchrun job's rank 1 wrote its cases into the held folder."""
    from medseg.locks import exclusive

    _tiny_bundle_and_inputs(tmp_path)
    with exclusive(tmp_path / "out", what="inference"):
        proc = run_torchrun("infer", "-m", "bundle", "-i", "in", "-o", "out", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode != 0
    # one refusal from each rank (two ranks' stderr lines can land on one line of the captured output)
    assert proc.stderr.count("another inference is using this folder") == 2, proc.stderr
    assert f"PID {os.getpid()}" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # nothing written, lock released


@pytest.mark.slow
def test_distributed_infer_shares_one_lock_and_releases_it_when_all_ranks_are_done(tmp_path):
    _tiny_bundle_and_inputs(tmp_path)
    proc = run_torchrun(
        "infer", "-m", "bundle", "-i", "in", "-o", "out", "--device", "cpu", "--no-report", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*_seg.json")) == [f"case{i}_seg.json" for i in range(3)]
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_distributed_train_into_a_held_run_folder_is_refused_on_every_rank(tiny_dataset, tmp_path):
    from medseg.locks import exclusive

    with exclusive(tmp_path / "run", what="training run"):
        proc = run_torchrun(
            "train",
            "--data",
            str(tiny_dataset),
            "--out",
            "run",
            "--epochs",
            "1",
            *TINY_ARGS,
            "--set",
            "train.device=cpu",
            "--set",
            "tracking.enabled=false",
            cwd=tmp_path,
        )
    assert proc.returncode != 0
    assert proc.stderr.count("another training run is using this folder") == 2, proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


# ----------------------------------------------------------------------------- train: SIGTERM before the loop


@pytest.mark.slow
def test_sigterm_between_the_mlflow_run_start_and_the_loop_ends_the_run_killed(
    tiny_dataset, tmp_path, monkeypatch
):
    """A SIGTERM before the loop left the MLflow run RUNNING for ever: it ends KILLED, exit 143's error."""
    import signal

    import mlflow

    import medseg.train as train_module
    from medseg.config import load_config

    prepare = train_module._prepare

    def prepare_then_sigterm(*args, **kwargs):  # the signal lands once the MLflow run has started
        os.kill(os.getpid(), signal.SIGTERM)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(train_module, "_prepare", prepare_then_sigterm)
    cfg = load_config(None, [*TINY, "train.epochs=1"])
    with pytest.raises(train_module.TrainingStoppedError, match="before training began") as err:
        train_module.train(cfg, tiny_dataset, out_dir=tmp_path / "run")
    assert err.value.exit_code == 143
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
