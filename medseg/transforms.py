"""MONAI transform chains: deterministic preprocessing (cached) and random augmentation.

``build_preprocess(cfg)`` loads (through ``medseg.io``, the reader of record), orients
to RAS, resamples to the planned spacing, crops to the body and normalises
intensities; ``build_augment(cfg)`` is applied per step. Spatial metadata rides
with the data as MONAI ``MetaTensor`` affines, which is how ``medseg.predict`` maps
predictions back to the source grid.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    Orientationd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    RandZoomd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Spacing,
    SpatialPadd,
)
from monai.transforms.transform import Transform

from medseg.config import Config, IntensityConfig
from medseg.errors import MedsegError
from medseg.io import Volume, checked_label, load_label


def to_metatensor(volume: Volume | Sequence[Volume]) -> MetaTensor:
    """A channel-first MetaTensor carrying the volume's affine (RAS); a sequence of volumes on one
    grid (a multi-channel case, see ``medseg.data.load_channels``) gives one channel each."""
    volumes = [volume] if isinstance(volume, Volume) else list(volume)
    arrays = [np.asarray(v.array, dtype=np.float32) for v in volumes]
    # one channel: a view with a channel axis, not a stacked copy (0.6 GB on a 512x512x600 CT)
    array = arrays[0][None] if len(arrays) == 1 else np.stack(arrays)
    return MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(volumes[0].affine, dtype=torch.float64))


class LoadVolumed(MapTransform):
    """Load ``image`` (NIfTI or DICOM series; a list of paths or a 4D NIfTI for several channels)
    and ``label`` (NIfTI) with medseg's readers.

    ``Volume``s already in the dict are used as they are (inference on in-memory data).
    ``resample_channels``: channels off the first channel's grid are resampled onto it
    instead of refused. ``label_values`` (channel -> stored value, ``Config.label_values``): the
    label's values become network channels, a value that is no label's refused (``medseg.labels``).
    """

    def __init__(
        self,
        keys=("image", "label"),
        allow_missing_keys: bool = True,
        *,
        resample_channels: bool = False,
        label_values: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resample_channels = resample_channels
        self.label_values = label_values

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medseg.data import load_channels

        d = dict(data)
        image = d.get("image")
        channels: list[Volume] | None = None
        if isinstance(image, Volume):
            channels = [image]
        elif isinstance(image, list | tuple) and image and all(isinstance(v, Volume) for v in image):
            channels = list(image)
        elif image is not None:
            channels = load_channels(image, resample=self.resample_channels)
        if channels is not None:
            d["image"] = to_metatensor(channels)
        label = d.get("label")
        if label is not None and not isinstance(label, Volume):
            label = load_label(label, image=channels[0] if channels else None, label_values=self.label_values)
        elif label is not None and self.label_values is not None:
            label = checked_label(label, label_values=self.label_values)
        if label is not None:
            d["label"] = to_metatensor(label)
        return d


class ChannelIntensityd(MapTransform):
    """Normalise each channel of ``image`` its own way (``IntensityConfig`` per channel)."""

    def __init__(self, channels: Sequence[IntensityConfig], key: str = "image") -> None:
        super().__init__([key])
        self.per_channel = [Compose(_intensity_ops(it, keys=None)) for it in channels]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != len(self.per_channel):
                raise ValueError(
                    f"image has {image.shape[0]} channels; the plan normalises {len(self.per_channel)}"
                )
            d[key] = torch.cat([ops(image[c : c + 1]) for c, ops in enumerate(self.per_channel)])
        return d


class _AboveThreshold:
    """Picklable foreground selector for CropForegroundd."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold


CROP_MARGIN_MM = 4.0 * 1.5
"""Kept around the body by the crop: four model voxels of a typical 1.5 mm plan."""


class BodyCropd(MapTransform):
    """Crop ``keys`` to the voxels of the first key above ``threshold``, plus ``margin_mm`` per axis
    (in the grid's own voxels, at least one): MONAI's ``CropForegroundd`` with a margin in mm,
    so a scan of thick slices keeps the same body border as a thin one. A scan with nothing above
    the threshold is kept whole. medseg maps predictions back by the grid's affine, not by
    inverting the chain."""

    def __init__(self, keys: Sequence[str], *, threshold: float, margin_mm: float) -> None:
        super().__init__(keys)
        self.threshold, self.margin_mm = threshold, margin_mm

    def _crop(self, data: Mapping[Any, Any]) -> CropForegroundd:
        image = data[self.keys[0]]
        affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=float)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        margin = [max(1, math.ceil(self.margin_mm / max(float(s), 1e-6))) for s in spacing]
        return CropForegroundd(
            keys=self.keys,
            source_key=str(self.keys[0]),
            select_fn=_AboveThreshold(self.threshold),
            margin=margin,
            allow_smaller=True,
        )

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        if not bool((data[self.keys[0]] > self.threshold).any()):
            return dict(data)  # nothing above the threshold: no body to crop to, the whole scan is kept
        return dict(self._crop(data)(data))


class SeparableSpacingd(MapTransform):
    """MONAI's ``Spacingd`` (border padding, float32), with linear keys resampled one axis at a time.

    The output grid and affine are MONAI's own (its ``Spacing`` run lazily computes them). Spacing
    keeps the grid's directions (oblique ones too), so the scan's grid and that output differ by
    scales and a shift, and ``medseg.separable`` interpolates along each axis in slabs: the values of
    MONAI's ``grid_sample`` up to rounding, without its sampling grid of three floats per output
    voxel (1 GB on a 512x512x600 CT's model grid), 9.4 -> 5.5 s and a peak of 2.3 -> 1.4 GB there.
    Nearest-neighbour keys (labels), and any grid that is not axis-aligned, go through MONAI's
    ``Spacing`` unchanged, so training, inference and the exported MONAI bundle see the same grid."""

    def __init__(self, keys: Sequence[str], *, pixdim: Sequence[float], modes: Sequence[str]) -> None:
        super().__init__(keys)
        self.modes = dict(zip(keys, modes, strict=True))
        self._eager = {
            mode: Spacing(pixdim=pixdim, mode=mode, padding_mode="border", dtype=np.float32)
            for mode in set(modes)
        }
        self._geometry = Spacing(pixdim=pixdim, mode="bilinear", padding_mode="border", dtype=np.float32, lazy=True)

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mode = self.modes[key]
            out = self._separable(d[key]) if mode == "bilinear" else None
            d[key] = self._eager[mode](d[key]) if out is None else out
        return d

    def _separable(self, img: MetaTensor) -> MetaTensor | None:
        """``img`` resampled one axis at a time, or None where the grids are not axis-aligned."""
        from medseg.separable import axis_aligned_map, resample_axis_aligned

        if not isinstance(img, MetaTensor) or img.pending_operations or img.ndim != 4:
            return None
        pending = self._geometry(img)  # shares img's data; the resampling recorded, not run
        assert isinstance(pending, MetaTensor)  # Spacing returns its input's type
        shape = tuple(int(n) for n in pending.peek_pending_shape())
        dst = np.asarray(pending.peek_pending_affine(), dtype=np.float64)
        to_source = np.linalg.solve(np.asarray(img.affine, dtype=np.float64), dst)
        maps = axis_aligned_map(to_source, shape)
        if maps is None:
            return None
        out = resample_axis_aligned(img.as_tensor(), maps, shape, border=True)
        meta = {k: v for k, v in img.meta.items() if k != "affine"}
        result = MetaTensor(out, affine=torch.as_tensor(dst), meta=meta)
        result.applied_operations = [*img.applied_operations, pending.pending_operations[-1]]
        return result


def _primary_kind(cfg: Config) -> str:
    """The first channel's normalisation kind (the body crop looks at raw intensities)."""
    channels = cfg.preprocess.channels
    return channels[0].kind if channels else cfg.preprocess.intensity.kind


def foreground_threshold(cfg: Config) -> float:
    if cfg.preprocess.foreground_threshold is not None:
        return cfg.preprocess.foreground_threshold
    return -500.0 if _primary_kind(cfg) == "ct" else 0.0


def build_preprocess(
    cfg: Config, *, keys: tuple[str, ...] = ("image", "label"), load: bool = True
) -> Compose:
    """Deterministic chain: load -> RAS -> body crop -> planned spacing -> intensity normalisation.

    The body is cropped before resampling, in the scan's own grid (a reorientation is a view, the
    crop a slice): a CT is mostly air around the body, and resampling the whole field of view took
    2.3 of 2.4 s of preprocessing on a 512x512x200 scan with a small body. The crop keeps
    ``CROP_MARGIN_MM`` around the body (at least one voxel), so the resampled grid still holds the
    body's whole border."""
    pre = cfg.preprocess
    if pre.spacing is None:
        raise ValueError("preprocess.spacing is not set: run the plan (medseg.plan.make_plan) first")
    modes = tuple("nearest" if k == "label" else "bilinear" for k in keys)
    chain: list[Any] = []
    if load:
        chain.append(LoadVolumed(keys, resample_channels=pre.resample_channels, label_values=cfg.label_values))
    chain.append(Orientationd(keys=keys, axcodes=pre.orientation, labels=None))
    if pre.crop_foreground:
        chain.append(BodyCropd(keys, threshold=foreground_threshold(cfg), margin_mm=CROP_MARGIN_MM))
    chain.append(SeparableSpacingd(keys, pixdim=pre.spacing, modes=modes))
    chain += intensity_transforms(cfg)
    chain.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return Compose(chain)


def preprocessed(chain: Compose, item: Mapping[Any, Any]) -> dict[Hashable, Any]:
    """``chain(item)``, with a medseg error raised inside it (a label value that is no label's, a
    label off its image's grid) raised as itself: MONAI wraps what a transform raises in a
    ``RuntimeError`` naming the transform, and the CLI turns medseg's errors into one line naming
    the file."""
    try:
        return chain(item)
    except RuntimeError as exc:
        if isinstance(exc.__cause__, MedsegError):
            raise exc.__cause__ from None
        raise


def intensity_transforms(cfg: Config) -> list[Any]:
    """Intensity normalisation of ``image``: the plan's one, or one per channel."""
    if cfg.preprocess.channels:
        return [ChannelIntensityd(cfg.preprocess.channels)]
    return _intensity_ops(cfg.preprocess.intensity, keys="image")


def _intensity_ops(it: IntensityConfig, *, keys: str | None) -> list[Any]:
    """The normalisation ``it`` as MONAI transforms: dict transforms on ``keys``, or array ones (None)."""
    if it.kind == "ct":
        if it.window is None or it.mean is None or it.std is None:
            raise ValueError(
                "CT normalisation needs preprocess.intensity.window/mean/std (planned from the dataset)"
            )
        lo, hi = it.window
        clip: dict[str, Any] = {"a_min": lo, "a_max": hi, "b_min": lo, "b_max": hi, "clip": True}
        zscore: dict[str, Any] = {"subtrahend": it.mean, "divisor": max(it.std, 1e-6)}
        if keys is None:
            return [ScaleIntensityRange(**clip), NormalizeIntensity(**zscore)]
        return [ScaleIntensityRanged(keys=keys, **clip), NormalizeIntensityd(keys=keys, **zscore)]
    if it.kind in ("mr", "zscore"):
        return [
            NormalizeIntensity(nonzero=True) if keys is None else NormalizeIntensityd(keys=keys, nonzero=True)
        ]
    return []


def bias_field_prob(cfg: Config) -> float:
    """The bias-field probability: as configured, else on for MR and off for CT."""
    if cfg.augment.bias_field_prob is not None:
        return cfg.augment.bias_field_prob
    kinds = [c.kind for c in cfg.preprocess.channel_intensities()]
    return 0.15 if "mr" in kinds else 0.0


def build_sampling_prep(cfg: Config, *, keys: tuple[str, ...] = ("image", "label")) -> Compose:
    """Deterministic part of patch sampling, cached with the preprocessing: pad to the patch
    size and locate the voxels of each class once, instead of at every step (74 -> 9 ms per 80x80x40 volume here)."""
    patch = [int(p) for p in cfg.train.patch_size]  # type: ignore[union-attr]
    index: Any = (
        ClassesToIndicesd(keys="label", num_classes=_num_classes(cfg))
        if crop_kind(cfg) == "label_classes"
        else FgBgToIndicesd(keys="label")
    )
    return Compose([SpatialPadd(keys=keys, spatial_size=patch, mode="constant"), index])


def build_train_chain(cfg: Config) -> Compose:
    """The whole per-case training chain: preprocessing and sampling prep (flat), then the
    augmentation in one ``WithoutMetadata`` step.

    Flat because MONAI's ``CacheDataset`` caches up to the first random transform of the
    ``Compose`` it holds and does not look into nested ones: nested, nothing is cached and every
    step loads and resamples its volume again (0.36 s against 0.08 s per step of two 48^3 cases
    here). The augmentation step is itself random, so the cache ends right before it; it copies
    each patch out of the cached volume first, so the cache needs no copy per step
    (``copy_cache=False``). Seed the augmentation with ``chain.set_random_state``.
    """
    cached = Compose([build_preprocess(cfg), build_sampling_prep(cfg)]).flatten()
    return Compose([*cached.transforms, WithoutMetadata(build_augment(cfg, precomputed=True))])


class OwnPatches(Transform):
    """Each tensor of a cropped sample copied out of the volume it was cropped from (a crop is a view
    of the cached case): nothing later in the chain can write into the cache."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in data.items()}


class WithoutMetadata(Randomizable, Transform):
    """Run a random chain with MONAI's metadata tracking off (``set_track_meta(False)``), restored
    after it even when it fails: patches need no affine or transform history. With the cache's copy
    per step gone (``OwnPatches``) the augmentation of a case of two 48^3 patches went from 15.6 to
    7.0 ms here (interleaved runs in one process). MONAI's switch is process-wide; the training chain
    runs in the loader's process (or in each worker), one call at a time."""

    def __init__(self, chain: Compose) -> None:
        self.chain = chain

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed=seed, state=state)
        self.chain.set_random_state(seed=seed, state=state)
        return self

    def randomize(self, data: Any = None) -> None:
        pass  # the wrapped transforms draw for themselves

    def __call__(self, data: Any) -> Any:
        from monai.data import get_track_meta, set_track_meta

        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return self.chain(data)
        finally:
            set_track_meta(tracking)


def _num_classes(cfg: Config) -> int | None:
    return max(cfg.labels) + 1 if cfg.labels else None


def crop_kind(cfg: Config) -> str:
    """The patch sampler: ``augment.crop``, with ``auto`` = ``label_classes`` for more than one
    foreground class (so every organ is a patch centre equally often), else ``pos_neg``."""
    if cfg.augment.crop != "auto":
        return cfg.augment.crop
    foreground = [k for k in (cfg.labels or {}) if k != 0]
    return "label_classes" if len(foreground) > 1 else "pos_neg"


def class_ratios(cfg: Config) -> list[float] | None:
    """Centre-class weights for ``label_classes``: each foreground label 1, background so that
    foreground centres keep the ``pos_neg_ratio`` share (2:1 = two thirds, each organ alike).
    Label values the config does not name (gaps in the numbering) weigh 0."""
    n = _num_classes(cfg)
    if n is None:
        return None
    foreground = [k for k in cfg.labels or {} if k != 0]
    ratios = [0.0] * n
    for k in foreground:
        ratios[k] = 1.0
    ratios[0] = len(foreground) / max(cfg.augment.pos_neg_ratio, 1e-6)
    return ratios


def build_augment(
    cfg: Config, *, keys: tuple[str, ...] = ("image", "label"), precomputed: bool = False
) -> Compose:
    """Random chain, per training step: foreground-biased patch crop, spatial, then intensity augmentation.

    Every transform is MONAI's own; its probability comes from ``cfg.augment`` and a
    probability of 0 leaves it out of the chain. Seed it with ``chain.set_random_state``.
    ``precomputed``: the items went through ``build_sampling_prep`` (as training caches them).
    """
    chain = [
        *_crop_steps(cfg, keys, precomputed=precomputed),
        *_spatial_steps(cfg, keys),
        *_intensity_steps(cfg),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
    ]
    return Compose(chain)


def _crop_steps(cfg: Config, keys: tuple[str, ...], *, precomputed: bool) -> list[Any]:
    """The patch crop (by label classes, or foreground/background), with its padding or the
    removal of the precomputed sampling indices, and the patches copied out of the case."""
    aug = cfg.augment
    patch = [int(p) for p in cfg.train.patch_size]  # type: ignore[union-attr]
    kind = crop_kind(cfg)
    if kind == "label_classes":
        crop: Any = RandCropByLabelClassesd(
            keys=keys,
            label_key="label",
            spatial_size=patch,
            ratios=class_ratios(cfg),
            num_classes=_num_classes(cfg),
            num_samples=aug.samples_per_volume,
            indices_key="label_cls_indices" if precomputed else None,
            warn=False,
        )
    else:
        # background patches anywhere in the (body-cropped) volume, as nnU-Net samples them
        crop = RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=patch,
            pos=aug.pos_neg_ratio,
            neg=1.0,
            num_samples=aug.samples_per_volume,
            fg_indices_key="label_fg_indices" if precomputed else None,
            bg_indices_key="label_bg_indices" if precomputed else None,
            allow_smaller=False,
        )
    if precomputed:
        chain: list[Any] = [
            crop,
            DeleteItemsd(
                keys=["label_cls_indices"]
                if kind == "label_classes"
                else ["label_fg_indices", "label_bg_indices"]
            ),
        ]
    else:
        chain = [SpatialPadd(keys=keys, spatial_size=patch, mode="constant"), crop]
    return [*chain, OwnPatches()]  # a crop is a view of the (cached) case


def _spatial_steps(cfg: Config, keys: tuple[str, ...]) -> list[Any]:
    """Elastic deformation, rotation, scaling, zoom and flips (label maps nearest-neighbour)."""
    aug = cfg.augment
    modes = tuple("nearest" if k == "label" else "bilinear" for k in keys)
    rot = math.radians(aug.rotate_range_deg)
    chain: list[Any] = []
    if aug.elastic_prob > 0:
        # displacement in voxels of the patch grid; applied before the other spatial transforms
        chain.append(
            Rand3DElasticd(
                keys=keys,
                sigma_range=aug.elastic_sigma,
                magnitude_range=aug.elastic_magnitude,
                prob=aug.elastic_prob,
                mode=modes,
                padding_mode="border",
            )
        )
    # rotation and scaling each with its own probability, as the config promises; one resampling
    if aug.rotate_prob > 0 or aug.scale_prob > 0:
        chain.append(
            RandRotateScaled(keys, rotate_prob=aug.rotate_prob, rotate_range=rot, scale_prob=aug.scale_prob,
                             scale_range=aug.scale_range, modes=modes)
        )
    if aug.zoom_prob > 0:
        chain.append(
            RandZoomd(
                keys=keys,
                prob=aug.zoom_prob,
                min_zoom=aug.zoom_range[0],
                max_zoom=aug.zoom_range[1],
                mode=tuple("nearest" if k == "label" else "trilinear" for k in keys),
                padding_mode="edge",
                keep_size=True,
            )
        )
    if aug.flip_prob > 0:
        chain += [RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=axis) for axis in range(3)]
    return chain


def _intensity_steps(cfg: Config) -> list[Any]:
    """Image-only: low resolution, blur, noise, bias field, brightness, shift and contrast."""
    aug = cfg.augment
    chain: list[Any] = []
    if aug.low_res_prob > 0:
        chain.append(
            RandSimulateLowResolutiond(keys="image", prob=aug.low_res_prob, zoom_range=aug.low_res_zoom)
        )
    if aug.blur_prob > 0:
        lo, hi = aug.blur_sigma
        chain.append(
            RandGaussianSmoothd(
                keys="image", sigma_x=(lo, hi), sigma_y=(lo, hi), sigma_z=(lo, hi), prob=aug.blur_prob
            )
        )
    if aug.noise_prob > 0:
        chain.append(RandNoised(keys="image", prob=aug.noise_prob, std=aug.noise_std))
    if aug.label_intensity_prob > 0:
        # after blur and noise (as measured in benchmarks/README.md): an additive shift keeps the noise
        chain.append(RandLabelIntensityd(prob=aug.label_intensity_prob, offsets=aug.label_intensity_shift))
    if bias_field_prob(cfg) > 0:
        chain.append(
            RandBiasFieldd(keys="image", prob=bias_field_prob(cfg), coeff_range=aug.bias_field_coeff)
        )
    # several channels (different contrasts): brightness, shift and gamma drawn per channel
    per_channel: dict[str, Any] = {"channel_wise": True} if (cfg.model.in_channels or 1) > 1 else {}
    if aug.intensity_scale_prob > 0:
        chain.append(
            RandScaleIntensityd(
                keys="image", factors=aug.intensity_scale, prob=aug.intensity_scale_prob, **per_channel
            )
        )
    if aug.intensity_shift_prob > 0:
        chain.append(
            RandShiftIntensityd(
                keys="image", offsets=aug.intensity_shift, prob=aug.intensity_shift_prob, **per_channel
            )
        )
    if aug.contrast_prob > 0:
        contrast = RandAdjustContrastd(
            keys="image", prob=aug.contrast_prob, gamma=aug.gamma_range, retain_stats=True
        )
        chain.append(RandPerChanneld(contrast) if per_channel else contrast)
    return chain


class RandLabelIntensityd(Randomizable, MapTransform):
    """Shift the image inside each foreground label by its own random offset.

    For each label value present in the patch, with probability ``prob``, every channel of
    ``image`` gets an offset drawn uniformly from [-offsets, offsets] on the voxels of that label.
    A global shift moves an organ and its surroundings together; this moves one organ against
    its neighbours, so the network also sees organs brighter or darker (less or more contrast)
    than the training set's. MONAI has no per-label intensity transform.
    """

    def __init__(self, *, prob: float, offsets: float, image_key: str = "image", label_key: str = "label") -> None:
        MapTransform.__init__(self, [image_key])
        self.prob = prob
        self.offsets = offsets
        self.image_key = image_key
        self.label_key = label_key

    def randomize(self, data: Any = None) -> None:
        pass  # drawn per label present, in __call__

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        lab = torch.as_tensor(d[self.label_key])[0].long().clamp_min(0)
        # the values present, ascending: a count per value (torch.unique sorted the patch, 3.5 ms
        # of 80x80x32 against 0.3 ms)
        values = [v for v in torch.bincount(lab.flatten()).nonzero().flatten().tolist() if v > 0]
        drawn = [v for v in values if self.R.rand() < self.prob]
        if not drawn:
            return d
        # one offset per (channel, label value), looked up at every voxel (background and undrawn: 0)
        table = torch.zeros((image.shape[0], max(values) + 1), dtype=image.dtype)
        for v in drawn:
            table[:, v] = torch.as_tensor(self.R.uniform(-self.offsets, self.offsets, size=image.shape[0]))
        d[self.image_key] = image + table[:, lab]
        return d


class RandRotateScaled(Randomizable, MapTransform):
    """Rotation and scaling of a patch, each drawn with its own probability, in one resampling.

    Rotation: angles uniform in [-rotate_range, rotate_range] radians about each axis; scaling: a
    factor uniform in [1 - scale_range, 1 + scale_range] per axis (above 1 the patch takes in more
    of the scan, as MONAI's ``RandAffine`` scales), both about the patch's centre in voxel
    coordinates, the border voxels extended. Each key resampled with its ``modes`` entry (label maps
    ``nearest``). Replaces two MONAI ``RandAffined`` (one per transform, 8 ms a firing on an
    80x80x32 patch here): one grid (``_affine_grid``) and one ``grid_sample`` per key, the grid cut
    into one slab per torch thread (``grid_sample`` works on one thread per volume): 3 ms a firing.
    """

    def __init__(self, keys: Sequence[str], *, rotate_prob: float, rotate_range: float, scale_prob: float,
                 scale_range: float, modes: Sequence[str]) -> None:
        MapTransform.__init__(self, keys)
        self.rotate_prob, self.rotate_range = rotate_prob, rotate_range
        self.scale_prob, self.scale_range = scale_prob, scale_range
        self.modes = tuple(modes)
        self._draw: tuple[np.ndarray | None, np.ndarray | None] = (None, None)

    def randomize(self, data: Any = None) -> None:
        # the same number of draws whatever fires: a run replays from its RNG state
        rotate = self.R.rand() < self.rotate_prob
        angles = self.R.uniform(-self.rotate_range, self.rotate_range, 3)
        scale = self.R.rand() < self.scale_prob
        factors = self.R.uniform(1 - self.scale_range, 1 + self.scale_range, 3)
        self._draw = (angles if rotate else None, factors if scale else None)

    def matrix(self, dims: int = 3) -> np.ndarray | None:
        """The drawn transform (source voxel offset = matrix @ output voxel offset from the centre)
        for ``dims`` spatial axes (2: one angle, in the plane), or None when nothing was drawn."""
        angles, factors = self._draw
        if angles is None and factors is None:
            return None
        m = np.diag(factors[:dims]) if factors is not None else np.eye(dims)
        if angles is not None:
            m = (_rotation(angles) if dims == 3 else _rotation(np.array([0.0, 0.0, angles[0]]))[:2, :2]) @ m
        return m

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        grid = None
        for key, mode in zip(self.key_iterator(d), self.modes, strict=False):
            x = torch.as_tensor(d[key])
            if grid is None:
                matrix = self.matrix(x.ndim - 1)
                if matrix is None:  # neither drawn
                    return d
                grid = _affine_grid(matrix, x.shape[1:])
            d[key] = _resample(x, grid, mode)
        return d


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation about the first, second and third axis by ``angles`` (radians), applied in that order."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine_grid(matrix: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """``grid_sample``'s grid (1, *shape, dims) for: source voxel = matrix @ (voxel - centre) + centre.

    ``F.affine_grid``'s points, summed from one row of coordinates per axis (0.4 ms for 80x80x32
    here, where its 4-wide matrix product took 1.0 ms)."""
    dims = len(shape)
    half = np.maximum((np.asarray(shape, dtype=float) - 1) / 2, 1.0)
    norm = np.diag(1 / half) @ matrix @ np.diag(half)  # in [-1, 1] coordinates (align_corners)
    # grid_sample's x, y (, z) index the last, ..., first axis
    theta = torch.as_tensor(norm[::-1, ::-1].copy(), dtype=torch.float32)
    grid = torch.zeros(1)
    for axis, n in enumerate(shape):  # broadcast: only the last sum is full size
        coords = torch.linspace(-1, 1, n) if n > 1 else torch.zeros(1)
        term = (coords[:, None] * theta[:, dims - 1 - axis]).reshape(*[n if a == axis else 1 for a in range(dims)], dims)
        grid = grid + term
    return grid.unsqueeze(0)


def _resample(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """``x`` (C, *spatial) sampled at ``grid``, borders extended; the grid in one slab per torch
    thread along the first axis (where the thread count divides it), as a batch, so that every
    thread works."""
    mode = "bilinear" if mode in ("bilinear", "trilinear") else mode
    dtype = x.dtype
    xf = x if x.is_floating_point() else x.float()
    n = grid.shape[1]
    parts = max(k for k in range(1, min(torch.get_num_threads(), n) + 1) if n % k == 0)
    g = grid.to(xf.dtype).reshape(parts, n // parts, *grid.shape[2:])
    out = F.grid_sample(xf.unsqueeze(0).expand(parts, *xf.shape), g, mode=mode, padding_mode="border",
                        align_corners=True)
    out = out.transpose(0, 1).reshape(x.shape)
    return out if out.dtype == dtype else out.round().to(dtype)


class RandNoised(Randomizable, MapTransform):
    """Gaussian noise, as MONAI's ``RandGaussianNoised`` (mean 0, its spread drawn uniformly from
    [0, std]), drawn by torch from a seed this transform's RNG gives: numpy's normal draw in float64
    took 3.0 ms for an 80x80x32 patch here, torch's 0.8 ms."""

    def __init__(self, keys: str | Sequence[str], *, prob: float, std: float) -> None:
        MapTransform.__init__(self, keys)
        self.prob, self.std = prob, std

    def randomize(self, data: Any = None) -> None:
        self._fire = self.R.rand() < self.prob
        self._std = self.R.uniform(0, self.std)
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._fire:
            return d
        gen = torch.Generator().manual_seed(self._seed)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            noise = torch.randn(x.shape, generator=gen, dtype=torch.float32)
            d[key] = x + (noise * self._std).to(x.dtype)
        return d


class RandPerChanneld(Randomizable, MapTransform):
    """Apply a random dict transform on ``image`` to each channel separately (its own draw each)."""

    def __init__(self, transform: Any, key: str = "image") -> None:
        MapTransform.__init__(self, [key])
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        self.transform.set_random_state(seed=seed, state=state)
        return self

    def randomize(self, data: Any = None) -> None:
        pass  # the wrapped transform draws per channel

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            parts = [self.transform({key: image[c : c + 1]})[key] for c in range(image.shape[0])]
            d[key] = torch.cat([torch.as_tensor(p) for p in parts])
        return d


def augment_preview(
    cfg: Config, data_root: str | Path, out: str | Path, *, samples: int = 8, seed: int = 0
) -> Path:
    """A PNG grid of augmented training patches (what the model sees) with their labels overlaid.

    The dataset is planned as ``train`` would plan it; each column is one patch drawn by
    the training chain (the axial slice through its centre on top, the coronal one below).
    """
    from matplotlib.figure import Figure

    from medseg.data import fingerprint, load_dataset
    from medseg.labels import channel_labels, channels_to_values
    from medseg.plan import make_plan
    from medseg.viz import label_colour

    dataset = load_dataset(data_root, allow_outside_root=cfg.data.allow_outside_root)
    cfg = channel_labels(cfg, dataset.labels)
    fp = fingerprint(dataset, seed=cfg.seed, resample_channels=cfg.preprocess.resample_channels)
    cfg = make_plan(cfg, fp)
    preprocess, augment = build_preprocess(cfg), build_augment(cfg)
    augment.set_random_state(seed=seed)
    rng = np.random.default_rng(seed)
    cases = [dataset.training[i] for i in rng.permutation(len(dataset.training))[: max(1, samples)]]
    patches: list[dict[str, Any]] = []
    for case in cases * samples:
        item = preprocess(case.item())
        drawn = augment(item)
        patches += drawn if isinstance(drawn, list) else [drawn]
        if len(patches) >= samples:
            break
    patches = patches[:samples]
    fig = Figure(figsize=(2.2 * len(patches), 4.6), layout="tight")
    axes = fig.subplots(2, len(patches), squeeze=False)
    for col, patch in enumerate(patches):
        image = np.asarray(patch["image"])[0]
        label = np.asarray(patch["label"])[0].round().astype(int)
        centre = [s // 2 for s in image.shape]
        views = [
            (image[:, :, centre[2]].T, label[:, :, centre[2]].T),
            (image[:, centre[1], :].T, label[:, centre[1], :].T),
        ]
        for row, (sl, lab) in enumerate(views):
            ax = axes[row][col]
            ax.imshow(sl, cmap="gray", origin="lower", vmin=-2.5, vmax=2.5)
            rgba = np.zeros((*lab.shape, 4), dtype=np.float32)
            present = lab > 0
            # coloured by the label files' values, as the QC pictures of inference
            rgba[present, :3] = label_colour(channels_to_values(lab[present], cfg.label_values))
            rgba[present, 3] = 0.4
            ax.imshow(rgba, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][col].set_title(f"patch {col + 1}", fontsize=8)
    axes[0][0].set_ylabel("axial", fontsize=8)
    axes[1][0].set_ylabel("coronal", fontsize=8)
    enabled = ", ".join(
        type(t).__name__.removeprefix("Rand").removesuffix("d")
        for t in augment.transforms
        if isinstance(t, Randomizable)
    )
    assert cfg.train.patch_size is not None  # make_plan filled it
    fig.suptitle(f"augmented patches {tuple(int(p) for p in cfg.train.patch_size)}: {enabled}", fontsize=7)
    from medseg.viz import save_figure

    return save_figure(fig, out, dpi=90)
