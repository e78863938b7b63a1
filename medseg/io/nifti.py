"""NIfTI reading and writing with nibabel, geometry kept exactly."""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import InputError
from medseg.io.volume import Volume, atomic_path

log = logging.getLogger(__name__)


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith((".nii", ".nii.gz"))


def read_nifti(path: str | Path, *, kind: str = "image") -> Volume:
    """Read a NIfTI image (``kind="image"``, float32) or label map (``kind="label"``, uint8/int16).

    Raises:
        InputError: the file is missing, truncated, not NIfTI, not 3D, or holds NaN/Inf.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise InputError(path, f"not a readable NIfTI file ({exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    shape = img.shape
    if any(int(s) == 0 for s in shape):
        raise InputError(path, f"has a zero-size dimension {shape}")
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"expected a 3D volume, got shape {img.shape}; split multi-volume files first")
    _check_transform(path, img)
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise InputError(path, f"truncated or corrupt voxel data ({exc})") from exc
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
        log.warning("%s: sform and qform disagree; using the %s as nibabel does", path, "sform")
    slope, inter = hdr.get_slope_inter()
    if slope is not None and (not np.isfinite(slope) or (inter is not None and not np.isfinite(inter))):
        raise InputError(path, f"invalid intensity scaling (scl_slope={slope}, scl_inter={inter})")


def _as_label(path: Path, data: np.ndarray) -> np.ndarray:
    values = np.asarray(data)
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise InputError(path, "label map holds NaN or infinite values")
        rounded = np.rint(values)
        if not np.array_equal(rounded, values):
            raise InputError(path, "label map holds non-integer values; expected class indices 0..N")
        values = rounded
    if values.size and values.min() < 0:
        raise InputError(path, f"label map holds negative values (min {values.min()})")
    if values.size and values.max() > 255:
        raise InputError(path, f"label map holds values up to {values.max()}; expected at most 255 classes")
    return values.astype(np.uint8)


def write_nifti(
    volume: Volume, path: str | Path, *, overwrite: bool = True, dtype: str | None = None
) -> Path:
    """Write atomically; the stored sform and qform both equal ``volume.affine``."""
    path = Path(path)
    array = volume.array if dtype is None else volume.array.astype(dtype)
    img = nib.Nifti1Image(array, volume.affine)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return path
