"""Post-processing of label maps in the source grid: connected components and hole filling.

Pure array functions on ``np.ndarray`` label maps; physical sizes use the voxel
spacing in mm. Components are found with ``cc3d`` (26-connectivity by default).
"""

from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage

from medseg.config import PostprocessConfig


def keep_largest_component(mask: np.ndarray, *, connectivity: int = 26) -> np.ndarray:
    """Keep only the largest connected component of a binary mask."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    return cc3d.largest_k(mask, k=1, connectivity=connectivity) > 0


def remove_small_components(
    mask: np.ndarray, *, min_volume_mm3: float, spacing: tuple[float, float, float], connectivity: int = 26
) -> np.ndarray:
    """Drop components smaller than ``min_volume_mm3`` (physical volume)."""
    mask = np.asarray(mask, dtype=bool)
    if min_volume_mm3 <= 0 or not mask.any():
        return mask.copy()
    voxel_mm3 = float(np.prod(spacing))
    min_voxels = int(np.ceil(min_volume_mm3 / voxel_mm3))
    return cc3d.dust(mask, threshold=min_voxels, connectivity=connectivity, in_place=False) > 0


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes of a binary mask (3D)."""
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def postprocess_labels(
    labels: np.ndarray, cfg: PostprocessConfig, *, spacing: tuple[float, float, float], label_ids: list[int]
) -> np.ndarray:
    """Apply the configured steps per foreground label; voxels removed become background."""
    out = np.zeros_like(labels)
    for label in label_ids:
        if label == 0:
            continue
        mask = labels == label
        if not mask.any():
            continue
        if cfg.min_volume_mm3 > 0:
            mask = remove_small_components(
                mask, min_volume_mm3=cfg.min_volume_mm3, spacing=spacing, connectivity=cfg.connectivity
            )
        if cfg.keep_largest:
            mask = keep_largest_component(mask, connectivity=cfg.connectivity)
        out[mask] = label
    if cfg.fill_holes:
        for label in label_ids:
            if label == 0:
                continue
            filled = fill_holes(out == label) & (out == 0)
            out[filled] = label
    return out
