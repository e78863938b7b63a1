"""MONAI transform chains: deterministic preprocessing (cached) and random augmentation.

``build_preprocess(cfg)`` loads (through ``medseg.io``, the reader of record), orients
to RAS, resamples to the planned spacing, crops to the body and normalises
intensities; ``build_augment(cfg)`` is applied per step. Spatial metadata rides
with the data as MONAI ``MetaTensor`` affines, which is how ``medseg.infer`` maps
predictions back to the source grid.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medseg.config import Config
from medseg.io import Volume, load_label, load_volume


def to_metatensor(volume: Volume) -> MetaTensor:
    """A channel-first MetaTensor carrying the volume's affine (RAS)."""
    array = torch.as_tensor(np.ascontiguousarray(volume.array)[None].astype(np.float32))
    return MetaTensor(array, affine=torch.as_tensor(volume.affine, dtype=torch.float64))


class LoadVolumed(MapTransform):
    """Load ``image`` (NIfTI or DICOM series) and ``label`` (NIfTI) paths with medseg's readers.

    A ``Volume`` already in the dict is used as it is (inference on in-memory data).
    """

    def __init__(self, keys=("image", "label"), allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.get("image")
        if not isinstance(image, Volume) and image is not None:
            image = load_volume(image)
        if image is not None:
            d["image"] = to_metatensor(image)
        label = d.get("label")
        if label is not None and not isinstance(label, Volume):
            label = load_label(label, image=image if isinstance(image, Volume) else None)
        if label is not None:
            d["label"] = to_metatensor(label)
        return d


class _AboveThreshold:
    """Picklable foreground selector for CropForegroundd."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold


def foreground_threshold(cfg: Config) -> float:
    if cfg.preprocess.foreground_threshold is not None:
        return cfg.preprocess.foreground_threshold
    return -500.0 if cfg.preprocess.intensity.kind == "ct" else 0.0


def build_preprocess(
    cfg: Config, *, keys: tuple[str, ...] = ("image", "label"), load: bool = True
) -> Compose:
    """Deterministic chain: load -> RAS -> planned spacing -> body crop -> intensity normalisation."""
    pre = cfg.preprocess
    if pre.spacing is None:
        raise ValueError("preprocess.spacing is not set: run the plan (medseg.plan.make_plan) first")
    modes = tuple("nearest" if k == "label" else "bilinear" for k in keys)
    chain: list[Any] = [LoadVolumed(keys)] if load else []
    chain += [
        Orientationd(keys=keys, axcodes=pre.orientation, labels=None),
        Spacingd(keys=keys, pixdim=pre.spacing, mode=modes, padding_mode="border", dtype=np.float32),
    ]
    if pre.crop_foreground:
        chain.append(
            CropForegroundd(
                keys=keys,
                source_key="image",
                select_fn=_AboveThreshold(foreground_threshold(cfg)),
                margin=4,
                allow_smaller=True,
            )
        )
    chain += intensity_transforms(cfg)
    chain.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return Compose(chain)


def intensity_transforms(cfg: Config) -> list[Any]:
    it = cfg.preprocess.intensity
    if it.kind == "ct":
        if it.window is None or it.mean is None or it.std is None:
            raise ValueError(
                "CT normalisation needs preprocess.intensity.window/mean/std (planned from the dataset)"
            )
        lo, hi = it.window
        return [
            ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True),
            NormalizeIntensityd(keys="image", subtrahend=it.mean, divisor=max(it.std, 1e-6)),
        ]
    if it.kind in ("mr", "zscore"):
        return [NormalizeIntensityd(keys="image", nonzero=True)]
    return []


def build_augment(cfg: Config, *, keys: tuple[str, ...] = ("image", "label")) -> Compose:
    """Random chain, per training step: foreground-biased patch crop, then spatial and intensity augmentation."""
    aug = cfg.augment
    patch = [int(p) for p in cfg.train.patch_size]  # type: ignore[union-attr]
    modes = tuple("nearest" if k == "label" else "bilinear" for k in keys)
    rot = math.radians(aug.rotate_range_deg)
    return Compose(
        [
            SpatialPadd(keys=keys, spatial_size=patch, mode="constant"),
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=patch,
                pos=aug.pos_neg_ratio,
                neg=1.0,
                num_samples=aug.samples_per_volume,
                image_key="image",
                allow_smaller=False,
            ),
            RandAffined(
                keys=keys,
                prob=max(aug.rotate_prob, aug.scale_prob),
                rotate_range=(rot, rot, rot),
                scale_range=(aug.scale_range,) * 3,
                mode=modes,
                padding_mode="border",
            ),
            *[RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=axis) for axis in range(3)],
            RandScaleIntensityd(keys="image", factors=aug.intensity_scale, prob=aug.intensity_scale_prob),
            RandShiftIntensityd(keys="image", offsets=aug.intensity_shift, prob=aug.intensity_shift_prob),
            RandGaussianNoised(keys="image", prob=aug.noise_prob, std=aug.noise_std),
            EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
        ]
    )
