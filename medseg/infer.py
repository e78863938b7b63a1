"""Inference: sliding-window prediction in the model's grid, mapped back to the source grid.

The bundle's preprocessing (RAS orientation, spacing, crop, normalisation) is
applied with MONAI; the MetaTensor affine after it says exactly where each
model-grid voxel lies in the world. Probabilities (optionally flip-TTA averaged,
CRF-refined in the model grid where the normalised image lives) are then resampled
onto the source grid (trilinear, in chunks, so memory stays bounded), averaged over
an ensemble of bundles and reduced to labels: the mask has the input's shape and
affine by construction, for any orientation, NIfTI or DICOM. Voxels outside the
model's field of view are background.

``run_inference`` segments a batch: existing outputs are skipped unless
``overwrite`` (an interrupted batch resumes), a failing case is reported and the
batch goes on, cases are split across ranks under ``torchrun``, and a QC report
(``report.html``) can be written at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from medseg.config import CRFConfig, InferConfig
from medseg.errors import InputError, MedsegError
from medseg.io import (
    Volume,
    case_stem,
    find_inputs,
    load_volume,
    write_dicom_seg,
    write_mask,
    write_nifti,
    write_text_atomic,
)
from medseg.postprocess import postprocess_labels
from medseg.transforms import build_preprocess, to_metatensor

if TYPE_CHECKING:
    from medseg.bundle import Bundle
    from medseg.tracking import Tracker

log = logging.getLogger(__name__)

FLIP_AXES = (2, 3, 4)


@dataclass
class Prediction:
    mask: Volume
    timings: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = None  # (C, X, Y, Z) float16 in the source grid, when asked for
    tta_disagreement: float | None = None  # fraction of predicted-foreground voxels where flips disagree
    backend: dict[str, Any] | None = None  # the network runtime used (medseg.backends.describe)


@dataclass
class ModelGridResult:
    """One bundle's output in its own model grid."""

    probs: torch.Tensor  # (C, X, Y, Z) on the CPU: float32, or float16 when computed on CUDA
    affine: np.ndarray  # model-grid voxel -> RAS mm
    image: torch.Tensor  # (X, Y, Z) normalised image the network saw
    tta_disagreement: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    backend: dict[str, Any] | None = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _forward_context(device: torch.device, cpu_bf16: bool):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sliding_window_logits(
    network: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    roi_size: tuple[int, ...],
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    mode: str = "gaussian",
    tta: bool = False,
    device: str | torch.device = "cpu",
    accumulate_on_cpu: bool = False,
    cpu_bf16: bool = False,
    flip_labels: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax probabilities (C, X, Y, Z) for one channel-first image (1, X, Y, Z), on the CPU.

    Windows run on ``device``; with ``accumulate_on_cpu`` the full-volume stitching
    stays on the CPU (MONAI's ``sw_device``/``device`` split), so a large volume
    does not have to fit in GPU memory. On CUDA the forward runs under fp16
    autocast and probabilities are kept in half precision. ``cpu_bf16`` (CPU only,
    opt-in) runs the forward under bfloat16 autocast with channels-last 3D.
    When ``flip_labels`` is a list, each flip's argmax (uint8) is appended to it.
    ``network`` may be any callable on a batch of windows (a medseg.backends.Predictor).
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    stitch_device = torch.device("cpu") if (accumulate_on_cpu or not on_cuda) else device
    x = torch.as_tensor(image)[None].float().to(stitch_device)
    use_bf16 = cpu_bf16 and not on_cuda
    predictor: Callable[[torch.Tensor], torch.Tensor] = network
    if use_bf16 and isinstance(network, torch.nn.Module):

        def predictor(window: torch.Tensor) -> torch.Tensor:
            return network(window.contiguous(memory_format=torch.channels_last_3d)).float()

        network.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # in place, once: the weights stay the same

    flips: list[tuple[int, ...]] = [()]
    if tta:
        flips += [c for r in (1, 2, 3) for c in itertools.combinations(FLIP_AXES, r)]
    acc_dtype = torch.float16 if on_cuda else torch.float32
    total: torch.Tensor | None = None
    with torch.no_grad(), _forward_context(device, use_bf16):
        for dims in flips:
            inp = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(
                inp,
                roi_size=roi_size,
                sw_batch_size=sw_batch_size,
                predictor=predictor,
                overlap=overlap,
                mode=mode,
                sw_device=device,
                device=stitch_device,
            )
            logits = torch.as_tensor(logits)
            probs = torch.softmax(logits.float(), dim=1).to(acc_dtype)
            del logits
            probs = torch.flip(probs, dims) if dims else probs
            if flip_labels is not None:
                flip_labels.append(probs[0].argmax(dim=0).to(torch.uint8).cpu())
            total = probs if total is None else total.add_(probs)
    assert total is not None
    return (total / len(flips))[0].cpu()


def model_grid_probabilities(
    bundle: Bundle,
    volume: Volume,
    *,
    device: str | torch.device = "cpu",
    tta: bool = False,
    crf: CRFConfig | None = None,
) -> ModelGridResult:
    """Probabilities in the bundle's model grid and that grid's affine (voxel -> RAS mm).

    Sliding-window settings come from the bundle's ``infer`` config (see
    ``with_infer_overrides``). ``crf`` (when enabled) refines the probabilities with
    the dense CRF in this grid.
    """
    cfg = bundle.config
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pre = build_preprocess(cfg, keys=("image",), load=False)
    image = pre({"image": to_metatensor(volume)})["image"]
    affine = np.asarray(image.affine, dtype=np.float64)
    timings["preprocess_s"] = time.perf_counter() - t0
    from medseg.backends import describe, predictor_for

    predictor = predictor_for(bundle, device)  # built (and, for auto, measured) once per bundle
    t0 = time.perf_counter()
    n_voxels = int(np.prod(image.shape[1:]))
    flip_labels: list[torch.Tensor] | None = [] if tta else None
    probs = sliding_window_logits(
        predictor,
        image.as_tensor(),
        roi_size=tuple(int(p) for p in cfg.train.patch_size),
        overlap=cfg.infer.overlap,
        sw_batch_size=cfg.infer.sw_batch_size,
        mode=cfg.infer.blend_mode,
        tta=tta,
        device=device,
        accumulate_on_cpu=n_voxels > cfg.infer.accumulate_on_cpu_voxels,
        cpu_bf16=False,  # the predictor runs the precision chosen for it
        flip_labels=flip_labels,
    )
    timings["network_s"] = time.perf_counter() - t0
    disagreement = None
    if flip_labels:
        final = probs.argmax(dim=0).to(torch.uint8)
        differs = torch.zeros_like(final, dtype=torch.bool)
        foreground = final > 0
        for lab in flip_labels:
            differs |= lab != final
            foreground |= lab > 0
        disagreement = float(differs.sum()) / max(1, int(foreground.sum()))
    grid_image = image.as_tensor()[0].float()
    if crf is not None and crf.enabled:
        from medseg.crf import dense_crf

        t0 = time.perf_counter()
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        crf_device = torch.device(device)
        refined = dense_crf(probs.to(crf_device).float(), grid_image.to(crf_device), spacing=spacing, cfg=crf)
        probs = refined.to(probs.dtype).cpu()
        timings["crf_s"] = time.perf_counter() - t0
    return ModelGridResult(probs, affine, grid_image, disagreement, timings, describe(predictor))


def resample_to_grid(
    sources: list[tuple[torch.Tensor, np.ndarray]],
    target_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    *,
    chunk_voxels: int = 2**22,
    return_probabilities: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Average class probabilities given on other grids onto a target grid; return the argmax labels.

    Each source is (probabilities (C, X, Y, Z), affine). Target voxels outside a
    source's grid count as background for it. Work goes in slabs of the target of
    about ``chunk_voxels``, each reading only the part of each source it needs, so
    memory stays bounded. With ``return_probabilities`` the averaged probabilities
    (C, X, Y, Z) float16 are returned too.
    """
    n_classes = sources[0][0].shape[0]
    out = np.zeros(target_shape, dtype=np.uint8)
    probs_out = np.zeros((n_classes, *target_shape), dtype=np.float16) if return_probabilities else None
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
            size = np.asarray(probs.shape[1:])
            # the part of the source this slab reads (+1 voxel for interpolation), clamped to the source
            lo = np.clip(np.floor(coords.min(axis=0)).astype(int), 0, size - 1)
            hi = np.clip(np.ceil(coords.max(axis=0)).astype(int) + 1, lo + 1, size)
            # one explicit zero voxel around the part read: the same as grid_sample's zero padding, and
            # no degenerate one-voxel axis (align_corners maps every coordinate of such an axis to 0)
            sub = F.pad(probs[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].float(), (1, 1, 1, 1, 1, 1))
            local = coords - lo + 1.0
            sub_size = np.asarray(sub.shape[1:], dtype=np.float64)
            norm = 2.0 * local / (sub_size - 1) - 1.0
            grid = torch.as_tensor(norm[:, ::-1].copy(), dtype=torch.float32).view(1, 1, 1, -1, 3)
            sampled = F.grid_sample(
                sub[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
            ).view(n_classes, -1)
            sampled[0] += (1.0 - sampled.sum(dim=0)).clamp_min(0.0)  # outside the field of view -> background
            acc += sampled
        out[start:stop] = acc.argmax(dim=0).view(stop - start, *target_shape[1:]).numpy().astype(np.uint8)
        if probs_out is not None:
            probs_out[:, start:stop] = (
                (acc / len(sources)).view(n_classes, stop - start, *target_shape[1:]).numpy()
            )
    if probs_out is not None:
        return out, probs_out
    return out


def entropy_map(probabilities: np.ndarray) -> np.ndarray:
    """Normalised entropy (0 = certain, 1 = uniform over the classes) of (C, X, Y, Z) probabilities."""
    p = probabilities.astype(np.float32)
    n = p.shape[0]
    ent = -(p * np.log(np.clip(p, 1e-7, 1.0))).sum(axis=0)
    return (ent / math.log(n)).astype(np.float32) if n > 1 else np.zeros(p.shape[1:], np.float32)


def with_infer_overrides(bundles: list[Bundle], **overrides: Any) -> list[Bundle]:
    """The bundles with their ``infer`` config updated by the overrides that are not None (validated)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return bundles
    out = []
    for bundle in bundles:
        infer_cfg = InferConfig.model_validate({**bundle.config.infer.model_dump(), **given})
        out.append(dataclasses.replace(bundle, config=bundle.config.model_copy(update={"infer": infer_cfg})))
    return out


def predict_volume(
    bundles: list[Bundle],
    volume: Volume,
    *,
    device: str | torch.device = "cpu",
    tta: bool = False,
    postprocess: bool = True,
    crf: bool | None = None,
    probabilities: bool = False,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    blend_mode: str | None = None,
    cpu_bf16: bool | None = None,
    backend: str | None = None,
    precision: str | None = None,
) -> Prediction:
    """Segment one volume with one bundle or an ensemble (probabilities averaged); the mask is in ``volume``'s grid.

    ``crf``: None follows the first bundle's ``postprocess.crf.enabled``; True/False force it.
    """
    bundles = with_infer_overrides(
        bundles,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        blend_mode=blend_mode,
        cpu_bf16=cpu_bf16,
        backend=backend,
        precision=precision,
    )
    timings: dict[str, float] = {}
    cfg = bundles[0].config
    crf_cfg = cfg.postprocess.crf.model_copy(
        update={"enabled": cfg.postprocess.crf.enabled if crf is None else crf}
    )
    results = []
    for bundle in bundles:
        r = model_grid_probabilities(
            bundle,
            volume,
            device=device,
            tta=tta,
            crf=crf_cfg,
        )
        for k, v in r.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        results.append(r)
    t0 = time.perf_counter()
    resampled = resample_to_grid(
        [(r.probs, r.affine) for r in results],
        volume.affine,
        volume.shape,
        return_probabilities=probabilities,
    )
    labels, probs = resampled if probabilities else (resampled, None)
    timings["invert_s"] = time.perf_counter() - t0
    if postprocess:
        t0 = time.perf_counter()
        labels = postprocess_labels(
            labels, cfg.postprocess, spacing=volume.spacing, label_ids=sorted(cfg.labels or {})
        )
        timings["postprocess_s"] = time.perf_counter() - t0
    disagreements = [r.tta_disagreement for r in results if r.tta_disagreement is not None]
    return Prediction(
        mask=volume.with_array(labels, kind="label"),
        timings=timings,
        probabilities=probs,
        tta_disagreement=float(np.mean(disagreements)) if disagreements else None,
        backend=results[0].backend if len(results) == 1 else {"ensemble": [r.backend for r in results]},
    )


@dataclass
class InferenceSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    report: Path | None = None
    rank: int = 0
    world_size: int = 1


def expand_models(models: list[str | Path]) -> list[str]:
    """``--model`` values to bundle locations: a bundle folder or MLflow URI as is; a folder holding
    several fold bundles (``fold_*/bundle``, as ``train`` writes them) becomes all of them (an ensemble)."""
    out: list[str] = []
    for model in models:
        path = Path(str(model))
        text = str(model)
        if text.startswith(("runs:/", "models:/")) or not path.is_dir() or (path / "config.yaml").is_file():
            out.append(text)
            continue
        found = sorted(
            {p.parent for p in path.glob("*/model.safetensors")}
            | {p.parent for p in path.glob("*/bundle/model.safetensors")}
        )
        if not found:
            raise InputError(path, "neither a bundle folder nor a folder of fold bundles (fold_*/bundle)")
        log.info(
            "%s: ensemble of %d bundles (%s)",
            path,
            len(found),
            ", ".join(str(f.relative_to(path)) for f in found),
        )
        out.extend(str(f) for f in found)
    return out


def mask_path(output_dir: Path, input_path: Path) -> Path:
    return output_dir / f"{case_stem(input_path)}_seg.nii.gz"


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torchrun (``RANK``/``WORLD_SIZE``), else (0, 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    if world < 1 or not 0 <= rank < world:
        return 0, 1
    return rank, world


def _write_extra_maps(pred: Prediction, volume: Volume, target: Path, labels: dict[int, str]) -> list[Path]:
    """Per-class probability maps and the entropy map, float32 NIfTI in the source grid."""
    assert pred.probabilities is not None
    stem = case_stem(target)
    written = []
    for k in sorted(labels):
        if k == 0 or k >= pred.probabilities.shape[0]:
            continue
        path = target.with_name(f"{stem}_prob_{k}.nii.gz")
        write_nifti(
            volume.with_array(pred.probabilities[k].astype(np.float32), kind="image"), path, dtype="float32"
        )
        written.append(path)
    path = target.with_name(f"{stem}_entropy.nii.gz")
    write_nifti(volume.with_array(entropy_map(pred.probabilities), kind="image"), path, dtype="float32")
    written.append(path)
    return written


def _add_write_time(target: Path, seconds: float) -> None:
    """Record the write stage in the sidecar too (it is known only after the mask is written)."""
    sidecar = target.with_name(case_stem(target) + ".json")
    tree = json.loads(sidecar.read_text())
    tree.setdefault("timings_s", {})["write_s"] = round(seconds, 4)
    write_text_atomic(sidecar, json.dumps(tree, indent=2))


def run_inference(
    bundles: list[Bundle],
    inputs: list[str | Path],
    output_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    tta: bool | None = None,
    overwrite: bool = False,
    progress=None,
    dicom_seg: bool = False,
    crf: bool | None = None,
    save_probabilities: bool = False,
    report: bool = False,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    blend_mode: str | None = None,
    cpu_bf16: bool | None = None,
    backend: str | None = None,
    precision: str | None = None,
    tracker: Tracker | None = None,
) -> InferenceSummary:
    """Segment every input; existing outputs are skipped unless ``overwrite``; a failing case is reported
    and the batch goes on. Under torchrun each rank takes every WORLD_SIZE-th case.

    Per case: ``<stem>_seg.nii.gz`` and ``<stem>_seg.json`` (labels, geometry, options,
    per-stage timings), with ``save_probabilities`` also ``<stem>_seg_prob_<k>.nii.gz``
    and ``<stem>_seg_entropy.nii.gz``. With ``report``, ``report.html`` (QC of the cases
    segmented in this run) is written at the end. With a started ``tracker`` (an MLflow
    run), per-case stage timings go to it as metrics (step = case index) and the report
    as an artifact.
    """
    bundles = with_infer_overrides(
        bundles,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        blend_mode=blend_mode,
        cpu_bf16=cpu_bf16,
        backend=backend,
        precision=precision,
    )
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
    tta = bundles[0].config.infer.tta if tta is None else tta
    rank, world = rank_and_world()
    if world > 1:
        paths = paths[rank::world]
        log.info("rank %d of %d: %d case(s)", rank, world, len(paths))
    summary = InferenceSummary(rank=rank, world_size=world)
    labels = bundles[0].labels
    qc_cases: list[Any] = []
    iterator = progress(paths, "segmenting") if progress else paths
    for index, path in enumerate(iterator):
        target = mask_path(output_dir, path)
        if target.exists() and not overwrite:
            log.info("[%d/%d] %s: %s exists, skipped", index + 1, len(paths), path.name, target.name)
            summary.skipped.append(target)
            continue
        try:
            t0 = time.perf_counter()
            volume = load_volume(path)
            load_s = time.perf_counter() - t0
            pred = predict_volume(
                bundles,
                volume,
                device=device,
                tta=tta,
                crf=crf,
                probabilities=save_probabilities,
            )
            timings = {"load_s": load_s, **pred.timings}
            t0 = time.perf_counter()
            if save_probabilities:
                _write_extra_maps(pred, volume, target, labels)
            extra = {
                "model": [str(b.path) for b in bundles],
                "tta": tta,
                "crf": bool(bundles[0].config.postprocess.crf.enabled if crf is None else crf),
                "tta_disagreement": pred.tta_disagreement,
                "backend": pred.backend,
                "timings_s": {k: round(v, 4) for k, v in timings.items()},
            }
            write_mask(pred.mask.array, volume, target, labels=labels, extra=extra, overwrite=True)
            if dicom_seg and volume.meta.get("source_format") == "dicom":
                write_dicom_seg(
                    pred.mask.array, path, target.with_suffix("").with_suffix(".dcm"), labels=labels
                )
            elif dicom_seg:
                log.warning("%s: no DICOM SEG written: DICOM SEG needs a DICOM series as input", path.name)
            timings["write_s"] = time.perf_counter() - t0
            _add_write_time(target, timings["write_s"])
            log.info(
                "[%d/%d] %s -> %s %s",
                index + 1,
                len(paths),
                path.name,
                target.name,
                json.dumps({k: round(v, 3) for k, v in timings.items()}),
            )
            summary.written.append(target)
            if tracker is not None:
                tracker.log_metrics({f"infer_{k}": v for k, v in timings.items()}, step=index)
            if report:
                from medseg.report import case_qc

                qc_cases.append(
                    case_qc(
                        case_stem(path),
                        volume,
                        pred.mask.array,
                        labels=labels,
                        tta_disagreement=pred.tta_disagreement,
                        volume_ranges=bundles[0].metadata.get("label_volumes_ml"),
                        connectivity=bundles[0].config.postprocess.connectivity,
                    )
                )
        except MedsegError as exc:
            log.error("[%d/%d] %s failed: %s", index + 1, len(paths), path.name, exc)
            summary.failed.append((path, str(exc)))
        except Exception as exc:  # a batch goes on past one bad case; the traceback goes to the log
            log.exception("[%d/%d] %s failed unexpectedly", index + 1, len(paths), path.name)
            summary.failed.append((path, f"{type(exc).__name__}: {exc}"))
    if report:
        from medseg.report import write_report

        name = "report.html" if world == 1 else f"report_rank{rank}.html"
        summary.report = write_report(
            qc_cases,
            output_dir / name,
            labels=labels,
            failed=[(p.name, r) for p, r in summary.failed],
            skipped=[p.name for p in summary.skipped],
            model=", ".join(str(b.path) for b in bundles),
        )
    if tracker is not None and summary.report is not None:
        tracker.log_artifact(summary.report, "inference")
    log.info(
        "%d written, %d skipped (exist), %d failed",
        len(summary.written),
        len(summary.skipped),
        len(summary.failed),
    )
    return summary
