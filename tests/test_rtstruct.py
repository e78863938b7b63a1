"""RTSTRUCT out: read back with pydicom, contours rasterised onto the source grid agree with the NIfTI mask."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath
from scipy.ndimage import affine_transform

from medseg.io import Volume, read_dicom_series, write_dicom_series, write_mask
from medseg.io.dicom import series_files_in_grid_order
from medseg.io.rtstruct import slice_contours, write_rtstruct
from medseg.synthetic import make_case

LABELS = {0: "background", 1: "liver", 2: "kidney", 3: "spleen"}


def rasterise(rtstruct_path, source_dir) -> dict[str, np.ndarray]:
    """Each ROI's contours filled on the source grid (even-odd rule, as planning systems fill them)."""
    rt = pydicom.dcmread(rtstruct_path)
    _, files = series_files_in_grid_order(source_dir)
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    # blanked by some anonymisers: the file meta still holds the instance UID
    k_of_uid = {
        ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID: k for k, ds in enumerate(slices)
    }
    shape = (int(slices[0].Columns), int(slices[0].Rows), len(slices))
    names = {roi.ROINumber: roi.ROIName for roi in rt.StructureSetROISequence}
    masks = {}
    for roi in rt.ROIContourSequence:
        filled = np.zeros(shape, bool)
        for contour in roi.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            k = k_of_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            ds = slices[k]
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == int(contour.NumberOfContourPoints)
            iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
            offset = points - np.asarray(ds.ImagePositionPatient, dtype=float)
            normal = np.cross(iop[:3], iop[3:])
            assert np.abs(offset @ normal).max() < 1e-3  # every point lies on its slice's plane
            row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
            ij = np.stack([offset @ iop[:3] / column_spacing, offset @ iop[3:] / row_spacing], axis=1)
            lo = np.maximum(np.floor(ij.min(axis=0)).astype(int), 0)  # only the voxels it can hold
            hi = np.minimum(np.ceil(ij.max(axis=0)).astype(int) + 1, shape[:2])
            ii, jj = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
            inside = PolygonPath(ij).contains_points(np.stack([ii.ravel(), jj.ravel()], axis=1))
            filled[lo[0] : hi[0], lo[1] : hi[1], k] ^= inside.reshape(ii.shape)
        masks[names[roi.ReferencedROINumber]] = filled
    return masks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("orientation", ["LPS", "oblique", "sagittal"])
def test_rtstruct_contours_agree_with_the_nifti_mask(tmp_path, orientation):
    image, label = make_case((5, 1), size=32, orientation=orientation)
    write_dicom_series(image, tmp_path / "series", instance_order="reversed")
    volume = read_dicom_series(tmp_path / "series")
    # the reader stacks slices along the slice normal, which may flip k: the label onto its grid
    to_label = np.linalg.inv(label.affine) @ volume.affine
    mask = affine_transform(
        label.array, to_label[:3, :3], to_label[:3, 3], output_shape=volume.shape, order=0
    )
    mask = mask.astype(np.uint8)
    nifti = write_mask(mask, volume, tmp_path / "case_seg.nii.gz", labels=LABELS)
    path = write_rtstruct(
        mask, tmp_path / "series", tmp_path / "case_rtstruct.dcm", labels=LABELS, algorithm_name="demo-unet"
    )
    reference = np.asarray(nib.load(nifti).dataobj)
    filled = rasterise(path, tmp_path / "series")
    assert sorted(filled) == ["kidney", "liver", "spleen"]
    for value, name in LABELS.items():
        if value:
            assert (reference == value).sum() > 20  # the organ is there to be contoured
            assert dice(filled[name], reference == value) >= 0.95, (
                name,
                dice(filled[name], reference == value),
            )

    rt = pydicom.dcmread(path)
    files = series_files_in_grid_order(tmp_path / "series")[1]
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert rt.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert rt.Modality == "RTSTRUCT"
    assert rt.StudyInstanceUID == source.StudyInstanceUID
    assert rt.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert str(rt.PatientName) == str(source.PatientName)
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == source.FrameOfReferenceUID
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence}
    assert referenced == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    rois = {roi.ROIName: roi.ROINumber for roi in rt.StructureSetROISequence}
    assert rois == {"liver": 1, "kidney": 2, "spleen": 3}
    colours = {c.ReferencedROINumber: [int(v) for v in c.ROIDisplayColor] for c in rt.ROIContourSequence}
    from tests.test_label_tables import palette_rgb

    assert colours == {n: list(palette_rgb(n)) for n in (1, 2, 3)}
    codes = {
        o.ReferencedROINumber: o.RTROIIdentificationCodeSequence[0].CodeValue
        for o in rt.RTROIObservationsSequence
    }
    assert codes == {1: "10200004", 2: "64033007", 3: "78961009"}
    assert "demo-unet" in rt.StructureSetROISequence[0].ROIGenerationDescription


def test_contours_of_shapes_with_holes_and_at_the_border():
    plane = np.zeros((9, 8), bool)
    plane[0:6, 0:5] = True  # touches the border
    plane[2:4, 2:3] = False  # a hole
    plane[7, 6] = True  # a single voxel
    contours = slice_contours(plane)
    assert len(contours) == 3
    ii, jj = np.meshgrid(np.arange(9), np.arange(8), indexing="ij")
    centres = np.stack([ii.ravel(), jj.ravel()], axis=1)
    filled = np.zeros(plane.shape, bool)
    for points in contours:
        assert not np.allclose(points[0], points[-1])  # DICOM closes the contour itself
        filled ^= PolygonPath(points).contains_points(centres).reshape(plane.shape)
    np.testing.assert_array_equal(filled, plane)


def test_rtstruct_refuses_what_it_cannot_reference(tmp_path, rng):
    image = Volume(rng.integers(0, 9, (8, 8, 4)).astype(np.float32), np.eye(4))
    write_dicom_series(image, tmp_path / "series")
    with pytest.raises(ValueError, match="does not fit"):
        write_rtstruct(
            np.zeros((8, 8, 5), np.uint8), tmp_path / "series", tmp_path / "x.dcm", labels={1: "a"}
        )
    with pytest.raises(ValueError, match="no name"):
        write_rtstruct(
            np.full((8, 8, 4), 2, np.uint8), tmp_path / "series", tmp_path / "x.dcm", labels={1: "a"}
        )
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.slow
def test_rtstruct_on_the_real_anonymised_ct(tmp_path, shared_data, caplog):
    """The real series has blank Study/Series/SOP instance UIDs (blanked by its anonymiser): the
    RTSTRUCT references the file meta's instance UIDs and stand-ins, with a warning, as the SEG does."""
    folder = shared_data / "example_ct_dicom"
    volume = read_dicom_series(folder)
    from scipy import ndimage

    mask = np.zeros(volume.shape, np.uint8)
    mask[ndimage.binary_fill_holes(volume.array > -300, structure=np.ones((3, 3, 1)))] = 2  # body
    mask[ndimage.binary_opening(volume.array > 200)] = 1  # bone, with the body around it
    labels = {1: "bone", 2: "body"}
    path = write_rtstruct(mask, folder, tmp_path / "rt.dcm", labels=labels)
    assert "stand-in UIDs" in caplog.text
    filled = rasterise(path, folder)
    for value, name in labels.items():
        assert dice(filled[name], mask == value) >= 0.95, (name, dice(filled[name], mask == value))
    # read back by medseg (medseg convert RTSTRUCT): voxel for voxel, on the series' grid
    from medseg.io.dicom_labels import read_label_object

    back = read_label_object(path, folder)
    np.testing.assert_array_equal(back.volume.array, mask)
    np.testing.assert_allclose(back.volume.affine, volume.affine, atol=1e-6)
    assert back.labels == {0: "background", **labels}
