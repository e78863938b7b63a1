"""Label values that are not 0..K-1 (a binary mask stored as 0/255, labels 0, 1, 2, 5): trained on
network channels 0..K-1, read and written with the values at every boundary (``medseg.labels``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml

from tests.helpers import TINY_OVERRIDES

SPLEEN_AS_5 = {0: "background", 1: "liver", 2: "kidney", 5: "spleen"}


def _relabelled(root: Path, lut: dict[int, int], labels: dict[int, str]) -> Path:
    """A tiny synthetic dataset (3 training cases, 1 test case with a DICOM series) whose label files
    and dataset.json hold ``lut``'s values instead of the phantom's 0..3."""
    from medseg.synthetic import make_dataset

    make_dataset(root, cases=4, size=24, seed=5, test_fraction=0.25, dicom=True)
    table = np.zeros(256, np.uint8)
    for old, new in lut.items():
        table[old] = new
    for path in [*root.glob("labelsTr/*.nii.gz"), *root.glob("labelsTs/*.nii.gz")]:
        img = nib.load(path)
        nib.save(nib.Nifti1Image(table[np.asarray(img.dataobj, dtype=np.uint8)], img.affine), path)
    spec = json.loads((root / "dataset.json").read_text())
    spec["labels"] = {str(k): v for k, v in labels.items()}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def _train(dataset: Path, out: Path, *, tune: bool = False) -> Path:
    from medseg.config import load_config
    from medseg.train import train

    overrides = [*TINY_OVERRIDES, "train.epochs=1", "tracking.enabled=false"]
    cfg = load_config(None, [*overrides, f"postprocess.tune_on_validation={str(tune).lower()}"])
    return train(cfg, dataset, out_dir=out).bundle


def _out_channels(bundle_dir: Path) -> int:
    from medseg.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    with torch.no_grad():
        return int(bundle.network(torch.zeros(1, 1, 16, 16, 16)).shape[1])


def _predicting(bundle_dir: Path, channel: int, out: Path) -> Path:
    """A copy of the bundle whose network calls every voxel ``channel`` (its last convolution's
    weights zeroed, the channel's bias raised): a one-epoch model may find nothing."""
    from medseg.bundle import load_bundle, save_bundle

    bundle = load_bundle(bundle_dir)
    # DynUNet's output convolution is its output block's (its deep-supervision heads come after it)
    head = getattr(getattr(bundle.network, "net", None), "output_block", bundle.network)
    last = [m for m in head.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[channel] = 10.0
    metadata = {k: v for k, v in bundle.metadata.items() if k != "versions"}
    return save_bundle(out, bundle.network, bundle.config, metadata)


@pytest.fixture(scope="module")
def binary_255(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, tuned bundle): every organ stored as 255, as ITK-SNAP and Slicer export binary masks."""
    root = tmp_path_factory.mktemp("binary_255")
    dataset = _relabelled(root / "data", {1: 255, 2: 255, 3: 255}, {0: "background", 255: "organs"})
    return dataset, _train(dataset, root / "run", tune=True)


@pytest.fixture(scope="module")
def spleen_as_5(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, bundle): labels 0, 1, 2, 5."""
    root = tmp_path_factory.mktemp("spleen_as_5")
    dataset = _relabelled(root / "data", {1: 1, 2: 2, 3: 5}, SPLEEN_AS_5)
    return dataset, _train(dataset, root / "run")


@pytest.mark.slow
def test_a_0_255_dataset_trains_two_channels_and_masks_come_back_0_255(binary_255, tmp_path):
    from medseg.bundle import load_bundle
    from medseg.cli import main
    from medseg.io import load_volume
    from tests.test_dicom_seg import seg_voxels
    from tests.test_rtstruct import rasterise

    dataset, bundle_dir = binary_255
    assert _out_channels(bundle_dir) == 2  # not 256
    config = yaml.safe_load((bundle_dir / "config.yaml").read_text())
    assert config["labels"] == {"0": "background", "1": "organs"}
    assert config["label_values"] == {"0": 0, "1": 255}
    assert load_bundle(bundle_dir).labels == {0: "background", 255: "organs"}
    tuning = json.loads((bundle_dir / "postprocess_tuning.json").read_text())
    assert set(tuning["final_dice"]) == {"255"}  # the tuning report names the label files' value
    assert {t["label"] for t in tuning["trials"]} <= {None, 255}

    forced = _predicting(bundle_dir, 1, tmp_path / "forced")
    image, dicom = dataset / "imagesTs" / "case_003.nii.gz", dataset / "dicom" / "case_003"
    for source, out in ((image, tmp_path / "nifti"), (dicom, tmp_path / "dicom")):
        args = ["infer", "-m", str(forced), "-i", str(source), "-o", str(out), "--save-probabilities"]
        assert main(args + (["--dicom-seg", "--rtstruct"] if source == dicom else [])) == 0
        mask = nib.load(out / "case_003_seg.nii.gz")
        values = set(np.unique(np.asarray(mask.dataobj)).tolist())
        assert 255 in values
        assert values <= {0, 255}
        ref = load_volume(source)
        assert mask.shape == ref.shape
        np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-4)
        assert json.loads((out / "case_003_seg.json").read_text())["labels"] == {"0": "background", "255": "organs"}
        assert '  255 ' in (out / "case_003_seg.itksnap.txt").read_text()
        assert "\n255 organs " in (out / "case_003_seg.ctbl").read_text()
        probability = np.asarray(nib.load(out / "case_003_seg_prob_255.nii.gz").dataobj)
        assert probability.max() > 0.99  # the organs' channel, named by its value
    stored = np.asarray(nib.load(tmp_path / "dicom" / "case_003_seg.nii.gz").dataobj)
    numbers, seg = seg_voxels(tmp_path / "dicom" / "case_003_seg.dcm", dicom)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organs"]
    np.testing.assert_array_equal(numbers == 1, stored == 255)
    rt = pydicom.dcmread(tmp_path / "dicom" / "case_003_seg_rtstruct.dcm")
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["organs"]
    assert rt.StructureSetROISequence[0].ROIGenerationDescription.endswith("label 255")
    assert set(rasterise(tmp_path / "dicom" / "case_003_seg_rtstruct.dcm", dicom)) == {"organs"}


@pytest.mark.slow
def test_labels_0_1_2_5_train_four_channels_and_evaluate_by_value(spleen_as_5, tmp_path):
    from medseg.bundle import load_bundle
    from medseg.cli import main
    from medseg.metrics import evaluate_folders

    dataset, bundle_dir = spleen_as_5
    assert _out_channels(bundle_dir) == 4  # not 6
    bundle = load_bundle(bundle_dir)
    assert bundle.config.labels == {0: "background", 1: "liver", 2: "kidney", 3: "spleen"}
    assert bundle.config.label_values == {0: 0, 1: 1, 2: 2, 3: 5}
    assert bundle.labels == SPLEEN_AS_5
    image = dataset / "imagesTs" / "case_003.nii.gz"
    assert set(np.unique(bundle.predict(image).array).tolist()) <= set(SPLEEN_AS_5)
    forced = load_bundle(_predicting(bundle_dir, 3, tmp_path / "forced"))
    spleen = set(np.unique(forced.predict(image).array).tolist())
    assert 5 in spleen  # channel 3 comes out as 5
    assert spleen <= {0, 5}

    # evaluate compares the masks with the references by value, named as dataset.json names them
    assert main(["infer", "-m", str(bundle_dir), "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "p")]) == 0
    rows = evaluate_folders(tmp_path / "p", dataset / "labelsTs", model=bundle_dir, labels_file=dataset / "dataset.json")
    assert {(r.label, r.name) for r in rows} == {(1, "liver"), (2, "kidney"), (5, "spleen")}
    assert all(r.ref_ml > 0 for r in rows)  # each reference label read, 5 among them

    # medseg tune reads the references onto the channels: value 5 is the spleen's channel 3
    tuned = tmp_path / "tuned"
    assert main(["tune", "-m", str(bundle_dir), "--data", str(dataset), "-o", str(tuned)]) == 0
    report = json.loads((tuned / "postprocess_tuning.json").read_text())
    assert set(report["baseline_dice"]) == {"1", "2", "5"}
    assert set(load_bundle(tuned).config.postprocess.per_label) <= {1, 2, 3}  # the bundle's config: channels
    assert load_bundle(tuned).labels == SPLEEN_AS_5


@pytest.mark.slow
def test_a_value_outside_the_labels_is_refused_naming_the_file(spleen_as_5, tmp_path):
    from medseg.errors import InputError
    from medseg.tuning import tune_on_dataset

    dataset = shutil.copytree(spleen_as_5[0], tmp_path / "data")
    label = sorted((dataset / "labelsTr").glob("*.nii.gz"))[0]
    img = nib.load(label)
    array = np.asarray(img.dataobj, dtype=np.uint8).copy()
    array[0, 0, 0] = 3  # channel 3's number, but no label's value
    nib.save(nib.Nifti1Image(array, img.affine), label)
    refused = rf"{label.name}: label map holds values \[3\] that are not among the declared labels \[0, 1, 2, 5\]"
    with pytest.raises(InputError, match=refused):
        _train(dataset, tmp_path / "run")
    with pytest.raises(InputError, match=refused):  # the references medseg tune reads, as well
        tune_on_dataset(spleen_as_5[1], dataset, tmp_path / "tuned")


def test_per_label_settings_are_given_by_value_and_stored_by_channel():
    from medseg.config import Config, config_from_dict, dump_config
    from medseg.errors import ConfigError
    from medseg.labels import channel_labels, channels_to_values, values_to_channels

    cfg = config_from_dict(
        {"postprocess": {"per_label": {5: {"keep_largest": True}}, "crf": {"skip_labels": [2]}}}
    )
    mapped = channel_labels(cfg, SPLEEN_AS_5)
    assert set(mapped.postprocess.per_label) == {3}
    assert mapped.postprocess.crf.skip_labels == [2]
    assert mapped.stored_labels() == SPLEEN_AS_5
    assert config_from_dict(yaml.safe_load(dump_config(mapped))) == mapped  # a bundle's config reads back
    with pytest.raises(ConfigError, match=r"postprocess.per_label: \[3\] are not label values"):
        channel_labels(config_from_dict({"postprocess": {"per_label": {3: {"fill_holes": True}}}}), SPLEEN_AS_5)
    with pytest.raises(ConfigError, match="label_values"):
        config_from_dict({"labels": {0: "a", 1: "b"}, "label_values": {0: 0, 1: 0}})
    stored = np.array([[[0, 1, 2, 5]]], np.uint8)
    channels = values_to_channels(stored, mapped.label_values or {})
    np.testing.assert_array_equal(channels, [[[0, 1, 2, 3]]])
    np.testing.assert_array_equal(channels_to_values(channels, mapped.label_values), stored)
    # labels 0..K-1: nothing mapped, the config as it was before label_values existed
    dense = channel_labels(Config(), {0: "background", 1: "liver"})
    assert dense.label_values is None
    assert "label_values" not in dump_config(dense)
    assert channels_to_values(channels, None) is channels


def test_an_ensemble_of_models_with_other_labels_is_refused(tmp_path):
    """Averaging a 0/255 model with a 0..3 model, or models whose labels differ, would mix organs:
    ``medseg infer`` refuses before anything loads, naming the model that differs."""
    from types import SimpleNamespace

    from medseg.batch import check_ensemble, run_inference
    from medseg.config import config_from_dict
    from medseg.errors import InputError
    from medseg.labels import channel_labels

    def model(name: str, labels: dict[int, str], **config) -> SimpleNamespace:
        cfg = channel_labels(config_from_dict(config), labels)
        return SimpleNamespace(labels=cfg.stored_labels(), config=cfg, source=name, path=tmp_path / name)

    organs = {0: "background", 255: "organs"}
    same = model("a", organs), model("b", organs)
    args = ([str(tmp_path / "in.nii.gz")], tmp_path / "out")
    # the labels, the channels they are on, the image channels: each must match the first model's
    for second, what in (
        (model("b", SPLEEN_AS_5), "labels"),
        (model("b", {0: "background", 1: "organs"}), "labels"),
        (model("b", organs, model={"in_channels": 2}), "image channels"),
    ):
        with pytest.raises(InputError, match=rf"^b: cannot ensemble with a: its {what} are"):
            run_inference([same[0], second], *args)
    assert check_ensemble(list(same)) is None  # the same labels on the same channels: an ensemble
