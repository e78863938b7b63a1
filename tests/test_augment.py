"""The augmentation set: every transform in the chain when enabled, out when off, seeded, previewable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config import Config
from medseg.transforms import build_augment

PROBS = {
    "elastic_prob": "Rand3DElasticd",
    "zoom_prob": "RandZoomd",
    "flip_prob": "RandFlipd",
    "noise_prob": "RandNoised",
    "blur_prob": "RandGaussianSmoothd",
    "intensity_scale_prob": "RandScaleIntensityd",
    "intensity_shift_prob": "RandShiftIntensityd",
    "contrast_prob": "RandAdjustContrastd",
    "label_intensity_prob": "RandLabelIntensityd",
    "bias_field_prob": "RandBiasFieldd",
    "low_res_prob": "RandSimulateLowResolutiond",
}


def _cfg(**augment) -> Config:
    return Config.model_validate(
        {"train": {"patch_size": [16, 16, 16]}, "augment": augment, "labels": {0: "bg", 1: "a"}}
    )


def _names(cfg: Config) -> list[str]:
    return [type(t).__name__ for t in build_augment(cfg).transforms]


@pytest.mark.parametrize(("field", "name"), sorted(PROBS.items()))
def test_each_transform_is_in_the_chain_when_enabled(field, name):
    assert name in _names(_cfg(**{field: 0.3}))
    assert name not in _names(_cfg(**{field: 0.0}))


def test_defaults_and_crop():
    names = _names(_cfg())
    assert names[:2] == ["SpatialPadd", "RandCropByPosNegLabeld"]
    precomputed = [type(t).__name__ for t in build_augment(_cfg(), precomputed=True).transforms]
    assert precomputed[:2] == ["RandCropByPosNegLabeld", "DeleteItemsd"]
    assert names.count("RandFlipd") == 3  # every axis
    assert "RandRotateScaled" in names  # rotation and scaling
    assert "RandBiasFieldd" not in names  # CT by default: no bias field
    assert "RandCropByLabelClassesd" in _names(_cfg(crop="label_classes"))
    mr = Config.model_validate(
        {"train": {"patch_size": [16, 16, 16]}, "preprocess": {"intensity": {"kind": "mr"}}}
    )
    assert "RandBiasFieldd" in _names(mr)  # MR: on by default
    assert "RandRotateScaled" not in _names(_cfg(rotate_prob=0, scale_prob=0))
    assert "RandRotateScaled" in _names(_cfg(rotate_prob=0, scale_prob=0.1))


def test_seeded_chain_repeats_and_keeps_labels_integer():
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.normal(size=(1, 24, 24, 20)).astype(np.float32))
    label = torch.zeros(1, 24, 24, 20)
    label[:, 8:16, 8:16, 6:14] = 1
    every = {field: 1.0 for field in PROBS} | {"samples_per_volume": 2}
    out = []
    for _ in range(2):
        chain = build_augment(_cfg(**every))
        chain.set_random_state(seed=7)
        out.append(chain({"image": image.clone(), "label": label.clone()}))
    for a, b in zip(*out, strict=True):
        assert a["image"].shape == (1, 16, 16, 16)
        torch.testing.assert_close(a["image"], b["image"])
        assert set(torch.unique(a["label"]).tolist()) <= {0.0, 1.0}
    assert not torch.equal(out[0][0]["image"], out[0][1]["image"])


def test_augment_preview_command_writes_png(tiny_dataset, tmp_path, capsys):
    from PIL import Image

    from medseg.cli import main

    out = tmp_path / "grid.png"
    code = main(
        [
            "augment-preview",
            *("--data", str(tiny_dataset)),
            *("--out", str(out)),
            *("--samples", "4"),
            *("--set", "train.patch_size=[16,16,16]"),
            *("--set", "preprocess.spacing=[2.0,2.0,3.0]"),
        ]
    )
    assert code == 0
    assert str(out) in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(out).size[0] > 400


def test_rotation_and_scaling_have_their_own_probability():
    """One transform, one resampling, but each drawn with its own probability (as two were)."""
    (spatial,) = [t for t in build_augment(_cfg(rotate_prob=0.3, scale_prob=0.05)).transforms
                  if type(t).__name__ == "RandRotateScaled"]
    spatial.set_random_state(seed=3)
    rotated = scaled = 0
    draws = 4000
    for _ in range(draws):
        spatial.randomize()
        m = spatial.matrix()
        if m is None:
            continue
        rotated += not np.allclose(m, np.diag(np.diag(m)))  # off-diagonal terms: a rotation
        gram = m.T @ m
        scaled += not np.allclose(gram, np.eye(3))  # a rotation alone keeps lengths
    assert rotated / draws == pytest.approx(0.3, abs=0.03)
    assert scaled / draws == pytest.approx(0.05, abs=0.015)


@pytest.mark.parametrize("shape", [(40, 36, 20), (41, 36, 21), (1, 16, 9), (30, 22)])
def test_rotation_and_scaling_resample_as_monais_affine(shape):
    """The same geometry as MONAI's ``Affine`` with that matrix (which two ``RandAffined`` ran):
    image linear, labels nearest, borders extended; the grid cut into slabs or not."""
    from monai.transforms import Affine

    from medseg.transforms import _affine_grid, _resample, _rotation

    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, *shape, generator=gen)
    label = torch.randint(0, 4, (1, *shape), generator=gen).float()
    m = _rotation(np.array([0.2, -0.1, 0.25])) @ np.diag([1.1, 0.9, 1.05])
    if len(shape) == 2:
        m = _rotation(np.array([0.0, 0.0, 0.2]))[:2, :2] @ np.diag([1.1, 0.9])
    a4 = np.eye(len(shape) + 1)
    a4[:-1, :-1] = m
    for x, mode in ((image, "bilinear"), (label, "nearest")):
        ref = Affine(affine=torch.as_tensor(a4), mode=mode, padding_mode="border", image_only=True)(x)
        ours = _resample(x, _affine_grid(m, shape), mode)
        assert ours.shape == x.shape
        torch.testing.assert_close(ours, torch.as_tensor(ref), atol=1e-4, rtol=0)


def test_noise_is_seeded_and_its_spread_drawn_up_to_std():
    from medseg.transforms import RandNoised

    image = torch.zeros(1, 32, 32, 16)
    spreads = []
    for seed in range(20):
        a = RandNoised(keys="image", prob=1.0, std=0.1).set_random_state(seed=seed)({"image": image})["image"]
        b = RandNoised(keys="image", prob=1.0, std=0.1).set_random_state(seed=seed)({"image": image})["image"]
        torch.testing.assert_close(a, b)
        spreads.append(float(a.std()))
    assert max(spreads) <= 0.1 * 1.05
    assert min(spreads) < 0.05 < max(spreads)  # drawn in [0, std], not fixed
    off = RandNoised(keys="image", prob=0.0, std=0.1)({"image": image})["image"]
    assert torch.equal(off, image)


def test_label_intensity_moves_one_organ_against_its_neighbours():
    from medseg.transforms import RandLabelIntensityd

    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.normal(size=(2, 12, 12, 8)).astype(np.float32))
    label = torch.zeros((1, 12, 12, 8))
    label[0, 2:6, 2:6, 2:6] = 1
    label[0, 7:11, 7:11, 2:6] = 2
    t = RandLabelIntensityd(prob=1.0, offsets=0.5)
    t.set_random_state(3)
    out = t({"image": image, "label": label})
    delta = out["image"] - image
    assert torch.equal(out["label"], label)
    assert torch.all(delta[:, label[0] == 0] == 0)  # background untouched
    for v in (1, 2):
        d = delta[:, label[0] == v]
        assert torch.allclose(d, d[:, :1].expand_as(d))  # one offset per label and channel
        assert torch.all(d.abs() <= 0.5)
    s1, s2 = delta[0, label[0] == 1][0], delta[0, label[0] == 2][0]
    assert s1 != s2  # each label its own draw
    assert s1 != 0
    assert delta[0, label[0] == 1][0] != delta[1, label[0] == 1][0]  # and each channel
    image_before = image.clone()
    t({"image": image, "label": label})
    assert torch.equal(image, image_before)  # the cached case is not modified
    off = RandLabelIntensityd(prob=0.0, offsets=0.5)({"image": image, "label": label})
    assert torch.equal(off["image"], image_before)
