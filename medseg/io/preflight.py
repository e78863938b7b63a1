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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import InputError

DEFAULT_FRACTION = 0.5
# torch, MONAI and a default U-Net's weights, resident before the first case
RUNTIME_OVERHEAD_BYTES = 600 * 2**20

__all__ = ["MemoryEstimate", "default_max_memory", "format_bytes", "parse_size", "preflight", "read_header"]


@dataclass(frozen=True)
class ImageHeader:
    """What a header says about the voxels: enough to size a case without reading it."""

    shape: tuple[int, ...]
    itemsize: int  # bytes per stored voxel (all components)
    spacing: tuple[float, float, float]
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
    """A fraction of this machine's physical memory, or of the cgroup (container) limit when lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return int(total * fraction)


def read_header(path: str | Path, *, series_id: str | None = None) -> ImageHeader:
    """The shape, voxel size and spacing a file's header declares; no voxel is read."""
    from medseg.io.nifti import is_nifti

    path = Path(path)
    if not path.exists():
        raise InputError(path, "not found")
    if path.is_file() and is_nifti(path):
        return _nifti_header(path)
    if path.is_dir() or path.suffix.lower() in (".dcm", "") or not _sitk_readable(path):
        return _dicom_header(path, series_id)
    return _sitk_header(path)


def _nifti_header(path: Path) -> ImageHeader:
    import nibabel as nib

    try:
        img = nib.load(str(path))  # the header only: voxels are read on demand
    except Exception as exc:
        raise InputError(path, f"not a readable NIfTI file ({' '.join(str(exc).split())})") from exc
    hdr = img.header
    zooms = tuple(float(z) for z in hdr.get_zooms()[:3]) + (1.0,) * max(0, 3 - len(img.shape))
    slope = float(hdr["scl_slope"]) if "scl_slope" in hdr else 0.0
    scaled = bool(np.isfinite(slope) and slope not in (0.0, 1.0)) or (
        "scl_inter" in hdr and np.isfinite(float(hdr["scl_inter"])) and float(hdr["scl_inter"]) != 0.0
    )
    return ImageHeader(
        shape=tuple(int(s) for s in img.shape),
        itemsize=int(img.get_data_dtype().itemsize),
        spacing=zooms[:3],  # type: ignore[arg-type]
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


def _sitk_readable(path: Path) -> bool:
    return path.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd"))


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


def estimate_case_bytes(
    header: ImageHeader,
    *,
    spacing: tuple[float, float, float] | None = None,
    n_classes: int = 2,
    n_models: int = 1,
    tta: bool = False,
    save_probabilities: bool = False,
    overhead_bytes: int = RUNTIME_OVERHEAD_BYTES,
) -> dict[str, int]:
    """Peak bytes by stage for reading and segmenting a case with ``header``.

    Reading: the stored voxels (float64 while a slope/intercept applies) and the float32
    image. Model grid (``spacing``; the native grid when None): the resampled image (two
    copies while transforms chain), the sliding-window logits, their softmax and count map,
    one probability map per ensemble member (one more with TTA). Back in the native grid:
    the mask, and float16 probabilities with ``save_probabilities``.
    """
    native = math.prod(header.shape)
    if spacing is None:
        model = native
    else:
        ratio = math.prod(
            max(float(s), 1e-6) / max(float(t), 1e-6) for s, t in zip(header.spacing, spacing, strict=False)
        )
        model = int(native * ratio)
    stored = native * (header.itemsize + (8 if header.scaled else 0))
    return {
        "read": stored + native * 4,
        "model grid": model * 4 * 2,
        "network output": model * 4 * (n_classes * (2 + max(n_models - 1, 0) + int(tta)) + 1),
        "back to native grid": native * (1 + (2 * n_classes if save_probabilities else 0)),
        "runtime": overhead_bytes,
    }


def preflight(
    path: str | Path,
    *,
    max_memory: int | None = None,
    spacing: tuple[float, float, float] | None = None,
    n_classes: int = 2,
    n_models: int = 1,
    tta: bool = False,
    save_probabilities: bool = False,
    series_id: str | None = None,
    overhead_bytes: int = RUNTIME_OVERHEAD_BYTES,
) -> MemoryEstimate:
    """Estimate the memory segmenting ``path`` needs, from its header; refuse it when over budget.

    Args:
        path: a NIfTI file, a DICOM file or series folder, or an NRRD/MHA file.
        max_memory: the budget in bytes (``--max-memory``); None = ``default_max_memory()``.
        spacing: the model grid's spacing in mm (the bundle's ``preprocess.spacing``).
        n_classes, n_models, tta, save_probabilities: as the inference will run.

    Returns:
        The estimate, by stage.

    Raises:
        InputError: the header cannot be read, or the case needs more than ``max_memory``
            (the message gives the estimate, the shape and the budget).
    """
    path = Path(path)
    budget = default_max_memory() if max_memory is None else int(max_memory)
    header = read_header(path, series_id=series_id)
    parts = estimate_case_bytes(
        header,
        spacing=spacing,
        n_classes=n_classes,
        n_models=n_models,
        tta=tta,
        save_probabilities=save_probabilities,
        overhead_bytes=overhead_bytes,
    )
    estimate = MemoryEstimate(header=header, parts=parts, budget=budget)
    if estimate.total > budget:
        shape = "x".join(str(s) for s in header.shape)
        raise InputError(
            path,
            f"needs {estimate.describe()} for {shape} voxels, more than the memory limit of "
            f"{format_bytes(budget)}; raise --max-memory if this machine has it, or crop/downsample the image",
        )
    return estimate
