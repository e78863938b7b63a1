"""Prediction: sliding-window probabilities in the model's grid, mapped back to the source grid.

The bundle's preprocessing (RAS orientation, spacing, crop, normalisation) is
applied with MONAI; the MetaTensor affine after it says exactly where each
model-grid voxel lies in the world. Probabilities (optionally flip-TTA averaged,
CRF-refined in the model grid where the normalised image lives) are then resampled
onto the source grid (trilinear, in slabs, so memory stays bounded; one axis at a time
where the grids are axis-aligned, and with one model only interpolated near class
borders, where a model-grid cell's corners disagree), averaged over
an ensemble of bundles and reduced to labels: the mask has the input's shape and
affine by construction, for any orientation, NIfTI or DICOM. Voxels outside the
model's field of view are background.

Every network call goes through one ``Predictor``: a callable from a batch of
windows (B, 1, X, Y, Z) to logits (B, C, X, Y, Z). ``torch_predictor`` wraps a
bundle's network (no_grad, autocast, memory format); other backends (ONNX Runtime,
OpenVINO) plug in by passing their own callable as ``predictor``.

Hands on a ``Prediction`` (mask in the source grid, holding the label files' values, see
``medseg.labels``; optional probabilities, one per network channel; timings) to ``medseg.batch``,
which writes the files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from medseg.config import CRFConfig, InferConfig
from medseg.io import Volume
from medseg.kernels import keep_channels_last
from medseg.labels import channels_to_values
from medseg.postprocess import label_biases, postprocess_labels
from medseg.runtime import Precision, autocast, channels_last, resolve_precision, set_memory_format
from medseg.separable import AxisMap, axis_aligned_map
from medseg.separable import linear_taps as _linear_taps
from medseg.separable import sample_axis_aligned as _sample_axis_aligned  # a module name: tests spy on it
from medseg.separable import slab_index as _slab_index
from medseg.transforms import build_preprocess, to_metatensor

if TYPE_CHECKING:
    from medseg.bundle import Bundle

FLIP_AXES = (2, 3, 4)

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""A batch of windows (B, 1, X, Y, Z) -> logits (B, C, X, Y, Z): the one seam to the network."""

ProgressHook = Callable[[str, int, int], None]
"""Called as ``hook(stage, done, total)``: the stage starting (``done == total == 0``) or, while
the network runs, windows done of the total for this case. It may raise to stop the case."""


@dataclass
class Prediction:
    mask: Volume  # the label files' values (``Config.label_values``), not the network's channels
    timings: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = None  # (C, X, Y, Z) float16 in the source grid, when asked for
    tta_disagreement: float | None = None  # fraction of predicted-foreground voxels where flips disagree


@dataclass
class ModelGridResult:
    """One bundle's output in its own model grid."""

    probs: torch.Tensor  # (C, X, Y, Z) on the CPU: float32, or float16 (CUDA, or above HALF_PROBS_VOXELS)
    affine: np.ndarray  # model-grid voxel -> RAS mm
    image: torch.Tensor  # (X, Y, Z) normalised image the network saw
    tta_disagreement: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


def inference_precision(
    device: str | torch.device, requested: str = "auto", *, cpu_bf16: bool = False
) -> Precision:
    """The forward pass's precision: ``medseg.runtime``'s policy (shared with training); a bundle's or
    flag's ``cpu_bf16`` asks for bf16 on the CPU when nothing more specific was requested."""
    device = torch.device(device)
    if cpu_bf16 and device.type == "cpu" and requested == "auto":
        requested = "bf16"
    return resolve_precision(device, requested)


def torch_predictor(
    network: torch.nn.Module, *, device: str | torch.device, precision: Precision
) -> Predictor:
    """The network as a ``Predictor``: no_grad and autocast in ``precision`` around each call.

    Where the policy says so (CPU bf16) windows go channels-last 3D; bf16 logits come back float32,
    fp16 logits (CUDA) stay half precision so the stitching buffer does too.
    """
    device = torch.device(device)
    last = channels_last(device, precision)
    if last:
        set_memory_format(network, torch.channels_last_3d)  # in place, once: the weights stay the same
        keep_channels_last(network)  # its instance norms give the layout back

    def predict(windows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(device, precision):
            out = network(windows.contiguous(memory_format=torch.channels_last_3d) if last else windows)
        return out.float() if precision == "bf16" else out

    return predict


def flip_sets(tta: bool, passes: int = 8) -> list[tuple[int, ...]]:
    """The flips run for one image: none, or (with TTA) every non-empty combination of the spatial
    axes (``passes`` 8), or the mirror in all three axes (``passes`` 2)."""
    flips: list[tuple[int, ...]] = [()]
    if tta and passes == 2:
        flips.append(FLIP_AXES)
    elif tta:
        flips += [c for r in (1, 2, 3) for c in itertools.combinations(FLIP_AXES, r)]
    return flips


def count_windows(shape: tuple[int, ...], roi_size: tuple[int, ...], overlap: float) -> int:
    """Windows MONAI's ``sliding_window_inference`` runs over an image of ``shape`` (as it pads and steps)."""
    n = 1
    for size, roi in zip(shape, roi_size, strict=True):
        padded = max(size, roi)
        step = roi if roi == padded else max(1, int(roi * (1 - overlap)))
        n *= math.ceil((padded - roi) / step) + 1
    return n


def _counting(predictor: Predictor, on_windows: Callable[[int], None] | None) -> Predictor:
    if on_windows is None:
        return predictor

    def predict(windows: torch.Tensor) -> torch.Tensor:
        out = predictor(windows)
        on_windows(int(windows.shape[0]))
        return out

    return predict


def sliding_window_logits(
    network: torch.nn.Module | Predictor,
    image: torch.Tensor,
    *,
    roi_size: tuple[int, ...],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    mode: str = "gaussian",
    tta: bool = False,
    tta_flips: int = 8,
    device: str | torch.device = "cpu",
    accumulate_on_cpu: bool = False,
    cpu_bf16: bool = False,
    precision: Precision | None = None,
    flip_labels: list[torch.Tensor] | None = None,
    on_windows: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Softmax probabilities (C, X, Y, Z) for one channel-first image (1, X, Y, Z), on the CPU.

    ``network`` is a torch module (wrapped by ``torch_predictor`` in ``precision``, by default
    ``inference_precision(device, cpu_bf16=cpu_bf16)``) or any ``Predictor``. Windows run on
    ``device``; with ``accumulate_on_cpu`` the full-volume stitching stays on the CPU (MONAI's ``sw_device``/``device`` split), so a large volume
    does not have to fit in GPU memory. On CUDA probabilities are kept in half precision.
    ``tta_flips``: the TTA passes (``flip_sets``). When ``flip_labels`` is a list, each flip's argmax (uint8) is appended to it;
    ``on_windows(n)`` is called after each batch of ``n`` windows.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    stitch_device = torch.device("cpu") if (accumulate_on_cpu or not on_cuda) else device
    x = torch.as_tensor(image)[None].float().to(stitch_device)
    if isinstance(network, torch.nn.Module):
        precision = precision or inference_precision(device, cpu_bf16=cpu_bf16)
        network = torch_predictor(network, device=device, precision=precision)
    predictor = _counting(network, on_windows)
    flips = flip_sets(tta, tta_flips)
    big = int(np.prod(x.shape[2:])) > HALF_PROBS_VOXELS
    acc_dtype = torch.float16 if on_cuda or big else torch.float32
    total: torch.Tensor | None = None
    with torch.no_grad():
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
            probs = softmax_classes(torch.as_tensor(logits).float(), acc_dtype)
            del logits
            probs = torch.flip(probs, dims) if dims else probs
            if flip_labels is not None:
                flip_labels.append(argmax_classes(probs[0].flatten(1)).view(probs.shape[2:]).cpu())
            total = probs if total is None else total.add_(probs)
    assert total is not None
    if len(flips) > 1:
        total.div_(len(flips))  # in place: no second copy of a volume's probabilities
    return total[0].cpu()


HALF_PROBS_VOXELS = 2**25
"""Above this many model-grid voxels (a 512x512x600 CT's body is 89 M at 1 x 1 x 2.3 mm) the CPU keeps
probabilities in float16: 0.7 GB instead of 1.4 GB for four classes. Half precision moves a
probability by at most 0.0005; the CRF and the resampling read it back slab by slab in float32."""

SOFTMAX_SLAB_VALUES = 2**23
"""Logits turned into probabilities at a time by ``softmax_classes`` (32 MB of float32)."""


def softmax_classes(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the classes (dim 1) of float32 (B, C, ...) logits, as ``dtype``: written over the
    logits when float32, else slab by slab (along dim 2) into a new tensor. A volume's softmax copy
    was the network stage's peak (1.4 GB on a 512x512x600 CT)."""
    out = logits if dtype == logits.dtype else torch.empty(logits.shape, dtype=dtype, device=logits.device)
    step = max(1, SOFTMAX_SLAB_VALUES // max(1, logits[:, :, :1].numel()))
    for i0 in range(0, logits.shape[2], step):
        part = logits[:, :, i0 : i0 + step]
        out[:, :, i0 : i0 + step] = torch.softmax(part, dim=1)
    return out


def tta_disagreement(probs: torch.Tensor, flip_labels: list[torch.Tensor]) -> float:
    """Fraction of voxels, among those any flip calls foreground, where a flip's label differs from the mean's."""
    final = probs.argmax(dim=0).to(torch.uint8)
    differs = torch.zeros_like(final, dtype=torch.bool)
    foreground = final > 0
    for lab in flip_labels:
        differs |= lab != final
        foreground |= lab > 0
    return float(differs.sum()) / max(1, int(foreground.sum()))


@contextlib.contextmanager
def _stage(name: str, timings: dict[str, float], progress: ProgressHook | None) -> Iterator[None]:
    if progress is not None:
        progress(name, 0, 0)
    t0 = time.perf_counter()
    yield
    timings[f"{name}_s"] = timings.get(f"{name}_s", 0.0) + time.perf_counter() - t0


def _network_probabilities(
    bundle: Bundle,
    image: torch.Tensor,
    *,
    device: str | torch.device,
    tta: bool,
    precision: Precision | None,
    predictor: Predictor | None,
    progress: ProgressHook | None,
) -> tuple[torch.Tensor, float | None]:
    """Sliding-window probabilities of the preprocessed image (1, X, Y, Z), and the TTA disagreement."""
    infer = bundle.config.infer
    assert bundle.config.train.patch_size is not None  # a trained bundle's config records its patch
    roi = tuple(int(p) for p in bundle.config.train.patch_size)
    on_windows = None
    if progress is not None:
        total = count_windows(tuple(image.shape[1:]), roi, infer.overlap) * len(flip_sets(tta, infer.tta_flips))
        done = [0]

        def on_windows(n: int) -> None:
            done[0] += n
            progress("network", done[0], total)

    flip_labels: list[torch.Tensor] | None = [] if tta else None
    probs = sliding_window_logits(
        predictor or bundle.network,
        image,
        roi_size=roi,
        overlap=infer.overlap,
        sw_batch_size=infer.sw_batch_size,
        mode=infer.blend_mode,
        tta=tta,
        tta_flips=infer.tta_flips,
        device=device,
        accumulate_on_cpu=int(np.prod(image.shape[1:])) > infer.accumulate_on_cpu_voxels,
        cpu_bf16=infer.cpu_bf16,
        precision=precision,
        flip_labels=flip_labels,
        on_windows=on_windows,
    )
    return probs, (tta_disagreement(probs, flip_labels) if flip_labels else None)


def model_grid_probabilities(
    bundle: Bundle,
    volume: Volume | Sequence[Volume],
    *,
    device: str | torch.device = "cpu",
    tta: bool = False,
    crf: CRFConfig | None = None,
    precision: Precision | None = None,
    predictor: Predictor | None = None,
    progress: ProgressHook | None = None,
) -> ModelGridResult:
    """Probabilities in the bundle's model grid and that grid's affine (voxel -> RAS mm).

    Sliding-window settings come from the bundle's ``infer`` config (see
    ``with_infer_overrides``). ``predictor`` replaces the bundle's torch network (a
    backend); ``precision`` (default: ``inference_precision`` for the bundle) is the torch
    network's; ``crf`` (when enabled) refines the probabilities with the dense CRF in this grid.
    """
    timings: dict[str, float] = {}
    with _stage("preprocess", timings, progress):
        pre = build_preprocess(bundle.config, keys=("image",), load=False)
        image = pre({"image": to_metatensor(volume)})["image"]
        affine = np.asarray(image.affine, dtype=np.float64)
    with _stage("network", timings, progress):
        probs, disagreement = _network_probabilities(
            bundle,
            image.as_tensor(),
            device=device,
            tta=tta,
            precision=precision,
            predictor=predictor,
            progress=progress,
        )
    grid_image = image.as_tensor()[0].float()
    if crf is not None and crf.enabled:
        from medseg.crf import Spacing, dense_crf

        with _stage("crf", timings, progress):
            spacing = cast(Spacing, tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)))
            crf_device = torch.device(device)
            refined = dense_crf(
                probs.to(crf_device), grid_image.to(crf_device), spacing=spacing, cfg=crf, inplace=True
            )
            probs = refined.to(probs.dtype).cpu()
    return ModelGridResult(probs, affine, grid_image, disagreement, timings)


RESAMPLE_CHUNK_VALUES = 2**24
"""Float32 values (classes x voxels) per slab of the target when resampling: about 64 MiB a buffer."""


def _sample_general(
    probs: torch.Tensor, to_source: np.ndarray, rows: range, target_shape: Sequence[int]
) -> torch.Tensor:
    """A source's probabilities (C, N) on target rows ``rows`` x the whole of axes 1, 2, for any
    affine map: trilinear ``grid_sample`` on the part of the source the slab reads."""
    n_classes = probs.shape[0]
    index = _slab_index(rows, target_shape)
    # source coordinate a of target voxel (i, j, k): a sum of three 1D terms, broadcast on the slab
    terms = [[to_source[a, j] * index[j] for j in range(3)] for a in range(3)]
    size = np.asarray(probs.shape[1:])
    low = np.array([sum(t.min() for t in terms[a]) + to_source[a, 3] for a in range(3)])
    high = np.array([sum(t.max() for t in terms[a]) + to_source[a, 3] for a in range(3)])
    # the part of the source this slab reads (+1 voxel for interpolation), clamped to the source
    lo = np.clip(np.floor(low).astype(int), 0, size - 1)
    hi = np.clip(np.ceil(high).astype(int) + 1, lo + 1, size)
    # one explicit zero voxel around the part read: the same as grid_sample's zero padding, and
    # no degenerate one-voxel axis (align_corners maps every coordinate of such an axis to 0)
    sub = F.pad(probs[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].float(), (1, 1, 1, 1, 1, 1))
    sub_size = np.asarray(sub.shape[1:], dtype=np.float64)
    grid = torch.empty((1, len(rows), target_shape[1], target_shape[2], 3), dtype=torch.float32)
    for a in range(3):
        local = terms[a][0][:, None, None] + terms[a][1][None, :, None] + terms[a][2][None, None, :]
        local += to_source[a, 3] - lo[a] + 1.0
        # grid_sample's last dimension lists (x, y, z) = (dim 4, dim 3, dim 2) of the input
        grid[0, ..., 2 - a] = torch.from_numpy(2.0 * local / (sub_size[a] - 1) - 1.0)
    sampled = F.grid_sample(sub[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return sampled.view(n_classes, -1)


def argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(dim=0)`` as uint8 for (C, N) scores: a pass per class, several times faster on
    the CPU than torch's reduction across the first dimension; ties go to the lower class, as argmax."""
    best = probs[0].clone()
    labels = torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    for c in range(1, probs.shape[0]):
        higher = probs[c] > best
        labels.masked_fill_(higher, c)
        torch.maximum(best, probs[c], out=best)
    return labels


MIXED_CELL = 255
"""In ``cell_labels``: a cell whose corners do not all have one label, or one across the grid's edge."""

MIXED_FRACTION_LIMIT = 0.25
"""Above this fraction of a slab in mixed cells, interpolating every voxel costs less than picking."""


def cell_labels(probs: torch.Tensor) -> torch.Tensor:
    """The label each cell of a source grid (its 2x2x2 voxels from ``i`` to ``i + 1`` on every axis)
    has at all eight corners, else ``MIXED_CELL``; padded on every side with a layer of
    ``MIXED_CELL`` (cells across the grid's edge) and, outermost, one of background (wholly outside).

    Trilinear interpolation inside a cell is a convex combination of its corners: where they all
    have argmax ``k``, so does the interpolated value (ties going to the lower class, as argmax). Only
    target voxels in mixed cells (class borders, the grid's edge) need the interpolation.
    """
    shape = probs.shape[1:]
    labels = argmax_classes(probs.reshape(probs.shape[0], -1)).view(shape)
    inner = [max(n - 1, 0) for n in shape]
    cells = labels[: inner[0], : inner[1], : inner[2]].clone()
    for di, dj, dk in itertools.product((0, 1), repeat=3):
        if di or dj or dk:
            corner = labels[di : di + inner[0], dj : dj + inner[1], dk : dk + inner[2]]
            cells.masked_fill_(corner != cells, MIXED_CELL)
    padded = torch.full([n + 4 for n in inner], MIXED_CELL, dtype=torch.uint8)
    padded[2:-2, 2:-2, 2:-2] = cells
    for dim in range(3):
        padded.select(dim, 0).zero_()
        padded.select(dim, -1).zero_()
    return padded


def _cell_index(coords: np.ndarray, size: int) -> torch.Tensor:
    """Per source coordinate along an axis of ``size`` voxels: its cell in ``cell_labels``' padded
    array; within one voxel outside the grid a mixed cell, further out the background layer."""
    cell = np.clip(np.floor(coords), 0, max(size - 2, 0)).astype(np.int64) + 2
    cell[coords < 0.0] = 1
    cell[coords > size - 1] = max(size - 1, 0) + 2
    cell[(coords <= -1.0) | (coords >= size)] = 0
    return torch.from_numpy(cell)


def _labels_at(
    probs: torch.Tensor, maps: Sequence[AxisMap], coords: list[np.ndarray], points: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Labels (uint8) at slab voxels ``points`` (three index tensors, target axes) at per-axis source
    coordinates ``coords``: trilinear, zero padding, background outside, as ``_sample_axis_aligned``."""
    flat = probs.reshape(probs.shape[0], -1)  # a view: ``probs`` is contiguous
    strides = [probs.stride(1 + mp.source_axis) for mp in maps]
    # per target axis, the lower and the upper neighbour: (offset into ``flat``, weight) at each point
    taps = []
    for c, mp, stride, p in zip(coords, maps, strides, points, strict=True):
        i0, i1, w0, w1 = _linear_taps(c, probs.shape[1 + mp.source_axis])
        taps.append(((i0[p] * stride, w0[p]), (i1[p] * stride, w1[p])))
    values = torch.zeros((probs.shape[0], points[0].numel()), dtype=torch.float32)
    for (oa, wa), (ob, wb), (oc, wc) in itertools.product(*taps):
        values.add_(flat.index_select(1, oa + ob + oc).float().mul_(wa * wb * wc))
    values[0] += (1.0 - values.sum(dim=0)).clamp_min_(0.0)
    return argmax_classes(values)


def _labels_axis_aligned(
    probs: torch.Tensor,
    cells: torch.Tensor,
    maps: tuple[AxisMap, AxisMap, AxisMap],
    rows: range,
    target_shape: Sequence[int],
) -> torch.Tensor | None:
    """Labels (uint8, rows x Y x Z) of one source on a slab: a cell's label where it has one, the
    interpolated probabilities' argmax in mixed cells; None when too much of the slab is mixed."""
    index = _slab_index(rows, target_shape)
    coords = [mp.scale * i + mp.offset for mp, i in zip(maps, index, strict=True)]
    sizes = [probs.shape[1 + mp.source_axis] for mp in maps]
    picks = [_cell_index(c, n) for c, n in zip(coords, sizes, strict=True)]
    labels = cells.permute(*(mp.source_axis for mp in maps))[picks[0]][:, picks[1]][:, :, picks[2]]
    mixed = (labels == MIXED_CELL).nonzero(as_tuple=True)
    if mixed[0].numel() > MIXED_FRACTION_LIMIT * labels.numel():
        return None
    if mixed[0].numel():
        labels[mixed] = _labels_at(probs, maps, coords, mixed)
    return labels


def _probabilities_on_slab(
    plans: list[tuple[torch.Tensor, np.ndarray, tuple[AxisMap, AxisMap, AxisMap] | None]],
    rows: range,
    target_shape: Sequence[int],
) -> torch.Tensor:
    """The sum over sources of their probabilities (C, N) on a slab, background outside each."""
    acc: torch.Tensor | None = None
    for probs, to_source, maps in plans:
        if maps is not None:
            sampled = _sample_axis_aligned(probs, maps, rows, target_shape)
        else:
            sampled = _sample_general(probs, to_source, rows, target_shape)
        # what a source does not cover (outside its field of view) is background
        sampled[0] += (1.0 - sampled.sum(dim=0)).clamp_min_(0.0)
        acc = sampled if acc is None else acc.add_(sampled)
    assert acc is not None
    return acc


def resample_to_grid(
    sources: list[tuple[torch.Tensor, np.ndarray]],
    target_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    *,
    chunk_voxels: int | None = None,
    return_probabilities: bool = False,
    axis_aligned: bool = True,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Average class probabilities given on other grids onto a target grid; return the argmax labels.

    Each source is (probabilities (C, X, Y, Z), affine). Target voxels outside a source's grid
    count as background for it. Work goes in slabs of the target's last axis of about
    ``chunk_voxels`` (default: ``RESAMPLE_CHUNK_VALUES`` / C), so memory stays bounded; each slab's
    labels go straight into the uint8 result. A source whose grid is the target's permuted,
    flipped, rescaled and shifted (``axis_aligned_map``) is interpolated one axis at a time; any
    other (oblique) one with ``grid_sample``: both trilinear with zero padding, the same values up to
    rounding. One axis-aligned source, labels only (the usual case): its labels are picked per
    source cell and interpolated only in cells whose corners disagree (``cell_labels``).
    ``axis_aligned=False`` takes the general path for every source. With ``return_probabilities``
    the averaged probabilities (C, X, Y, Z) float16 are returned too.
    """
    # The result is in Fortran order, as NIfTI stores voxels and cc3d labels them (writing a C-order
    # 512x512x200 mask spent 0.4 s transposing it): it is computed in C order on the grid with its
    # axes reversed, slab by slab along the target's last axis, and returned transposed (a view).
    reverse = np.eye(4)[[2, 1, 0, 3]]  # voxel (k, j, i) of the reversed grid is (i, j, k) of the target
    result = _resample_to_grid_c(
        sources,
        np.asarray(target_affine, dtype=np.float64) @ reverse,
        (target_shape[2], target_shape[1], target_shape[0]),
        chunk_voxels=chunk_voxels,
        return_probabilities=return_probabilities,
        axis_aligned=axis_aligned,
    )
    if isinstance(result, tuple):
        return result[0].T, result[1].transpose(0, 3, 2, 1)
    return result.T


def _resample_to_grid_c(
    sources: list[tuple[torch.Tensor, np.ndarray]],
    target_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    *,
    chunk_voxels: int | None,
    return_probabilities: bool,
    axis_aligned: bool,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``resample_to_grid`` in C order: slabs along the target's first axis."""
    n_classes = sources[0][0].shape[0]
    out = np.empty(target_shape, dtype=np.uint8)
    probs_out = np.empty((n_classes, *target_shape), dtype=np.float16) if return_probabilities else None
    target = np.asarray(target_affine, dtype=np.float64)
    plans = []
    for probs, affine in sources:
        to_source = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ target
        plans.append((probs, to_source, axis_aligned_map(to_source, target_shape) if axis_aligned else None))
    first_maps = plans[0][2]
    pick = len(plans) == 1 and first_maps is not None and probs_out is None and n_classes < MIXED_CELL
    if pick:
        plans[0] = (plans[0][0].contiguous(), *plans[0][1:])
    cells = cell_labels(plans[0][0]) if pick else None
    chunk = chunk_voxels or max(1, RESAMPLE_CHUNK_VALUES // max(n_classes, 1))
    step = max(1, chunk // max(target_shape[1] * target_shape[2], 1))
    for start in range(0, target_shape[0], step):
        rows = range(start, min(target_shape[0], start + step))
        slab = (len(rows), *target_shape[1:])
        if cells is not None and first_maps is not None:
            labels = _labels_axis_aligned(plans[0][0], cells, first_maps, rows, target_shape)
            if labels is not None:
                out[rows.start : rows.stop] = labels.numpy()
                continue
        acc = _probabilities_on_slab(plans, rows, target_shape)
        out[rows.start : rows.stop] = argmax_classes(acc).view(slab).numpy()
        if probs_out is not None:
            probs_out[:, rows.start : rows.stop] = acc.div_(len(sources)).view(n_classes, *slab).numpy()
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


def crf_config(bundle: Bundle, crf: bool | None) -> CRFConfig:
    """The bundle's CRF settings, switched on or off by ``crf`` (None keeps the bundle's choice)."""
    cfg = bundle.config.postprocess.crf
    return cfg if crf is None else cfg.model_copy(update={"enabled": crf})


def apply_label_biases(probs: torch.Tensor, biases: dict[int, float]) -> torch.Tensor:
    """Probabilities (C, ...) with ``log p_k + bias_k`` renormalised, in place: the argmax is that of
    the biased log-probabilities, and the result is still a distribution (for averaging)."""
    if not biases:
        return probs
    for k, bias in biases.items():
        if k < probs.shape[0]:
            probs[k].mul_(math.exp(bias))
    return probs.div_(probs.sum(dim=0, keepdim=True).clamp_min_(1e-12))


def ensemble_to_source_grid(
    bundles: list[Bundle],
    volume: Volume | Sequence[Volume],
    *,
    device: str | torch.device = "cpu",
    tta: bool = False,
    crf: CRFConfig | None = None,
    probabilities: bool = False,
    postprocess: bool = True,
    precision: Precision | None = None,
    predictors: list[Predictor] | None = None,
    progress: ProgressHook | None = None,
) -> Prediction:
    """Segment ``volume`` with bundles already configured (overrides applied, ``crf`` resolved).

    Each bundle's model-grid probabilities (through ``predictors[i]`` when given) are
    averaged in ``volume``'s grid, reduced to labels and post-processed with the
    first bundle's settings (its per-label log-probability biases first, in the model grid; they
    are in the saved probabilities too). This is the one prediction path: ``predict_volume`` and
    the batch both call it.
    """
    timings: dict[str, float] = {}
    # several channels (one Volume each, on one grid): the mask goes on the first one's grid
    channels = [volume] if isinstance(volume, Volume) else list(volume)
    volume = channels[0]
    results = []
    for i, bundle in enumerate(bundles):
        predictor = predictors[i] if predictors else None
        r = model_grid_probabilities(
            bundle,
            channels,
            device=device,
            tta=tta,
            crf=crf,
            precision=precision,
            predictor=predictor,
            progress=progress,
        )
        for k, v in r.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        if postprocess:
            apply_label_biases(r.probs, label_biases(bundles[0].config.postprocess))
        results.append(r)
    with _stage("invert", timings, progress):
        resampled = resample_to_grid(
            [(r.probs, r.affine) for r in results],
            volume.affine,
            volume.shape,
            return_probabilities=probabilities,
        )
        labels, probs = (
            cast(tuple[np.ndarray, np.ndarray], resampled)
            if probabilities
            else (cast(np.ndarray, resampled), None)
        )
    cfg = bundles[0].config
    if postprocess:
        with _stage("postprocess", timings, progress):
            labels = postprocess_labels(
                labels, cfg.postprocess, spacing=volume.spacing, label_ids=sorted(cfg.labels or {})
            )
    labels = channels_to_values(labels, cfg.label_values)  # the mask holds the label files' values
    disagreements = [r.tta_disagreement for r in results if r.tta_disagreement is not None]
    return Prediction(
        mask=volume.with_array(labels, kind="label"),
        timings=timings,
        probabilities=probs,
        tta_disagreement=float(np.mean(disagreements)) if disagreements else None,
    )


def predict_volume(
    bundles: list[Bundle],
    volume: Volume | Sequence[Volume],
    *,
    device: str | torch.device = "cpu",
    tta: bool | None = None,
    postprocess: bool = True,
    crf: bool | None = None,
    probabilities: bool = False,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    blend_mode: str | None = None,
    cpu_bf16: bool | None = None,
    precision: str | None = "auto",
    backend: str | None = None,
) -> Prediction:
    """Segment one volume with one bundle or an ensemble (probabilities averaged); the mask is in ``volume``'s grid.

    ``crf``: None follows the first bundle's ``postprocess.crf.enabled``; True/False force it.
    ``tta``: None follows the first bundle's ``infer.tta`` (flip TTA, kept when validation chose it).
    The sliding-window options override the bundles' ``infer`` settings for this call;
    ``backend`` (auto, torch, onnxruntime, openvino) and ``precision`` (auto, fp32, bf16; fp16 on
    CUDA) default to the bundles' ``infer`` config; medseg.backends builds the predictors (``auto``:
    measured once per machine and bundle).
    """
    from medseg.backends import backend_predictors

    bundles = with_infer_overrides(
        bundles,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        blend_mode=blend_mode,
        cpu_bf16=cpu_bf16,
        backend=backend,
        precision=None if precision in (None, "auto") else precision,
    )
    return ensemble_to_source_grid(
        bundles,
        volume,
        device=device,
        tta=bundles[0].config.infer.tta if tta is None else tta,
        crf=crf_config(bundles[0], crf),
        probabilities=probabilities,
        postprocess=postprocess,
        predictors=list(backend_predictors(bundles, device)),
    )
