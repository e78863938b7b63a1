"""The DICOM reader on what real exports hold: compressed syntaxes, MONOCHROME1, signed pixels,
per-slice rescale, enhanced multi-frame objects, scouts and non-image objects, several series, tilt."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medseg.errors import InputError
from medseg.io import Volume, read_dicom_series, scan_dicom
from tests import dicom_cases as dc


@pytest.mark.parametrize("syntax", sorted(dc.SYNTAXES))
def test_transfer_syntaxes_decode(tmp_path, syntax):
    paths = dc.series(tmp_path / "s", dc.ramp_volume((32, 32, 4)))  # OpenJPEG needs 32+ pixels a side
    if syntax == "jpeg_baseline":
        for p in paths:
            dc.to_8bit(p)
    reference = read_dicom_series(tmp_path / "s")
    for p in paths:
        dc.transcode(p, syntax)
    back = read_dicom_series(tmp_path / "s")
    assert back.meta["transfer_syntax"] == dc.SYNTAXES[syntax]
    np.testing.assert_array_equal(back.affine, reference.affine)
    if syntax == "jpeg_baseline":  # lossy: close, not equal
        assert np.abs(back.array - reference.array).mean() < 20
    else:
        np.testing.assert_array_equal(back.array, reference.array)


def test_monochrome1_is_inverted_to_higher_is_brighter(tmp_path):
    vol = dc.ramp_volume()
    paths = dc.series(tmp_path / "s", vol)

    def invert(ds):
        ds.PixelData = (65535 - ds.pixel_array.astype(np.int64)).astype(np.uint16).tobytes()
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.Modality = "DX"  # display values: mirrored; a MONOCHROME1 CT keeps its HU (test_dicom_pixels)

    for p in paths:
        dc.edit(p, invert)
    back = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.meta["photometric"] == "MONOCHROME1"


def test_signed_pixels_and_per_slice_rescale(tmp_path):
    vol = dc.ramp_volume()
    paths = dc.series(tmp_path / "s", vol)
    for k, p in enumerate(paths):
        slope, intercept = (1.0, 0.0) if k % 2 else (2.0, -7.0)

        def signed(ds, slope=slope, intercept=intercept, k=k):
            stored = (vol.array[:, :, k].T - intercept) / slope
            ds.PixelData = np.rint(stored).astype(np.int16).tobytes()
            ds.PixelRepresentation = 1
            ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"

        dc.edit(p, signed)
    back = read_dicom_series(tmp_path / "s")
    expected = vol.array.copy()
    expected[:, :, ::2] = np.rint((expected[:, :, ::2] + 7) / 2) * 2 - 7  # what 2x slope can store
    np.testing.assert_array_equal(back.array, expected)
    assert back.array.min() < 0


def test_enhanced_multiframe_matches_single_frame_series(tmp_path):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    affine = np.array([[0, 0, 2.5, -3], [-0.8, 0, 0, 10], [0, -0.9, 0, 40], [0, 0, 0, 1.0]])  # sagittal
    vol = dc.ramp_volume(affine=affine)
    paths = dc.series(tmp_path / "single", vol)
    single = read_dicom_series(tmp_path / "single")
    datasets = [pydicom.dcmread(p) for p in reversed(paths)]  # frame order need not follow position
    enhanced = LegacyConvertedEnhancedCTImage(datasets, generate_uid(), 2, generate_uid(), 1)
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "enhanced.dcm")
    scan = scan_dicom(tmp_path / "multi")
    assert [s.n_slices for s in scan.series] == [6]
    back = read_dicom_series(tmp_path / "multi")
    np.testing.assert_allclose(back.affine, single.affine, atol=1e-5)
    np.testing.assert_array_equal(back.array, single.array)
    assert back.meta["orientation"] == "sagittal"


def test_scouts_and_non_image_objects_are_skipped_with_reasons(tmp_path):
    folder = tmp_path / "export"
    vol = dc.ramp_volume()
    paths = dc.series(folder / "ct", vol, series_uid="1.2.3.4.5")
    dc.localizer(folder / "ct" / "scout_flagged.dcm")
    dc.localizer(folder / "ct" / "scout_same_uid.dcm", series_uid="1.2.3.4.5", flagged=False)
    for kind in ("SR", "RTSTRUCT", "PR", "SEG"):
        dc.non_image(folder / "other" / f"{kind}.dcm", kind)
    (folder / "DICOMDIR.txt").write_text("not dicom")
    scan = scan_dicom(folder)
    assert [(s.series_id, s.n_slices) for s in scan.series] == [("1.2.3.4.5", len(paths))]
    reasons = {p.name: r for p, r in scan.skipped}
    assert reasons["scout_flagged.dcm"] == "localizer/scout image"
    assert "scout" in reasons["scout_same_uid.dcm"]
    assert "degrees" in reasons["scout_same_uid.dcm"]
    assert reasons["SR.dcm"] == "non-image object (modality SR)"
    for kind in ("RTSTRUCT", "PR", "SEG"):
        assert "non-image" in reasons[f"{kind}.dcm"]
    assert reasons["DICOMDIR.txt"] == "not a DICOM file"
    np.testing.assert_array_equal(read_dicom_series(folder).array, vol.array)


def test_main_series_is_the_largest_original_one(tmp_path):
    folder = tmp_path / "study"
    dc.series(folder / "a", dc.ramp_volume((12, 10, 6)), series_uid="1.2.826.1")
    dc.series(folder / "b", dc.ramp_volume((12, 10, 4)), series_uid="1.2.826.2")
    derived = dc.series(folder / "c", dc.ramp_volume((12, 10, 9)), series_uid="1.2.826.3")
    for p in derived:  # a reformat: more slices, but not what a user means
        dc.edit(p, lambda ds: setattr(ds, "ImageType", ["DERIVED", "SECONDARY", "MPR"]))
    scan = scan_dicom(folder)
    assert [s.series_id for s in scan.series] == ["1.2.826.1", "1.2.826.2", "1.2.826.3"]
    assert read_dicom_series(folder).shape == (12, 10, 6)
    assert read_dicom_series(folder, series_id="1.2.826.2").shape == (12, 10, 4)
    by_hash = scan.series[1].uid_hash
    assert read_dicom_series(folder, series_id=by_hash).shape == (12, 10, 4)


def test_equal_series_are_refused_listing_them(tmp_path):
    dc.series(tmp_path / "a", series_uid="1.2.826.1")
    dc.series(tmp_path / "b", series_uid="1.2.826.2")
    with pytest.raises(InputError, match="--series") as info:
        read_dicom_series(tmp_path)
    scan = scan_dicom(tmp_path)
    assert all(s.uid_hash in str(info.value) for s in scan.series)
    assert "1.2.826" not in str(info.value)  # UIDs are hashed in messages (they reach logs)


def test_blank_series_uid_falls_back_to_other_keys(tmp_path):
    paths = dc.series(tmp_path / "s")
    for p in paths:
        dc.edit(p, lambda ds: setattr(ds, "SeriesInstanceUID", ""))
    (info,) = scan_dicom(tmp_path).series
    assert info.series_id.startswith("hash:")
    assert read_dicom_series(tmp_path).shape == (12, 10, 6)


def _tilted_series(folder, vol: Volume, shift_voxels: int) -> None:
    """Slice k of a tilted acquisition starts ``k * shift_voxels`` voxels further along i."""
    paths = dc.series(folder, vol)
    for k, p in enumerate(paths):

        def shear(ds, k=k):
            ipp = np.array([float(v) for v in ds.ImagePositionPatient])
            row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
            ipp += row_dir * float(ds.PixelSpacing[1]) * k * shift_voxels
            ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
            # the slice holds what lies at its sheared position: the volume shifted back
            ds.PixelData = (
                np.ascontiguousarray(np.roll(vol.array[:, :, k], -k * shift_voxels, axis=0).T + 1024)
                .astype(np.uint16)
                .tobytes()
            )

        dc.edit(p, shear)


def test_gantry_tilt_is_refused_or_resampled(tmp_path):
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    vol = dc.ramp_volume((16, 10, 5), affine=affine)
    _tilted_series(tmp_path / "s", vol, shift_voxels=1)
    with pytest.raises(InputError, match=r"gantry tilt of 14\.\d\d degrees"):
        read_dicom_series(tmp_path / "s")
    back = read_dicom_series(tmp_path / "s", allow_tilt=True)
    assert back.shape == vol.shape
    # orthogonal grid: same in-plane axes and spacing, slices stacked along the normal
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    # voxels the shear did not push out of the field of view come back at their world positions
    for k in range(vol.shape[2]):
        np.testing.assert_allclose(back.array[k:, :, k], vol.array[k:, :, k], atol=1e-3)


def test_no_instance_numbers_and_scrambled_file_names(tmp_path):
    vol = dc.ramp_volume()
    paths = dc.series(tmp_path / "s", vol)
    order = np.random.default_rng(0).permutation(len(paths))
    for k, p in enumerate(paths):
        dc.edit(p, lambda ds: ds.__delattr__("InstanceNumber"))
        p.rename(p.with_name(f"IM{order[k]:04d}"))
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "s").array, vol.array)


def test_two_stacks_in_one_series_are_listed_apart(tmp_path):
    dc.series(tmp_path / "ax", dc.ramp_volume((12, 10, 6)), series_uid="1.2.826.9")
    sag = Volume(
        dc.ramp_volume((12, 10, 5)).array,
        np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]]),
    )
    dc.series(tmp_path / "sag", sag, series_uid="1.2.826.9")
    scan = scan_dicom(tmp_path)
    assert [(s.series_id, s.orientation, s.n_slices) for s in scan.series] == [
        ("1.2.826.9", "axial", 6),
        ("1.2.826.9#1", "sagittal", 5),
    ]
    assert read_dicom_series(tmp_path, series_id="1.2.826.9#1").meta["orientation"] == "sagittal"


def test_series_and_convert_commands(tmp_path):
    from medseg.io import uid_hash
    from tests.conftest import run_cli

    dc.series(tmp_path / "study" / "a", dc.ramp_volume((12, 10, 6)), series_uid="1.2.826.1")
    dc.series(tmp_path / "study" / "b", dc.ramp_volume((12, 10, 4)), series_uid="1.2.826.2")
    dc.non_image(tmp_path / "study" / "sr.dcm", "SR")
    before = {p: p.read_bytes() for p in (tmp_path / "study").rglob("*") if p.is_file()}
    proc = run_cli("series", "study", cwd=tmp_path, check=True)
    out = proc.stdout
    assert "series 1.2.826.1  (hash " + uid_hash("1.2.826.1") + ")" in out
    assert "CT  'medseg synthetic'  6 slices  size 12 x 10 x 6  spacing 1 x 1 x 1 mm  axial  original" in out
    assert "sr.dcm: non-image object (modality SR)" in out
    assert "SYNTHETIC" not in out  # the patient name write_dicom_series puts in
    proc = run_cli("convert", "study", "main.nii.gz", cwd=tmp_path, check=True)
    assert (
        f"2 series found; converting {uid_hash('1.2.826.1')} (CT, 'medseg synthetic', 6 slices" in proc.stdout
    )
    proc = run_cli(
        "convert", "study", "b.nii.gz", "--series", uid_hash("1.2.826.2"), cwd=tmp_path, check=True
    )
    assert read_nifti_shape(tmp_path / "b.nii.gz") == (12, 10, 4)
    assert {p: p.read_bytes() for p in (tmp_path / "study").rglob("*") if p.is_file()} == before  # untouched


def read_nifti_shape(path):
    import nibabel as nib

    return nib.load(path).shape
