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
    "noise_prob": "RandGaussianNoised",
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
    assert "RandAffined" in names  # rotation and scaling
    assert "RandBiasFieldd" not in names  # CT by default: no bias field
    assert "RandCropByLabelClassesd" in _names(_cfg(crop="label_classes"))
    mr = Config.model_validate(
        {"train": {"patch_size": [16, 16, 16]}, "preprocess": {"intensity": {"kind": "mr"}}}
    )
    assert "RandBiasFieldd" in _names(mr)  # MR: on by default
    assert "RandAffined" not in _names(_cfg(rotate_prob=0, scale_prob=0))


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
    def affines(cfg: Config) -> list:
        return [t for t in build_augment(cfg).transforms if type(t).__name__ == "RandAffined"]

    def ranged(values) -> bool:
        return any(v is not None for v in values)

    rot, scale = affines(_cfg(rotate_prob=0.3, scale_prob=0.05))
    assert rot.prob == pytest.approx(0.3)
    assert scale.prob == pytest.approx(0.05)
    assert ranged(rot.rand_affine.rand_affine_grid.rotate_range)
    assert not ranged(rot.rand_affine.rand_affine_grid.scale_range)
    assert ranged(scale.rand_affine.rand_affine_grid.scale_range)
    assert not ranged(scale.rand_affine.rand_affine_grid.rotate_range)
    (only_rot,) = affines(_cfg(rotate_prob=0.3, scale_prob=0.0))
    assert not ranged(only_rot.rand_affine.rand_affine_grid.scale_range)


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
