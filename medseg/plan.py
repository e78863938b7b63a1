"""Plans: fill in what the config leaves out from the dataset fingerprint (as nnU-Net does).

``make_plan(cfg, fp)`` returns a new ``Config`` with target spacing, intensity
normalisation, patch size, batch size, scheduler and memory budget set. Only fields
left empty are planned, so any planned value can be overridden with ``--set``;
``plan_summary`` says in a few lines what was chosen and why.

Rules (nnU-Net's, made visible):
- spacing: the median spacing; when one axis is more than 3x coarser than the others and
  its median image size in voxels is 3x smaller, that axis takes the 10th percentile of
  its spacings instead (less interpolation across thick slices).
- normalisation: CT clips to the foreground's 0.5-99.5 percentiles, every label weighing
  the same (nnU-Net pools the voxels, so a small fat-density or cystic organ can fall below
  the window and merge with the fat and air around it), and z-scores with the foreground
  mean/std; MR and other modalities get a per-image z-score. A multi-channel dataset gets
  one normalisation per channel, read from its channel names as nnU-Net reads
  ``channel_names`` ("CT" -> CT, "noNorm" -> none, anything else -> per-image z-score).
- patch: the median image size at the target spacing, rounded up to what the network
  divides, shrunk along its longest axis in mm until the activations fit the memory budget.
- batch: 2; raised (up to 8) while the patch covers the whole median image and memory allows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from medseg.config import Config, IntensityConfig, ModelConfig, PreprocessConfig
from medseg.errors import ConfigError
from medseg.models import divisor_of

if TYPE_CHECKING:
    from medseg.data import Fingerprint, IntensityStats

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


def _plan_ct(it: IntensityConfig, stats: IntensityStats) -> None:
    """Fill a CT normalisation's window and z-score from a channel's foreground statistics."""
    if it.window is None:
        it.window = (round(stats.p00_5, 2), round(stats.p99_5, 2))
    if it.mean is None or it.std is None:
        it.mean, it.std = round(stats.mean, 3), round(max(stats.std, 1e-3), 3)


def _plan_intensity(pre: PreprocessConfig, fp: Fingerprint) -> int:
    """Plan the normalisation (one per channel for multi-channel data); returns the channel count."""
    names = fp.channel_names
    if len(names) <= 1:
        if pre.channels is not None and len(pre.channels) != 1:
            raise ConfigError(f"preprocess.channels lists {len(pre.channels)} channels; the dataset has 1")
        it = pre.intensity
        modality = fp.modality.upper()
        if modality != "CT" and it.kind == "ct":
            it.kind = channel_kind(modality) if channel_kind(modality) != "ct" else "zscore"  # type: ignore[assignment]
        if it.kind == "ct":
            _plan_ct(it, fp.foreground_intensity)
        return 1
    if pre.channels is None:
        pre.channels = [IntensityConfig(kind=channel_kind(n), name=n) for n in names]
    elif len(pre.channels) != len(names):
        raise ConfigError(
            f"preprocess.channels lists {len(pre.channels)} channels; the dataset has {len(names)} ({names})"
        )
    planned = []
    for channel, name, stats in zip(pre.channels, names, fp.foreground_intensity_channels or (), strict=True):
        channel = channel.model_copy(update={"name": channel.name or name})
        if channel.kind == "ct":
            _plan_ct(channel, stats)
        planned.append(channel)
    pre.channels = planned
    return len(names)


def target_spacing(fp: Fingerprint) -> tuple[float, float, float]:
    """Median spacing, with the coarse axis of strongly anisotropic data at its 10th percentile."""
    spacing = np.asarray(fp.spacing_median, dtype=float)
    extent = np.asarray(fp.extent_mm_median, dtype=float)
    size = extent / spacing
    worst = int(np.argmax(spacing))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = spacing[worst] > ANISOTROPY * spacing[others].max()
    aniso_voxels = size[worst] * ANISOTROPY < size[others].min()
    if aniso_spacing and aniso_voxels and fp.spacing_p10 is not None:  # None in old fingerprints
        coarse = float(fp.spacing_p10[worst])
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


def _shrink_path(patch: np.ndarray, divisor: int, spacing: Sequence[float] | None) -> list[np.ndarray]:
    """``patch`` and every patch after it as it shrinks by ``divisor`` down to ``divisor`` on every
    axis, each step along the axis that leaves the field of view nearest a cube *in mm* (``spacing``;
    in voxels without it): the longest axis, unless taking ``divisor`` off it would make it much
    the shortest. With few voxels on the coarse axis one step halves it: 80 x 80 x 32 at 0.98 x 0.98 x
    2.57 mm (78 x 78 x 82 mm) went to 80 x 80 x 16 (78 x 78 x 41 mm; 16 slices are 1 voxel at a
    depth-4 U-Net's bottleneck), now to 64 x 80 x 32. Measured on two phantom draws (seeds 13, 14, 11
    minutes, 20 test cases): 80x80x16 on a 1.5x coarser grid 0.872 / 0.913 against 80x80x32 at 1.0 mm
    0.912 / 0.928; on seed 1 at one grid, 64x64x16 0.918 against 64x64x32 0.933-0.937."""
    size = np.ones(3) if spacing is None else np.asarray(spacing, dtype=float)
    patch = patch.astype(float).copy()
    path = [patch.copy()]

    def aspect_after(axis: int) -> tuple[float, float]:  # ties: the longer axis in mm, then the first
        mm = patch * size
        mm[axis] -= divisor * size[axis]
        return float(mm.max() / mm.min()), -float(patch[axis] * size[axis])

    while (patch > divisor).any():
        patch[min(np.flatnonzero(patch > divisor).tolist(), key=aspect_after)] -= divisor  # none below the divisor
        path.append(patch.copy())
    return path


def _fit_patch(
    extent_vox: np.ndarray, divisor: int, max_voxels: float, spacing: Sequence[float] | None = None
) -> tuple[float, float, float]:
    """Largest patch <= the median image size (rounded up), divisible by ``divisor``, within ``max_voxels``.

    It shrinks along its longest axis *in mm* (``_shrink_path``), so the field of view stays as near
    a cube as the image allows, as nnU-Net's patches do: shrinking the axis with the most voxels cut a
    1 x 1 x 2.3 mm CT's patch to 48 x 48 x 48 voxels, 50 x 50 x 112 mm, which sees a third of a liver
    across and the whole abdomen's height (64 x 64 x 32 now, 67 x 67 x 75 mm); at 5 mm slices it was
    five times taller than wide."""
    top = np.maximum(divisor, np.ceil(extent_vox / divisor) * divisor)
    path = _shrink_path(top, divisor, spacing)
    fit = next((p for p in path if np.prod(p) <= max_voxels), path[-1])
    return tuple(float(v) for v in fit)  # type: ignore[return-value]


def make_plan(cfg: Config, fp: Fingerprint, *, max_patch_voxels: int = MAX_PATCH_VOXELS) -> Config:
    """Fill the empty planned fields of ``cfg`` from the dataset fingerprint ``fp``."""
    plan = cfg.model_copy(deep=True)
    pre, tr = plan.preprocess, plan.train
    if pre.spacing is None:
        pre.spacing = target_spacing(fp)
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
    extent_vox = np.asarray(fp.extent_mm_median) / np.asarray(pre.spacing)
    divisor = divisor_of(plan.model)
    if tr.patch_size is None:
        per_sample = min(max_patch_voxels, budget_voxels / 2)  # room for a batch of 2
        tr.patch_size = _fit_patch(extent_vox, divisor, per_sample, pre.spacing)
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


def plan_summary(cfg: Config, fp: Fingerprint) -> str:
    """A few lines a person reads: what was planned from which dataset properties."""
    channels = cfg.preprocess.channel_intensities()
    norm = "; ".join((f"{it.name}: " if len(channels) > 1 else "") + _norm_text(it) for it in channels)
    return (
        f"plan for {fp.n_cases} cases ({fp.modality}, fingerprint {fp.hash}):\n"
        f"  spacing    {cfg.preprocess.spacing} mm (dataset median {list(fp.spacing_median)})\n"
        f"  intensity  {norm}\n"
        f"  patch      {tuple(int(p) for p in cfg.train.patch_size or ())} voxels, batch {cfg.train.batch_size} "
        f"(memory budget {cfg.train.memory_budget_gb} GB)\n"
        f"  model      {cfg.model.name} features {cfg.model.features} depth {cfg.model.depth}\n"
        f"  optimiser  {cfg.train.optimizer} lr {cfg.train.lr} with {cfg.train.scheduler} decay, "
        f"{cfg.train.epochs} epochs"
    )


# ----------------------------------------------------------------------------- time budget
#
# With a wall-clock budget the question is not "what fits the memory" but "what learns most in
# the time there is". The plan measures one training step of a few candidate sizes on this
# machine (the warm-up), then takes the largest patch (most context) whose step time still
# leaves MIN_STEPS optimiser steps in the training share of the budget; when no candidate does,
# the cheapest (most steps). The measurement is the reason: 80^3 patches x 8 gave 10
# epochs in 11 CPU minutes and Dice 0.74, a plain loop with small patches and many steps 0.915.

CPU_DEFAULT_BUDGET_S = 15 * 60.0  # CPU, no budget, epochs and patch unset: 15 minutes, said so
# Steps for AdamW to converge on a small dataset, measured on the phantoms (11 minutes, 2 CPU cores,
# 20 test cases a draw; real CT): the plans that left 1033-1043 steps scored 0.833-0.903, those
# with 1548-2064 steps on a grid that let the patch see enough 0.921-0.956 (at 0.8-1.05 mm, 0.895-0.901).
# Seed 5 went 0.833 -> 0.921 when 1400 instead of 1000 moved its plan from 80x80x32 (1043 steps) to
# 64x64x32 (1578 steps; the grid rule then coarsened 1.38x instead of 1.10x), one run each
MIN_STEPS = 1500
PATCH_SCALES = (1.0, 0.8, 0.64, 0.5, 0.4, 0.32)  # of the fingerprint patch's voxels, per axis
WARMUP_FRACTION = 0.05  # of the budget, at most, spent measuring step times
# A CPU warm-up whose process got less than this share of its threads' time was sharing the machine:
# its step times are slow and the plan small, which the plan then says. Measured on 2 cores: 0.69-0.81
# quiet, 0.39-0.45 beside two busy processes, 0.18-0.22 beside six (benchmarks/slow_warmup.py's setting).
BUSY_CPU_SHARE = 0.5
VALIDATIONS = 5  # validations over the run (the last at the end)
FINAL_FRACTION = 0.08  # of the budget kept for the bundle, post-processing tuning and MLflow
# A budget patch that sees less than this share of the median image's voxels gets a coarser grid
# (context_spacing): on the seed-1 phantoms (0.8 mm) the 11-minute patch, 64x64x32, saw 5.8 %; the
# seed-2 draw's plan (1.1 mm) saw 15 % and scored 0.929; nnU-Net adds a low-resolution stage below 25 %
CONTEXT_COVERAGE = 0.2
MAX_CONTEXT_COARSENING = 4.0  # the finest axis at most this factor coarser (0.75 mm -> 3 mm, the real CT's grid)
MIN_CONTEXT_COARSENING = 1.1  # below this, the grid is left as it is
# A size that left MIN_STEPS before the sizes above it were measured is kept while the time they took
# leaves it this share of MIN_STEPS: on the seed-13 phantoms 80x80x32 left 1500 steps, the three sizes
# above it took the warm-up to 20 s and the plan fell to 80x80x16 on a 1.5x coarser grid (1486 for
# 80x80x32): 0.872; 80x80x32 pinned scored 0.905, and 0.904 with 1321 steps (seed 5's 1043 steps at
# that size had scored 0.833 against 0.921 at 1578 for the smaller size)
KEEP_FRACTION = 0.85
# The next size above the chosen one, when it missed MIN_STEPS by less than this share, is measured
# once more and the faster timing kept: on seed 14's phantoms 80x80x32 measured 0.475 s a step (1197
# steps; 2.05x the step of 80x80x16, where the same sizes measured 1.54-1.56x in three runs that day,
# 0.315-0.376 s) and the plan fell to 80x80x16 on a 1.49x coarser grid
RECHECK_FRACTION = 0.75
MAX_SIZES_BETWEEN = 3  # shrink-path sizes measured between the chosen candidate and the next larger
MIN_STRUCTURE_VOXELS = 16  # the smallest label's equivalent diameter keeps at least this many voxels


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``1.5h``, ``8h``, ``1h30m``; ConfigError otherwise."""
    import re

    from medseg.errors import ConfigError

    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", str(text).strip().lower())
        joined = "".join(f"{n}{u}" for n, u in parts)
        if not parts or joined != re.sub(r"\s+", "", str(text).strip().lower()):
            raise ConfigError(f"time budget {text!r}: expected e.g. 900, 15m, 1.5h or 1h30m")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"time budget {text!r}: must be more than 0 seconds")
    return seconds


def resolve_budget(cfg: Config, device: str) -> tuple[float | None, str]:
    """The run's budget in seconds (or None) and why: given, the CPU default, or none."""
    tr = cfg.train
    if tr.time_budget_s is not None:
        return float(tr.time_budget_s), "given"
    chosen_by_user = {"epochs", "patch_size", "iterations_per_epoch"} & tr.model_fields_set
    if str(device).startswith("cpu") and not chosen_by_user:
        return CPU_DEFAULT_BUDGET_S, (
            f"CPU and neither epochs nor patch given: default budget {CPU_DEFAULT_BUDGET_S / 60:.0f} min "
            "(set --time-budget, or --epochs for a run of that many epochs)"
        )
    if str(device).startswith("cpu"):
        given = ", ".join(sorted(chosen_by_user))
        if speed_plan_for_epochs(cfg, device):
            return None, (f"none ({given} given): patch, batch and width measured on this CPU as for a "
                          f"{CPU_DEFAULT_BUDGET_S / 60:.0f}-min budget, for the epochs given (--time-budget "
                          "plans the steps for the time you have)")
        return None, (f"none ({given} given): the given patch, not planned by this CPU's speed "
                      "(--time-budget plans patch, batch and steps for the time you have)")
    return None, "none: fingerprint plan"


def speed_plan_for_epochs(cfg: Config, device: str) -> bool:
    """On a CPU, epochs (or iterations) given without a budget or a patch: the patch, batch and width
    are still measured for this CPU's speed (as for the default budget), the epochs are the user's.

    The fingerprint plan sizes the patch by memory: on the phantoms 192 x 160 x 48 x 3 at 0.3 samples
    a second, about 80 s an epoch of 4 steps, so ``--epochs 8``, chosen to fill 11 minutes, trained 32
    steps and scored Dice 0.469 (benchmarks/README.md). A GPU keeps the fingerprint plan."""
    tr = cfg.train
    return (str(device).startswith("cpu") and tr.time_budget_s is None
            and "patch_size" not in tr.model_fields_set
            and bool({"epochs", "iterations_per_epoch"} & tr.model_fields_set))


def context_spacing(
    spacing: Sequence[float],
    extent_mm: Sequence[float],
    patch: Sequence[float],
    label_volumes_ml: dict[str, tuple[float, float]] | None = None,
    median_spacing: Sequence[float] | None = None,
) -> tuple[tuple[float, float, float], str]:
    """A coarser grid when a budget's patch sees too little of the image, and why ('' when unchanged).

    The time budget buys a patch in voxels (its step time was measured); the grid decides how many
    millimetres it sees. When it covers less than ``CONTEXT_COVERAGE`` of the median image's voxels,
    every axis is given a floor in millimetres, raised until the patch covers that share: the finest
    axes coarsen first (towards isotropy), and only once they reach the coarsest one does every axis
    (nnU-Net's low-resolution stage answers the same question with a second network). The floor is
    at most ``MAX_CONTEXT_COARSENING`` times the finest axis, and keeps the smallest label's
    equivalent-sphere diameter at ``MIN_STRUCTURE_VOXELS`` voxels or more. Measured on the seed-1
    phantoms (0.8 x 0.8 x 1.8 mm, 11 minutes, 20 test cases, one run each): at 0.8 mm the 64x64x32
    patch saw 5.8 % and scored 0.901 (fatty organ, a low-contrast blob 30-60 mm across, 0.812, worst
    case 0.552); at 1.2 mm 0.921 (0.852, worst 0.672), every label better, the kidney's too (0.934 ->
    0.944). On a thin-slice draw (seed 18 resampled to a median of 0.63 x 0.63 x 0.81 mm) the earlier
    cap of 1.5x left the 64x64x48 patch 3.8 % of the image: 0.902; the floor, 1.29 mm: 0.926
    (benchmarks/README.md).

    With ``median_spacing``, a coarse axis planned finer than the dataset's median (``target_spacing``
    takes the 10th percentile of strongly anisotropic data) first goes back to the median: the median
    case holds no more detail along it, and the patch sees that much more.
    """
    original = np.asarray(spacing, dtype=float)
    sp = original.copy()
    vox = np.asarray(patch, dtype=float)
    extent = np.asarray(extent_mm, dtype=float)

    def coverage(grid: np.ndarray) -> float:
        return float(np.prod(vox) / np.prod(np.maximum(extent / grid, vox)))

    before = coverage(sp)
    if before >= CONTEXT_COVERAGE:
        return tuple(float(v) for v in sp), ""  # type: ignore[return-value]
    restored = ""
    coarse = int(np.argmax(sp))
    if median_spacing is not None and float(median_spacing[coarse]) > sp[coarse] * MIN_CONTEXT_COARSENING:
        sp[coarse] = min(float(median_spacing[coarse]), sp[coarse] * MAX_CONTEXT_COARSENING)
        restored = f"{'xyz'[coarse]} back to the median {sp[coarse]:.3f} mm"
    finest = float(sp.min())
    ceiling, limit = finest * MAX_CONTEXT_COARSENING, f", held at {MAX_CONTEXT_COARSENING:g}x"
    if label_volumes_ml:
        smallest_mm = min((6.0 * lo * 1000.0 / math.pi) ** (1.0 / 3.0) for lo, _ in label_volumes_ml.values())
        if smallest_mm / MIN_STRUCTURE_VOXELS < ceiling:
            ceiling, limit = smallest_mm / MIN_STRUCTURE_VOXELS, f", held by the smallest label ({smallest_mm:.0f} mm across)"
    floor = max(ceiling, finest)
    if coverage(np.maximum(sp, floor)) >= CONTEXT_COVERAGE:  # the share is reached below the ceiling
        low, limit = finest, ""
        for _ in range(60):  # coverage grows with the floor: bisect for the share
            mid = 0.5 * (low + floor)
            low, floor = (mid, floor) if coverage(np.maximum(sp, mid)) < CONTEXT_COVERAGE else (low, mid)
    grid, steps = sp.copy(), [restored] if restored else []
    if floor / finest >= MIN_CONTEXT_COARSENING:  # below it, not worth a resampling of its own at inference
        grid = np.maximum(sp, floor)
        axes = ", ".join("xyz"[i] for i in range(3) if grid[i] > sp[i])
        steps.append(f"{floor / finest:.2f}x on {axes}" + (f" (to {floor:.3f} mm)" if len(set(sp.round(3))) > 1 else ""))
    if not steps:
        return tuple(float(v) for v in original), ""  # type: ignore[return-value]
    grid = grid.round(3)
    why = (
        f"grid coarsened {', then '.join(steps)} ({original.round(3).tolist()} -> {grid.tolist()} mm): the "
        f"{'x'.join(str(int(v)) for v in vox)} patch saw {100 * before:.1f} % of the median image, "
        f"now {100 * coverage(grid):.1f} % (target {100 * CONTEXT_COVERAGE:.0f} %{limit})"
    )
    return tuple(float(v) for v in grid), why  # type: ignore[return-value]


def candidate_patches(
    top: tuple[float, ...], divisor: int, *, scales=PATCH_SCALES, spacing: Sequence[float] | None = None
) -> list[tuple[int, int, int]]:
    """Patches from ``top`` (the fingerprint plan's) down: on its shrink path (``_shrink_path``, by
    the longest axis in mm with ``spacing``), the one nearest ``scale**3`` of its voxels for each
    scale, divisible by ``divisor``; distinct, smallest first."""
    top_arr = np.asarray(top, dtype=float)
    path = _shrink_path(top_arr, divisor, spacing)
    found: set[tuple[int, int, int]] = set()
    for scale in scales:
        target = float(np.prod(top_arr)) * scale**3
        patch = min(path, key=lambda p: abs(math.log(float(np.prod(p)) / target)))
        # at least 4 voxels at the bottleneck (instance norm needs more than 1), unless it is the top
        if scale == 1.0 or np.prod(np.asarray(patch) / divisor) >= 4:
            found.add(tuple(int(p) for p in patch))  # type: ignore[arg-type]
    return sorted(found, key=lambda p: (int(np.prod(p)), p))


@dataclass(frozen=True)
class Candidate:
    """One measured configuration: patch (voxels), batch, network width, seconds per step."""

    patch: tuple[int, int, int]
    batch: int
    features: int
    step_s: float
    model: str = ModelConfig.model_fields["name"].default  # the config's default network

    @property
    def voxels(self) -> int:
        return int(np.prod(self.patch)) * self.batch


@dataclass(frozen=True)
class BudgetPlan:
    """What the budget plan chose and why (printed, in plan.txt, plan.yaml and MLflow params)."""

    budget_s: float
    reason: str
    chosen: Candidate
    steps: int
    epochs: int
    iterations_per_epoch: int
    val_every: int
    train_s: float
    val_s: float
    warmup_s: float
    measured: tuple[Candidate, ...]
    why: str
    validations: int = VALIDATIONS
    spacing: tuple[float, float, float] | None = None  # a coarser grid for context (context_spacing)
    # measured as for ``budget_s`` on a CPU where the user gave epochs (``speed_plan_for_epochs``): no
    # deadline; ``epochs`` the user's, ``iterations_per_epoch`` a tenth of the budget's steps unless given
    for_epochs: bool = False

    def params(self) -> dict[str, Any]:
        """Flat MLflow params."""
        measured = {
            "budget.reason": self.reason,
            "budget.step_s": round(self.chosen.step_s, 4),
            "budget.warmup_s": round(self.warmup_s, 1),
            "budget.why": self.why[:450],
        }
        if self.for_epochs:  # no budget: what was measured, and why this size
            return measured
        return {
            **measured,
            "budget.seconds": round(self.budget_s, 1),
            "budget.steps": self.steps,
            "budget.train_s": round(self.train_s, 1),
            "budget.val_s": round(self.val_s, 1),
        }

    def summary(self) -> str:
        rows = "\n".join(
            f"    {'x'.join(map(str, c.patch))} batch {c.batch} {c.model} width {c.features}: {c.step_s:.3f} s/step"
            f" -> {int(self.train_s / c.step_s)} steps"
            for c in self.measured
        )
        if self.for_epochs:
            head = (f"  budget     {self.reason}: {self.epochs} epochs of {self.iterations_per_epoch} steps of "
                    f"{self.chosen.step_s:.3f} s = ~{self.steps * self.chosen.step_s / 60:.0f} min training, "
                    f"{self.warmup_s:.0f} s warm-up")
        else:
            head = (f"  budget     {self.budget_s / 60:.1f} min ({self.reason}): {self.steps} steps of "
                    f"{self.chosen.step_s:.3f} s = {self.train_s:.0f} s training, ~{self.val_s:.0f} s for "
                    f"{self.validations} validation(s), {self.warmup_s:.0f} s warm-up")
        return f"{head}\n    {self.why}\n  measured on this machine:\n{rows}"


def choose_candidate(
    measured: list[Candidate], train_s: float, *, min_steps: int = MIN_STEPS
) -> tuple[Candidate, str]:
    """The largest patch x batch (then the widest) that leaves ``min_steps`` steps in ``train_s``;
    if none does, the one with the most steps. Pure: the rule the tests pin down."""
    if not measured:
        raise ValueError("no candidate was measured")
    enough = [c for c in measured if train_s / c.step_s >= min_steps]
    if enough:
        best = max(enough, key=lambda c: (c.voxels, c.features, -c.step_s))
        return best, (
            f"largest patch with >= {min_steps} steps in {train_s:.0f} s "
            f"({len(enough)} of {len(measured)} candidates qualify)"
        )
    best = min(measured, key=lambda c: c.step_s)
    return best, (
        f"no candidate reaches {min_steps} steps in {train_s:.0f} s: the fastest, "
        f"{int(train_s / best.step_s)} steps (a longer budget would train better)"
    )


def measure_step_seconds(
    cfg: Config,
    patch: tuple[int, int, int],
    batch: int,
    features: int,
    *,
    out_channels: int,
    device: str,
    time_limit_s: float | None = None,
    model_name: str | None = None,
) -> float:
    """Seconds of one training step (forward, Dice+CE, backward, AdamW) at this size on ``device``,
    in the precision and memory layout training will use: one untimed step, then the fastest of
    three timed ones. Random data; the model is thrown away. The fastest, not the mean: on a shared
    machine a burst of other work landed on one size's two steps (64x80x16 at 0.343 s a step, 0.252 s
    an hour before; the next larger size 0.354 s) and the plan changed patch and grid between two runs.

    The layout is the trainer's own choice (``medseg.runtime.training_channels_last``: on a CPU in
    fp32 measured once per machine, network and shape, then cached, so the trainer reads this
    measurement; bf16 is timed channels-last, and the trainer measures the size it trains): timed
    contiguous only, 64x64x32 measured 0.52 s a step against 0.39 s channels-last here, and the
    plan took a patch half that size.
    When the first step alone takes more than a third of ``time_limit_s``, its time is the answer
    (an overestimate: the first step also allocates), so a slow machine is not measured for longer
    than the budget can spare."""
    import time

    import torch

    from medseg.kernels import training_stand_ins
    from medseg.models import build_model
    from medseg.runtime import autocast, resolve_precision, set_memory_format, training_channels_last
    from medseg.train import make_loss, make_optimizer

    dev = torch.device(device)
    precision = resolve_precision(dev, cfg.train.precision, amp=cfg.train.amp, quiet=True)
    update = {"features": features, **({"name": model_name} if model_name else {})}
    model = build_model(cfg.model.model_copy(update=update), out_channels=out_channels).to(dev)
    training_stand_ins(model)  # as the trainer runs it
    loss_fn = make_loss(cfg)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn((batch, int(cfg.model.in_channels or 1), *patch), generator=gen).to(dev)
    label = torch.randint(0, out_channels, (batch, 1, *patch), generator=gen).float().to(dev)
    requested = cfg.train.memory_format
    if requested == "auto" and precision == "bf16" and dev.type == "cpu":
        # bf16 is timed channels-last, not A/B-measured per candidate: that doubled the warm-up here
        # (19 -> 48 s of an 11-minute budget) to choose what the trainer measures once for the size
        # it trains (channels-last won for MONAI's UNet and, with its instance norms keeping the
        # layout, for the classic U-Net: 0.609 against 0.670 s contiguous at 80x80x32, batch 4)
        requested = "channels_last"
    last, _ = training_channels_last(model, tuple(image.shape), out_channels, dev, precision, requested=requested)
    if last:
        set_memory_format(model, torch.channels_last_3d)
        image = image.contiguous(memory_format=torch.channels_last_3d)
    optimizer = make_optimizer(cfg, model.parameters())
    times = []
    for _ in range(4):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(dev, precision):
            out = model(image)
        loss = loss_fn(out, label)
        loss.backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
        if time_limit_s is not None and len(times) == 1 and times[0] > time_limit_s / 3:
            return times[0]
    return float(min(times[1:]))


# the network the plan takes, with none named, where the default's half width is narrower than the
# classes it must tell apart: DynUNet at 8 features missed four of ten organs in 90 s (Dice 0.01-0.50)
# where MONAI's UNet at 16, at the same patch and fewer steps, learned all ten (0.91-0.99; benchmarks/README.md)
MANY_CLASSES_MODEL = "monai_unet"

# CPU: augmentation shares the cores (13.5 % data wait measured by train_throughput.py)
CPU_DATA_OVERHEAD = 1.15


def _model_candidates(cfg: Config, out_channels: int) -> list[tuple[str, int]]:
    """Networks to measure. A network the user named: it, and at half width when the width is not
    given. None named: the default, DynUNet, at its width and half of it (on a 2-core CPU its step
    at the default width is too slow for the step target at any useful patch, and the plan takes
    half: 8 features at the top, as on the three phantom draws of benchmarks/README.md; a GPU keeps
    the full width). No width narrower than the output channels is measured: there the default
    gives way to MONAI's UNet at its width (``MANY_CLASSES_MODEL``: ten organs), and a named network
    keeps its width only. The classic U-Net was measured beside the default until the plan took it
    where nothing reached the step target: on ten organs it reached a validation Dice of 0.30 in
    90 s where MONAI's UNet reached 0.86 (benchmarks/README.md)."""
    given = cfg.model.model_fields_set
    half = cfg.model.features // 2 if "features" not in given and cfg.model.features >= 16 else None
    if half is not None and half < out_channels:  # never narrower than the classes to tell apart
        if "name" not in given:
            return [(MANY_CLASSES_MODEL, cfg.model.features)]
        half = None
    return [(cfg.model.name, cfg.model.features)] + ([(cfg.model.name, half)] if half else [])


def _validation_seconds(cfg: Config, fp: Fingerprint, step_s: float, patches_per_step: int) -> float:
    """Estimated seconds of one validation: sliding windows over the validation cases, each
    window's forward about a third of a training step per patch (no backward)."""
    n_val = max(1, round(fp.n_cases * cfg.train.val_fraction))
    extent = np.asarray(fp.extent_mm_median, dtype=float) / np.asarray(cfg.preprocess.spacing)
    stride = np.asarray(cfg.train.patch_size, dtype=float) * (1.0 - cfg.infer.overlap)
    windows = float(np.prod(np.maximum(1.0, np.ceil(extent / stride))))
    # x2: HD95 and surface Dice, the loader, the overlay (the first measured validation replaces it)
    return n_val * windows * step_s / 3.0 / patches_per_step * 2.0


def plan_for_budget(
    cfg: Config,
    fp: Fingerprint,
    *,
    device: str,
    out_channels: int,
    elapsed_s: float = 0.0,
    measure=measure_step_seconds,
) -> tuple[Config, BudgetPlan | None]:
    """The fingerprint plan, then (with a budget) patch, batch, width and steps from a measured warm-up.

    Only what the user left unset is chosen: a given patch, batch or width is the only
    candidate along that axis. ``elapsed_s``: already spent by this run (counted in the
    budget). Returns the planned config and the budget plan (None without a budget).
    """
    budget, reason = resolve_budget(cfg, device)
    planned = make_plan(cfg, fp)
    for_epochs = budget is None and speed_plan_for_epochs(cfg, device)
    if for_epochs:  # measured for the default budget's share of steps; the run then trains the epochs given
        budget, elapsed_s = CPU_DEFAULT_BUDGET_S, 0.0
    if budget is None:
        return planned, None
    tr, fixed = planned.train, cfg.train.model_fields_set
    assert tr.patch_size is not None  # make_plan fills both
    assert tr.batch_size is not None
    patches = (
        [cast(tuple[int, int, int], tuple(int(p) for p in tr.patch_size))]
        if "patch_size" in fixed
        else candidate_patches(tr.patch_size, divisor_of(planned.model), spacing=planned.preprocess.spacing)
    )
    warm = _Warmup(cfg, planned, fp, budget=budget, elapsed_s=elapsed_s, device=device,
                   out_channels=out_channels, measure=measure,
                   batch=int(tr.batch_size) if "batch_size" in fixed else 2)
    _warm_up(patches, _model_candidates(cfg, out_channels), warm.measure_one, left_s=warm.left_s,
             cap_s=warm.cap_s, elapsed=warm.elapsed)
    fit = warm.fit()
    if "patch_size" not in fixed:
        fit = warm.between_sizes(warm.recheck(fit), tr.patch_size)
    chosen, val_s, train_s, why, validations = fit
    warm.note_a_busy_machine()
    why = "; ".join([why, *warm.notes])
    warmup_s = warm.elapsed()
    steps = max(1, int(train_s / chosen.step_s))
    epochs = 2 * VALIDATIONS
    per_epoch, val_every = max(1, -(-steps // epochs)), -(-epochs // validations)
    if for_epochs:  # the budget's steps set an epoch's length; the epochs (and what else was given) the user's
        epochs = int(tr.epochs)
        per_epoch = tr.iterations_per_epoch if "iterations_per_epoch" in fixed and tr.iterations_per_epoch else per_epoch
        val_every = int(tr.val_every) if "val_every" in fixed else -(-epochs // validations)
        steps = epochs * per_epoch
    spacing, coarser = _context_grid(cfg, planned, fp, chosen.patch)
    plan = BudgetPlan(
        budget_s=budget,
        reason=reason,
        chosen=chosen,
        steps=steps,
        epochs=epochs,
        iterations_per_epoch=per_epoch,
        val_every=val_every,
        train_s=train_s,
        val_s=val_s,
        warmup_s=warmup_s,
        measured=tuple(warm.measured),
        why=f"{why}; {coarser}" if coarser else why,
        validations=validations,
        spacing=spacing,
        for_epochs=for_epochs,
    )
    return apply_budget_plan(planned, plan), plan


_Fit = tuple[Candidate, float, float, str, int]  # chosen, validation s, training s, why, validations


def _cpu_threads() -> float:
    """The CPU time a second of torch's threads can get here: its threads, or fewer usable CPUs."""
    import torch

    from medseg.cgroups import usable_cpus

    return max(0.01, min(float(max(1, torch.get_num_threads())), usable_cpus()))


class _Warmup:
    """The warm-up's state: the step times measured so far (``measured``) and the time it has
    taken, against the budget that the final validation, tuning and export leave."""

    def __init__(self, cfg: Config, planned: Config, fp: Fingerprint, *, budget: float, elapsed_s: float,
                 device: str, out_channels: int, measure, batch: int) -> None:
        import time

        self.cfg, self.planned, self.fp = cfg, planned, fp
        self.budget, self.device, self.out_channels, self.measure = budget, device, out_channels, measure
        self.batch = batch
        self.overhead = CPU_DATA_OVERHEAD if str(device).startswith("cpu") else 1.0
        self.patches_per_step = batch * planned.augment.samples_per_volume  # each case gives that many crops
        self.cap_s = WARMUP_FRACTION * budget
        self.reserve = elapsed_s + FINAL_FRACTION * budget
        self.measured: list[Candidate] = []
        self.notes: list[str] = []  # what the warm-up did beyond measuring each size once
        self._clock = time.perf_counter
        self._start = self._clock()
        self._cpu_start = time.process_time()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def cpu_share(self, cpus: float) -> float | None:
        """The share of the CPU time ``cpus`` (``_cpu_threads``: a container's quota counts) could
        give that this process got while warming up on the CPU: about 1 with the machine to itself,
        less beside other work; None on another device or when the warm-up was too short to tell."""
        import time

        wall = self.elapsed()
        if not str(self.device).startswith("cpu") or wall < 0.5:
            return None
        return (time.process_time() - self._cpu_start) / (wall * cpus)

    def note_a_busy_machine(self) -> None:
        """A note (and a warning) when the warm-up shared the machine: the plan then under-buys."""
        cpus = _cpu_threads()
        share = self.cpu_share(cpus)
        if share is None or share >= BUSY_CPU_SHARE:
            return
        note = (f"the warm-up got {share:.0%} of the CPU time it could use ({cpus:g} CPUs; other work "
                "was running): its step times are slower than this machine's when quiet, so the patch may be "
                "smaller than it allows; the epochs follow the run's own speed")
        log.warning("time budget: %s", note)
        self.notes.append(note)

    def left_s(self) -> float:
        """Training time left once the warm-up stops now."""
        return self.budget - self.reserve - self.elapsed()

    def measure_one(self, patch: tuple[int, int, int], name: str, features: int, limit_s: float) -> Candidate:
        step_s = self.overhead * self.measure(
            self.planned, patch, self.patches_per_step, features, out_channels=self.out_channels,
            device=self.device, time_limit_s=max(1.0, limit_s), model_name=name,
        )
        self.measured.append(Candidate(patch, self.batch, features, step_s, name))
        return self.measured[-1]

    def fit(self, among: Sequence[Candidate] | None = None) -> _Fit:
        return _fit_to_budget(
            self.planned, self.fp, list(self.measured if among is None else among), self.left_s(),
            self.patches_per_step, grid=lambda patch: _context_grid(self.cfg, self.planned, self.fp, patch)[0],
        )

    def refit(self, fit: _Fit, what: str) -> _Fit:
        """Fit again after more measuring; when that took the seconds that let the size chosen
        before qualify, keep it while it still leaves ``KEEP_FRACTION`` of MIN_STEPS."""
        chosen, refit = fit[0], self.fit()
        if refit[0].voxels >= chosen.voxels:
            return refit
        kept = self.fit(among=[chosen])
        if kept[2] / chosen.step_s < KEEP_FRACTION * MIN_STEPS:
            return refit
        size = "x".join(map(str, chosen.patch))
        return (*kept[:3], f"{fit[3]}; {size} kept: it left {MIN_STEPS} steps before {what}, "
                f"{int(kept[2] / chosen.step_s)} after", kept[4])

    def recheck(self, fit: _Fit) -> _Fit:
        """Measure the next size above the chosen one (same network) once more when it missed
        MIN_STEPS by less than ``RECHECK_FRACTION``, keep the faster of its two timings (a burst of
        other work only ever adds time) and fit again."""
        chosen, train_s = fit[0], fit[2]
        larger = [c for c in self.measured
                  if (c.model, c.features) == (chosen.model, chosen.features) and c.voxels > chosen.voxels]
        if not larger:
            return fit
        above = min(larger, key=lambda c: c.voxels)
        if train_s / above.step_s < RECHECK_FRACTION * MIN_STEPS:
            return fit
        again = self.measure_one(above.patch, above.model, above.features, self.cap_s)
        self.measured.pop()  # ``again``: one entry per size, the faster timing
        if again.step_s < above.step_s:
            self.measured[self.measured.index(above)] = again
        self.notes.append(f"{'x'.join(map(str, above.patch))} measured twice ({above.step_s:.3f} and "
                          f"{again.step_s:.3f} s a step, the faster kept)")
        return self.refit(fit, "it was measured again")

    def between_sizes(self, fit: _Fit, top: Sequence[float]) -> _Fit:
        """With room to spare at the chosen size, measure the sizes between it and the next one
        measured larger (largest first, the first that leaves MIN_STEPS ends it) and fit again."""
        chosen, train_s = fit[0], fit[2]
        if train_s / chosen.step_s < MIN_STEPS:
            return fit
        between = _sizes_between(chosen, self.measured, top, divisor_of(self.planned.model),
                                 self.planned.preprocess.spacing)[:MAX_SIZES_BETWEEN]
        for patch in between:  # largest first: the first that leaves MIN_STEPS is the one
            if train_s / self.measure_one(patch, chosen.model, chosen.features, self.cap_s).step_s >= MIN_STEPS:
                break
        if not between:
            return fit
        refit = self.refit(fit, "the sizes above it were measured")
        if refit[0].patch in between:
            below = "x".join(map(str, chosen.patch))
            refit = (*refit[:3], f"{refit[3]} (measured between the candidate sizes, above {below})", refit[4])
        return refit


def _warm_up(
    patches: list[tuple[int, int, int]],
    models: list[tuple[str, int]],
    measure_one: Callable[[tuple[int, int, int], str, int, float], Candidate],
    *,
    left_s: Callable[[], float],
    cap_s: float,
    elapsed: Callable[[], float],
) -> None:
    """Measure every network at each size, smallest first; a network whose step no longer leaves
    MIN_STEPS in ``left_s()`` is not measured larger, and the warm-up stops after ``cap_s``."""
    alive = list(models)
    latest: dict[tuple[str, int], float] = {}  # the last size's step, per network
    for patch in patches:
        for name, features in list(alive):
            if elapsed() > cap_s and latest:
                break
            step_s = measure_one(patch, name, features, cap_s - elapsed()).step_s
            if left_s() / step_s < MIN_STEPS:
                alive.remove((name, features))
            latest[(name, features)] = step_s
        if not alive or elapsed() > cap_s:
            break
        # the next size measures the fastest network first: the warm-up's time cap then cuts the
        # slow ones (measured on seed 1: the classic U-Net at 64x64x48, 1.17 s a step, used the cap
        # and MONAI's UNet, twice as fast and the one the rule would have taken, went unmeasured)
        alive.sort(key=lambda m: latest[m])


def _sizes_between(
    chosen: Candidate,
    measured: list[Candidate],
    top: Sequence[float],
    divisor: int,
    spacing: Sequence[float] | None,
) -> list[tuple[int, int, int]]:
    """The shrink path's patches between ``chosen`` and the next larger size measured for its
    network, largest first ([] when none was measured larger).

    The candidate sizes lie about a factor 2 in voxels apart, and the largest patch that leaves
    MIN_STEPS can lie between two of them: on the seed-6 phantoms 64x64x16 left 2442 steps and the
    next size, 64x80x32, 1052; the path's 64x64x32 between them was never measured."""
    same = [c for c in measured if (c.model, c.features) == (chosen.model, chosen.features)]
    larger = [c for c in same if int(np.prod(c.patch)) > int(np.prod(chosen.patch))]
    if not larger:
        return []
    floor, ceiling = int(np.prod(chosen.patch)), min(int(np.prod(c.patch)) for c in larger)
    seen = {c.patch for c in same}
    path = _shrink_path(np.asarray(top, dtype=float), divisor, spacing)  # shrinks: largest first
    patches = [cast(tuple[int, int, int], tuple(int(v) for v in p)) for p in path]
    return [p for p in patches if floor < int(np.prod(p)) < ceiling and p not in seen]


def _context_grid(
    cfg: Config, planned: Config, fp: Fingerprint, patch: tuple[int, int, int]
) -> tuple[tuple[float, float, float] | None, str]:
    """The budget plan's coarser grid and why (``context_spacing``), or (None, '') when unchanged or
    when the user gave the grid or the patch (their choice of context is kept)."""
    if cfg.preprocess.spacing is not None or "patch_size" in cfg.train.model_fields_set:
        return None, ""
    assert planned.preprocess.spacing is not None  # make_plan fills it
    grid, why = context_spacing(
        planned.preprocess.spacing, fp.extent_mm_median, patch, fp.label_volumes_ml, fp.spacing_median
    )
    return (grid, why) if why else (None, "")


def _fit_to_budget(
    cfg: Config,
    fp: Fingerprint,
    measured: list[Candidate],
    left_s: float,
    patches_per_step: int,
    grid: Callable[[tuple[int, int, int]], tuple[float, float, float] | None] = lambda patch: None,
) -> tuple[Candidate, float, float, str, int]:
    """Choose with validation time taken out of the budget (it depends on the patch chosen, and on
    the grid ``grid`` gives that patch: seed 1's coarser grid held a third of the voxels, and the
    estimate on the planned grid kept 129 s of 11 minutes for 5 validations of about 3 s each, so
    the patch was chosen for 465 s of training):
    up to VALIDATIONS validations, fewer (at least the final one) when they would take more
    than a quarter of the time left."""
    left_s = max(left_s, 1.0)
    chosen, why = choose_candidate(measured, left_s * 0.85)
    validations, val_s = 1, 0.0
    for _ in range(3):  # the validation estimate depends on the choice: settle it
        probe = cfg.model_copy(deep=True)
        probe.train.patch_size = tuple(float(p) for p in chosen.patch)  # type: ignore[assignment]
        probe.preprocess.spacing = grid(chosen.patch) or probe.preprocess.spacing
        one = _validation_seconds(probe, fp, chosen.step_s, patches_per_step)
        validations = int(np.clip(0.25 * left_s // max(one, 1e-6), 1, VALIDATIONS))
        val_s = min(validations * one, 0.5 * left_s)
        again, why = choose_candidate(measured, left_s - val_s)
        if again == chosen:
            break
        chosen = again
    return chosen, val_s, left_s - val_s, why, validations


def apply_budget_plan(cfg: Config, plan: BudgetPlan) -> Config:
    """``cfg`` with the budget plan's patch, batch, width, steps and validation cadence set."""
    out = cfg.model_copy(deep=True)
    tr = out.train
    tr.patch_size = tuple(float(p) for p in plan.chosen.patch)  # type: ignore[assignment]
    tr.batch_size = plan.chosen.batch
    out.model.features = plan.chosen.features
    out.model.name = plan.chosen.model
    if plan.spacing is not None:
        out.preprocess.spacing = plan.spacing
    tr.epochs = plan.epochs
    tr.iterations_per_epoch = plan.iterations_per_epoch
    tr.val_every = plan.val_every
    if not plan.for_epochs:  # with the user's epochs there is no deadline
        tr.time_budget_s = plan.budget_s
    if "lr_warmup_fraction" not in cfg.train.model_fields_set:
        tr.lr_warmup_fraction = 0.03
    return out


def lr_factor(
    step: int, total_steps: int, *, warmup_fraction: float, kind: str, progress: float | None = None
) -> float:
    """The learning-rate multiplier at ``step`` of ``total_steps``: linear warm-up, then cosine or
    poly (0.9) decay to 0. ``progress`` (0-1, e.g. the budget's elapsed share) overrides the step's
    when larger, so that a run slower than planned still finishes its decay by the deadline."""
    total = max(1, total_steps)
    done = step / total
    if progress is not None:
        done = max(done, progress)
    done = min(max(done, 0.0), 1.0)
    warm = warmup_fraction
    if warm > 0 and done < warm:
        return max(done / warm, 1e-3)
    rest = (done - warm) / max(1e-9, 1.0 - warm)
    if kind == "cosine":
        return 0.5 * (1.0 + float(np.cos(np.pi * rest)))
    return max(0.0, 1.0 - rest) ** 0.9


@dataclass
class Deadline:
    """The run's clock under a time budget: when training must stop so that the last validation,
    the bundle, post-processing tuning and MLflow still end within the budget.

    ``started`` is the run's start (``time.monotonic()``); ``spent_before`` what a resumed run
    had already used; the estimate of one validation starts from the plan and then follows the
    measured ones."""

    budget_s: float
    started: float
    spent_before: float = 0.0
    final_s: float = 0.0
    validation_s: float = 0.0
    first_step: float | None = None
    step_s: float = 0.0
    _last_step: float | None = None

    @classmethod
    def for_run(
        cls, cfg: Config, plan: BudgetPlan | None, *, started: float, history: list[dict[str, float]]
    ) -> Deadline | None:
        """A deadline when the run has a budget (None otherwise); resumed runs keep what they spent."""
        budget = cfg.train.time_budget_s
        if budget is None:
            return None
        spent = max([float(h.get("elapsed_s", 0.0)) for h in history] or [0.0])
        per_validation = plan.val_s / plan.validations if plan is not None else 0.0
        return cls(budget, started, spent, FINAL_FRACTION * budget, per_validation)

    def elapsed(self) -> float:
        import time

        return self.spent_before + time.monotonic() - self.started

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def validation_took(self, seconds: float) -> None:
        """A validation's measured duration (the next ones are assumed to take as long, +10 %)."""
        self.validation_s = 1.1 * seconds
        self._last_step = None  # the next interval would include the validation

    def step_done(self) -> None:
        """Called after each training step: the time since the previous one is the next step's estimate."""
        import time

        now = time.monotonic()
        if self._last_step is not None:
            self.step_s = now - self._last_step
        self._last_step = now

    def training_left(self) -> float:
        """Seconds of training left before the last validation and the final work must start."""
        return self.remaining() - self.validation_s - self.final_s

    def must_stop_training(self) -> bool:
        """True when one more step would leave too little time to validate and finish."""
        return self.remaining() <= self.step_s + self.validation_s + self.final_s

    def training_progress(self) -> float:
        """Share (0-1) of the training time used, from the first step to the latest stop time."""
        import time

        now = time.monotonic()
        if self.first_step is None:
            self.first_step = now
        end = self.started + self.budget_s - self.spent_before - self.final_s - self.validation_s
        return float(min(1.0, (now - self.first_step) / max(end - self.first_step, 1e-6)))
