"""Geometry is exact: NIfTI and DICOM round trips, the real JPEG 2000 CT, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import InputError, OutputError
from medseg.io import (
    Volume,
    load_volume,
    read_dicom_series,
    read_nifti,
    scan_dicom,
    write_dicom_series,
    write_nifti,
)
from medseg.synthetic import make_case


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "sagittal", "coronal", "oblique"])
def test_dicom_roundtrip_geometry(tmp_path, orientation):
    image, _ = make_case((0, 7), size=24, orientation=orientation)
    write_dicom_series(image, tmp_path / "series")
    back = read_dicom_series(tmp_path / "series")
    expected_array, expected_affine = image.array, image.affine
    if np.linalg.det(image.affine[:3, :3]) < 0:
        # DICOM stacks slices along row x column direction: a left-handed grid comes back with k reversed,
        # the same voxels at the same world positions.
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1.0, image.shape[2] - 1
        expected_array, expected_affine = image.array[:, :, ::-1], image.affine @ flip
    assert back.shape == image.shape
    np.testing.assert_allclose(back.affine, expected_affine, atol=1e-4)
    np.testing.assert_array_equal(back.array, expected_array)
    assert back.meta["modality"] == "CT"


def test_dicom_slices_sorted_by_position_not_instance_number(tmp_path):
    image, _ = make_case((0, 8), size=24, orientation="RAS")
    write_dicom_series(image, tmp_path / "s", instance_order="reversed")
    back = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(back.array, image.array)


def test_dicom_missing_slice_is_refused(tmp_path):
    image, _ = make_case((0, 9), size=24, orientation="RAS")
    paths = write_dicom_series(image, tmp_path / "s")
    paths[len(paths) // 2].unlink()
    with pytest.raises(InputError, match="missing slice"):
        read_dicom_series(tmp_path / "s")


def test_nifti_roundtrip_and_atomic_overwrite(tmp_path):
    _image, label = make_case((0, 1), size=24, orientation="LPS")
    path = write_nifti(label, tmp_path / "lab.nii.gz")
    back = read_nifti(path, kind="label")
    np.testing.assert_array_equal(back.array, label.array)
    np.testing.assert_allclose(back.affine, label.affine, atol=1e-5)
    plain = tmp_path / "plain"
    plain.touch()
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not left private by mkstemp
    with pytest.raises(OutputError, match="--overwrite"):
        write_nifti(label, path, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab.nii.gz", "plain"]


def test_nifti_nan_is_refused(tmp_path):
    arr = np.zeros((4, 4, 4), np.float32)
    arr[1, 1, 1] = np.nan
    path = write_nifti(Volume(arr, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="NaN") as info:
        read_nifti(path)
    assert "nan.nii.gz" in str(info.value)


def test_not_an_image(tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(b"hello")
    with pytest.raises(InputError, match=r"x\.nii\.gz"):
        load_volume(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no DICOM image series"):
        load_volume(empty)


def test_real_jpeg2000_ct_series(shared_data):
    folder = shared_data / "example_ct_dicom"
    scan = scan_dicom(folder)
    assert len(scan.series) == 1
    assert scan.series[0].n_slices == 20
    vol = load_volume(folder)
    assert vol.shape == (512, 512, 20)
    np.testing.assert_allclose(vol.spacing, (0.977, 0.977, 2.0), atol=1e-3)
    assert vol.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.90"
    assert -1100 < vol.array.min() < -900
    assert vol.array.max() > 500

    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    ref_arr = sitk.GetArrayFromImage(ref).transpose(2, 1, 0).astype(np.float32)  # (z,y,x) -> (x,y,z)
    np.testing.assert_allclose(vol.spacing, ref.GetSpacing(), atol=1e-4)
    lps_origin = np.array(ref.GetOrigin())
    np.testing.assert_allclose(vol.origin, lps_origin * [-1, -1, 1], atol=1e-3)
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(vol.direction, np.diag([-1, -1, 1]) @ direction, atol=1e-5)
    np.testing.assert_array_equal(vol.array, ref_arr)


def test_nifti_qform_sform_disagreement_follows_nibabel_and_warns(tmp_path, caplog):
    import nibabel as nib

    sform = np.diag([0.8, 0.8, 2.0, 1.0])
    qform = np.diag([1.0, 1.0, 1.0, 1.0])
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), sform)
    img.set_sform(sform, code=2)
    img.set_qform(qform, code=1)
    nib.save(img, tmp_path / "x.nii.gz")
    with caplog.at_level("WARNING", logger="medseg"):
        vol = read_nifti(tmp_path / "x.nii.gz")
    np.testing.assert_allclose(vol.affine, nib.load(tmp_path / "x.nii.gz").affine)  # nibabel's choice
    np.testing.assert_allclose(vol.affine, sform)
    assert "sform and qform disagree" in caplog.text
    assert "x.nii.gz" in caplog.text


def test_nifti_zero_slope_means_no_scaling_and_4d_single_volume_is_squeezed(tmp_path):
    import nibabel as nib

    arr = np.arange(60, dtype=np.int16).reshape(3, 4, 5, 1)
    img = nib.Nifti1Image(arr, np.eye(4))
    img.header["scl_slope"], img.header["scl_inter"] = 0.0, 50.0
    nib.save(img, tmp_path / "x.nii.gz")
    vol = read_nifti(tmp_path / "x.nii.gz")
    assert vol.shape == (3, 4, 5)
    np.testing.assert_array_equal(vol.array, arr[..., 0])


def test_unexpected_label_values_are_named(tmp_path):
    from medseg.io import load_label

    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 7
    path = write_nifti(Volume(lab, np.eye(4)), tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match=r"lab\.nii\.gz: label map holds values \[7\]"):
        load_label(path, expected_labels=[1, 2])
    assert load_label(path, expected_labels=[7]).array.max() == 7
