"""Memory preflight: the bytes a case will need, estimated from its header before any voxel is read.

``preflight(path, ...)`` reads only the header (NIfTI header, DICOM headers
without pixels, or SimpleITK's image information for other formats), estimates
the peak memory of reading and segmenting the case, and raises an
``InputError`` naming the estimate when it is over the budget, so that a
66-byte file claiming 32767^3 voxels or a small gzip holding gigabytes is one
line, not a MemoryError or a machine brought down. The batch refuses that case
and goes on with the next.

The budget is ``--max-memory`` (``parse_size("8G")``) or, by default,
``default_max_memory()``: half of this machine's memory (or of the cgroup's
limit when lower).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.cgroups import memory_limit
from medseg.errors import InputError

DEFAULT_FRACTION = 0.5
# torch, MONAI and a default U-Net's weights, resident before the first case
RUNTIME_OVERHEAD_BYTES = 600 * 2**20

__all__ = [
    "MemoryEstimate",
    "check_read_size",
    "default_max_memory",
    "format_bytes",
    "network_bytes",
    "parse_size",
    "preflight",
    "preflight_inference",
    "read_header",
    "resident_bytes",
]


@dataclass(frozen=True)
class ImageHeader:
    """What a header says about the voxels: enough to size a case without reading it."""

    shape: tuple[int, ...]
    itemsize: int  # bytes per stored voxel (all components)
    spacing: tuple[float, float, float] | None  # None: unknown (a zipped study), taken as the model grid's
    scaled: bool = False  # a slope/intercept turns the stored values into float64 while reading
    compressed: bool = False


@dataclass(frozen=True)
class MemoryEstimate:
    """The bytes one case needs at its peak, by stage, and the budget it was checked against."""

    header: ImageHeader
    parts: dict[str, int] = field(default_factory=dict)
    budget: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items() if v)
        return f"about {format_bytes(self.total)} ({detail})"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from '8G', '512M', '1.5GiB', '2000000' (binary units: 1G = 2**30)."""
    match = _SIZE_RE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a size such as 8G, 512M or 1.5GiB, got {text!r}")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024**power)


def default_max_memory(fraction: float = DEFAULT_FRACTION) -> int:
    """A fraction of this machine's physical memory, or of the cgroup (container) limit when lower
    (``medseg.cgroups.memory_limit``: the process's own cgroup and those above it; only the mount's
    root was read before, which misses a limit set below it)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    limit = memory_limit()  # the process's cgroup or one above it (a container's --memory)
    if limit is not None and limit < total:
        total = limit
    return int(total * fraction)


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 where it cannot be read)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def network_bytes(window: Sequence[float], features: int, windows_in_flight: int) -> int:
    """The network's activations for ``windows_in_flight`` windows of ``window`` voxels at once: about
    eight full-resolution float32 feature maps of ``features`` channels each (the measured runs:
    ``estimate_case_bytes``)."""
    return int(math.prod(window) * features * 4 * 8 * windows_in_flight)


def read_header(path: str | Path, *, series_id: str | None = None) -> ImageHeader:
    """The shape, voxel size and spacing a file's header declares; no voxel is read."""
    from medseg.io.nifti import is_nifti
    from medseg.io.sitk import is_sitk_image

    path = Path(path)
    if not path.exists():
        raise InputError(path, "not found")
    if path.is_file() and is_nifti(path):
        return _nifti_header(path)
    if path.is_file() and is_sitk_image(path):
        return _sitk_header(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        return _zip_header(path)
    return _dicom_header(path, series_id)


def _nifti_header(path: Path) -> ImageHeader:
    import nibabel as nib

    try:
        img = nib.load(str(path))  # the header only: voxels are read on demand
    except Exception as exc:
        raise InputError(path, f"not a readable NIfTI file ({' '.join(str(exc).split())})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    hdr = img.header
    zooms = [float(z) for z in hdr.get_zooms()[:3]] + [1.0] * max(0, 3 - len(img.shape))
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    scaled = bool(np.isfinite(slope) and slope not in (0.0, 1.0)) or bool(np.isfinite(inter) and inter != 0.0)
    return ImageHeader(
        shape=tuple(int(s) for s in img.shape),
        itemsize=int(img.get_data_dtype().itemsize),
        spacing=(zooms[0], zooms[1], zooms[2]),
        scaled=scaled,
        compressed=path.name.lower().endswith(".gz"),
    )


def _dicom_header(path: Path, series_id: str | None) -> ImageHeader:
    from medseg.io.dicom import scan_dicom, select_series

    info = select_series(scan_dicom(path), path, series_id)
    rows, cols, slices = info.size
    return ImageHeader(
        shape=(int(rows), int(cols), int(slices)), itemsize=2, spacing=info.spacing, scaled=True
    )


def _zip_header(path: Path) -> ImageHeader:
    """A zipped study, sized by what it expands to (16-bit voxels, the native grid): an upper bound."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(path, f"not a readable zip archive ({exc})") from exc
    return ImageHeader(
        shape=(max(expanded // 2, 1), 1, 1), itemsize=2, spacing=None, scaled=True, compressed=True
    )


def _sitk_header(path: Path) -> ImageHeader:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(path, "the image header cannot be read") from exc
    bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    itemsize = int(bits.group(1)) // 8 if bits else 8
    spacing = tuple(float(s) for s in reader.GetSpacing())[:3]
    return ImageHeader(
        shape=tuple(int(s) for s in reader.GetSize()),
        itemsize=itemsize * max(1, reader.GetNumberOfComponents()),
        spacing=spacing + (1.0,) * (3 - len(spacing)),  # type: ignore[arg-type]
        compressed=True,
    )


def check_read_size(path: str | Path, *, max_bytes: int | None = None) -> None:
    """Refuse, from its header, a file whose voxels alone would not fit in ``max_bytes``.

    For readers that allocate what the header declares before reading (SimpleITK): a few bytes
    of NRRD header can claim gigabytes. None = ``default_max_memory()``.
    """
    header = read_header(path)
    n_voxels = math.prod(header.shape)
    needed = n_voxels * (header.itemsize + 4)  # the stored voxels and the float32 image
    budget = default_max_memory() if max_bytes is None else int(max_bytes)
    if needed > budget:
        shape = "x".join(str(s) for s in header.shape)
        raise InputError(
            path,
            f"its header declares {shape} voxels: reading them needs about {format_bytes(needed)}, more "
            f"than the memory limit of {format_bytes(budget)} (a corrupt header, or an image to crop or "
            "downsample first)",
        )


def _spatial(header: ImageHeader) -> int:
    return math.prod(header.shape[:3])


def _channels(header: ImageHeader) -> int:
    """Channels a header holds: a 4D NIfTI's fourth (and fifth) axis, else one."""
    return max(1, math.prod(header.shape[3:]))


def estimate_case_bytes(
    header: ImageHeader | Sequence[ImageHeader],
    *,
    spacing: tuple[float, float, float] | None = None,
    n_classes: int = 2,
    n_models: int = 1,
    tta: bool = False,
    save_probabilities: bool = False,
    patch_size: tuple[float, float, float] | None = None,
    features: int = 16,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    n_channels: int = 1,
    overhead_bytes: int = RUNTIME_OVERHEAD_BYTES,
) -> dict[str, int]:
    """Peak bytes by stage for reading and segmenting a case with ``header``.

    ``header``: one header, or one per channel file (or DICOM series) of a multi-channel case,
    the first giving the grid the others are put on. Every channel is counted: a 4D file's
    channels, one file per channel, and at least ``n_channels`` (the model's ``in_channels``).
    Reading: the stored voxels (float64 while a slope/intercept applies) and the float32
    image, per channel. Model grid (``spacing``; the native grid when None): the resampled
    channels (two copies while transforms chain), the sliding-window logits, their softmax
    and count map, one probability map per ensemble member (one more with TTA): the network's
    output has ``n_classes`` channels whatever the input's. Back in the native grid: the mask,
    and float16 probabilities with ``save_probabilities``. The network (``patch_size``,
    ``features``): about eight full-resolution float32 feature maps per window in flight
    (``sw_batch_size``, or fewer when the grid holds fewer windows).
    Measured on CPU (benchmarks/preflight_memory.py, the backend choice cached): peak RSS 0.97x,
    1.16x and 0.92x the estimate for CTs of 128x128x64, 256x256x100 and 512x512x300 with DynUNet
    (features 8, patch 80x96x32), 1.15x, 0.98x and 0.88x with the classic U-Net (features 16,
    patch 96x96x64). Not counted here: the ``auto`` backend's measurement, once per machine and
    bundle before the first case (``medseg.backends.measurement_bytes``).
    """
    headers = [header] if isinstance(header, ImageHeader) else list(header)
    if not headers:
        raise ValueError("estimate_case_bytes needs at least one header")
    first = headers[0]
    channels = max(sum(_channels(h) for h in headers), int(n_channels), 1)
    native = _spatial(first)
    grid = [float(n) for n in first.shape[:3]]
    if spacing is not None and first.spacing is not None:
        grid = [
            n * max(float(s), 1e-6) / max(float(t), 1e-6)
            for n, s, t in zip(grid, first.spacing, spacing, strict=False)
        ]
    model = int(math.prod(grid))
    read = sum(math.prod(h.shape) * (h.itemsize + (8 if h.scaled else 0) + 4) for h in headers)
    network = 0
    if patch_size is not None:
        windows = math.prod(
            1 if n <= p else math.ceil((n - p) / max(p * (1 - overlap), 1.0)) + 1
            for n, p in zip(grid, patch_size, strict=False)
        )
        network = network_bytes(patch_size, features, min(sw_batch_size, windows))
    return {
        "read": read,
        "model grid": model * channels * 4 * 2,
        "network output": model * 4 * (n_classes * (2 + max(n_models - 1, 0) + int(tta)) + 1),
        "back to native grid": native * (1 + (2 * n_classes if save_probabilities else 0)),
        "network": network,
        "runtime": overhead_bytes,
    }


def _read_headers(
    path: str | Path | Sequence[str | Path], series_id: str | Sequence[str] | None
) -> list[ImageHeader]:
    """One header per channel source: each channel file, each DICOM series named, or the one input."""
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    if not paths:
        raise ValueError("preflight needs at least one input path")
    series = [series_id] if series_id is None or isinstance(series_id, str) else list(series_id)
    if len(paths) == 1 and len(series) > 1:  # one DICOM study, one series per channel
        return [read_header(paths[0], series_id=uid) for uid in series]
    return [read_header(p, series_id=series[0] if series else None) for p in paths]


def preflight(
    path: str | Path | Sequence[str | Path],
    *,
    max_memory: int | None = None,
    spacing: tuple[float, float, float] | None = None,
    n_classes: int = 2,
    n_models: int = 1,
    tta: bool = False,
    save_probabilities: bool = False,
    series_id: str | Sequence[str] | None = None,
    patch_size: tuple[float, float, float] | None = None,
    features: int = 16,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    n_channels: int = 1,
    overhead_bytes: int = RUNTIME_OVERHEAD_BYTES,
) -> MemoryEstimate:
    """Estimate the memory segmenting ``path`` needs, from its header(s); refuse it when over budget.

    Args:
        path: a NIfTI file, a DICOM file or series folder, or an NRRD/MHA file; or a case's
            channel files (``CASE_0000`` .. ``CASE_000N``), each header read and counted.
        max_memory: the budget in bytes (``--max-memory``); None = ``default_max_memory()``.
        spacing: the model grid's spacing in mm (the bundle's ``preprocess.spacing``).
        n_classes, n_models, tta, save_probabilities: as the inference will run.
        series_id: the DICOM series to read; several (one per channel, ``--series`` given
            once per channel) read one header each.
        patch_size, features, sw_batch_size, overlap: the sliding window and the network's width.
        n_channels: the model's input channels (``model.in_channels``): at least this many are counted.

    Returns:
        The estimate, by stage (``header``: the first channel's).

    Raises:
        InputError: a header cannot be read, or the case needs more than ``max_memory``
            (the message gives the estimate, the shape and the budget).
    """
    budget = default_max_memory() if max_memory is None else int(max_memory)
    headers = _read_headers(path, series_id)
    parts = estimate_case_bytes(
        headers,
        spacing=spacing,
        n_classes=n_classes,
        n_models=n_models,
        tta=tta,
        save_probabilities=save_probabilities,
        patch_size=patch_size,
        features=features,
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        n_channels=n_channels,
        overhead_bytes=overhead_bytes,
    )
    estimate = MemoryEstimate(header=headers[0], parts=parts, budget=budget)
    if estimate.total > budget:
        first = Path(path) if isinstance(path, str | Path) else Path(next(iter(path)))
        shape = "x".join(str(s) for s in headers[0].shape)
        channels = max(sum(_channels(h) for h in headers), n_channels)
        what = f"{channels} channels of {shape}" if len(headers) > 1 or n_channels > 1 else shape
        raise InputError(
            first,
            f"needs {estimate.describe()} for {what} voxels, more than the memory limit of "
            f"{format_bytes(budget)}; raise --max-memory if this machine has it, or crop/downsample the image",
        )
    return estimate


def preflight_inference(
    path: str | Path | Sequence[str | Path],
    bundles: Sequence[Any],
    *,
    max_memory: int | None = None,
    tta: bool = False,
    save_probabilities: bool = False,
    series_id: str | Sequence[str] | None = None,
) -> MemoryEstimate:
    """``preflight`` with the settings of the bundles that will segment ``path`` (an ensemble).

    ``path``: the input, or a case's channel files; ``series_id``: one DICOM series, or one per
    channel. Each bundle needs ``.config`` (a ``medseg.config.Config``) and ``.labels``; the
    largest model grid, window, width and input channels among them are used.
    """
    cfgs = [b.config for b in bundles]
    spacings = [c.preprocess.spacing for c in cfgs if c.preprocess.spacing is not None]
    finest = tuple(min(s[i] for s in spacings) for i in range(3)) if spacings else None
    patches = [c.train.patch_size for c in cfgs if c.train.patch_size is not None]
    return preflight(
        path,
        max_memory=max_memory,
        spacing=finest,
        n_classes=max(len(b.labels) for b in bundles),
        n_models=len(bundles),
        tta=tta,
        save_probabilities=save_probabilities,
        series_id=series_id,
        patch_size=max(patches, key=math.prod) if patches else None,
        features=max(c.model.features for c in cfgs),
        sw_batch_size=max(c.infer.sw_batch_size for c in cfgs),
        overlap=max(c.infer.overlap for c in cfgs),
        n_channels=max(c.model.in_channels or 1 for c in cfgs),
    )
