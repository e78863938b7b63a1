"""NRRD (.nrrd, .nhdr) and MetaImage (.mha, .mhd) through SimpleITK, geometry kept exactly.

SimpleITK describes a grid in LPS (origin, spacing, a direction-cosine matrix, voxels indexed
(i, j, k) with k slowest in its numpy view); a ``Volume`` holds a RAS affine and (i, j, k)
arrays. ``read_sitk`` converts one into the other; ``write_sitk`` writes a mask back, copying
the grid of the file it was computed from bit for bit when that file is at hand.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg.errors import InputError, one_line
from medseg.io.volume import Volume, atomic_path

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# suffix -> the format name medseg records (source_format) and accepts for --output-format
SITK_SUFFIXES = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage", ".mhd": "metaimage"}
# the single-file suffix a mask gets for each format (a detached .nhdr/.mhd input gets a .nrrd/.mha mask)
MASK_SUFFIX = {"nrrd": ".nrrd", "metaimage": ".mha"}


def is_sitk_image(path: str | Path) -> bool:
    """True for the NRRD and MetaImage file names that SimpleITK reads for medseg."""
    return Path(path).suffix.lower() in SITK_SUFFIXES


def sitk_format(path: str | Path) -> str:
    """``"nrrd"`` or ``"metaimage"`` from the file name."""
    return SITK_SUFFIXES[Path(path).suffix.lower()]


def _itk_message(exc: BaseException) -> str:
    """ITK's messages span lines and repeat the source file of ITK itself: keep the description."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    described = [ln.split("Description:", 1)[1].strip() for ln in lines if "Description:" in ln]
    return one_line(described[0] if described else (lines[-1] if lines else exc))


def _affine(image) -> np.ndarray:
    """The RAS voxel -> world affine of a SimpleITK image (which is LPS)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def _read_image(path: Path):
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"not a readable {sitk_format(path)} file ({_itk_message(exc)})") from exc


def read_sitk(path: str | Path, *, kind: str = "image") -> Volume:
    """Read a NRRD or MetaImage file into a RAS ``Volume``: float32 image or uint8 label map.

    Raises:
        InputError: missing, unreadable or truncated file; not one scalar 3D volume; a singular
            grid; NaN/Inf voxels (or non-integer labels).
    """
    import SimpleITK as sitk

    from medseg.io.nifti import _as_label

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    from medseg.io.preflight import check_read_size

    check_read_size(path)  # SimpleITK allocates what the header declares before it reads
    image = _read_image(path)
    dim, components = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    size = tuple(int(s) for s in image.GetSize())
    if dim == 4 and size[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputError(path, f"holds a {dim}D image of size {size}; medseg reads one 3D volume per file")
    if components != 1:
        raise InputError(
            path, f"holds {components} values per voxel (vector/RGB image); medseg reads scalar volumes"
        )
    affine = _affine(image)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "the header's grid (spacing/directions) is singular or not finite")
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
    if kind == "label":
        array = _as_label(path, data)
    else:
        array = np.asarray(data, dtype=np.float32)
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            raise InputError(path, f"{n_bad} voxels are NaN or infinite; fix or mask them before use")
    meta = {"source_format": sitk_format(path), "dtype": str(data.dtype), "kind": kind}
    return Volume(array=np.ascontiguousarray(array), affine=affine, meta=meta, source=str(path))


def _grid_of_file(path: Path, shape: tuple[int, ...]):
    """(origin, spacing, direction) from the header of ``path`` when it is a SimpleITK file of ``shape``."""
    import SimpleITK as sitk

    if not (path.is_file() and is_sitk_image(path)):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    if tuple(reader.GetSize())[:3] != tuple(shape) or reader.GetDimension() not in (3, 4):
        return None
    direction = reader.GetDirection()
    if reader.GetDimension() == 4:  # 4x4 row-major -> the upper-left 3x3
        direction = tuple(direction[r * 4 + c] for r in range(3) for c in range(3))
    return reader.GetOrigin()[:3], reader.GetSpacing()[:3], direction


def write_sitk(volume: Volume, path: str | Path, *, overwrite: bool = True, compress: bool = True) -> Path:
    """Write ``volume`` as NRRD or MetaImage (from the suffix of ``path``), atomically.

    The grid is the one of ``volume.source`` read from its header when that is a NRRD/MetaImage
    file of the same shape (so a mask has its input's grid bit for bit); otherwise it is computed
    from ``volume.affine``.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.suffix.lower() not in (".nrrd", ".mha"):
        raise ValueError(f"{path}: write NRRD as .nrrd and MetaImage as .mha (single files)")
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array.transpose(2, 1, 0)))
    grid = _grid_of_file(Path(volume.source), volume.shape) if volume.source else None
    if grid is not None and np.allclose(_affine_of(*grid), volume.affine, atol=1e-4):
        origin, spacing, direction = grid
    else:
        lps = np.linalg.inv(LPS_TO_RAS) @ volume.affine
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = (lps[:3, :3] / spacing[None, :]).ravel()
        origin = lps[:3, 3]
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in direction))
    with atomic_path(path, overwrite=overwrite) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return path


def _affine_of(origin, spacing, direction) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps
