"""DICOM label objects in: RTSTRUCT contours and DICOM SEG segments read as a label map on their series' grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.ndimage import affine_transform

from medseg.cli import main
from medseg.errors import InputError
from medseg.io import Volume, read_dicom_series, read_label_names, read_nifti, write_dicom_series
from medseg.io.dicom_labels import parse_roi_specs, read_label_object
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.rtstruct import write_rtstruct
from medseg.synthetic import make_case

LABELS = {0: "background", 1: "liver", 2: "kidney", 3: "spleen"}


def _series_and_mask(folder, orientation="LPS", seed=5):
    """A synthetic CT written as a DICOM series (slices stored in reverse), and its label on the series' grid."""
    image, label = make_case((seed, 1), size=32, orientation=orientation)
    write_dicom_series(image, folder, instance_order="reversed")
    volume = read_dicom_series(folder)
    to_label = np.linalg.inv(label.affine) @ volume.affine
    mask = affine_transform(label.array, to_label[:3, :3], to_label[:3, 3], output_shape=volume.shape, order=0)
    return volume, mask.astype(np.uint8)


@pytest.mark.parametrize("orientation", ["LPS", "oblique", "sagittal"])
def test_rtstruct_and_seg_read_back_voxel_for_voxel(tmp_path, orientation):
    volume, mask = _series_and_mask(tmp_path / "series", orientation)
    assert all((mask == v).sum() > 20 for v in (1, 2, 3))
    written = [
        write_rtstruct(mask, tmp_path / "series", tmp_path / "rt.dcm", labels=LABELS),
        write_dicom_seg(mask, tmp_path / "series", tmp_path / "seg.dcm", labels=LABELS),
    ]
    for path in written:
        got = read_label_object(path, tmp_path / "series")
        np.testing.assert_array_equal(got.volume.array, mask, err_msg=path.name)
        np.testing.assert_allclose(got.volume.affine, volume.affine, atol=1e-6)
        assert got.labels == LABELS
        assert got.counts == {v: int((mask == v).sum()) for v in (1, 2, 3)}
        assert got.notes == []


def _merged_rtstruct(tmp_path, folder, parts: dict[str, np.ndarray]) -> pydicom.Dataset:
    """One structure set holding each named mask as an ROI of its own (ROIs may overlap)."""
    merged = None
    for number, (name, part) in enumerate(parts.items(), start=1):
        ds = pydicom.dcmread(write_rtstruct(part.astype(np.uint8), folder, tmp_path / f"{name}.dcm", labels={1: name}))
        for seq in ("StructureSetROISequence", "ROIContourSequence", "RTROIObservationsSequence"):
            item = ds[seq].value[0]
            for key in ("ROINumber", "ReferencedROINumber", "ObservationNumber"):
                if key in item:
                    setattr(item, key, number)
            if merged is not None:
                merged[seq].value.append(item)
        merged = merged if merged is not None else ds
    assert merged is not None
    return merged


def test_overlapping_rois_keep_the_smallest_and_rois_are_chosen_by_name(tmp_path):
    _, mask = _series_and_mask(tmp_path / "series")
    body = np.zeros(mask.shape, bool)
    body[2:-2, 2:-2, :] = True
    organ = mask == 1
    ds = _merged_rtstruct(tmp_path, tmp_path / "series", {"BODY": body, "Liver": organ, "Kidney": mask == 2})
    ds.save_as(tmp_path / "series" / "RS.dcm")

    got = read_label_object(tmp_path / "series" / "RS.dcm")  # the series beside it by default
    assert got.labels == {0: "background", 1: "BODY", 2: "Liver", 3: "Kidney"}
    expected = np.where(body, 1, 0)
    expected[organ] = 2
    expected[mask == 2] = 3
    np.testing.assert_array_equal(got.volume.array, expected)
    inside = int((organ & body).sum()) + int(((mask == 2) & body).sum())
    assert f"{inside} voxels lie in more than one label; each kept the smallest" in got.notes[-1]

    # chosen, ordered and renamed by --roi, matched without regard to case; the body then holds nothing else
    rois = parse_roi_specs(["kidney", "organ=LIVER"])
    got = read_label_object(tmp_path / "series" / "RS.dcm", rois=rois)
    assert got.labels == {0: "background", 1: "kidney", 2: "organ"}
    np.testing.assert_array_equal(got.volume.array, np.where(mask == 2, 1, np.where(organ, 2, 0)))
    assert got.notes == []
    with pytest.raises(InputError, match=r"no ROI named 'pancreas'; it has 'BODY', 'Liver', 'Kidney'"):
        read_label_object(tmp_path / "series" / "RS.dcm", rois=parse_roi_specs(["pancreas"]))
    # names that drift between patients: the first alternative the file holds
    got = read_label_object(tmp_path / "series" / "RS.dcm", rois=parse_roi_specs(["organ=Leber|liver_1|LIVER|Kidney"]))
    assert got.labels == {0: "background", 1: "organ"}
    np.testing.assert_array_equal(got.volume.array, organ.astype(np.uint8))
    with pytest.raises(InputError, match=r"no ROI named 'Leber' or 'Milz'; it has"):
        read_label_object(tmp_path / "series" / "RS.dcm", rois=parse_roi_specs(["x=Leber|Milz"]))
    with pytest.raises(InputError, match=r"ROI 'Liver' would be read as two labels"):
        read_label_object(tmp_path / "series" / "RS.dcm", rois=parse_roi_specs(["a=liver", "b=Leber|Liver"]))
    with pytest.raises(ValueError, match="twice"):
        parse_roi_specs(["liver", "liver=Kidney"])


def _contour(points_ij: list[tuple[float, float]], k: float, affine_lps: np.ndarray, kind="CLOSED_PLANAR"):
    item = pydicom.Dataset()
    ijk = np.array([[i, j, k, 1.0] for i, j in points_ij])
    item.ContourGeometricType = kind
    item.NumberOfContourPoints = len(points_ij)
    item.ContourData = [round(float(v), 4) for v in (ijk @ affine_lps.T)[:, :3].ravel()]
    return item


def test_contours_as_a_planning_system_writes_them(tmp_path):
    """Contours without image references, a hole as a second contour, a contour a little off its
    slice, an open contour and one outside the series: filled by the even-odd rule at voxel centres."""
    image = Volume(np.zeros((20, 16, 6), np.float32), np.diag([0.8, 0.8, 2.5, 1.0]))
    write_dicom_series(image, tmp_path / "series")
    volume = read_dicom_series(tmp_path / "series")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    part = np.zeros(volume.shape, np.uint8)
    part[0, 0, 0] = 1
    ds = pydicom.dcmread(write_rtstruct(part, tmp_path / "series", tmp_path / "rt.dcm", labels={1: "GTV"}))
    ds.ROIContourSequence[0].ContourSequence = [
        _contour([(2.5, 2.5), (12.5, 2.5), (12.5, 10.5), (2.5, 10.5)], 2.0, lps),  # voxels 3..12 x 3..10
        _contour([(5.5, 5.5), (7.5, 5.5), (7.5, 7.5), (5.5, 7.5)], 2.0, lps),  # its hole: 6..7 x 6..7
        _contour([(0.2, 0.2), (3.4, 0.2), (3.4, 2.8)], 3.2, lps),  # 0.2 slices off slice 3: a triangle
        _contour([(1, 1), (4, 1), (4, 4)], 3.0, lps, kind="OPEN_PLANAR"),
        _contour([(1, 1), (4, 1), (4, 4)], 9.0, lps),  # beyond the last slice
    ]
    ds.save_as(tmp_path / "rt.dcm")
    got = read_label_object(tmp_path / "rt.dcm", tmp_path / "series")
    expected = np.zeros(volume.shape, np.uint8)
    expected[3:13, 3:11, 2] = 1
    expected[6:8, 6:8, 2] = 0
    expected[2, 1, 3] = expected[3, 1, 3] = expected[3, 2, 3] = 1  # the centres the triangle encloses
    np.testing.assert_array_equal(got.volume.array, expected)
    assert "1 open_planar contour(s) (only closed planar ones are areas) skipped" in got.notes
    assert "1 contour(s) outside the series' slices skipped" in got.notes
    assert not any("slices from the slices" in n for n in got.notes), "0.2 slices off is within tolerance"


def test_convert_cli_reads_an_rtstruct_and_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, mask = _series_and_mask(tmp_path / "ct")
    write_rtstruct(mask, tmp_path / "ct", tmp_path / "ct" / "RS.dcm", labels=LABELS)
    _series_and_mask(tmp_path / "other", seed=6)  # another patient: another frame of reference

    assert main(["convert", "ct", "ct.nii.gz"]) == 0  # the folder: its image series, not the RTSTRUCT
    assert capsys.readouterr().out.rstrip().endswith(", int16")  # HU are integers: half of float32's size
    assert nib.load(tmp_path / "ct.nii.gz").get_data_dtype() == np.int16
    np.testing.assert_array_equal(read_nifti(tmp_path / "ct.nii.gz").array, read_dicom_series(tmp_path / "ct").array)
    assert main(["convert", "ct/RS.dcm", "labels.nii.gz", "--roi", "spleen", "--roi", "liver"]) == 0
    out = capsys.readouterr().out
    assert f"labels.nii.gz: 1 spleen ({int((mask == 3).sum())} voxels), 2 liver" in out
    labels = read_nifti(tmp_path / "labels.nii.gz", kind="label")
    image = read_nifti(tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(labels.affine, image.affine, atol=1e-5)  # the image's own grid
    np.testing.assert_array_equal(labels.array, np.where(mask == 3, 1, np.where(mask == 1, 2, 0)))
    assert read_label_names(tmp_path / "labels.nii.gz") == {0: "background", 1: "spleen", 2: "liver"}
    assert "spleen" in (tmp_path / "labels.itksnap.txt").read_text()
    assert (tmp_path / "labels.ctbl").is_file()

    refusals = {
        ("ct/RS.dcm", "x.nii.gz", "--roi", "pancreas"): "no ROI named 'pancreas'; it has 'liver', 'kidney', 'spleen'",
        ("ct/RS.dcm", "x.nii.gz", "--reference", "other"): "drawn in frame of reference",
        ("ct", "x.nii.gz", "--roi", "liver"): "--roi and --reference are for an RTSTRUCT or DICOM SEG file, and",
        ("ct/slice_0000.dcm", "x.nii.gz", "--roi", "liver"): "--roi and --reference are for an RTSTRUCT",
        ("ct/RS.dcm", "labels.nii.gz"): "already exists",
        ("ct/RS.dcm", "labels2.nii.gz"): "labels2.itksnap.txt: already exists",  # a table left by another run
    }
    (tmp_path / "labels2.itksnap.txt").write_text("an older table")
    for args, message in refusals.items():
        assert main(["convert", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1, (args, err)
        assert message in err, (args, err)
    assert not (tmp_path / "x.nii.gz").exists()
    assert not (tmp_path / "labels2.nii.gz").exists()


def test_convert_stores_integer_values_as_integers_and_others_as_they_are(tmp_path, capsys, monkeypatch):
    from tests.dicom_cases import edit, ramp_volume

    monkeypatch.chdir(tmp_path)
    paths = write_dicom_series(ramp_volume((8, 8, 3)), tmp_path / "ct")
    for path in paths:
        edit(path, lambda ds: setattr(ds, "RescaleSlope", 0.5))  # half-HU steps
    assert main(["convert", "ct", "half.nii.gz"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(", float32")
    np.testing.assert_array_equal(read_nifti(tmp_path / "half.nii.gz").array, read_dicom_series(tmp_path / "ct").array)
    assert main(["convert", "half.nii.gz", "again.nii.gz"]) == 0  # a NIfTI in keeps its own type
    assert nib.load(tmp_path / "again.nii.gz").get_data_dtype() == np.float32


def test_broken_structure_sets(tmp_path, capsys, monkeypatch):
    """Contour points that are not numbers are skipped and counted; a truncated or empty file, or one
    that is not a structure set, is one line and exit 2."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    monkeypatch.chdir(tmp_path)
    _, mask = _series_and_mask(tmp_path / "ct")
    path = write_rtstruct(mask, tmp_path / "ct", tmp_path / "rt.dcm", labels=LABELS)
    ds = pydicom.dcmread(path)
    contours = ds.ROIContourSequence[0].ContourSequence
    contours[0][0x30060050] = RawDataElement(Tag(0x30060050), "DS", 8, b"ab\\cd\\ef", 0, False, True)
    contours[1].ContourData = [1.0, 2.0]
    ds.save_as(tmp_path / "garbled.dcm")
    assert main(["convert", "garbled.dcm", "g.nii.gz", "--reference", "ct"]) == 0
    assert "garbled.dcm: 2 broken contour(s) (fewer than 3 points, or points that are not numbers) skipped" in (
        capsys.readouterr().out
    )
    data = path.read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.dcm").write_bytes(b"")
    seg = write_dicom_seg(mask, tmp_path / "ct", tmp_path / "seg.dcm", labels=LABELS).read_bytes()
    (tmp_path / "seg_truncated.dcm").write_bytes(seg[: len(seg) // 2])
    capsys.readouterr()  # the writer's log line
    refusals = {
        "truncated.dcm": "enclose(s) no voxel of series",
        "seg_truncated.dcm": "cannot be read as a DICOM SEG",
        "empty.dcm": "--roi and --reference are for an RTSTRUCT or DICOM SEG file, and this is not one",
    }
    for name, message in refusals.items():
        assert main(["convert", name, "x.nii.gz", "--reference", "ct"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert message in err, err
    with pytest.raises(InputError, match="is a CT object, not an RTSTRUCT or DICOM SEG"):
        read_label_object(next((tmp_path / "ct").glob("*.dcm")), tmp_path / "ct")
    assert not (tmp_path / "x.nii.gz").exists()
