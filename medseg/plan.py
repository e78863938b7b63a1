"""Plans: fill in what the config leaves out from the dataset fingerprint (as nnU-Net does).

``make_plan(cfg, fp)`` returns a new ``Config`` with target spacing, intensity
normalisation, patch size, batch size, scheduler and memory budget set. Only fields
left empty are planned, so any planned value can be overridden with ``--set``;
``plan_summary`` says in a few lines what was chosen and why.

Rules (nnU-Net's, made visible):
- spacing: the median spacing; when one axis is more than 3x coarser than the others and
  its median image size in voxels is 3x smaller, that axis takes the 10th percentile of
  its spacings instead (less interpolation across thick slices).
- normalisation: CT clips to the foreground's 0.5-99.5 percentiles and z-scores with
  the foreground mean/std; MR and other modalities get a per-image z-score. A multi-channel
  dataset gets one normalisation per channel, read from its channel names as nnU-Net reads
  ``channel_names`` ("CT" -> CT, "noNorm" -> none, anything else -> per-image z-score).
- patch: the median image size at the target spacing, rounded up to what the network
  divides, shrunk along its largest axis until the activations fit the memory budget.
- batch: 2; raised (up to 8) while the patch covers the whole median image and memory allows.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from medseg.config import Config, IntensityConfig, ModelConfig, PreprocessConfig
from medseg.errors import ConfigError
from medseg.models import divisor_of

log = logging.getLogger(__name__)

ANISOTROPY = 3.0
MAX_PATCH_VOXELS = 128**3
MAX_BATCH = 8
MR_NAMES = ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD", "SWI", "DCE", "HBV")  # prefixes, any case


def channel_kind(name: str) -> str:
    """The normalisation a channel name asks for: ``ct``, ``mr`` (MR sequence names), ``none``
    (nnU-Net's "noNorm") or ``zscore`` (anything else)."""
    name = str(name).strip()
    if name.upper() == "CT":
        return "ct"
    if name.lower() in ("nonorm", "none"):
        return "none"
    return "mr" if name.upper().startswith(MR_NAMES) else "zscore"


def _plan_ct(it: IntensityConfig, stats: dict[str, float]) -> None:
    """Fill a CT normalisation's window and z-score from a channel's foreground statistics."""
    if it.window is None:
        it.window = (round(stats["p00_5"], 2), round(stats["p99_5"], 2))
    if it.mean is None or it.std is None:
        it.mean, it.std = round(stats["mean"], 3), round(max(stats["std"], 1e-3), 3)


def _plan_intensity(pre: PreprocessConfig, fp: dict[str, Any]) -> int:
    """Plan the normalisation (one per channel for multi-channel data); returns the channel count."""
    names = [str(v) for _, v in sorted((fp.get("channels") or {}).items(), key=lambda kv: int(kv[0]))]
    if len(names) <= 1:
        if pre.channels is not None and len(pre.channels) != 1:
            raise ConfigError(f"preprocess.channels lists {len(pre.channels)} channels; the dataset has 1")
        it = pre.intensity
        modality = str(fp.get("modality", "CT")).upper()
        if modality != "CT" and it.kind == "ct":
            it.kind = channel_kind(modality) if channel_kind(modality) != "ct" else "zscore"  # type: ignore[assignment]
        if it.kind == "ct":
            _plan_ct(it, fp["foreground_intensity"])
        return 1
    if pre.channels is None:
        pre.channels = [IntensityConfig(kind=channel_kind(n), name=n) for n in names]  # type: ignore[arg-type]
    elif len(pre.channels) != len(names):
        raise ConfigError(
            f"preprocess.channels lists {len(pre.channels)} channels; the dataset has {len(names)} ({names})"
        )
    planned = []
    for channel, name, stats in zip(pre.channels, names, fp["foreground_intensity_channels"], strict=True):
        channel = channel.model_copy(update={"name": channel.name or name})
        if channel.kind == "ct":
            _plan_ct(channel, stats)
        planned.append(channel)
    pre.channels = planned
    return len(names)


def target_spacing(fp: dict[str, Any]) -> tuple[float, float, float]:
    """Median spacing, with the coarse axis of strongly anisotropic data at its 10th percentile."""
    spacing = np.asarray(fp["spacing_median"], dtype=float)
    extent = np.asarray(fp["extent_mm_median"], dtype=float)
    size = extent / spacing
    worst = int(np.argmax(spacing))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = spacing[worst] > ANISOTROPY * spacing[others].max()
    aniso_voxels = size[worst] * ANISOTROPY < size[others].min()
    if aniso_spacing and aniso_voxels and "spacing_p10" in fp:
        coarse = float(fp["spacing_p10"][worst])
        spacing[worst] = max(coarse, float(spacing[others].max()) + 1e-5)
    return tuple(float(s) for s in spacing.round(3))  # type: ignore[return-value]


def bytes_per_voxel(model: ModelConfig) -> float:
    """Rough training memory per input voxel and sample (activations kept for backward, fp32).

    Each level stores about 8 feature maps of its width (2 convs, norms, activations, plus
    the decoder's concatenation); level ``l`` has ``features * 2**l`` channels on ``8**-l``
    of the voxels, a geometric sum of ratio 1/4. A heuristic (not measured per architecture).
    """
    width = model.features * (4.0 / 3.0)
    return 8 * width * 4 * 2  # x2: encoder and decoder


def detect_memory_gb(device: str | None) -> float:
    """Memory for training: most of a CUDA device, else a quarter of the RAM (at most 16 GB).

    Total, not free, memory: the same machine plans the same patch for every fold and rerun.
    """
    import torch

    if (device is None or str(device).startswith("cuda")) and torch.cuda.is_available():
        index = torch.device(device or "cuda").index or 0
        return round(0.8 * torch.cuda.get_device_properties(index).total_memory / 2**30, 1)
    try:
        import os

        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        total = 8.0
    return round(min(16.0, max(1.0, total / 4)), 1)


def _fit_patch(extent_vox: np.ndarray, divisor: int, max_voxels: float) -> tuple[float, float, float]:
    """Largest patch <= the median image size (rounded up), divisible by ``divisor``, within ``max_voxels``."""
    patch = np.maximum(divisor, np.ceil(extent_vox / divisor) * divisor)
    while np.prod(patch) > max_voxels:
        axis = int(np.argmax(patch))
        if patch[axis] <= divisor:
            break
        patch[axis] -= divisor
    return tuple(float(p) for p in patch)  # type: ignore[return-value]


def make_plan(cfg: Config, fp: dict[str, Any], *, max_patch_voxels: int = MAX_PATCH_VOXELS) -> Config:
    """Fill the empty planned fields of ``cfg`` from the dataset fingerprint ``fp``."""
    plan = cfg.model_copy(deep=True)
    pre, tr = plan.preprocess, plan.train
    if pre.spacing is None:
        pre.spacing = target_spacing(fp)  # type: ignore[assignment]
    n_channels = _plan_intensity(pre, fp)
    if plan.model.in_channels is None:
        plan.model.in_channels = n_channels
    elif plan.model.in_channels != n_channels:
        raise ConfigError(
            f"model.in_channels is {plan.model.in_channels}; the dataset has {n_channels} channel(s)"
        )
    if tr.memory_budget_gb is None:
        tr.memory_budget_gb = detect_memory_gb(tr.device)
    budget_voxels = tr.memory_budget_gb * 2**30 / bytes_per_voxel(plan.model)
    extent_vox = np.asarray(fp["extent_mm_median"]) / np.asarray(pre.spacing)
    divisor = divisor_of(plan.model)
    if tr.patch_size is None:
        per_sample = min(max_patch_voxels, budget_voxels / 2)  # room for a batch of 2
        tr.patch_size = _fit_patch(extent_vox, divisor, per_sample)  # type: ignore[assignment]
    if tr.batch_size is None:
        patch_vox = float(np.prod(tr.patch_size))
        covers_image = bool(np.all(np.asarray(tr.patch_size) >= extent_vox))
        fits = int(budget_voxels // max(patch_vox, 1.0))
        tr.batch_size = int(np.clip(fits, 2, MAX_BATCH)) if covers_image else 2
    if tr.scheduler is None:
        tr.scheduler = "poly" if tr.optimizer == "sgd" else "cosine"
    log.debug("%s", plan_summary(plan, fp))
    return plan


def _norm_text(it: IntensityConfig) -> str:
    return {
        "ct": f"CT: clip to {it.window} then z-score (mean {it.mean}, std {it.std})",
        "mr": "per-image z-score over non-zero voxels",
        "zscore": "per-image z-score over non-zero voxels",
        "none": "none",
    }[it.kind]


def plan_summary(cfg: Config, fp: dict[str, Any]) -> str:
    """A few lines a person reads: what was planned from which dataset properties."""
    channels = cfg.preprocess.channels or [cfg.preprocess.intensity]
    norm = "; ".join((f"{it.name}: " if len(channels) > 1 else "") + _norm_text(it) for it in channels)
    return (
        f"plan for {fp.get('n_cases', '?')} cases ({fp.get('modality', '?')}, fingerprint {fp.get('hash', '?')}):\n"
        f"  spacing    {cfg.preprocess.spacing} mm (dataset median {fp.get('spacing_median')})\n"
        f"  intensity  {norm}\n"
        f"  patch      {tuple(int(p) for p in cfg.train.patch_size or ())} voxels, batch {cfg.train.batch_size} "
        f"(memory budget {cfg.train.memory_budget_gb} GB)\n"
        f"  model      {cfg.model.name} features {cfg.model.features} depth {cfg.model.depth}\n"
        f"  optimiser  {cfg.train.optimizer} lr {cfg.train.lr} with {cfg.train.scheduler} decay, "
        f"{cfg.train.epochs} epochs"
    )
