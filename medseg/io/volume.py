"""The in-memory image every stage shares: voxels + affine (RAS, mm) + safe metadata."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import OutputError

# Header fields a Volume may carry. Anything else read from a file header
# (patient name, ID, birth date, accession number, institution, study dates) is
# dropped at the reader, so it can never reach a log, MLflow or a file name.
SAFE_META_KEYS = frozenset(
    {
        "modality",
        "manufacturer",
        "manufacturer_model",
        "series_description",
        "series_uid_hash",
        "body_part",
        "transfer_syntax",
        "photometric",
        "n_slices",
        "source_format",
        "orientation",
        "dtype",
        "kind",
    }
)


@dataclass(frozen=True)
class Volume:
    """A 3D image in world space.

    Attributes:
        array: voxels indexed (i, j, k); float32 for images, integers for masks.
        affine: 4x4 voxel-index -> RAS world (mm) matrix.
        meta: safe, non-identifying metadata only (see ``SAFE_META_KEYS``).
        source: the path it came from (for messages), or "" for computed volumes.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D, got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got {self.affine.shape}")
        unsafe = set(self.meta) - SAFE_META_KEYS
        if unsafe:
            raise ValueError(f"Volume.meta holds keys that are not known to be safe: {sorted(unsafe)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of the voxel axes."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    def axcodes(self) -> str:
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """Same grid, new voxels (e.g. a mask for this image)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array=array, affine=self.affine.copy(), meta={**self.meta, **meta}, source=self.source)


def case_stem(path: str | Path) -> str:
    """File name without .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd/.dcm/.zip; a DICOM folder's name."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@contextlib.contextmanager
def atomic_path(final: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place on success.

    The temporary name keeps the final suffixes (writers pick the format from
    them). On any error the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputError(f"{final}: already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".partial{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{final}: could not be written ({exc.strerror or exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
