"""Batch inference as a user runs it: NIfTI and DICOM inputs, TTA, ensembles, every post-processing option,
probabilities and entropy, resume, a failing case, ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medseg.io import load_volume
from tests.conftest import run_cli

TINY = [
    "preprocess.spacing=[2.0, 2.0, 3.0]",
    "train.patch_size=[16, 16, 16]",
    "model.features=4",
    "model.depth=2",
    "train.val_every=1",
    "augment.samples_per_volume=1",
    "train.epochs=1",
    "tracking.enabled=false",
]

ALL_POSTPROCESSING = {
    "keep_largest": True,
    "components": 1,
    "largest_of": "label",
    "min_volume_mm3": 20.0,
    "fill_holes": True,
    "connectivity": 26,
    "per_label": {2: {"components": 2}},
    "crf": {"enabled": True, "iterations": 2},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Decathlon folder with DICOM copies of every image, and two tiny bundles (an ensemble)."""
    from medseg.config import load_config
    from medseg.synthetic import make_dataset
    from medseg.train import train

    root = tmp_path_factory.mktemp("infer_batch")
    make_dataset(root / "data", cases=5, size=32, seed=4, test_fraction=0.4, dicom=True)
    bundles = []
    for seed in (0, 1):
        cfg = load_config(None, [*TINY, f"seed={seed}"])
        bundle = train(cfg, root / "data", out_dir=root / f"run{seed}").bundle
        # every post-processing option on, in the bundle's own config (as a user would set it)
        tree = yaml.safe_load((bundle / "config.yaml").read_text())
        tree["postprocess"] = ALL_POSTPROCESSING
        (bundle / "config.yaml").write_text(yaml.safe_dump(tree))
        bundles.append(bundle)
    return root, bundles


@pytest.mark.slow
def test_nifti_and_dicom_with_tta_ensemble_crf_and_all_postprocessing(trained, tmp_path):
    root, (b0, b1) = trained
    data = root / "data"
    images = sorted((data / "imagesTs").glob("*.nii.gz"))
    # one NIfTI file and one DICOM series folder (another case) in the same batch
    sources = [images[0], data / "dicom" / images[1].name.replace(".nii.gz", "")]
    common = ["--model", str(b0), "--model", str(b1), "--tta", "--crf", "--save-probabilities"]
    run_cli("infer", *common, "--input", *map(str, sources), "--output", "pred", cwd=tmp_path, check=True)
    for source in sources:
        ref = load_volume(source)
        stem = source.name.replace(".nii.gz", "")
        mask = nib.load(tmp_path / "pred" / f"{stem}_seg.nii.gz")
        assert mask.shape == ref.shape
        np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 3}
        sidecar = json.loads((tmp_path / "pred" / f"{stem}_seg.json").read_text())
        assert sidecar["tta"] is True
        assert sidecar["crf"] is True
        assert len(sidecar["model"]) == 2
        assert 0.0 <= sidecar["tta_disagreement"] <= 1.0
        assert set(sidecar["timings_s"]) >= {
            "load_s",
            "preprocess_s",
            "network_s",
            "crf_s",
            "invert_s",
            "postprocess_s",
            "write_s",
        }
        probs = [nib.load(tmp_path / "pred" / f"{stem}_seg_prob_{k}.nii.gz") for k in (1, 2, 3)]
        entropy = nib.load(tmp_path / "pred" / f"{stem}_seg_entropy.nii.gz")
        for img in (*probs, entropy):
            assert img.shape == ref.shape
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
        p = np.stack([np.asarray(i.dataobj) for i in probs])
        assert p.min() >= 0.0
        assert p.sum(axis=0).max() <= 1.0 + 1e-2
        e = np.asarray(entropy.dataobj)
        assert e.min() >= 0.0
        assert e.max() <= 1.0 + 1e-5
    report = (tmp_path / "pred" / "report.html").read_text()
    assert all(s.name.replace(".nii.gz", "") in report for s in sources)


@pytest.mark.slow
def test_interrupted_batch_resumes_and_a_failing_case_goes_on(trained, tmp_path):
    from medseg.batch import run_inference
    from medseg.bundle import load_bundle

    root, (b0, _) = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in sorted((root / "data" / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(p, inputs / p.name)
    good = sorted(inputs.glob("*.nii.gz"))
    # an interrupted batch: the first case was written, the second not
    run_inference([load_bundle(b0)], [good[0]], tmp_path / "out")
    first = tmp_path / "out" / good[0].name.replace(".nii.gz", "_seg.nii.gz")
    mtime = first.stat().st_mtime_ns
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not a complete gzip stream")
    proc = run_cli("infer", "--model", str(b0), "--input", str(inputs), "--output", "out", cwd=tmp_path)
    assert proc.returncode == 1
    assert "1 written, 1 skipped (done), 1 failed" in proc.stdout
    assert "broken.nii.gz" in proc.stderr
    assert first.stat().st_mtime_ns == mtime  # skipped, not rewritten
    assert (tmp_path / "out" / good[1].name.replace(".nii.gz", "_seg.nii.gz")).exists()
    assert not list((tmp_path / "out").glob(".*partial*"))  # no partial files left behind
    report = (tmp_path / "out" / "report.html").read_text()
    assert "broken.nii.gz" in report  # the failure is in the QC report too
    # overwrite replaces existing masks
    (inputs / "broken.nii.gz").unlink()
    summary = run_inference([load_bundle(b0)], [inputs], tmp_path / "out", overwrite=True)
    assert (len(summary.written), len(summary.skipped), len(summary.failed)) == (2, 0, 0)
    assert first.stat().st_mtime_ns != mtime


@pytest.mark.slow
def test_cases_split_across_ranks(trained, tmp_path, monkeypatch):
    from medseg.batch import run_inference
    from medseg.bundle import load_bundle

    root, (b0, _) = trained
    images = sorted((root / "data" / "imagesTr").glob("*.nii.gz"))[:3]
    bundle = load_bundle(b0)
    written = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        summary = run_inference([bundle], images, tmp_path / "out")
        assert (summary.rank, summary.world_size) == (rank, 2)
        written.append({p.name for p in summary.written})
    assert len(written[0]) == 2
    assert len(written[1]) == 1
    assert not written[0] & written[1]


@pytest.mark.slow
def test_inference_options_and_cpu_bf16(trained):
    """Probabilities, not argmax masks: a 1-epoch model may predict only background, which would let
    mask comparisons pass whatever the options did."""
    from medseg.bundle import load_bundle
    from medseg.predict import predict_volume

    root, (b0, _) = trained
    bundle = load_bundle(b0)
    image = load_volume(sorted((root / "data" / "imagesTs").glob("*.nii.gz"))[0])

    def probabilities(volume, **options):
        pred = predict_volume([bundle], volume, postprocess=False, crf=False, probabilities=True, **options)
        assert pred.mask.shape == volume.shape
        return pred.probabilities.astype(np.float32)

    base = probabilities(image, precision="fp32")
    assert base[1:].max() > 0.05
    assert base.std(axis=(1, 2, 3)).min() > 1e-3  # every class varies over the volume: not a constant
    # bf16 autocast: the same probabilities up to bf16 rounding
    bf16 = probabilities(image, cpu_bf16=True, precision="auto")
    assert np.abs(bf16 - base).max() < 0.05
    assert np.abs(bf16 - base).mean() < 5e-3
    assert np.abs(bf16 - base).max() > 0  # and it did run in another precision
    # another blend mode and overlap change the stitching, and only a little
    constant = probabilities(image, precision="fp32", blend_mode="constant", overlap=0.5)
    assert np.abs(constant - base).max() > 1e-3
    assert np.abs(constant - base).mean() < 0.05
    # the DICOM copy of the scan gives the same probabilities as the NIfTI (int16 HU storage aside)
    dicom = load_volume(root / "data" / "dicom" / image.source.split("/")[-1].replace(".nii.gz", ""))
    np.testing.assert_allclose(dicom.affine, image.affine, atol=1e-3)
    from_dicom = probabilities(dicom, precision="fp32")
    assert np.abs(from_dicom - base).max() < 0.02


@pytest.mark.gpu
def test_windows_on_gpu_accumulation_on_cpu():
    import torch

    from medseg.predict import sliding_window_logits

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    net = torch.nn.Conv3d(1, 3, 3, padding=1).cuda().eval()
    image = torch.randn(1, 40, 36, 30)
    split = sliding_window_logits(net, image, roi_size=(16, 16, 16), device="cuda", accumulate_on_cpu=True)
    whole = sliding_window_logits(net, image, roi_size=(16, 16, 16), device="cuda", accumulate_on_cpu=False)
    assert split.device.type == "cpu"
    torch.testing.assert_close(split.float(), whole.float(), atol=2e-3, rtol=0)


@pytest.mark.slow
def test_stage_timings_and_report_go_to_mlflow(trained, tmp_path):
    import mlflow

    from medseg.batch import run_inference
    from medseg.bundle import load_bundle
    from medseg.config import TrackingConfig
    from medseg.tracking import Tracker

    root, (b0, _) = trained
    images = sorted((root / "data" / "imagesTs").glob("*.nii.gz"))
    tracker = Tracker(TrackingConfig(experiment="inference"))
    tracker.start(run_name="batch")
    run_inference([load_bundle(b0)], images, tmp_path / "out", tracker=tracker, report=True)
    tracker.end()
    client = mlflow.MlflowClient()
    history = client.get_metric_history(tracker.run_id, "infer_network_s")
    assert [m.step for m in history] == [0, 1]
    assert client.get_metric_history(tracker.run_id, "infer_write_s")
    assert [a.path for a in client.list_artifacts(tracker.run_id, "inference")] == ["inference/report.html"]


def test_folder_of_fold_bundles_is_an_ensemble(tmp_path):
    from medseg.batch import expand_models
    from medseg.errors import InputError

    for fold in (0, 1):
        bundle = tmp_path / "model" / f"fold_{fold}" / "bundle"
        bundle.mkdir(parents=True)
        (bundle / "model.safetensors").write_bytes(b"")
        (bundle / "config.yaml").write_text("{}")
    (tmp_path / "model" / "notes").mkdir()
    found = expand_models([tmp_path / "model"])
    assert [Path(p).parent.name for p in found] == ["fold_0", "fold_1"]
    assert expand_models([found[0], "runs:/abc/model"]) == [found[0], "runs:/abc/model"]
    with pytest.raises(InputError, match="fold bundles"):
        expand_models([tmp_path / "model" / "notes"])


def test_no_crf_overrides_the_bundles_crf(trained, tmp_path):
    """The bundle's config switches the CRF on; ``--no-crf`` runs without it (and says so in the
    sidecar), as a user who sees the CRF trim a structure would run it."""
    root, (b0, _) = trained
    image = sorted((root / "data" / "imagesTs").glob("*.nii.gz"))[0]
    proc = run_cli("infer", "--model", str(b0), "--input", str(image), "--output", "pred", "--no-crf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads(next((tmp_path / "pred").glob("*_seg.json")).read_text())
    assert sidecar["crf"] is False
    assert "crf_s" not in sidecar["timings_s"]


def test_tuning_decides_flip_tta_and_inference_follows_it(trained, tmp_path, caplog, monkeypatch):
    """Validation tuning tries flip TTA (when the time left allows) and stores its verdict as
    ``infer.tta``; inference runs it by default and ``--no-tta`` leaves it out."""
    import logging
    from types import SimpleNamespace

    from medseg import load_bundle
    from medseg.tuning import tune_bundle

    root, (b0, _) = trained
    data = root / "data"
    val = [SimpleNamespace(image=p, label=data / "labelsTr" / p.name) for p in sorted((data / "imagesTr").glob("*.nii.gz"))[:2]]
    bundle = tmp_path / "bundle"
    shutil.copytree(b0, bundle)
    # TTA is tried only when the bundle does not run it already (its training's own tuning may have kept it)
    tree = yaml.safe_load((bundle / "config.yaml").read_text())
    tree["infer"].pop("tta", None)
    tree["infer"].pop("tta_flips", None)
    (bundle / "config.yaml").write_text(yaml.safe_dump(tree))
    with caplog.at_level(logging.INFO, logger="medseg.tuning"):
        report = tune_bundle(bundle, val, time_left=0.0)  # no time: the 8 passes are not tried
    assert report is not None
    assert report.tta is None
    assert "flip TTA not tried" in caplog.text
    report = tune_bundle(bundle, val)
    assert report is not None
    assert report.tta in (True, False)
    assert [t.step for t in report.trials[:2]] == ["flip TTA (2 passes)", "flip TTA (8 passes)"]
    infer = load_bundle(bundle).config.infer
    assert infer.tta is report.tta
    assert infer.tta_flips == (report.tta_flips or 8)
    assert json.loads((bundle / "postprocess_tuning.json").read_text())["tta"] is report.tta

    # a bundle whose tuning kept it: TTA by default, --no-tta without it
    tree = yaml.safe_load((bundle / "config.yaml").read_text())
    tree["infer"]["tta"], tree["infer"]["tta_flips"] = True, 2
    (bundle / "config.yaml").write_text(yaml.safe_dump(tree))
    image = sorted((data / "imagesTs").glob("*.nii.gz"))[0]
    for flag, expected in (([], True), (["--no-tta"], False)):
        out = f"pred{len(flag)}"
        proc = run_cli("infer", "--model", str(bundle), "--input", str(image), "--output", out, *flag,
                       "--no-crf", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        sidecar = json.loads(next((tmp_path / out).glob("*_seg.json")).read_text())
        assert sidecar["tta"] is expected
        assert ("flip TTA on (2 passes)" in proc.stderr) is expected
        assert sidecar["options"].get("tta_flips") == (2 if expected else None)
    # the Python API follows the bundle too
    import medseg.predict

    asked: list[tuple[bool, int]] = []
    real = medseg.predict.flip_sets
    monkeypatch.setattr(medseg.predict, "flip_sets", lambda tta, n=8: asked.append((tta, n)) or real(tta, n))
    assert load_bundle(bundle).predict(image).array.shape == load_volume(image).shape
    load_bundle(bundle).predict(image, tta=False)
    assert asked[0] == (True, 2)
    assert asked[-1][0] is False
