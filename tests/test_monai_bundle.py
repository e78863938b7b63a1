"""`medseg export --format monai-bundle` writes a MONAI bundle that `python -m monai.bundle run` executes
on NIfTI files, giving the mask medseg gives (Dice >= 0.99) on the input's own grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import TINY_OVERRIDES, run_cli


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_dataset):
    """A one-epoch bundle (default post-processing: none)."""
    from medseg.config import load_config
    from medseg.train import train

    root = tmp_path_factory.mktemp("monai_bundle")
    cfg = load_config(None, [*TINY_OVERRIDES, "train.epochs=1", "tracking.enabled=false"])
    path = train(cfg, tiny_dataset, out_dir=root / "run").bundle
    # inputs: a test image as it is, and one stored in another orientation (LPI)
    images = root / "images"
    images.mkdir()
    for source in sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[:1]:
        img = nib.load(source)
        nib.save(img, images / source.name)
        flipped = img.as_reoriented(np.array([[0, -1], [1, -1], [2, -1]]))
        nib.save(
            nib.Nifti1Image(np.asarray(flipped.dataobj, dtype=np.float32), flipped.affine),
            images / "lpi.nii.gz",
        )
    return root, path, images


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    total = int(x.sum() + y.sum())
    return 1.0 if total == 0 else 2.0 * float((x & y).sum()) / total


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_monai_bundle_run_gives_medseg_mask(bundle, tmp_path):
    from medseg.bundle import load_bundle

    _, path, images = bundle
    out = tmp_path / "monai_bundle"
    proc = run_cli(
        "export", "-m", str(path), "--format", "monai-bundle", "-o", str(out), cwd=tmp_path, check=True
    )
    assert str(out) in proc.stdout
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.ts"):
        assert (out / name).is_file(), name
    inference = (out / "configs" / "inference.json").read_text()
    assert "medseg" not in inference  # MONAI and PyTorch alone run it
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["0"] == "background"
    assert meta["medseg"]["not_exported"] == []

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [
            *(sys.executable, "-m", "monai.bundle", "run"),
            *("--config_file", str(out / "configs" / "inference.json")),
            *(
                "--bundle_root",
                str(out),
                "--dataset_dir",
                str(images),
                "--output_dir",
                str(tmp_path / "masks"),
            ),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    medseg_bundle = load_bundle(path)
    labels = sorted(int(k) for k in medseg_bundle.labels if int(k) != 0)
    for image in sorted(images.glob("*.nii.gz")):
        stem = image.name[: -len(".nii.gz")]
        got = nib.load(tmp_path / "masks" / f"{stem}_seg.nii.gz")
        source = nib.load(image)
        assert got.shape == source.shape
        np.testing.assert_allclose(got.affine, source.affine, atol=1e-4)
        expected = medseg_bundle.predict(image).array
        assert expected.max() > 0  # a real mask, not all background
        mask = np.asarray(got.dataobj).astype(np.uint8)
        for label in labels:
            assert _dice(mask, expected, label) >= 0.99, (stem, label)


def test_export_refuses_a_folder_that_holds_files(bundle, tmp_path):
    _, path, _ = bundle
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("keep me")
    proc = run_cli("export", "-m", str(path), "--format", "monai-bundle", "-o", "taken", cwd=tmp_path)
    assert proc.returncode == 2
    assert "not empty" in proc.stderr
    assert (tmp_path / "taken" / "x.txt").read_text() == "keep me"


def test_post_processing_maps_to_monai_transforms_and_lists_what_it_cannot():
    from monai.bundle import ConfigParser

    from medseg.config import load_config
    from medseg.monai_bundle import inference_config

    cfg = load_config(
        None,
        [
            *TINY_OVERRIDES,
            "postprocess.keep_largest=true",
            "postprocess.fill_holes=true",
            "postprocess.min_volume_mm3=20",
            "postprocess.crf.enabled=true",
        ],
    ).model_copy(update={"labels": {0: "background", 1: "liver", 2: "spleen"}})
    cfg.preprocess.intensity.window = (-100.0, 200.0)
    cfg.preprocess.intensity.mean = 50.0
    cfg.preprocess.intensity.std = 30.0
    config, skipped = inference_config(cfg)
    names = [t["_target_"] for t in config["postprocessing"]["transforms"]]
    assert (
        names.index("RemoveSmallObjectsd")
        < names.index("KeepLargestConnectedComponentd")
        < names.index("FillHolesd")
    )
    assert skipped == ["postprocess.crf"]
    parser = ConfigParser(config)  # MONAI instantiates every transform from the JSON
    parser["bundle_root"] = "."
    assert len(parser.get_parsed_content("postprocessing").transforms) == len(names)
    assert len(parser.get_parsed_content("preprocessing").transforms) == 9
