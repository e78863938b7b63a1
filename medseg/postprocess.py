"""Post-processing of label maps in the source grid: connected components and hole filling.

Pure array functions on ``np.ndarray`` label maps; physical sizes use the voxel
spacing in mm. Components are found with ``cc3d`` (26-connectivity by default).
Every function returns a new array: inputs are never modified in place (MONAI's
``KeepLargestConnectedComponent`` does modify a torch input).

``postprocess_labels(labels, cfg, spacing=..., label_ids=...)`` applies, per label,
small-component removal (mm^3), keep-the-largest (per label or per foreground, k
components) and hole filling, with per-label overrides from ``cfg.per_label``.
The CRF refinement works on probabilities in the model grid and lives in
:mod:`medseg.crf`; ``label_biases`` reads the per-label log-probability biases that
``medseg.predict`` adds before the argmax.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import cc3d
import numpy as np
from scipy import ndimage

from medseg.config import PostprocessConfig

log = logging.getLogger(__name__)

Connectivity = Literal[6, 18, 26]
"""Voxel connectivity of a 3D component: faces (6), faces and edges (18), or all neighbours (26)."""


def keep_largest_component(
    mask: np.ndarray, *, connectivity: Connectivity = 26, k: int = 1, ties: float = 1.0
) -> np.ndarray:
    """Keep the ``k`` largest connected components of a binary mask, and any other at least
    ``ties`` times the size of the k-th (1.0: only an exact tie)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    components, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    if n <= k:
        return mask.copy()
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    sizes[0] = 0  # the background: never kept
    keep = sizes >= ties * np.sort(sizes[1:])[-k]
    return keep[components]


def remove_small_components(
    mask: np.ndarray, *, min_volume_mm3: float, spacing: tuple[float, float, float], connectivity: Connectivity = 26
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


def count_components(mask: np.ndarray, *, connectivity: Connectivity = 26) -> int:
    """Number of connected components of a binary mask."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0
    _, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    return int(n)


@dataclass(frozen=True)
class LabelSteps:
    """The post-processing steps that apply to one label after per-label overrides."""

    keep_largest: bool
    components: int
    min_volume_mm3: float
    fill_holes: bool


def steps_for_label(cfg: PostprocessConfig, label: int) -> LabelSteps:
    override = cfg.per_label.get(int(label))

    def pick(name: str):
        value = getattr(override, name) if override is not None else None
        return getattr(cfg, name) if value is None else value

    return LabelSteps(
        keep_largest=bool(pick("keep_largest")),
        components=int(pick("components")),
        min_volume_mm3=float(pick("min_volume_mm3")),
        fill_holes=bool(pick("fill_holes")),
    )


def label_biases(cfg: PostprocessConfig) -> dict[int, float]:
    """The labels whose log-probability gets a bias before the argmax (``per_label[k].logit_bias``)."""
    return {int(k): float(v.logit_bias) for k, v in cfg.per_label.items() if v.logit_bias}


def postprocess_labels(
    labels: np.ndarray, cfg: PostprocessConfig, *, spacing: tuple[float, float, float], label_ids: list[int]
) -> np.ndarray:
    """Apply the configured steps per foreground label; voxels removed become background.

    Order: small components are removed per label; keep-largest then runs per label
    (``largest_of: label``) or once over the whole foreground (``largest_of:
    foreground``, for the labels whose steps say ``keep_largest``); holes are filled
    last, into background voxels only (a hole holding another label is that label's).
    ``labels`` is not modified.
    """
    labels = np.asarray(labels)
    out = np.zeros_like(labels)
    ids = [int(k) for k in label_ids if int(k) != 0]
    unknown = sorted(set(cfg.per_label) - set(ids))
    if unknown:
        log.warning(
            "postprocess.per_label names label(s) %s, which the model does not have (%s)", unknown, ids
        )
    # Every step sees only the box around the foreground: components and enclosed holes lie inside
    # it, and outside it is background either way (a CT's organs fill a few % of its voxels).
    box = foreground_box(labels)
    if box is not None:
        out[box] = _postprocess_box(labels[box], cfg, spacing=spacing, ids=ids)
    return out


def foreground_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every non-zero voxel of ``labels``; None when there is none."""
    foreground = labels != 0
    box = []
    for axis in range(labels.ndim):
        others = tuple(d for d in range(labels.ndim) if d != axis)
        hit = np.flatnonzero(foreground.any(axis=others))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _postprocess_box(
    labels: np.ndarray, cfg: PostprocessConfig, *, spacing: tuple[float, float, float], ids: list[int]
) -> np.ndarray:
    """``postprocess_labels``' steps on a box that holds all of the foreground."""
    out = np.zeros_like(labels)
    steps = {k: steps_for_label(cfg, k) for k in ids}
    for label in ids:
        mask = labels == label
        if not mask.any():
            continue
        s = steps[label]
        if s.min_volume_mm3 > 0:
            mask = remove_small_components(
                mask, min_volume_mm3=s.min_volume_mm3, spacing=spacing, connectivity=cfg.connectivity
            )
        if s.keep_largest and cfg.largest_of == "label":
            mask = keep_largest_component(mask, connectivity=cfg.connectivity, k=s.components, ties=cfg.largest_ties)
        out[mask] = label
    if cfg.largest_of == "foreground":
        chosen = [k for k in ids if steps[k].keep_largest]
        if chosen:
            k = max(steps[c].components for c in chosen)
            foreground = keep_largest_component(out > 0, connectivity=cfg.connectivity, k=k, ties=cfg.largest_ties)
            drop = np.isin(out, chosen) & ~foreground
            out[drop] = 0
    for label in ids:
        if steps[label].fill_holes:
            filled = fill_holes(out == label) & (out == 0)
            out[filled] = label
    return out
