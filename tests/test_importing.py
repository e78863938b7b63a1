"""medseg import-dicom: a folder of DICOM studies with RTSTRUCT/SEG becomes a dataset that trains."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from scipy.ndimage import affine_transform

from medseg.cli import main
from medseg.data import load_dataset
from medseg.importing import import_dicom_dataset
from medseg.io import read_dicom_series, read_label_names, read_nifti, uid_hash, write_dicom_series
from medseg.io.dicom_labels import parse_roi_specs
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.rtstruct import write_rtstruct
from medseg.synthetic import make_case

PATIENT = "Quexley^Wilhelmina"
NAMES = {1: "Liver", 2: "Kidney", 3: "Spleen"}


def _study(folder, seed: int, *, drop_spleen: bool = False):
    """A CT series of a (fake) named patient and its label map on the series' grid."""
    image, label = make_case((7, seed), size=24, orientation="LPS")
    for path in write_dicom_series(image, folder / "CT", patient_name=PATIENT):
        assert pydicom.dcmread(path, stop_before_pixels=True).PatientName == PATIENT
    volume = read_dicom_series(folder / "CT")
    m = np.linalg.inv(label.affine) @ volume.affine
    mask = affine_transform(label.array, m[:3, :3], m[:3, 3], output_shape=volume.shape, order=0).astype(np.uint8)
    if drop_spleen:
        mask[mask == 3] = 0
    return volume, mask


def test_import_dicom_writes_a_dataset_of_the_usable_studies(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    export = tmp_path / "export"
    expected = {}
    for n in range(5):
        study = export / f"{PATIENT.split('^')[0]}_{n}"  # folder names a hospital export may have
        volume, mask = _study(study, n, drop_spleen=n == 3)
        names = {v: NAMES[v] for v in np.unique(mask) if v}
        if n == 1:
            write_dicom_seg(mask, study / "CT", study / "SEG.dcm", labels=names)
            write_rtstruct(mask, study / "CT", study / "RS_2.dcm", labels=names)  # a second object, same series
        else:
            write_rtstruct(mask, study / "CT", study / "RS.dcm", labels=names)
        expected[n] = (volume, mask)
    for path in (export / "Quexley_4" / "CT").iterdir():  # contours whose CT is not in the export
        path.unlink()

    assert main(["import-dicom", "export", "--roi", "spleen", "--roi", "liver", "--out", "data"]) == 1
    captured = capsys.readouterr()
    skipped = sorted(line for line in captured.err.splitlines() if line.startswith("SKIPPED"))
    assert len(skipped) == 3, captured.err
    assert "Quexley_1/SEG.dcm: series" in skipped[0]
    assert "already has its labels from Quexley_1/RS_2.dcm" in skipped[0]
    assert "Quexley_3/RS.dcm: no ROI named 'spleen'; it has 'Liver', 'Kidney'" in skipped[1]
    assert "Quexley_4/RS.dcm: the series it references" in skipped[2]
    assert "data: 3 case(s), 3 skipped" in captured.out

    assert main(["check", "data"]) == 0  # the integrity check a user runs before training
    dataset = load_dataset(tmp_path / "data")
    assert dataset.labels == {0: "background", 1: "spleen", 2: "liver"}
    assert [case.name for case in dataset.training] == ["case_000", "case_001", "case_002"]
    sources = json.loads((tmp_path / "data" / "sources.json").read_text())
    objects = [export / "Quexley_0/RS.dcm", export / "Quexley_1/RS_2.dcm", export / "Quexley_2/RS.dcm"]
    assert [s["labels_from"] for s in sources] == [
        f"RTSTRUCT {uid_hash(pydicom.dcmread(p).SOPInstanceUID)}" for p in objects
    ]
    series = [pydicom.dcmread(next((p.parent / "CT").iterdir())).SeriesInstanceUID for p in objects]
    assert [s["series"] for s in sources] == [uid_hash(uid) for uid in series]
    for case, n in zip(dataset.training, (0, 1, 2), strict=True):
        volume, mask = expected[n]
        image, label = read_nifti(case.images[0]), read_nifti(case.label, kind="label")
        np.testing.assert_array_equal(image.array, volume.array)
        np.testing.assert_allclose(label.affine, volume.affine, atol=1e-5)
        np.testing.assert_array_equal(label.array, np.where(mask == 3, 1, np.where(mask == 1, 2, 0)))
        assert read_label_names(case.label) == {0: "background", 1: "spleen", 2: "liver"}
    # the patient's name is in the source headers and folder names, and nowhere in the dataset
    for path in (tmp_path / "data").rglob("*"):
        assert "quexley" not in path.name.lower()
        if path.is_file():
            assert b"quexley" not in path.read_bytes().lower(), path

    # nothing written over, nothing to import: one line, exit 2
    assert main(["import-dicom", "export", "--roi", "liver", "--out", "data"]) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["import-dicom", "empty", "--roi", "liver", "--out", "other"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no RTSTRUCT or DICOM SEG file under it" in err
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_import_finds_the_anonymised_real_ct_by_its_stand_in_uid(tmp_path, shared_data):
    """The real JPEG 2000 series has blank Study/Series UIDs: medseg's RTSTRUCT references stand-ins,
    and the import, among another patient's study, finds that series again by them."""
    from scipy import ndimage

    export = tmp_path / "export"
    shutil.copytree(shared_data / "example_ct_dicom", export / "a_real" / "CT")
    volume = read_dicom_series(export / "a_real" / "CT")
    mask = np.zeros(volume.shape, np.uint8)
    mask[ndimage.binary_fill_holes(volume.array > -300, structure=np.ones((3, 3, 1)))] = 2
    mask[ndimage.binary_opening(volume.array > 200)] = 1
    write_rtstruct(mask, export / "a_real" / "CT", export / "a_real" / "RS.dcm", labels={1: "bone", 2: "body"})
    _, other = _study(export / "b_other", 0)
    other = np.where(other == 1, 2, 0).astype(np.uint8)  # its liver as "body"
    other[3:6, 3:6, 3:6] = 1
    write_rtstruct(other, export / "b_other" / "CT", export / "b_other" / "RS.dcm", labels={1: "bone", 2: "body"})

    summary = import_dicom_dataset(export, tmp_path / "data", parse_roi_specs(["bone", "body"]))
    assert summary.skipped == []
    assert [c["series"] for c in summary.cases] == [volume.meta["series_uid_hash"], summary.cases[1]["series"]]
    labels = read_nifti(tmp_path / "data" / "labelsTr" / "case_000.nii.gz", kind="label")
    np.testing.assert_array_equal(labels.array, mask)
    np.testing.assert_allclose(labels.affine, volume.affine, atol=1e-5)
    np.testing.assert_array_equal(read_nifti(tmp_path / "data" / "labelsTr" / "case_001.nii.gz").array, other)
