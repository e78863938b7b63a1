"""Class-balanced patch sampling: each foreground class a patch centre equally often by default."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.config import Config
from medseg.transforms import build_augment, class_ratios, crop_kind


def _cfg(labels: dict[int, str], **augment) -> Config:
    off = {k: 0.0 for k in Config().augment.model_dump() if k.endswith("_prob")}
    return Config.model_validate(
        {
            "labels": labels,
            "model": {"depth": 3},
            "train": {"patch_size": [8, 8, 8]},
            "augment": {**off, "samples_per_volume": 1, **augment},
        }
    )


def test_auto_is_class_balanced_for_several_foreground_classes():
    assert crop_kind(_cfg({0: "bg", 1: "liver", 2: "spleen"})) == "label_classes"
    assert crop_kind(_cfg({0: "bg", 1: "spleen"})) == "pos_neg"
    assert crop_kind(_cfg({0: "bg", 1: "a", 2: "b"}, crop="pos_neg")) == "pos_neg"
    # two thirds foreground centres (pos_neg_ratio 2), shared equally; unnamed label values weigh 0
    assert class_ratios(_cfg({0: "bg", 1: "spleen", 5: "liver"})) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_a_small_organ_beside_a_large_one_is_a_patch_centre_a_third_of_the_time():
    label = np.zeros((40, 40, 40), np.float32)
    label[2:30, 2:30, 2:30] = 1  # large "liver": 21952 voxels
    label[34:37, 34:37, 34:37] = 2  # small "spleen": 27 voxels
    item = {
        "image": MetaTensor(torch.randn(1, 40, 40, 40)),
        "label": MetaTensor(torch.as_tensor(label)[None]),
    }
    chain = build_augment(_cfg({0: "bg", 1: "liver", 2: "spleen"}))
    chain.set_random_state(seed=0)
    hits = 0
    for _ in range(150):
        patch = chain(dict(item))[0]
        hits += bool((patch["label"] == 2).any())
    assert 0.25 < hits / 150 < 0.5  # by voxel count it would be about 0.1 % of foreground centres
