from __future__ import annotations

import numpy as np

from medseg.config import PostprocessConfig
from medseg.metrics import dice
from medseg.postprocess import fill_holes, keep_largest_component, postprocess_labels, remove_small_components


def test_keep_largest_and_remove_small():
    mask = np.zeros((20, 20, 20), bool)
    mask[2:8, 2:8, 2:8] = True  # 216 voxels
    mask[12:14, 12:14, 12:14] = True  # 8 voxels
    assert keep_largest_component(mask).sum() == 216
    # voxels of 2 mm^3: the small one is 16 mm^3
    kept = remove_small_components(mask, min_volume_mm3=20.0, spacing=(1.0, 1.0, 2.0))
    assert kept.sum() == 216
    kept = remove_small_components(mask, min_volume_mm3=10.0, spacing=(1.0, 1.0, 2.0))
    assert kept.sum() == 224


def test_fill_holes_and_per_label():
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[2:9, 2:9, 2:9] = 1
    labels[5, 5, 5] = 0
    labels[10, 10, 10] = 1  # speck
    assert fill_holes(labels == 1)[5, 5, 5]
    out = postprocess_labels(
        labels, PostprocessConfig(keep_largest=True, fill_holes=True), spacing=(1, 1, 1), label_ids=[0, 1]
    )
    assert out[5, 5, 5] == 1
    assert out[10, 10, 10] == 0


def test_dice_conventions():
    a = np.zeros((4, 4), bool)
    assert dice(a, a) == 1.0
    b = a.copy()
    b[0, 0] = True
    assert dice(a, b) == 0.0
    assert dice(b, b) == 1.0
