"""Multi-channel inputs: 4D NIfTI and CASE_000k files, one grid per case, per-channel
normalisation from the plan, augmentation that keeps channels aligned, in_channels in the bundle."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.config import Config
from medseg.data import (
    fingerprint,
    group_channel_inputs,
    load_channels,
    load_dataset,
    load_input_channels,
)
from medseg.errors import InputError
from medseg.io import Volume, read_nifti, write_nifti
from medseg.io.nifti import read_nifti_channels, write_nifti_channels
from medseg.models import build_model
from medseg.plan import channel_kind, make_plan
from medseg.synthetic import make_dataset, make_mr_case
from medseg.transforms import build_augment, build_preprocess
from tests.helpers import TINY_ARGS, run_cli


def _volume(rng, shape=(10, 9, 8), spacing=(1.5, 1.2, 2.0), offset=0.0) -> Volume:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-5.0 + offset, 3.0, 7.0)
    return Volume(array=rng.normal(100, 20, shape).astype(np.float32), affine=affine)


def test_4d_nifti_reads_as_channels_and_stays_refused_where_one_volume_is_expected(tmp_path, rng):
    channels = [_volume(rng) for _ in range(3)]
    path = write_nifti_channels(channels, tmp_path / "case.nii.gz")
    assert nib.load(path).shape == (10, 9, 8, 3)
    read = read_nifti_channels(path)
    assert len(read) == 3
    for a, b in zip(channels, read, strict=True):
        np.testing.assert_allclose(a.array, b.array, rtol=1e-6)
        np.testing.assert_allclose(a.affine, b.affine)
    with pytest.raises(InputError, match="holds 3 volumes"):
        read_nifti(path)
    # the NIfTI vector layout (x, y, z, 1, C)
    vec = nib.Nifti1Image(np.stack([c.array for c in channels], -1)[:, :, :, None, :], channels[0].affine)
    nib.save(vec, tmp_path / "vector.nii.gz")
    assert len(read_nifti_channels(tmp_path / "vector.nii.gz")) == 3


def test_channels_on_different_grids_are_refused_naming_both_or_resampled(tmp_path, rng):
    first = _volume(rng)
    write_nifti(first, tmp_path / "c_0000.nii.gz")
    write_nifti(_volume(rng, offset=3.0), tmp_path / "c_0001.nii.gz")
    files = [tmp_path / "c_0000.nii.gz", tmp_path / "c_0001.nii.gz"]
    with pytest.raises(InputError) as err:
        load_channels(files)
    message = str(err.value)
    assert "c_0001.nii.gz" in message
    assert "c_0000.nii.gz" in message
    assert "--resample-channels" in message
    assert "\n" not in message
    resampled = load_channels(files, resample=True)
    assert resampled[1].shape == first.shape
    np.testing.assert_allclose(resampled[1].affine, first.affine)
    # a shifted copy of the same image lands back on it (3 mm = 2 voxels along x)
    twin = Volume(array=first.array, affine=first.affine.copy())
    shifted = twin.affine.copy()
    shifted[0, 3] -= 3.0
    write_nifti(Volume(array=np.roll(first.array, 2, axis=0), affine=shifted), tmp_path / "c_0001.nii.gz")
    back = load_channels(files, resample=True)[1]
    np.testing.assert_allclose(back.array[2:-2], first.array[2:-2], atol=1e-3)


def test_inputs_are_grouped_into_cases_by_channel(tmp_path, rng):
    for c in range(2):
        write_nifti(_volume(rng), tmp_path / f"a_{c:04d}.nii.gz")
    write_nifti(_volume(rng), tmp_path / "b_0000.nii.gz")
    write_nifti_channels([_volume(rng), _volume(rng)], tmp_path / "four_d.nii.gz")
    groups = dict(group_channel_inputs([*sorted(tmp_path.glob("a_*")), tmp_path / "four_d.nii.gz"], 2))
    assert groups == {
        "a": [tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"],
        "four_d": [tmp_path / "four_d.nii.gz"],
    }
    with pytest.raises(InputError, match=r"case b has channel files \[0\]; the model takes 2"):
        group_channel_inputs([tmp_path / "b_0000.nii.gz"], 2)
    assert len(load_input_channels([tmp_path / "four_d.nii.gz"], n_channels=2)) == 2
    with pytest.raises(InputError, match=r"gives 1 channel\(s\); the model takes 2 \(T1, T2\)"):
        load_input_channels([tmp_path / "b_0000.nii.gz"], n_channels=2, channel_names=["T1", "T2"])


def test_channel_names_choose_the_normalisation():
    assert channel_kind("CT") == "ct"
    assert [channel_kind(n) for n in ("FLAIR", "T1w", "t1gd", "T2", "ADC")] == ["mr"] * 5
    assert channel_kind("noNorm") == "none"
    assert channel_kind("PET") == "zscore"


def _two_channel_dataset(tmp_path):
    """An nnU-Net folder whose channel 0 is the CT phantom and channel 1 an MR contrast of it."""
    root = tmp_path / "Dataset010_CTMR"
    make_dataset(
        root, cases=3, size=20, seed=4, test_fraction=0.34, modality="mr", channels=2, layout="nnunet"
    )
    spec = json.loads((root / "dataset.json").read_text())
    spec["channel_names"] = {"0": "CT", "1": "T2"}
    (root / "dataset.json").write_text(json.dumps(spec))
    for case in load_dataset(root).training:  # channel 0 becomes CT (HU) of the same anatomy
        index = int(case.name.split("_")[1])
        from medseg.synthetic import make_case

        ct, _ = make_case((4, index), size=20)
        write_nifti(ct, case.images[0], dtype="int16")
    return root


def test_per_channel_normalisation_from_the_plan(tmp_path):
    root = _two_channel_dataset(tmp_path)
    dataset = load_dataset(root)
    fp = fingerprint(dataset)
    assert fp.channels == {"0": "CT", "1": "T2"}
    assert fp.foreground_intensity_channels is not None
    assert len(fp.foreground_intensity_channels) == 2
    tiny = {"train": {"patch_size": [16, 16, 16]}, "model": {"features": 4, "depth": 2}}
    cfg = make_plan(Config.model_validate(tiny), fp)
    ct, t2 = cfg.preprocess.channels
    assert (ct.kind, ct.name, t2.kind, t2.name) == ("ct", "CT", "mr", "T2")
    stats = fp.foreground_intensity_channels[0]
    assert ct.window == (round(stats.p00_5, 2), round(stats.p99_5, 2))
    assert ct.mean == round(stats.mean, 3)
    assert t2.window is None
    assert cfg.model.in_channels == 2
    net = build_model(cfg.model, out_channels=4)
    assert net.eval()(torch.zeros(1, 2, 16, 16, 16)).shape[:2] == (1, 4)

    case = dataset.training[0]
    cfg = cfg.model_copy(update={"preprocess": cfg.preprocess.model_copy(update={"crop_foreground": False})})
    item = build_preprocess(cfg.model_copy(deep=True))(case.item())
    image = item["image"]
    assert image.shape[0] == 2
    raw = load_channels(case.images)
    # CT channel: clipped to the window, z-scored with the dataset's foreground statistics
    lo, hi = ct.window
    ct_expected = (np.clip(raw[0].array, lo, hi) - ct.mean) / ct.std
    assert image[0].min().item() == pytest.approx((lo - ct.mean) / ct.std, abs=1e-3)
    assert image[0].max().item() == pytest.approx((hi - ct.mean) / ct.std, abs=0.2)
    assert float(np.mean(ct_expected)) != pytest.approx(0.0, abs=0.05)  # not a per-image z-score
    # MR channel: per-image z-score over its non-zero voxels
    t2_values = image[1][image[1] != 0]
    assert t2_values.mean().item() == pytest.approx(0.0, abs=0.05)
    assert t2_values.std().item() == pytest.approx(1.0, abs=0.05)


def test_augmentation_keeps_channels_aligned():
    cfg = Config.model_validate(
        {
            "train": {"patch_size": [16, 16, 16]},
            "model": {"in_channels": 3},
            "labels": {0: "bg", 1: "a"},
            "augment": {
                "elastic_prob": 1.0,
                "rotate_prob": 1.0,
                "scale_prob": 1.0,
                "zoom_prob": 1.0,
                "flip_prob": 0.5,
                "low_res_prob": 0.0,
                "noise_prob": 0.0,
                "blur_prob": 0.0,
                "intensity_scale_prob": 0.0,
                "intensity_shift_prob": 0.0,
                "contrast_prob": 0.0,
                "label_intensity_prob": 0.0,
                "bias_field_prob": 0.0,
            },
        }
    )
    rng = np.random.default_rng(0)
    label = np.zeros((1, 24, 24, 20), np.float32)
    label[:, 6:16, 8:18, 5:14] = 1
    base = (label[0] * 3 + rng.normal(0, 0.1, label.shape[1:])).astype(np.float32)
    image = np.stack([base, 2 * base - 1, -base])
    chain = build_augment(cfg)
    chain.set_random_state(seed=3)
    for patch in chain({"image": torch.as_tensor(image), "label": torch.as_tensor(label)}):
        out = patch["image"].numpy()
        np.testing.assert_allclose(out[1], 2 * out[0] - 1, atol=1e-4)
        np.testing.assert_allclose(out[2], -out[0], atol=1e-4)
        inside = patch["label"].numpy()[0] > 0.5
        if inside.any() and (~inside).any():
            assert out[0][inside].mean() > out[0][~inside].mean() + 1.0


def test_intensity_augmentation_draws_per_channel():
    cfg = Config.model_validate(
        {
            "train": {"patch_size": [16, 16, 16]},
            "model": {"in_channels": 2},
            "augment": {"contrast_prob": 1.0, "intensity_scale_prob": 1.0, "intensity_shift_prob": 0.0},
        }
    )
    names = [type(t).__name__ for t in build_augment(cfg).transforms]
    assert "RandPerChanneld" in names
    scale = next(t for t in build_augment(cfg).transforms if type(t).__name__ == "RandScaleIntensityd")
    assert scale.scaler.channel_wise


def test_mr_phantom_channels_differ_in_contrast():
    channels, label = make_mr_case((0, 1), size=24, channels=4)
    assert len(channels) == 4
    means = np.array([[c.array[label.array == k].mean() for k in (1, 2, 3)] for c in channels])
    # each organ pair is told apart by some channel, and no two channels rank the organs alike
    assert len({tuple(np.argsort(row)) for row in means}) >= 3
    for a in channels[1:]:
        np.testing.assert_allclose(a.affine, channels[0].affine)


def test_synth_mr_writes_4d_and_nnunet_layouts(tmp_path):
    run_cli("synth", "--out", "msd", "--modality", "mr", "--channels", "4", "--cases", "2", "--size", "16",
            cwd=tmp_path, check=True)  # fmt: skip
    spec = json.loads((tmp_path / "msd" / "dataset.json").read_text())
    assert spec["modality"] == {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}
    image = tmp_path / "msd" / spec["training"][0]["image"]
    assert nib.load(image).shape[3] == 4
    assert run_cli("check", "msd", cwd=tmp_path).stdout.strip() == "ok"
    run_cli("synth", "--out", "Dataset005_MR", "--modality", "mr", "--channels", "2", "--cases", "2",
            "--size", "16", "--layout", "nnunet", cwd=tmp_path, check=True)  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "Dataset005_MR" / "imagesTr").iterdir())
    assert names == ["case_000_0000.nii.gz", "case_000_0001.nii.gz"]
    assert run_cli("check", "Dataset005_MR", cwd=tmp_path).stdout.strip() == "ok"
    proc = run_cli("synth", "--out", "x", "--channels", "2", cwd=tmp_path)
    assert proc.returncode == 2
    assert "synthetic CT has one channel" in proc.stderr


def test_check_refuses_a_channel_off_grid_unless_resampled(tmp_path):
    root = tmp_path / "Dataset006_Grid"
    make_dataset(root, cases=2, size=16, seed=1, modality="mr", channels=2, layout="nnunet")
    moved = root / "imagesTr" / "case_000_0001.nii.gz"
    img = nib.load(moved)
    affine = img.affine.copy()
    affine[:3, 3] += 1.5
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), moved)
    proc = run_cli("check", str(root), cwd=tmp_path)
    assert proc.returncode == 1
    lines = [line for line in proc.stdout.splitlines() if "channel 1" in line]
    assert len(lines) == 1
    assert "case_000_0001.nii.gz" in lines[0]
    assert "case_000_0000.nii.gz" in lines[0]
    proc = run_cli("check", str(root), "--resample-channels", cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok"), proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_synth_mr_4_channels_train_infer_4d_and_dicom_series_evaluate(tmp_path):
    run_cli("synth", "--out", "mr", "--modality", "mr", "--channels", "4", "--cases", "4", "--size", "24",
            "--dicom", cwd=tmp_path, check=True)  # fmt: skip
    run_cli("train", "--data", "mr", "--epochs", "1", "--out", "run", *TINY_ARGS,
            "--set", "tracking.enabled=false", cwd=tmp_path, check=True)  # fmt: skip
    bundle_cfg = (tmp_path / "run" / "bundle" / "config.yaml").read_text()
    assert "in_channels: 4" in bundle_cfg
    image = tmp_path / "mr" / "imagesTs" / "case_003.nii.gz"
    run_cli("infer", "--model", "run/bundle", "--input", str(image), "--output", "pred", "--no-report",
            cwd=tmp_path, check=True)  # fmt: skip
    mask = nib.load(tmp_path / "pred" / "case_003_seg.nii.gz")
    assert mask.shape == nib.load(image).shape[:3]
    np.testing.assert_allclose(mask.affine, nib.load(image).affine, atol=1e-5)
    proc = run_cli(
        "evaluate", "--pred", "pred", "--ref", "mr/labelsTs", "--out", "m.csv", cwd=tmp_path, check=True
    )
    assert "| **all** |" in proc.stdout
    # the same case as four DICOM series of one study, one --series per channel in channel order
    from medseg.io import scan_dicom

    study = tmp_path / "mr" / "dicom" / "case_003"
    by_name = {s.description: s.series_id for s in scan_dicom(study).series}
    series = [arg for name in ("FLAIR", "T1w", "T1gd", "T2w") for arg in ("--series", by_name[name])]
    run_cli("infer", "--model", "run/bundle", "--input", str(study), "--output", "pred_dicom", "--no-report",
            *series, cwd=tmp_path, check=True)  # fmt: skip
    dicom_mask = nib.load(tmp_path / "pred_dicom" / "case_003_seg.nii.gz")
    assert dicom_mask.shape == mask.shape
    # ... and as four files CASE_0000 .. CASE_0003 (nnU-Net naming): one case, the same mask
    split = tmp_path / "split"
    for c, channel in enumerate(read_nifti_channels(image)):
        write_nifti(channel, split / f"case_003_{c:04d}.nii.gz")
    run_cli("infer", "--model", "run/bundle", "--input", str(split), "--output", "pred_files", "--no-report",
            cwd=tmp_path, check=True)  # fmt: skip
    files_mask = nib.load(tmp_path / "pred_files" / "case_003_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(files_mask.dataobj), np.asarray(mask.dataobj))
    # one --series for a 4-channel model: one line naming what is missing
    proc = run_cli("infer", "--model", "run/bundle", "--input", str(study), "--output", "bad", "--no-report",
                   "--series", by_name["FLAIR"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0
    assert "the model takes 4 (FLAIR, T1w, T1gd, T2w)" in proc.stderr + proc.stdout
