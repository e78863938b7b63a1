"""Dataset folders as hospital teams hold them: nnU-Net v2 raw beside Decathlon, and hostile entries.

nnU-Net v2 folders (``channel_names``, labels name -> int, ``CASE_000k`` files) are read as
they are; every ``dataset.json`` entry must stay inside the dataset folder unless
``--allow-outside-root`` is passed, no file may be listed twice, and dot-files (macOS
``._*``) are never inputs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data import check_dataset, load_dataset
from medseg.errors import InputError
from medseg.synthetic import make_dataset
from tests.conftest import run_cli

TINY = [
    "--set",
    "preprocess.spacing=[2.0, 2.0, 3.0]",
    "--set",
    "train.patch_size=[16, 16, 16]",
    "--set",
    "model.features=4",
    "--set",
    "model.depth=2",
    "--set",
    "augment.samples_per_volume=1",
    "--set",
    "tracking.enabled=false",
]


@pytest.fixture(scope="module")
def nnunet_ct(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nnunet") / "Dataset001_Synth"
    make_dataset(root, cases=4, size=24, seed=5, test_fraction=0.25, layout="nnunet")
    return root


def _msd(tmp_path: Path, cases: int = 3) -> Path:
    root = tmp_path / "Task09_Synth"
    make_dataset(root, cases=cases, size=16, seed=2, test_fraction=0.34)
    return root


def _rewrite(root: Path, **changes) -> None:
    spec = json.loads((root / "dataset.json").read_text())
    spec.update(changes)
    (root / "dataset.json").write_text(json.dumps(spec))


# ------------------------------------------------------------------ nnU-Net v2 raw


def test_nnunet_folder_is_read_as_it_is(nnunet_ct):
    spec = json.loads((nnunet_ct / "dataset.json").read_text())
    assert "training" not in spec
    assert spec["labels"]["background"] == 0
    dataset = load_dataset(nnunet_ct)
    assert dataset.layout == "nnunet"
    assert dataset.labels == {0: "background", 1: "liver", 2: "kidney", 3: "spleen"}
    assert dataset.channels == {0: "CT"}
    assert [c.name for c in dataset.training] == ["case_000", "case_001", "case_002"]
    assert dataset.training[0].images == ((nnunet_ct / "imagesTr" / "case_000_0000.nii.gz").resolve(),)
    assert dataset.training[0].label == (nnunet_ct / "labelsTr" / "case_000.nii.gz").resolve()
    assert [c.name for c in dataset.test] == ["case_003"]
    assert check_dataset(nnunet_ct) == []


def test_augment_preview_reads_a_multichannel_nnunet_folder(tmp_path):
    root = tmp_path / "Dataset008_MR"
    make_dataset(root, cases=2, size=16, seed=1, modality="mr", channels=2, layout="nnunet")
    proc = run_cli(
        "augment-preview", "--data", str(root), "--out", "grid.png", "--samples", "2", *TINY, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_nnunet_integrity_problems_are_named(tmp_path, nnunet_ct):
    root = tmp_path / "Dataset002_Broken"
    shutil.copytree(nnunet_ct, root)
    _rewrite(root, numTraining=5)
    assert "numTraining is 5 but 3 training cases were found" in check_dataset(root)[0]
    _rewrite(root, numTraining=3, channel_names={"0": "CT", "1": "T2"})
    assert "case case_000 has channels [0]; channel_names declares 2" in check_dataset(root)[0]
    _rewrite(root, channel_names={"0": "CT"})
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    assert "has no label case_001.nii.gz for case case_001" in check_dataset(root)[0]


def test_region_based_labels_are_refused_in_one_line(tmp_path, nnunet_ct):
    root = tmp_path / "Dataset003_Regions"
    shutil.copytree(nnunet_ct, root)
    _rewrite(
        root,
        labels={"background": 0, "whole": [1, 2, 3], "core": [2, 3]},
        regions_class_order=[1, 2],
    )
    proc = run_cli("check", str(root), cwd=tmp_path)
    assert proc.returncode == 1
    assert "region-based labels" in proc.stdout
    assert "Traceback" not in proc.stderr
    proc = run_cli("train", "--data", str(root), "--epochs", "1", *TINY, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "region-based labels (nnU-Net regions_class_order" in proc.stderr


def test_appledouble_and_dot_files_are_not_inputs(tmp_path, nnunet_ct):
    root = tmp_path / "Dataset004_Mac"
    shutil.copytree(nnunet_ct, root)
    for folder, name in (("imagesTr", "._case_000_0000.nii.gz"), ("labelsTr", "._case_000.nii.gz")):
        (root / folder / name).write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # AppleDouble magic
    (root / "imagesTr" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    assert check_dataset(root) == []
    assert len(load_dataset(root).training) == 3
    msd = _msd(tmp_path)
    (msd / "imagesTr" / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    _rewrite(msd, training=[{"image": "imagesTr/._case_000.nii.gz", "label": "labelsTr/case_000.nii.gz"}])
    with pytest.raises(InputError, match=r"a hidden file \(macOS '\._\*' files are not images\)"):
        load_dataset(msd)


@pytest.mark.timeout(600)
def test_nnunet_folder_trains_and_infers_without_conversion(tmp_path, nnunet_ct):
    proc = run_cli("check", str(nnunet_ct), cwd=tmp_path, check=True)
    assert proc.stdout.strip() == "ok"
    run_cli(
        "train", "--data", str(nnunet_ct), "--epochs", "1", "--out", "run", *TINY, cwd=tmp_path, check=True
    )
    image = nnunet_ct / "imagesTs" / "case_003_0000.nii.gz"
    run_cli(
        "infer", "--model", "run/bundle", "--input", str(image), "--output", "pred", "--no-report",
        cwd=tmp_path, check=True,
    )  # fmt: skip
    mask = nib.load(tmp_path / "pred" / "case_003_0000_seg.nii.gz")
    source = nib.load(image)
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)


def test_real_ct_arranged_as_nnunet_passes_check(tmp_path, shared_data):
    root = tmp_path / "Dataset100_TotalSegExample"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shutil.copy(shared_data / "example_ct_sm.nii.gz", root / "imagesTr" / "s0001_0000.nii.gz")
    shutil.copy(shared_data / "example_seg.nii.gz", root / "labelsTr" / "s0001.nii.gz")
    names = json.loads((shared_data / "labels_total_v2.json").read_text())
    labels = {"background": 0, **{name: int(k) for k, name in names.items()}}
    spec = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    proc = run_cli("check", str(root), cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok"), proc.stdout + proc.stderr
    dataset = load_dataset(root)
    assert dataset.labels[5] == "liver"
    assert dataset.modality == "CT"


# ------------------------------------------------------------------ hostile entries


HOSTILE = {
    "dotdot": (
        "../outside/secret.nii.gz",
        "labelsTr/case_000.nii.gz",
        "which leads outside the dataset folder",
    ),
    "absolute": ("{outside}/secret.nii.gz", "labelsTr/case_000.nii.gz", "an absolute path"),
    "symlink": ("imagesTr/link.nii.gz", "labelsTr/case_000.nii.gz", "a symbolic link that leads outside"),
    "label": (
        "imagesTr/case_000.nii.gz",
        "../outside/secret.nii.gz",
        "which leads outside the dataset folder",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_entries_outside_the_root_are_refused_before_anything_is_opened(tmp_path, kind):
    root = _msd(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    # a FIFO: opening it blocks, so a reader that opened an entry before checking it would hang here
    os.mkfifo(outside / "secret.nii.gz")
    (root / "imagesTr" / "link.nii.gz").symlink_to(outside / "secret.nii.gz")
    image, label, words = HOSTILE[kind]
    _rewrite(root, training=[{"image": image.format(outside=outside), "label": label}])
    proc = run_cli("check", str(root), cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    assert words in proc.stdout
    assert "--allow-outside-root" in proc.stdout
    proc = run_cli(
        "train", "--data", str(root), "--epochs", "1", "--out", "run", *TINY, cwd=tmp_path, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "run").exists()


def test_allow_outside_root_accepts_outside_entries(tmp_path):
    root = _msd(tmp_path, cases=3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(root / "imagesTr" / "case_000.nii.gz", elsewhere / "case_000.nii.gz")
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"][0]["image"] = "../elsewhere/case_000.nii.gz"
    (root / "dataset.json").write_text(json.dumps(spec))
    assert "leads outside the dataset folder" in run_cli("check", str(root), cwd=tmp_path).stdout
    proc = run_cli("check", str(root), "--allow-outside-root", cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok"), proc.stdout
    assert (
        load_dataset(root, allow_outside_root=True).training[0].image
        == (elsewhere / "case_000.nii.gz").resolve()
    )


@pytest.mark.parametrize(
    "second",
    ["./imagesTr/case_000.nii.gz", "imagesTr/../imagesTr/case_000.nii.gz", "imagesTr/alias.nii.gz"],
)
def test_the_same_file_twice_is_refused(tmp_path, second):
    root = _msd(tmp_path)
    (root / "imagesTr" / "alias.nii.gz").symlink_to(root / "imagesTr" / "case_000.nii.gz")
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"][1]["image"] = second
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="lists the same file twice"):
        load_dataset(root)
    # a test image that is also a training image
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"][1]["image"] = "imagesTr/case_001.nii.gz"
    spec["test"] = ["imagesTr/case_000.nii.gz"]
    spec["test_labels"] = []
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="lists the same file twice"):
        load_dataset(root)


def test_nnunet_folder_linked_outside_is_refused(tmp_path, nnunet_ct):
    root = tmp_path / "Dataset007_Linked"
    root.mkdir()
    shutil.copy(nnunet_ct / "dataset.json", root / "dataset.json")
    shutil.copytree(nnunet_ct / "labelsTr", root / "labelsTr")
    (root / "imagesTr").symlink_to(nnunet_ct / "imagesTr")
    with pytest.raises(InputError, match="is a symbolic link that leads outside the dataset folder"):
        load_dataset(root)
    assert len(load_dataset(root, allow_outside_root=True).training) == 3
