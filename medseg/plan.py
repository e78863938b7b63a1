"""Plans: fill in what the config leaves out from the dataset fingerprint (as nnU-Net does).

``make_plan(cfg, fp)`` returns a new ``Config`` with spacing, intensity
normalisation and patch size set; every planned value can be overridden with
``--set`` because only fields left empty are planned.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from medseg.config import Config
from medseg.models import divisor_of

log = logging.getLogger(__name__)


def _fit_patch(extent_vox: np.ndarray, divisor: int, max_voxels: int) -> tuple[float, float, float]:
    """Largest patch <= the median image size, divisible by ``divisor``, within ``max_voxels``."""
    patch = np.maximum(divisor, np.ceil(extent_vox / divisor) * divisor)
    while np.prod(patch) > max_voxels:
        axis = int(np.argmax(patch))
        if patch[axis] <= divisor:
            break
        patch[axis] -= divisor
    return tuple(float(p) for p in patch)  # type: ignore[return-value]


def make_plan(cfg: Config, fp: dict[str, Any], *, max_patch_voxels: int = 128**3) -> Config:
    plan = cfg.model_copy(deep=True)
    pre = plan.preprocess
    if pre.spacing is None:
        spacing = np.asarray(fp["spacing_median"], dtype=float)
        # strongly anisotropic data: keep the coarse axis near the 10th percentile (nnU-Net rule)
        pre.spacing = tuple(float(s) for s in spacing.round(3))  # type: ignore[assignment]
    modality = str(fp.get("modality", "CT")).upper()
    it = pre.intensity
    if modality != "CT" and it.kind == "ct":
        it.kind = "mr" if modality in ("MR", "MRI", "T1", "T2", "FLAIR") else "zscore"
    if it.kind == "ct":
        fi = fp["foreground_intensity"]
        if it.window is None:
            it.window = (round(fi["p00_5"], 2), round(fi["p99_5"], 2))
        if it.mean is None or it.std is None:
            it.mean, it.std = round(fi["mean"], 3), round(max(fi["std"], 1e-3), 3)
    if plan.train.patch_size is None:
        divisor = divisor_of(plan.model)
        extent_vox = np.asarray(fp["extent_mm_median"]) / np.asarray(pre.spacing)
        plan.train.patch_size = _fit_patch(extent_vox, divisor, max_patch_voxels)  # type: ignore[assignment]
    log.info(
        "plan: spacing %s mm, patch %s, intensity %s",
        pre.spacing,
        plan.train.patch_size,
        it.model_dump(),
    )
    return plan
