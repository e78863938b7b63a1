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


def identity_roundtrip(label: Volume) -> np.ndarray:
    cfg = Config()
    cfg.preprocess.spacing = tuple(_ras_spacing(label.affine))
    cfg.preprocess.intensity.kind = "none"
    cfg.preprocess.crop_foreground = False
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
