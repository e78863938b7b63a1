"""DICOM SEG out: references the source series, one named segment per label, same voxels as the NIfTI mask."""

from __future__ import annotations

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.io import Volume, read_dicom_series, write_dicom_series, write_mask
from medseg.io.dicom import series_files_in_grid_order
from medseg.io.dicom_seg import write_dicom_seg


def instance_uid(path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID  # blanked by some anonymisers


def seg_voxels(seg_path, source_dir) -> tuple[np.ndarray, hd.seg.Segmentation]:
    """Read a SEG back with highdicom into medseg's (i, j, k) grid, segment numbers -> label values."""
    seg = hd.seg.segread(seg_path)
    _, files = series_files_in_grid_order(source_dir)
    uids = [instance_uid(f) for f in files]
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    return np.asarray(frames).transpose(2, 1, 0), seg


def check_seg_matches_mask(tmp_path, source_dir, volume, mask, labels):
    nifti = write_mask(mask, volume, tmp_path / "case_seg.nii.gz", labels=labels)
    path = write_dicom_seg(mask, source_dir, tmp_path / "case_seg.dcm", labels=labels)
    numbers, seg = seg_voxels(path, source_dir)
    named = sorted(v for v in labels if v)
    relabel = np.array([0, *named])  # segment number n -> the n-th label value
    nifti_mask = np.asarray(nib.load(nifti).dataobj)
    np.testing.assert_array_equal(relabel[numbers], nifti_mask)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [labels[v] for v in named]
    files = series_files_in_grid_order(source_dir)[1]
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    referenced = seg.ReferencedSeriesSequence[0]
    if source.SeriesInstanceUID:  # blank in the anonymised real series: a stand-in is referenced
        assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
        assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {
        instance_uid(f) for f in files
    }
    return seg


def test_dicom_seg_on_a_synthetic_series(tmp_path, rng):
    affine = np.array([[0, 0, -2.5, 30], [0.9, 0, 0, -10], [0, -0.8, 0, 50], [0, 0, 0, 1.0]])  # sagittal, FF
    image = Volume(rng.integers(-100, 100, (14, 11, 7)).astype(np.float32), affine)
    write_dicom_series(image, tmp_path / "series", instance_order="reversed")
    volume = read_dicom_series(tmp_path / "series")
    mask = np.zeros(volume.shape, np.uint8)
    mask[2:8, 3:9, 1:5] = 1
    mask[9:12, 1:4, 4:7] = 3  # label values need not be consecutive
    check_seg_matches_mask(
        tmp_path, tmp_path / "series", volume, mask, {0: "background", 1: "liver", 3: "spleen"}
    )


def test_dicom_seg_refuses_a_mask_off_the_grid(tmp_path, rng):
    image = Volume(rng.integers(0, 9, (8, 8, 4)).astype(np.float32), np.eye(4))
    write_dicom_series(image, tmp_path / "series")
    with pytest.raises(ValueError, match="does not fit"):
        write_dicom_seg(
            np.zeros((8, 8, 5), np.uint8), tmp_path / "series", tmp_path / "x.dcm", labels={1: "a"}
        )
    with pytest.raises(ValueError, match="no name"):
        write_dicom_seg(
            np.full((8, 8, 4), 2, np.uint8), tmp_path / "series", tmp_path / "x.dcm", labels={1: "a"}
        )
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.slow
def test_dicom_seg_on_the_real_jpeg2000_ct(tmp_path, shared_data):
    folder = shared_data / "example_ct_dicom"
    volume = read_dicom_series(folder)
    mask = np.zeros(volume.shape, np.uint8)
    mask[volume.array > 300] = 1
    mask[(volume.array > -50) & (volume.array < 80)] = 2
    check_seg_matches_mask(tmp_path, folder, volume, mask, {1: "bone", 2: "soft tissue"})
