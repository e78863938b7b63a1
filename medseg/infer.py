"""Inference: sliding-window prediction in the model's grid, mapped back to the source grid.

The bundle's preprocessing (RAS orientation, spacing, crop, normalisation) is
applied with MONAI; the MetaTensor affine after it says exactly where each
model-grid voxel lies in the world. Probabilities are then resampled onto the
source grid (trilinear, in chunks, so memory stays bounded) and reduced to labels:
the mask has the input's shape and affine by construction, for any orientation,
NIfTI or DICOM. Voxels outside the model's field of view are background.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from medseg.errors import InputError, MedsegError
from medseg.io import Volume, case_stem, find_inputs, load_volume, write_dicom_seg, write_mask
from medseg.postprocess import postprocess_labels
from medseg.transforms import build_preprocess, to_metatensor

if TYPE_CHECKING:
    from medseg.bundle import Bundle

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    mask: Volume
    timings: dict[str, float] = field(default_factory=dict)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sliding_window_logits(
    network: torch.nn.Module,
    image: torch.Tensor,
    *,
    roi_size: tuple[int, ...],
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    mode: str = "gaussian",
    tta: bool = False,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Softmax probabilities (C, X, Y, Z) for one channel-first image (1, X, Y, Z)."""
    device = torch.device(device)
    x = torch.as_tensor(image)[None].to(device)
    flips: list[tuple[int, ...]] = [()]
    if tta:
        flips += [c for r in (1, 2, 3) for c in itertools.combinations((2, 3, 4), r)]
    total = None
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for dims in flips:
            inp = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(
                inp,
                roi_size=roi_size,
                sw_batch_size=sw_batch_size,
                predictor=network,
                overlap=overlap,
                mode=mode,
            )
            probs = torch.softmax(torch.as_tensor(logits).float(), dim=1)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
    return (total / len(flips))[0].cpu()


def model_grid_probabilities(
    bundle: Bundle, volume: Volume, *, device: str | torch.device = "cpu", tta: bool = False
) -> tuple[torch.Tensor, np.ndarray]:
    """Probabilities in the bundle's model grid and that grid's affine (voxel -> RAS mm)."""
    cfg = bundle.config
    pre = build_preprocess(cfg, keys=("image",), load=False)
    image = pre({"image": to_metatensor(volume)})["image"]
    affine = np.asarray(image.affine, dtype=np.float64)
    probs = sliding_window_logits(
        bundle.network,
        image.as_tensor(),
        roi_size=tuple(int(p) for p in cfg.train.patch_size),
        overlap=cfg.infer.overlap,
        sw_batch_size=cfg.infer.sw_batch_size,
        mode=cfg.infer.blend_mode,
        tta=tta,
        device=device,
    )
    return probs, affine


def resample_to_grid(
    sources: list[tuple[torch.Tensor, np.ndarray]],
    target_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    *,
    chunk_voxels: int = 2**22,
) -> np.ndarray:
    """Average class probabilities given on other grids onto a target grid; return the argmax labels.

    Each source is (probabilities (C, X, Y, Z), affine). Target voxels outside a
    source's grid count as background for it.
    """
    n_classes = sources[0][0].shape[0]
    out = np.zeros(target_shape, dtype=np.uint8)
    plane = target_shape[1] * target_shape[2]
    step = max(1, chunk_voxels // max(plane, 1))
    jj, kk = np.meshgrid(np.arange(target_shape[1]), np.arange(target_shape[2]), indexing="ij")
    for start in range(0, target_shape[0], step):
        stop = min(target_shape[0], start + step)
        ii = np.arange(start, stop)[:, None, None]
        idx = np.stack(np.broadcast_arrays(ii, jj[None], kk[None]), axis=-1).reshape(-1, 3).astype(np.float64)
        acc = torch.zeros((n_classes, idx.shape[0]), dtype=torch.float32)
        for probs, affine in sources:
            to_src = np.linalg.inv(affine) @ target_affine
            coords = idx @ to_src[:3, :3].T + to_src[:3, 3]
            size = np.asarray(probs.shape[1:], dtype=np.float64)
            norm = 2.0 * coords / np.maximum(size - 1, 1) - 1.0
            grid = torch.as_tensor(norm[:, ::-1].copy(), dtype=torch.float32).view(1, 1, 1, -1, 3)
            sampled = F.grid_sample(
                probs[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True
            ).view(n_classes, -1)
            sampled[0] += (1.0 - sampled.sum(dim=0)).clamp_min(0.0)  # outside the field of view -> background
            acc += sampled
        out[start:stop] = acc.argmax(dim=0).view(stop - start, *target_shape[1:]).numpy().astype(np.uint8)
    return out


def predict_volume(
    bundles: list[Bundle],
    volume: Volume,
    *,
    device: str | torch.device = "cpu",
    tta: bool = False,
    postprocess: bool = True,
) -> Prediction:
    """Segment one volume with one bundle or an ensemble; the mask is in ``volume``'s grid."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sources = [model_grid_probabilities(b, volume, device=device, tta=tta) for b in bundles]
    timings["network_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = resample_to_grid(sources, volume.affine, volume.shape)
    timings["invert_s"] = time.perf_counter() - t0
    if postprocess:
        t0 = time.perf_counter()
        cfg = bundles[0].config
        labels = postprocess_labels(
            labels, cfg.postprocess, spacing=volume.spacing, label_ids=sorted(cfg.labels or {})
        )
        timings["postprocess_s"] = time.perf_counter() - t0
    return Prediction(mask=volume.with_array(labels, kind="label"), timings=timings)


@dataclass
class InferenceSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def mask_path(output_dir: Path, input_path: Path) -> Path:
    return output_dir / f"{case_stem(input_path)}_seg.nii.gz"


def run_inference(
    bundles: list[Bundle],
    inputs: list[str | Path],
    output_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    tta: bool = False,
    overwrite: bool = False,
    progress=None,
    dicom_seg: bool = False,
) -> InferenceSummary:
    """Segment every input; existing outputs are skipped unless ``overwrite``; a failing case is reported
    and the batch goes on."""
    output_dir = Path(output_dir)
    paths = find_inputs(list(inputs))
    if not paths:
        raise InputError(None, "no inputs to segment")
    targets: dict[Path, Path] = {}
    for path in paths:
        target = mask_path(output_dir, path)
        if target in targets:
            raise InputError(
                path,
                f"has the same output name {target.name} as {targets[target]}; segment them into "
                "separate output folders",
            )
        targets[target] = path
    summary = InferenceSummary()
    labels = bundles[0].labels
    iterator = progress(paths, "segmenting") if progress else paths
    for path in iterator:
        target = mask_path(output_dir, path)
        if target.exists() and not overwrite:
            summary.skipped.append(target)
            continue
        try:
            t0 = time.perf_counter()
            volume = load_volume(path)
            load_s = time.perf_counter() - t0
            pred = predict_volume(bundles, volume, device=device, tta=tta)
            t0 = time.perf_counter()
            extra = {
                "model": [str(b.path) for b in bundles],
                "tta": tta,
                "timings_s": {"load_s": load_s, **pred.timings},
            }
            write_mask(pred.mask.array, volume, target, labels=labels, extra=extra, overwrite=True)
            if dicom_seg and volume.meta.get("source_format") == "dicom":
                write_dicom_seg(
                    pred.mask.array, path, target.with_suffix("").with_suffix(".dcm"), labels=labels
                )
            elif dicom_seg:
                log.warning("%s: no DICOM SEG written: DICOM SEG needs a DICOM series as input", path.name)
            pred.timings["write_s"] = time.perf_counter() - t0
            log.info(
                "%s -> %s (%s)",
                path.name,
                target.name,
                json.dumps({k: round(v, 3) for k, v in pred.timings.items()}),
            )
            summary.written.append(target)
        except MedsegError as exc:
            log.error("%s", exc)
            summary.failed.append((path, str(exc)))
    return summary
