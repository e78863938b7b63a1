"""Property: an identity model (prediction = the label fed in) comes back voxel-exact in the source grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config import Config
from medseg.data import _ras_spacing
from medseg.io import Volume
from medseg.predict import resample_to_grid
from medseg.synthetic import make_case
from medseg.transforms import build_preprocess, to_metatensor


def random_affine(rng: np.random.Generator) -> np.ndarray:
    """Random axis permutation and flips, anisotropic spacing, optional oblique rotation, random origin."""
    perm = rng.permutation(3)
    directions = np.eye(3)[:, perm] * rng.choice([-1.0, 1.0], size=3)
    if rng.random() < 0.4:
        angle = rng.uniform(-0.4, 0.4)
        c, s = np.cos(angle), np.sin(angle)
        directions = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ directions
    affine = np.eye(4)
    affine[:3, :3] = directions * rng.uniform(0.5, 3.0, size=3)[None, :]
    affine[:3, 3] = rng.uniform(-100, 100, size=3)
    return affine


def identity_roundtrip(label: Volume, *, crop: bool = False) -> np.ndarray:
    cfg = Config()
    cfg.preprocess.spacing = tuple(_ras_spacing(label.affine))
    cfg.preprocess.intensity.kind = "none"
    cfg.preprocess.crop_foreground = crop  # crop: to the labelled voxels (above 0), before resampling
    pre = build_preprocess(cfg, keys=("image",), load=False)
    model_grid = pre({"image": to_metatensor(label)})["image"]
    n = int(label.array.max()) + 1
    onehot = torch.nn.functional.one_hot(model_grid[0].round().long(), n).permute(3, 0, 1, 2).float()
    return resample_to_grid([(onehot, np.asarray(model_grid.affine))], label.affine, label.shape)


@pytest.mark.parametrize("seed", range(12))
def test_identity_model_is_voxel_exact_for_random_affines(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=tuple(rng.integers(5, 14, size=3))).astype(np.uint8)
    vol = Volume(labels, random_affine(rng))
    np.testing.assert_array_equal(identity_roundtrip(vol), labels)


@pytest.mark.parametrize("seed", range(6))
def test_body_crop_before_resampling_keeps_the_geometry(seed):
    """The body crop runs in the scan's grid before resampling: the model grid is smaller than the
    scan, and what it holds still lands voxel-exact in the scan, background all around."""
    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(n) for n in rng.integers(16, 28, size=3))
    labels = np.zeros(shape, np.uint8)
    lo = [int(rng.integers(3, n // 2)) for n in shape]
    hi = [int(rng.integers(n // 2 + 2, n - 3)) for n in shape]
    labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = rng.integers(1, 4, size=[h - q for q, h in zip(lo, hi, strict=True)])
    vol = Volume(labels, random_affine(rng))
    cfg = Config()
    cfg.preprocess.spacing = tuple(_ras_spacing(vol.affine))
    cfg.preprocess.intensity.kind = "none"
    grid = build_preprocess(cfg, keys=("image",), load=False)({"image": to_metatensor(vol)})["image"]
    assert np.prod(grid.shape[1:]) < labels.size  # cropped
    np.testing.assert_array_equal(identity_roundtrip(vol, crop=True), labels)


def test_body_crop_margin_is_in_mm_and_an_empty_scan_is_kept_whole():
    from medseg.transforms import BodyCropd

    image = np.zeros((40, 40, 20), np.float32)
    image[18:22, 18:22, 9:11] = 1.0
    # a 4x4x2-voxel body and 6 mm each side: 6 voxels of 1 mm; 12 of 0.5 mm, 2 of 3 mm
    for spacing, expect in (((1.0, 1.0, 1.0), (16, 16, 14)), ((0.5, 0.5, 3.0), (28, 28, 6))):
        item = {"image": to_metatensor(Volume(image, np.diag([*spacing, 1.0])))}
        out = BodyCropd(["image"], threshold=0.5, margin_mm=6.0)(item)["image"]
        assert tuple(out.shape[1:]) == expect
    empty = {"image": to_metatensor(Volume(np.zeros((8, 8, 4), np.float32), np.eye(4)))}
    assert BodyCropd(["image"], threshold=0.5, margin_mm=6.0)(empty)["image"].shape[1:] == (8, 8, 4)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "sagittal", "coronal", "oblique"])
def test_identity_model_on_phantoms(orientation):
    _, label = make_case((5, 1), size=24, orientation=orientation)
    np.testing.assert_array_equal(identity_roundtrip(label), label.array)


def test_outside_field_of_view_is_background():
    probs = torch.zeros(2, 4, 4, 4)
    probs[1] = 1.0  # the model says "foreground" everywhere inside its grid
    target = np.eye(4)
    target[:3, 3] = -2.0  # target grid starts 2 voxels before the model grid
    out = resample_to_grid([(probs, np.eye(4))], target, (8, 8, 8))
    assert out[2:6, 2:6, 2:6].all()
    assert out[0].sum() == 0
    assert out[7].sum() == 0


def test_preprocessing_reads_the_scan_without_copying_or_writing_it():
    """One channel goes to MONAI as a view of the scan (no stacked copy: 0.6 GB on a 512x512x600 CT),
    and no step of the chain writes into it, even where resampling and cropping are no-ops."""
    rng = np.random.default_rng(3)
    array = rng.normal(40.0, 30.0, size=(12, 10, 8)).astype(np.float32)
    vol = Volume(array, np.diag([1.0, 1.0, 2.0, 1.0]))
    before = array.copy()
    tensor = to_metatensor(vol)
    assert np.shares_memory(tensor.numpy(), array)
    cfg = Config()
    cfg.preprocess.spacing = (1.0, 1.0, 2.0)
    cfg.preprocess.intensity.window = (-100.0, 200.0)
    cfg.preprocess.intensity.mean, cfg.preprocess.intensity.std = 40.0, 30.0
    out = build_preprocess(cfg, keys=("image",), load=False)({"image": tensor})["image"]
    assert not np.shares_memory(out.numpy(), array)
    np.testing.assert_array_equal(array, before)
