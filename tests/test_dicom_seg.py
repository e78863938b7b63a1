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
    mask[9:12, 6:9, 0:2] = 255  # nor small: a binary mask exported as 0/255 (medseg.labels)
    check_seg_matches_mask(
        tmp_path, tmp_path / "series", volume, mask, {0: "background", 1: "liver", 3: "spleen", 255: "lesion"}
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
    # and read back as a label map (medseg convert SEG): the same voxels on the series' grid
    from medseg.io.dicom_labels import read_label_object

    back = read_label_object(tmp_path / "case_seg.dcm", folder)
    np.testing.assert_array_equal(back.volume.array, mask)
    np.testing.assert_allclose(back.volume.affine, volume.affine, atol=1e-6)


def _coded_case(tmp_path):
    image = Volume(np.zeros((10, 9, 5), np.float32), np.diag([0.8, 0.8, 2.0, 1.0]))
    write_dicom_series(image, tmp_path / "series")
    mask = np.zeros(image.shape, np.uint8)
    for value, (i, j) in zip(
        (1, 2, 3, 4, 5, 6), [(0, 0), (3, 0), (6, 0), (0, 4), (3, 4), (6, 4)], strict=True
    ):
        mask[i : i + 3, j : j + 4, 1:4] = value
    labels = {
        0: "background",
        1: "Liver",
        2: "kidney_left",
        3: "right kidney",
        4: "peritumoral oedema",
        5: "my structure",
        6: "enhancing tumour",
    }
    return mask, labels


def _code(item) -> tuple[str, str]:
    return item.CodingSchemeDesignator, item.CodeValue


def test_segments_are_coded_coloured_and_name_the_model(tmp_path):
    from highdicom.color import CIELabColor

    from tests.test_label_tables import palette_rgb

    mask, labels = _coded_case(tmp_path)
    overrides = {
        "my structure": {"category": "SCT:91723000:Anatomical Structure", "type": "SCT:15825003:Aorta"}
    }
    path = write_dicom_seg(
        mask,
        tmp_path / "series",
        tmp_path / "seg.dcm",
        labels=labels,
        codes=overrides,
        algorithm_name="spleen-unet",
        algorithm_version="3.1",
    )
    seg = hd.seg.segread(path)
    by_label = {s.SegmentLabel: s for s in seg.SegmentSequence}
    anatomy, abnormal = ("SCT", "91723000"), ("SCT", "49755003")
    expect = {  # label -> (category, type, laterality modifier)
        "Liver": (anatomy, ("SCT", "10200004"), None),
        "kidney_left": (anatomy, ("SCT", "64033007"), ("SCT", "7771000")),
        "right kidney": (anatomy, ("SCT", "64033007"), ("SCT", "24028007")),
        "peritumoral oedema": (abnormal, ("SCT", "79654002"), None),
        "my structure": (anatomy, ("SCT", "15825003"), None),
        "enhancing tumour": (abnormal, ("SCT", "108369006"), None),
    }
    for value, name in labels.items():
        if not value:
            continue
        item = by_label[name]
        category, kind, modifier = expect[name]
        assert _code(item.SegmentedPropertyCategoryCodeSequence[0]) == category
        type_item = item.SegmentedPropertyTypeCodeSequence[0]
        assert _code(type_item) == kind
        modifiers = type_item.get("SegmentedPropertyTypeModifierCodeSequence", [])
        assert [_code(m) for m in modifiers] == ([modifier] if modifier else [])
        rgb = CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.subtract(rgb, palette_rgb(value))).max() <= 1  # the QC report's colour
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("spleen-unet", "3.1")
        assert item.SegmentAlgorithmType == "AUTOMATIC"
    assert seg.ManufacturerModelName == "spleen-unet"
    # and the voxels still match, segment by segment
    numbers, _ = seg_voxels(path, tmp_path / "series")
    np.testing.assert_array_equal(numbers, mask)


def test_segment_code_overrides_and_bad_codes(tmp_path):
    from medseg.io.coding import FALLBACK, segment_code

    assert segment_code("unheard of") == FALLBACK
    assert segment_code("x", 7, overrides={7: {"category": "SCT:1:A", "type": "SCT:2:B"}}).type.value == "2"
    assert (
        segment_code("x", 7, overrides={"7": {"category": "SCT:1:A", "type": ["SCT", "3", "C"]}}).type.value
        == "3"
    )
    mask, labels = _coded_case(tmp_path)
    with pytest.raises(ValueError, match="SCHEME:VALUE:MEANING"):
        write_dicom_seg(
            mask,
            tmp_path / "series",
            tmp_path / "seg.dcm",
            labels=labels,
            codes={"Liver": {"category": "SCT:91723000:Anatomical Structure", "type": "10200004"}},
        )
    assert not (tmp_path / "seg.dcm").exists()


def test_bundled_codes_are_snomed_codes_dicom_lists():
    """Every code in the bundled map exists in pydicom's SNOMED CT dictionary with that meaning."""
    from pydicom.sr._concepts_dict import concepts

    from medseg.io import coding

    meanings: dict[str, set[str]] = {}
    for entries in concepts["SCT"].values():
        for value, (meaning, _) in entries.items():
            meanings.setdefault(value, set()).add(meaning.lower())
    bundled = [*coding._ORGANS.values(), *coding._FINDINGS.values()]
    bundled += [
        coding.ANATOMY,
        coding.ABNORMAL,
        coding.TISSUE,
        coding.LEFT,
        coding.RIGHT,
        coding.FALLBACK.type,
    ]
    for code in bundled:
        assert code.scheme == "SCT"
        assert code.meaning.lower() in meanings.get(code.value, set()), code
    for alias, target in coding._ALIASES.items():
        assert coding.bundled_code(alias) is not None, (alias, target)


def test_dicom_seg_from_a_zipped_study_references_the_same_instances(tmp_path):
    import zipfile

    mask, labels = _coded_case(tmp_path)
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as zf:
        for file in sorted((tmp_path / "series").iterdir()):
            zf.write(file, f"DICOM/{file.name}")
    path = write_dicom_seg(mask, tmp_path / "study.zip", tmp_path / "seg.dcm", labels=labels)
    numbers, _seg = seg_voxels(path, tmp_path / "series")
    np.testing.assert_array_equal(numbers, mask)
