"""Property: DICOM series in every orientation, head-first and feet-first, with random spacing,

(a) read back with the exact world geometry, (b) agree with SimpleITK (the cross-check reader) on
spacing, origin, direction and voxels, and (c) survive an identity model through the real inference
resampling voxel-exact, the written NIfTI mask having the DICOM volume's shape and affine.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.io import Volume, read_dicom_series, write_dicom_series, write_mask
from tests.test_infer_geometry import identity_roundtrip

# voxel axes (i = row direction, j = column direction, k = slice normal) in RAS, as scanners write them
_BASES = {
    "axial": np.array([[-1, 0, 0], [0, -1, 0], [0, 0, 1.0]]).T,
    "sagittal": np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0.0]]).T,
    "coronal": np.array([[-1, 0, 0], [0, 0, -1], [0, -1, 0.0]]).T,
}


def _rotation(rng: np.random.Generator) -> np.ndarray:
    a, b = rng.uniform(0.25, 0.6, size=2) * rng.choice([-1, 1], size=2)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return ry @ rx


def series_volume(orientation: str, head_first: bool, seed: int) -> Volume:
    """Random labels on a grid as a scanner writes it; feet-first reverses the slice order along the normal."""
    rng = np.random.default_rng(seed)
    directions = _BASES["axial" if orientation == "oblique" else orientation].copy()
    if orientation == "oblique":
        directions = _rotation(rng) @ directions
    if not head_first:
        directions[:, 2] *= -1
    affine = np.eye(4)
    affine[:3, :3] = directions * rng.uniform(0.5, 3.0, size=3)[None, :]
    affine[:3, 3] = rng.uniform(-150, 150, size=3)
    shape = tuple(int(n) for n in rng.integers(6, 13, size=3))
    return Volume(rng.integers(0, 4, size=shape).astype(np.float32), affine)


def assert_same_world_image(vol: Volume, array: np.ndarray, affine: np.ndarray) -> None:
    """Every voxel of ``vol`` lies at a voxel centre of (array, affine) with the same value."""
    to_other = np.linalg.inv(affine) @ vol.affine
    assert np.allclose(to_other[:3, :3], np.round(to_other[:3, :3]), atol=1e-4), to_other
    assert np.allclose(to_other[:3, 3], np.round(to_other[:3, 3]), atol=1e-3), to_other
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1).reshape(-1, 3)
    other = np.rint(idx @ to_other[:3, :3].T + to_other[:3, 3]).astype(int)
    assert (other >= 0).all()
    assert (other < np.asarray(array.shape)).all()
    np.testing.assert_array_equal(array[tuple(other.T)], vol.array[tuple(idx.T)])


CASES = [(o, hf, 0) for o in ("axial", "sagittal", "coronal", "oblique") for hf in (True, False)]
CASES += [("oblique", True, 1), ("oblique", False, 2), ("sagittal", False, 3), ("coronal", True, 4)]


@pytest.mark.parametrize(("orientation", "head_first", "seed"), CASES)
def test_dicom_series_geometry_is_exact(tmp_path, orientation, head_first, seed):
    vol = series_volume(orientation, head_first, seed)
    files = write_dicom_series(vol, tmp_path / "series")
    back = read_dicom_series(tmp_path / "series")

    # (a) exact world geometry: same voxels at the same world positions; k runs along the slice normal
    assert_same_world_image(vol, back.array, back.affine)
    np.testing.assert_allclose(sorted(back.spacing), sorted(vol.spacing), rtol=1e-5)
    if not head_first:  # k comes back reversed: the same slab, listed along the normal
        np.testing.assert_allclose(back.affine[:3, 2], -vol.affine[:3, 2], atol=1e-5)
    assert back.meta["orientation"] == orientation

    # (b) SimpleITK (GDCM) reads the same series the same way
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    ref = reader.Execute()
    assert len(files) == ref.GetSize()[2]
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(back.spacing, ref.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(back.origin, lps_to_ras @ np.array(ref.GetOrigin()), atol=1e-3)
    np.testing.assert_allclose(
        back.direction, lps_to_ras @ np.array(ref.GetDirection()).reshape(3, 3), atol=1e-5
    )
    np.testing.assert_array_equal(back.array, sitk.GetArrayFromImage(ref).transpose(2, 1, 0))

    # (c) identity model through preprocessing + inverse resampling: voxel-exact on the DICOM grid
    labels = back.array.astype(np.uint8)
    mask = identity_roundtrip(Volume(labels, back.affine))
    np.testing.assert_array_equal(mask, labels)
    out = write_mask(mask, back, tmp_path / "series_seg.nii.gz", labels={1: "a", 2: "b", 3: "c"})
    img = nib.load(out)
    assert img.shape == back.shape
    np.testing.assert_allclose(img.affine, back.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
