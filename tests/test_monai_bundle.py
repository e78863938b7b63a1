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

from tests.helpers import TINY_OVERRIDES, run_cli, train_untuned_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_dataset):
    """A one-epoch bundle with no post-processing (the tuning off: what it keeps depends on the training)."""
    root = tmp_path_factory.mktemp("monai_bundle")
    path = train_untuned_bundle(tiny_dataset, root / "run")
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

    from medseg.config import LabelPostprocess, load_config
    from medseg.monai_bundle import inference_config
    from medseg.predict import apply_label_biases

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
    assert skipped == ["postprocess.crf", "postprocess.largest_ties (exactly the largest component exported)"]
    parser = ConfigParser(config)  # MONAI instantiates every transform from the JSON
    parser["bundle_root"] = "."
    assert len(parser.get_parsed_content("postprocessing").transforms) == len(names)
    assert len(parser.get_parsed_content("preprocessing").transforms) == 9

    # a log-probability bias per label (medseg.tuning) is exported, as medseg applies it: the
    # probabilities scaled by exp(bias) and renormalised in the model grid, before resampling
    import torch

    biased = cfg.model_copy(deep=True)
    biased.postprocess.crf.enabled = False
    biased.postprocess.largest_ties = 1.0  # exactly the largest, as MONAI's transform keeps
    biased.postprocess.per_label = {2: LabelPostprocess(logit_bias=2.0)}
    config, skipped = inference_config(biased)
    assert skipped == []
    parser = ConfigParser(config)
    parser["bundle_root"] = "."
    chain = parser.get_parsed_content("postprocessing").transforms
    assert [type(t).__name__ for t in chain[:3]] == ["Activationsd", "Lambdad", "ToDeviced"]
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))[:, None, None, None].expand(3, 2, 2, 2).clone()
    out = chain[1](chain[0]({"pred": logits}))["pred"]
    expected = apply_label_biases(torch.tensor([0.6, 0.3, 0.1])[:, None, None, None].repeat(1, 2, 2, 2), {2: 2.0})
    torch.testing.assert_close(out, expected)
    assert int(out.argmax(0).unique()) == 2  # 0.1 * e^2 = 0.74 beats 0.6


def test_a_model_of_label_values_0_255_exports_masks_of_0_255():
    """The network's channels go back to the label files' values before the mask is saved, as
    ``medseg infer`` writes them (``medseg.labels``); labels 0..K-1 need no such step."""
    import torch
    from monai.bundle import ConfigParser

    from medseg.config import load_config
    from medseg.labels import channel_labels
    from medseg.monai_bundle import inference_config

    cfg = channel_labels(load_config(None, TINY_OVERRIDES), {0: "background", 255: "lesion"})
    cfg.preprocess.intensity.window = (-100.0, 200.0)
    cfg.preprocess.intensity.mean, cfg.preprocess.intensity.std = 50.0, 30.0
    config, _ = inference_config(cfg)
    names = [t["_target_"] for t in config["postprocessing"]["transforms"]]
    assert names[-2:] == ["MapLabelValued", "SaveImaged"]
    parser = ConfigParser(config)
    parser["bundle_root"] = "."
    to_values = parser.get_parsed_content("postprocessing").transforms[-2]
    mask = to_values({"pred": torch.tensor([[[[0.0, 1.0]]]])})["pred"]
    assert mask.flatten().tolist() == [0, 255]
    dense = channel_labels(load_config(None, TINY_OVERRIDES), {0: "background", 1: "lesion"})
    dense.preprocess.intensity = cfg.preprocess.intensity
    assert "MapLabelValued" not in json.dumps(inference_config(dense)[0])


@pytest.fixture(scope="module")
def two_channel_bundle(tmp_path_factory):
    """A one-epoch bundle of a 2-channel (CT + T2) nnU-Net dataset, and its test case as a user has it:
    nnU-Net files CASE_0000/CASE_0001, and as one 4D NIfTI stored in another orientation (LPI)."""
    from medseg.data import load_dataset
    from medseg.io import write_nifti
    from medseg.synthetic import make_case, make_dataset

    root = tmp_path_factory.mktemp("monai_bundle_2ch")
    data = root / "Dataset011_CTMR"
    make_dataset(
        data, cases=3, size=20, seed=4, test_fraction=0.34, modality="mr", channels=2, layout="nnunet"
    )
    spec = json.loads((data / "dataset.json").read_text())
    spec["channel_names"] = {"0": "CT", "1": "T2"}
    (data / "dataset.json").write_text(json.dumps(spec))
    dataset = load_dataset(data)
    for case in [*dataset.training, *dataset.test]:  # channel 0 becomes CT (HU) of the same anatomy
        ct, _ = make_case((4, int(case.name.split("_")[1])), size=20)
        write_nifti(ct, case.images[0], dtype="int16")
    # no tuning: a one-epoch model's near-ties would let it pick a bias that flips them (the export of
    # the tuned steps has its own test above)
    path = train_untuned_bundle(data, root / "run")
    images = root / "images"
    images.mkdir()
    case = load_dataset(data).test[0]
    for c, file in enumerate(case.images):
        nib.save(nib.load(file), images / f"{case.name}_{c:04d}.nii.gz")
    lpi = np.array([[0, -1], [1, -1], [2, -1]])
    flipped = [nib.load(f).as_reoriented(lpi) for f in case.images]
    stacked = np.stack([np.asarray(f.dataobj, dtype=np.float32) for f in flipped], axis=-1)
    nib.save(nib.Nifti1Image(stacked, flipped[0].affine), images / "lpi.nii.gz")
    return path, images, case.name


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_monai_bundle_of_a_two_channel_model_gives_medseg_infer_mask(two_channel_bundle, tmp_path):
    path, images, case = two_channel_bundle
    out = tmp_path / "monai_bundle"
    run_cli("export", "-m", str(path), "--format", "monai-bundle", "-o", str(out), cwd=tmp_path, check=True)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    image_format = meta["network_data_format"]["inputs"]["image"]
    assert image_format["num_channels"] == 2
    assert image_format["channel_def"] == {"0": "CT", "1": "T2"}
    assert "NAME_0000.nii.gz .. NAME_0001.nii.gz" in meta["medseg"]["inputs"]
    assert "4D NIfTI" in (out / "docs" / "README.md").read_text()
    assert "medseg" not in (out / "configs" / "inference.json").read_text()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [
            *(sys.executable, "-m", "monai.bundle", "run"),
            *("--config_file", str(out / "configs" / "inference.json"), "--bundle_root", str(out)),
            *("--dataset_dir", str(images), "--output_dir", str(tmp_path / "masks")),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == sorted(
        [f"{case}_seg.nii.gz", "lpi_seg.nii.gz"]
    )

    run_cli("infer", "-m", str(path), "-i", str(images), "-o", "medseg_masks", "--no-report",
            cwd=tmp_path, check=True)  # fmt: skip
    for stem in (case, "lpi"):
        expected = nib.load(tmp_path / "medseg_masks" / f"{stem}_seg.nii.gz")
        got = nib.load(tmp_path / "masks" / f"{stem}_seg.nii.gz")
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.affine, expected.affine, atol=1e-4)
        want = np.asarray(expected.dataobj).astype(np.uint8)
        assert want.max() > 0, stem  # a real mask, not all background
        mask = np.asarray(got.dataobj).astype(np.uint8)
        for label in sorted((set(np.unique(want)) | set(np.unique(mask))) - {0}):
            assert _dice(mask, want, label) >= 0.99, (stem, label)
