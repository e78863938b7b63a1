"""Validation during training: whole preprocessed volumes by sliding window, scored by ``medseg.metrics``.

The same metric functions as ``medseg evaluate`` (Dice, HD95 in mm, surface Dice), so the
figures MLflow shows during training and the ones ``metrics.csv`` holds agree on the same
masks. A metric that fails on one case is a warning naming the case, never a silent gap.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medseg.config import Config
from medseg.metrics import dice_per_label, label_metrics
from medseg.runtime import Precision, autocast

log = logging.getLogger(__name__)


@dataclass
class FirstCase:
    """The first validation case, for an overlay: normalised image, predicted labels, affine."""

    image: np.ndarray
    prediction: np.ndarray
    affine: np.ndarray


def _case_metrics(
    pred: np.ndarray, ref: np.ndarray, label_ids: list[int], spacing: tuple[float, float, float], cfg: Config
) -> dict[str, float]:
    try:
        return label_metrics(
            pred,
            ref,
            label_ids,
            spacing,
            surface=cfg.train.val_surface_metrics,
            tolerance_mm=cfg.train.surface_dice_tolerance_mm,
        )
    except Exception as exc:  # a metric must not stop training, nor vanish silently
        log.warning("validation: surface metrics failed on a case (%s: %s); Dice only", type(exc).__name__, exc)
        return {f"dice_{k}": v for k, v in dice_per_label(pred, ref, label_ids).items()}


def window_logits(network: torch.nn.Module, image: torch.Tensor, cfg: Config) -> torch.Tensor:
    """float32 logits of a whole model-grid volume: sliding windows of the training patch, blended
    with the ``cfg.infer`` settings, as validation (and post-processing tuning) scores cases."""
    logits = sliding_window_inference(
        image,
        roi_size=tuple(int(p) for p in cfg.train.patch_size or ()),
        sw_batch_size=cfg.infer.sw_batch_size,
        predictor=network,
        overlap=cfg.infer.overlap,
        mode=cfg.infer.blend_mode,
    )
    return torch.as_tensor(logits).float()


def validate(
    network: torch.nn.Module,
    loader: Iterable,
    cfg: Config,
    device: torch.device,
    label_ids: list[int],
    *,
    precision: Precision = "fp32",
    keep_first: bool = False,
) -> tuple[list[dict[str, float]], FirstCase | None]:
    """Per-case metrics over whole validation volumes (sliding window, model grid).

    Returns one dict per case (``dice_<k>``, ``hd95_<k>`` mm, ``nsd_<k>``) and, with
    ``keep_first``, the first case for an overlay.
    """
    network.eval()
    rows: list[dict[str, float]] = []
    first = None
    with torch.no_grad(), autocast(device, precision):
        for batch in loader:
            image = batch["image"].to(device)
            pred = window_logits(network, image, cfg).argmax(dim=1).cpu().numpy()
            ref = batch["label"][:, 0].cpu().numpy().round().astype(np.int64)
            affine = batch["image"].affine
            affine = np.asarray(affine[0] if affine.ndim == 3 else affine, dtype=float)
            sx, sy, sz = (float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
            for p, r in zip(pred, ref, strict=True):
                rows.append(_case_metrics(p, r, label_ids, (sx, sy, sz), cfg))
            if keep_first and first is None:
                first = FirstCase(image[0, 0].float().cpu().numpy(), pred[0], affine)
    network.train()
    return rows, first


def summarise(rows: list[dict[str, float]], labels: dict[int, str]) -> dict[str, float]:
    """Means over cases: ``val_<kind>_<label name>`` and ``val_dice`` (mean of the label means)."""
    record: dict[str, float] = {}
    for kind in ("dice", "hd95", "nsd"):
        for k, name in labels.items():
            values = [r[f"{kind}_{k}"] for r in rows if f"{kind}_{k}" in r]
            if k and values:
                record[f"val_{kind}_{name}"] = float(np.mean(values))
    dices = [v for key, v in record.items() if key.startswith("val_dice_")]
    record["val_dice"] = float(np.mean(dices)) if dices else 0.0
    return record
