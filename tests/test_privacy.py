"""Privacy: patient data in DICOM headers never reaches a log, MLflow, an artifact, an output or a file name.

A dataset whose DICOM headers hold recognisable fake patient data goes through ``series``,
``convert``, ``train`` (MLflow tracking on, to a sqlite store in tmp) and ``infer`` (model from
MLflow, DICOM SEG on); then everything written is searched for those strings: every file under
the test folder (the MLflow database and artifacts included) except the input DICOM files and the
DICOM SEG objects (which must carry the source's patient module to attach to the study), and all
stdout/stderr with debug logging on. Series UIDs must appear only hashed outside the ``series`` listing.
"""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.io import read_dicom_series, uid_hash, write_dicom_series, write_nifti
from medseg.synthetic import make_case
from tests.conftest import run_cli
from tests.test_dicom_seg import seg_voxels
from tests.test_end_to_end import TINY

FAKE = {
    "PatientName": "Quexley^Wilhelmina^Private",
    "PatientID": "PID-7788991",
    "PatientBirthDate": "19511231",
    "AccessionNumber": "ACC-5544332",
    "InstitutionName": "St Elsewhere Memorial Hospital",
    "StudyDate": "19990317",
    "ReferringPhysicianName": "Houseman^Gregoria",
    "OtherPatientIDs": "OPID-3141592",
    "PatientAddress": "12 Quince Lane Fakeville",
}
# what must not appear anywhere: each value and its distinctive parts
NEEDLES = sorted(
    {v for v in FAKE.values()} | {"Quexley", "Wilhelmina", "Houseman", "Gregoria", "Elsewhere", "Fakeville"}
)
SERIES_UID_ROOT = "1.2.826.0.1.3680043.10.7777"


def _fake_patient_series(folder, image, index: int) -> str:
    uid = f"{SERIES_UID_ROOT}.{index}"
    paths = write_dicom_series(
        image,
        folder,
        patient_name=FAKE["PatientName"],
        patient_id=FAKE["PatientID"],
        series_uid=uid,
        series_description=f"abdomen {index}",
    )
    for path in paths:
        ds = pydicom.dcmread(path)
        for key, value in FAKE.items():
            setattr(ds, key, value)
        ds.save_as(path)
    return uid


_DATA_URI = re.compile(rb"data:[a-z]+/[a-z0-9.+-]+;base64,[A-Za-z0-9+/=]+")


def _findings(blob: bytes, where: str, needles: list[str]) -> list[str]:
    # a picture embedded in a report is base64: a short needle ("DOE") turns up in it by chance, and
    # a name drawn into pixels is not text anyway; everything else in the file is searched
    low = _DATA_URI.sub(b"data:", blob).lower()
    return [f"{needle!r} in {where}" for needle in needles if needle.lower().encode() in low]


@pytest.mark.slow
def test_no_patient_data_leaks_through_convert_series_train_infer(tmp_path):
    data = tmp_path / "data"
    training, uids = [], []
    for index in range(4):
        image, label = make_case((11, index), size=24, orientation="LPS")
        name = f"case_{index:03d}"
        uids.append(_fake_patient_series(data / "dicom" / name, image, index))
        back = read_dicom_series(data / "dicom" / name)
        np.testing.assert_allclose(back.affine, image.affine, atol=1e-4)  # the label's grid is the image's
        write_nifti(label, data / "labelsTr" / f"{name}.nii.gz", dtype="uint8")
        training.append({"image": f"./dicom/{name}", "label": f"./labelsTr/{name}.nii.gz"})
    spec = {
        "name": "privacy",
        "labels": {"0": "background", "1": "liver", "2": "kidney", "3": "spleen"},
        "modality": {"0": "CT"},
        "training": training[:3],
        "test": [],
    }
    (data / "dataset.json").write_text(json.dumps(spec))
    # a NIfTI input next to the DICOM one: --dicom-seg must say it needs a DICOM source
    write_nifti(make_case((11, 9), size=24)[0], tmp_path / "other.nii.gz", dtype="int16")

    procs = {
        "series": run_cli("-v", "series", "data/dicom", cwd=tmp_path, check=True),
        "convert": run_cli("-v", "convert", "data/dicom/case_003", "conv.nii.gz", cwd=tmp_path, check=True),
        "train": run_cli(
            "-v", "train", "--data", "data", "--epochs", "1", "--out", "run", *TINY, cwd=tmp_path, check=True
        ),
    }
    import mlflow

    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    procs["infer"] = run_cli(
        "-v",
        "infer",
        "--model",
        f"runs:/{run.info.run_id}/model",
        "--input",
        "data/dicom/case_003",
        "other.nii.gz",
        "--output",
        "pred",
        "--dicom-seg",
        cwd=tmp_path,
        check=True,
    )
    assert "DICOM SEG needs a DICOM series" in procs["infer"].stderr
    seg_path = tmp_path / "pred" / "case_003_seg.dcm"
    assert (tmp_path / "pred" / "case_003_seg.nii.gz").exists()
    assert not (tmp_path / "pred" / "other_seg.dcm").exists()
    # by design the SEG carries the patient module of its source (so a PACS files it with the study)
    assert str(pydicom.dcmread(seg_path).PatientName) == FAKE["PatientName"]
    # the SEG from `infer --dicom-seg` holds the NIfTI mask's voxels
    numbers, seg = seg_voxels(seg_path, data / "dicom" / "case_003")
    value_of_name = {name: int(value) for value, name in spec["labels"].items()}
    relabel = np.zeros(len(seg.SegmentSequence) + 1, np.uint8)  # segment number -> label value
    for item in seg.SegmentSequence:
        relabel[int(item.SegmentNumber)] = value_of_name[item.SegmentLabel]
    nifti_mask = np.asarray(nib.load(tmp_path / "pred" / "case_003_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(relabel[numbers], nifti_mask)
    # and `convert` reads that SEG back onto the series' grid (a label map and its tables, searched below)
    procs["convert_seg"] = run_cli(
        "-v", "convert", "pred/case_003_seg.dcm", "back.nii.gz", "--reference", "data/dicom/case_003",
        cwd=tmp_path, check=True,
    )
    np.testing.assert_array_equal(relabel[np.asarray(nib.load(tmp_path / "back.nii.gz").dataobj)], nifti_mask)

    leaks: list[str] = []
    checked = 0
    for path in sorted(tmp_path.rglob("*")):
        rel = path.relative_to(tmp_path)
        leaks += _findings(str(rel).encode(), f"file name {rel}", [*NEEDLES, SERIES_UID_ROOT])
        if not path.is_file() or rel.parts[:2] == ("data", "dicom") or path == seg_path:
            continue
        blob = path.read_bytes()
        checked += 1
        leaks += _findings(blob, str(rel), [*NEEDLES, SERIES_UID_ROOT])
    for name, proc in procs.items():
        leaks += _findings(proc.stderr.encode(), f"{name} stderr", [*NEEDLES, SERIES_UID_ROOT])
        uid_needles = [] if name == "series" else [SERIES_UID_ROOT]  # the listing shows UIDs to choose from
        leaks += _findings(proc.stdout.encode(), f"{name} stdout", NEEDLES + uid_needles)
    assert not leaks, leaks
    assert checked > 20  # the MLflow store, artifacts, bundle, masks, sidecars were all searched
    assert (tmp_path / "mlflow.db").exists()
    assert len([p for p in (tmp_path / "mlruns").rglob("*") if p.is_file()]) >= 5  # MLflow artifacts
    # the series listing names the series by UID and hash; logs and messages only by hash
    assert uids[3] in procs["series"].stdout
    assert uid_hash(uids[3]) in procs["series"].stdout
    assert uids[0] not in procs["train"].stderr


# ---- third-party messages on DICOM paths: patient names in every form --------------------------------

NAME_FORMS = {
    "no carets": "DOE JOHN",
    "unicode": "Ñúñez Þórsdóttir Ωμέγα",
    "very long": "QUEXLEYWILHELMINA " * 6,
}


def _named_series(folder, name: str):
    from tests.dicom_cases import ramp_volume

    paths = write_dicom_series(ramp_volume((8, 8, 4)), folder)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, so the unicode name is stored as it is
        ds.PatientName = name
        ds.ReferringPhysicianName = name.split()[0]
        ds.save_as(path)
    return paths


def _name_needles(name: str) -> list[str]:
    words = name.split()
    return [name.strip(), *[w for w in words if len(w) >= 3], " ".join(words[:2])]


@pytest.mark.parametrize("form", sorted(NAME_FORMS))
def test_library_warnings_about_a_name_never_show_it(tmp_path, caplog, capfd, form):
    """highdicom warns that a name without carets is "unlikely to represent the intended person name",
    quoting it; pydicom warns about over-long components. Read + DICOM SEG with debug logging on:
    the messages are captured and logged scrubbed, and the name appears nowhere."""
    import logging
    import warnings

    from medseg.io import write_dicom_seg

    name = NAME_FORMS[form]
    _named_series(tmp_path / "series", name)
    caplog.set_level(logging.DEBUG)
    for library in ("highdicom", "pydicom"):  # an earlier in-process CLI run may have quietened them
        caplog.set_level(logging.DEBUG, logger=library)
    with warnings.catch_warnings(record=True) as escaped:  # what would reach stderr outside pytest
        warnings.simplefilter("always")
        volume = read_dicom_series(tmp_path / "series")
        mask = np.zeros(volume.shape, np.uint8)
        mask[2:5, 2:5, 1:3] = 1
        seg = write_dicom_seg(mask, tmp_path / "series", tmp_path / "seg.dcm", labels={1: "liver"})
    assert str(pydicom.dcmread(seg).PatientName).strip() == name.strip()  # the SEG keeps it, by design
    out, err = capfd.readouterr()
    text = caplog.text
    warned = " ".join(str(w.message) for w in escaped)
    leaks = _findings((out + err + text + warned).encode(), "output", _name_needles(name))
    assert not leaks, leaks
    assert "unlikely to represent the intended person name" in text  # the warning was there, scrubbed
    assert "<redacted>" in text


def test_scrub_removes_every_form_of_the_identifying_values():
    from pydicom.dataset import Dataset

    from medseg.io.privacy import identifying_values, scrub

    ds = Dataset()
    ds.PatientName = "Doe^John^Quincy"
    ds.PatientID = "PID-7788991"
    ds.InstitutionName = "St Elsewhere"
    needles = identifying_values([ds])
    for text in (
        "The string DOE JOHN QUINCY is odd",
        "name Doe, John, Quincy; id pid-7788991",
        "bytes b'Doe^John^Quincy' seen at ST ELSEWHERE",
        "copy attributes from dataset 1.2.826.0.1.3680043.10.7777.3",
        "quoted \"anything at all\" and 'more'",
    ):
        cleaned = scrub(text, needles)
        for needle in ("doe", "john", "quincy", "7788991", "elsewhere", "3680043", "anything", "more"):
            assert needle not in cleaned.lower(), (text, cleaned)


def test_convert_with_debug_logging_shows_no_name(tmp_path):
    _named_series(tmp_path / "series", NAME_FORMS["no carets"])
    proc = run_cli("-v", "convert", "series", "out.nii.gz", cwd=tmp_path, check=True)
    leaks = _findings((proc.stdout + proc.stderr).encode(), "convert", _name_needles(NAME_FORMS["no carets"]))
    assert not leaks, leaks


def test_scrubbed_blocks_in_threads_restore_the_library_loggers():
    """Concurrent reads (MONAI caches datasets with a thread pool) leave pydicom's logger as it was."""
    import logging
    import threading

    from medseg.io.privacy import scrubbed_messages

    loggers = [logging.getLogger(name) for name in ("pydicom", "highdicom")]
    before = [(lg.propagate, list(lg.handlers)) for lg in loggers]
    barrier = threading.Barrier(4)

    def work():
        with scrubbed_messages(where="t"):
            barrier.wait(timeout=30)
            logging.getLogger("pydicom").warning("Invalid value for VR PN: 'DOE JOHN'")
            with scrubbed_messages(where="nested"):
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [(lg.propagate, list(lg.handlers)) for lg in loggers] == before


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(NAME_FORMS))
def test_infer_dicom_seg_and_rtstruct_never_print_the_name(tmp_path, form):
    """Issue 11's reproduction: ``medseg -v infer --dicom-seg`` on a series whose PatientName has no
    carets printed it in highdicom's UserWarning. Now nothing but the SEG and RTSTRUCT (which carry
    the patient module by design) holds the name: not stderr, stdout, the mask, sidecar, tables, report."""
    import torch

    from medseg.bundle import save_bundle
    from medseg.config import config_from_dict
    from medseg.models import build_model
    from tests.test_batch import TINY as BATCH_TINY

    name = NAME_FORMS[form]
    _named_series(tmp_path / "in" / "scan", name)
    cfg = config_from_dict(BATCH_TINY)
    torch.manual_seed(0)
    save_bundle(tmp_path / "bundle", build_model(cfg.model, out_channels=4), cfg, {})
    proc = run_cli(
        "-v",
        "infer",
        "--model",
        "bundle",
        "--input",
        "in/scan",
        "--output",
        "out",
        "--dicom-seg",
        "--rtstruct",
        cwd=tmp_path,
        check=True,
    )
    seg, rt = tmp_path / "out" / "scan_seg.dcm", tmp_path / "out" / "scan_seg_rtstruct.dcm"
    assert str(pydicom.dcmread(seg).PatientName).strip() == name.strip()  # by design
    assert str(pydicom.dcmread(rt).PatientName).strip() == name.strip()
    needles = _name_needles(name)
    leaks = _findings((proc.stdout + proc.stderr).encode(), "infer output", needles)
    checked = 0
    for path in sorted((tmp_path / "out").rglob("*")):
        if path.is_file() and path not in (seg, rt):
            leaks += _findings(path.read_bytes(), path.name, needles)
            checked += 1
    assert not leaks, leaks
    assert checked >= 5  # mask, sidecar, two label tables, report
