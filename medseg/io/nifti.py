"""NIfTI reading and writing with nibabel, geometry kept exactly."""

from __future__ import annotations

import gzip
import json
import logging
import math
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from medseg.errors import InputError, one_line
from medseg.io.preflight import default_max_memory, format_bytes
from medseg.io.volume import Volume, atomic_path

log = logging.getLogger(__name__)


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith((".nii", ".nii.gz"))


def read_nifti(path: str | Path, *, kind: str = "image", max_bytes: int | None = None) -> Volume:
    """Read a NIfTI image (``kind="image"``, float32) or label map (``kind="label"``, uint8).

    ``max_bytes`` caps the memory reading may take (the stored voxels, decompressed,
    plus the float32 copy), checked from the header before any voxel is read; None =
    ``preflight.default_max_memory()``. A compressed file is never decompressed beyond
    what its header declares.

    Raises:
        InputError: the file is missing, truncated, not NIfTI, not one 3D volume, too large
            for the memory limit, has a broken transform or scaling, or holds NaN/Inf (or
            non-integer labels).
    """
    path = Path(path)
    # nibabel warns on stderr about odd headers; what matters is checked here and raised or logged.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = _read_nifti(path, kind, max_bytes)
    for w in caught[:3]:
        log.debug("%s: %s", path, one_line(w.message))
    return volume


def _read_nifti(path: Path, kind: str, max_bytes: int | None) -> Volume:
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise InputError(path, f"not a readable NIfTI file ({one_line(exc)})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    shape = img.shape
    if any(int(s) <= 0 for s in shape):
        raise InputError(path, f"has a zero-size dimension {shape}; the file holds no voxels")
    # A trailing singleton time/channel axis (4D with one volume) is squeezed; NIfTI stores
    # vector/multi-channel data in the 5th dimension.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        what = "multi-channel (5D)" if len(img.shape) >= 5 else f"{shape[3]} volumes (4D)"
        raise InputError(
            path,
            f"holds {what}, shape {img.shape}; medseg reads one 3D volume per file: split it "
            "(e.g. fslsplit) and pass one volume",
        )
    dtype = img.get_data_dtype()
    if dtype.kind not in "iufb" or dtype.fields is not None:
        raise InputError(
            path, f"voxel type {dtype} (RGB/complex) is not a scalar image; convert it to greyscale"
        )
    _check_transform(path, img)
    _check_size(path, img, max_bytes)
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise InputError(
            path,
            f"truncated or corrupt voxel data, the file holds less than its header says ({one_line(exc)})",
        ) from exc
    data = data.reshape(shape)
    if kind == "label":
        array = _as_label(path, data)
    else:
        array = np.asarray(data, dtype=np.float32)
        n_bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            raise InputError(path, f"{n_bad} voxels are NaN or infinite; fix or mask them before use")
    meta = {"source_format": "nifti", "dtype": str(img.get_data_dtype()), "kind": kind}
    return Volume(array=array, affine=np.asarray(img.affine, dtype=np.float64), meta=meta, source=str(path))


def _check_size(path: Path, img: nib.Nifti1Image, max_bytes: int | None) -> None:
    """Refuse, from the header alone, a file whose voxels cannot be there or cannot fit in memory.

    nibabel allocates what the header declares before it reads: a 66-byte file claiming
    32767^3 voxels would otherwise end in a MemoryError, a small gzip of zeros in gigabytes.
    """
    n_voxels = math.prod(int(s) for s in img.shape)
    itemsize = int(img.get_data_dtype().itemsize)
    stored = n_voxels * itemsize
    offset = int(getattr(img.dataobj, "offset", 352))
    if not path.name.lower().endswith(".gz"):
        available = path.stat().st_size - offset
        if available < stored:
            raise InputError(
                path,
                f"truncated or corrupt voxel data, the file holds less than its header says "
                f"({available} of {stored} bytes of voxels)",
            )
    # the stored voxels, float64 while nibabel applies a slope, and the float32 image
    slope, inter = float(img.header["scl_slope"]), float(img.header["scl_inter"])
    scaled = (np.isfinite(slope) and slope not in (0.0, 1.0)) or (np.isfinite(inter) and inter != 0.0)
    needed = stored + n_voxels * (4 + (8 if scaled else 0))
    budget = default_max_memory() if max_bytes is None else int(max_bytes)
    if needed > budget:
        shape = "x".join(str(int(s)) for s in img.shape)
        raise InputError(
            path,
            f"its header declares {shape} voxels of {img.get_data_dtype()}: reading them needs about "
            f"{format_bytes(needed)}, more than the memory limit of {format_bytes(budget)} "
            "(a corrupt header, or an image to crop or downsample first)",
        )


def _check_transform(path: Path, img: nib.Nifti1Image) -> None:
    hdr = img.header
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise InputError(path, "the header's voxel-to-world transform is not finite")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "the header's voxel-to-world transform is singular (a zero voxel size?)")
    sform, s_code = img.get_sform(coded=True)
    qform, q_code = img.get_qform(coded=True)
    if s_code and q_code and not np.allclose(sform, qform, atol=1e-3):
        # nibabel's rule (and the NIfTI standard's intent): a coded sform wins over the qform.
        log.warning(
            "%s: sform and qform disagree (max difference %.3g mm); using the sform as nibabel does",
            path,
            float(np.abs(sform - qform).max()),
        )
    # nibabel's rule: scl_slope 0 or NaN means "no scaling" (nibabel itself writes NaN for float data).
    # An infinite slope, or a real slope with a non-finite intercept, is a broken writer: refuse it.
    raw_slope, raw_inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    scaled = np.isfinite(raw_slope) and raw_slope != 0
    if np.isinf(raw_slope) or (scaled and not np.isfinite(raw_inter)):
        raise InputError(
            path,
            f"invalid intensity scaling in the header (scl_slope={raw_slope}, scl_inter={raw_inter}); "
            "set scl_slope to 0 (no scaling) or finite values",
        )
    if not scaled:
        log.debug(
            "%s: scl_slope is %s, so no intensity scaling applies (as nibabel reads it)", path, raw_slope
        )


def read_nifti_channels(path: str | Path) -> list[Volume]:
    """Read a multi-channel NIfTI image as one ``Volume`` per channel (all on the file's grid).

    Channels lie on the 4th axis (as MSD Task01 BrainTumour stores FLAIR/T1/T1gd/T2) or on the
    5th with a singleton 4th (the NIfTI vector layout); a 3D file is read by ``read_nifti``
    and gives one channel. The header and voxel checks are ``read_nifti``'s.
    """
    path = Path(path)
    try:
        shape = tuple(int(s) for s in cast(SpatialImage, nib.load(str(path))).shape)  # the header only
    except Exception:
        return [read_nifti(path)]  # which names the problem
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 5 and shape[3] == 1:
        shape = (*shape[:3], shape[4])
    if len(shape) != 4:
        return [read_nifti(path)]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
        _check_transform(path, img)
        _check_size(path, img, None)  # every channel counts against the memory limit
        dtype = img.get_data_dtype()
        if dtype.kind not in "iuf" or dtype.fields is not None:
            raise InputError(path, f"voxel type {dtype} is not a scalar image")
        try:
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
        except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
            raise InputError(
                path,
                f"truncated or corrupt voxel data, the file holds less than its header says ({one_line(exc)})",
            ) from exc
    n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        raise InputError(path, f"{n_bad} voxels are NaN or infinite; fix or mask them before use")
    meta = {"source_format": "nifti", "dtype": str(dtype), "kind": "image"}
    affine = np.asarray(img.affine, dtype=np.float64)
    return [
        Volume(array=data[..., c], affine=affine.copy(), meta=meta, source=str(path)) for c in range(shape[3])
    ]


def write_nifti_channels(
    volumes: list[Volume], path: str | Path, *, overwrite: bool = True, dtype: str | None = None
) -> Path:
    """Write channels on one grid as one 4D NIfTI (channels on the 4th axis, as MSD Task01), atomically."""
    path = Path(path)
    first = volumes[0]
    if any(v.shape != first.shape or not np.allclose(v.affine, first.affine) for v in volumes):
        raise ValueError("every channel of a 4D NIfTI must lie on the first channel's grid")
    array = np.stack([v.array if dtype is None else v.array.astype(dtype) for v in volumes], axis=-1)
    img = nib.Nifti1Image(array, first.affine)
    img.set_sform(first.affine, code=1)
    img.set_qform(first.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return path


def _as_label(path: Path, data: np.ndarray) -> np.ndarray:
    values = np.asarray(data)
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise InputError(path, "label map holds NaN or infinite values")
        rounded = np.rint(values)
        if not np.array_equal(rounded, values):
            odd = values[rounded != values]
            raise InputError(
                path,
                f"label map holds {odd.size} non-integer values (e.g. {float(odd[0]):.4g}); expected class "
                "indices 0..N (was it resampled with linear interpolation? use nearest neighbour)",
            )
        values = rounded
    if values.size and values.min() < 0:
        raise InputError(path, f"label map holds negative values (min {values.min()})")
    if values.size and values.max() > 255:
        raise InputError(path, f"label map holds values up to {values.max()}; expected at most 255 classes")
    return values.astype(np.uint8)


# Label names ride in the NIfTI header as a JSON comment extension (code 6): nibabel, ITK and
# FSL readers skip extensions they do not know, so the file stays an ordinary NIfTI.
LABELS_EXTENSION_KEY = "medseg_labels"


def compact_dtype(array: np.ndarray) -> str | None:
    """The integer type that holds an image's values exactly (CT in HU: int16), or None to keep them
    as they are: a 512x512x300 CT stored as int16 takes half the disk and reading time of float32,
    as nnU-Net and dcm2niix store it. Values off the integers (a rescale slope of 0.5) stay float."""
    if array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        return None
    low, high = float(np.min(array)), float(np.max(array))
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    for dtype in ("int16", "uint16"):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype if np.array_equal(array, np.rint(array)) else None
    return None


def write_nifti(
    volume: Volume,
    path: str | Path,
    *,
    overwrite: bool = True,
    dtype: str | None = None,
    labels: Mapping[int, str] | None = None,
) -> Path:
    """Write atomically; the stored sform and qform both equal ``volume.affine``.

    With ``labels`` (value -> name) the names are embedded as a JSON comment header extension
    (see ``read_label_names``), so a mask that travels alone still says what its values mean.
    """
    path = Path(path)
    array = volume.array if dtype is None else volume.array.astype(dtype)
    img = nib.Nifti1Image(array, volume.affine)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if labels:
        payload = {LABELS_EXTENSION_KEY: {str(int(k)): str(v) for k, v in sorted(labels.items())}}
        text = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", text))
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return path


def read_label_names(path: str | Path) -> dict[int, str]:
    """The label names embedded by ``write_nifti(..., labels=...)``; empty when there are none."""
    img = nib.load(str(path))
    for ext in getattr(img.header, "extensions", []):
        if ext.get_code() != 6:
            continue
        try:
            payload = json.loads(ext.get_content().rstrip(b"\0").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(payload, dict) and isinstance(payload.get(LABELS_EXTENSION_KEY), dict):
            return {int(k): str(v) for k, v in payload[LABELS_EXTENSION_KEY].items()}
    return {}
