"""The real pipeline at tiny settings, through the command line as a user runs it."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import TINY_ARGS, run_cli

TINY = TINY_ARGS  # kept under this name: other modules import it


@pytest.mark.slow
def test_synth_train_infer_evaluate_track(tmp_path):
    run_cli(
        "synth",
        "--out",
        "data",
        "--cases",
        "5",
        "--size",
        "32",
        "--seed",
        "1",
        "--dicom",
        cwd=tmp_path,
        check=True,
    )
    data = tmp_path / "data"
    spec = json.loads((data / "dataset.json").read_text())
    assert spec["numTraining"] == 4
    assert spec["numTest"] == 1

    proc = run_cli(
        "train", "--data", "data", "--epochs", "2", "--out", "run", *TINY, cwd=tmp_path, check=True
    )
    assert "bundle:" in proc.stdout
    # one log, in medseg's format: MLflow's own INFO lines (its database set-up, its signature check)
    # are not printed in MLflow's format between medseg's
    assert not re.search(r"^\d{4}/\d\d/\d\d .* INFO mlflow", proc.stderr, re.M), proc.stderr
    bundle = tmp_path / "run" / "bundle"
    assert {p.name for p in bundle.iterdir()} >= {"model.safetensors", "config.yaml", "metadata.json"}
    # labels 0..K-1 are the network's channels as they are: nothing mapped (medseg.labels)
    assert "label_values" not in (bundle / "config.yaml").read_text()

    test_image = data / "imagesTs" / "case_004.nii.gz"
    dicom_case = data / "dicom" / "case_004"
    proc = run_cli(
        "infer",
        "--model",
        "run/bundle",
        "--input",
        str(test_image),
        str(dicom_case),
        "--output",
        "pred",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "same output name" in proc.stderr
    run_cli(
        "infer",
        "--model",
        "run/bundle",
        "--input",
        str(test_image),
        "--output",
        "pred",
        "--tta",
        cwd=tmp_path,
        check=True,
    )
    run_cli(
        "infer",
        "--model",
        "run/bundle",
        "--input",
        str(dicom_case),
        "--output",
        "pred_dicom",
        cwd=tmp_path,
        check=True,
    )
    for source, out in ((test_image, "pred"), (dicom_case, "pred_dicom")):
        mask = nib.load(tmp_path / out / "case_004_seg.nii.gz")
        from medseg.io import load_volume

        ref = load_volume(source)
        assert mask.shape == ref.shape
        np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-4)
    sidecar = json.loads((tmp_path / "pred" / "case_004_seg.json").read_text())
    assert sidecar["labels"]["1"] == "liver"

    # a second run skips existing outputs (an interrupted batch resumes)
    proc = run_cli(
        "infer",
        "--model",
        "run/bundle",
        "--input",
        str(test_image),
        "--output",
        "pred",
        cwd=tmp_path,
        check=True,
    )
    assert "1 skipped" in proc.stdout

    proc = run_cli(
        "evaluate", "--pred", "pred", "--ref", "data/labelsTs", "--out", "m.csv", cwd=tmp_path, check=True
    )
    assert "liver" in proc.stdout
    assert (tmp_path / "m.csv").exists()

    # MLflow (the real local store): params, per-epoch metrics, model and bundle artifacts
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model.name"] == "dynunet"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"bundle", "plan.yaml"} <= artifacts

    # the logged model URI works for inference too
    proc = run_cli(
        "infer",
        "--model",
        f"runs:/{run.info.run_id}/model",
        "--input",
        str(test_image),
        "--output",
        "pred2",
        cwd=tmp_path,
        check=True,
    )
    assert (tmp_path / "pred2" / "case_004_seg.nii.gz").exists()


@pytest.mark.slow
def test_python_api_predict(tiny_dataset, tmp_path):
    import medseg
    from medseg.config import load_config
    from medseg.io import load_volume
    from medseg.train import train

    cfg = load_config(None, [a for a in TINY if a != "--set"] + ["train.epochs=1", "tracking.enabled=false"])
    result = train(cfg, tiny_dataset, out_dir=tmp_path / "run")
    bundle = medseg.load_bundle(result.bundle)
    assert not bundle.network.training
    image = load_volume(next((tiny_dataset / "imagesTs").glob("*.nii.gz")))
    mask = bundle.predict(image)
    assert mask.shape == image.shape
    np.testing.assert_array_equal(mask.affine, image.affine)
    assert set(np.unique(mask.array)) <= {0, 1, 2, 3}


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli("convert", "nonexistent", "out.nii.gz", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "nonexistent" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("train", "--data", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "dataset.json" in proc.stderr


@pytest.mark.slow
def test_demo_command_at_tiny_settings(tmp_path):
    """`medseg demo` itself (the README's main job), with smaller numbers; its Dice equals `evaluate`'s."""
    import csv

    proc = run_cli(
        "demo",
        "--out",
        "demo",
        "--cases",
        "5",
        "--size",
        "24",
        "--set",
        "train.epochs=2",
        "--set",
        "model.features=4",
        "--set",
        "model.depth=2",
        "--set",
        "train.patch_size=[16,16,16]",
        "--set",
        "preprocess.spacing=[2.0,2.0,3.0]",
        "--set",
        "train.val_every=1",
        cwd=tmp_path,
        check=True,
    )
    assert "mean foreground Dice on 1 held-out cases" in proc.stdout
    assert "mlflow ui --backend-store-uri" in proc.stdout
    demo = tmp_path / "demo"
    from medseg.io import load_volume

    masks = sorted((demo / "predictions").glob("*_seg.nii.gz"))
    assert [m.name for m in masks] == ["case_004_seg.nii.gz"]
    image = load_volume(demo / "data" / "imagesTs" / "case_004.nii.gz")
    mask = nib.load(masks[0])
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    assert (demo / "predictions" / "report.html").exists()

    run_cli(
        "evaluate",
        "--pred",
        "demo/predictions",
        "--ref",
        "demo/data/labelsTs",
        "--out",
        "again.csv",
        cwd=tmp_path,
        check=True,
    )
    read = lambda p: [(r["case"], r["name"], r["dice"]) for r in csv.DictReader(p.open())]
    assert read(demo / "metrics.csv") == read(tmp_path / "again.csv")
