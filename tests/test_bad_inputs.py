"""A battery of broken inputs, each generated here and run through the command line as a user would.

Every case must end with exit code 2 and ONE line on stderr that names the file and the problem,
no traceback, and no output file (not even a partial one) left behind.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.io import Volume, write_nifti
from tests import dicom_cases as dc
from tests.conftest import run_cli

# A case builds its input under tmp and returns (CLI arguments, text the error must name, problem words).
Case = Callable[[Path], tuple[list[str], str, str]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def convert(src: Path, *extra: str) -> list[str]:
    return ["convert", str(src), "out/image.nii.gz", *extra]


# ---------------------------------------------------------------- DICOM


@case
def dicom_truncated_pixel_data(tmp):
    paths = dc.series(tmp / "ct")
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[:-100])
    return convert(tmp / "ct"), paths[3].name, "pixel data truncated (expected 240 bytes, found 140)"


@case
def dicom_truncated_header(tmp):
    paths = dc.series(tmp / "ct")
    paths[0].write_bytes(paths[0].read_bytes()[:300])  # an edge slice: a gap check alone would miss it
    return convert(tmp / "ct"), paths[0].name, "unreadable DICOM header"


@case
def dicom_not_a_dicom_file(tmp):
    (tmp / "notes.dcm").write_text("scan request, see attached\n")
    return convert(tmp / "notes.dcm"), "notes.dcm", "not a DICOM file"


@case
def dicom_empty_folder(tmp):
    (tmp / "ct").mkdir()
    return convert(tmp / "ct"), "ct", "no DICOM image series found"


@case
def dicom_only_non_image_objects(tmp):
    for kind in ("SR", "RTSTRUCT", "PR", "SEG"):
        dc.non_image(tmp / "export" / f"{kind}.dcm", kind)
    return convert(tmp / "export"), "export", "non-image object"


@case
def dicom_only_localizers(tmp):
    dc.localizer(tmp / "scouts" / "a.dcm")
    dc.localizer(tmp / "scouts" / "b.dcm")
    return convert(tmp / "scouts"), "scouts", "localizer/scout"


@case
def dicom_only_colour_screenshots(tmp):
    paths = dc.series(tmp / "sc")

    def rgb(ds):
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()

    for p in paths:
        dc.edit(p, rgb)
    return convert(tmp / "sc"), "sc", "colour image"


@case
def dicom_missing_slice(tmp):
    paths = dc.series(tmp / "ct")
    paths[3].unlink()
    return convert(tmp / "ct"), paths[2].name, "missing slice(s)"


@case
def dicom_duplicated_position(tmp):
    paths = dc.series(tmp / "ct")
    ipp = pydicom.dcmread(paths[2]).ImagePositionPatient
    dc.edit(paths[3], lambda ds: setattr(ds, "ImagePositionPatient", ipp))
    return convert(tmp / "ct"), "lie at the same position", "duplicated slice positions"


@case
def dicom_inconsistent_pixel_spacing(tmp):
    paths = dc.series(tmp / "ct")
    dc.edit(paths[2], lambda ds: setattr(ds, "PixelSpacing", ["0.7", "0.7"]))
    return (
        convert(tmp / "ct"),
        f"{paths[2].name} has 0.7 x 0.7 mm, 5 other slices 1 x 1 mm",
        "inconsistent PixelSpacing",
    )


@case
def dicom_inconsistent_orientation(tmp):
    paths = dc.series(tmp / "ct")
    c, s = np.cos(np.radians(3)), np.sin(np.radians(3))
    dc.edit(paths[2], lambda ds: setattr(ds, "ImageOrientationPatient", [-c, -s, 0, s, -c, 0]))
    return (
        convert(tmp / "ct"),
        f"({paths[2].name} is turned by 3.00 degrees)",
        "inconsistent ImageOrientationPatient",
    )


@case
def dicom_inconsistent_matrix_size(tmp):
    paths = dc.series(tmp / "ct")

    def smaller(ds):
        ds.Rows = 8
        ds.PixelData = ds.PixelData[: 8 * ds.Columns * 2]

    dc.edit(paths[2], smaller)
    return convert(tmp / "ct"), paths[2].name, "inconsistent image size"


@case
def dicom_gantry_tilt(tmp):
    paths = dc.series(tmp / "ct")
    for k, p in enumerate(paths):
        dc.edit(p, lambda ds, k=k: setattr(ds, "ImagePositionPatient", [-0.5 * k, 0.0, float(k)]))
    return convert(tmp / "ct"), "ct", "gantry tilt of 26.57 degrees"


@case
def dicom_two_series_of_equal_size(tmp):
    dc.series(tmp / "study" / "a")
    dc.series(tmp / "study" / "b")
    return convert(tmp / "study"), "study", "choose one with --series"


@case
def dicom_unknown_series_uid(tmp):
    dc.series(tmp / "ct", series_uid="1.2.3")
    return convert(tmp / "ct", "--series", "9.9.9"), "ct", "no series '9.9.9' here"


@case
def dicom_wrong_transfer_syntax_declared(tmp):
    paths = dc.series(tmp / "ct")
    # native pixels, file meta patched to claim RLE Lossless (same UID length, so the bytes line up)
    data = paths[1].read_bytes()
    assert data.count(b"1.2.840.10008.1.2.1\x00") == 1
    paths[1].write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.5\x00"))
    return convert(tmp / "ct"), paths[1].name, "cannot be decoded as RLE Lossless"


@case
def dicom_corrupt_jpeg2000_stream(tmp):
    paths = dc.series(tmp / "ct", dc.ramp_volume((32, 32, 4)))
    for p in paths:
        dc.transcode(p, "jpeg2000")
    data = bytearray(paths[2].read_bytes())
    start = data.find(b"\xff\x4f\xff\x51")  # the JPEG 2000 codestream's first markers
    data[start : start + 60] = b"\x00" * 60
    paths[2].write_bytes(bytes(data))
    return convert(tmp / "ct"), paths[2].name, "cannot be decoded"


@case
def dicom_pixel_data_missing(tmp):
    paths = dc.series(tmp / "ct")
    dc.edit(paths[4], lambda ds: ds.__delattr__("PixelData"))
    return convert(tmp / "ct"), paths[4].name, "no pixel data"


@case
def dicom_multiframe_without_frame_geometry(tmp):
    paths = dc.series(tmp / "mf")
    for p in paths[1:]:
        p.unlink()

    def frames(ds):
        ds.NumberOfFrames = 3
        ds.PixelData = ds.PixelData * 3

    dc.edit(paths[0], frames)
    return convert(tmp / "mf"), "mf", "without per-frame geometry"


@case
def dicom_no_image_position(tmp):
    paths = dc.series(tmp / "ct")
    for p in paths:
        dc.edit(p, lambda ds: ds.__delattr__("ImagePositionPatient"))
    return convert(tmp / "ct"), "ct", "no ImageOrientationPatient/ImagePositionPatient"


@case
def dicom_non_orthogonal_orientation(tmp):
    paths = dc.series(tmp / "ct")
    for p in paths:
        dc.edit(p, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0.5, 0.5, 0]))
    return convert(tmp / "ct"), "ct", "not two orthogonal unit vectors"


@case
def dicom_zero_pixel_spacing(tmp):
    paths = dc.series(tmp / "ct")
    for p in paths:
        dc.edit(p, lambda ds: setattr(ds, "PixelSpacing", ["0", "0.8"]))
    return convert(tmp / "ct"), "ct", "non-positive PixelSpacing"


@case
def series_on_empty_folder(tmp):
    (tmp / "nothing").mkdir()
    return ["series", str(tmp / "nothing")], "nothing", "no DICOM image series found"


@case
def series_on_missing_folder(tmp):
    return ["series", str(tmp / "absent")], "absent", "not found"


# ---------------------------------------------------------------- NIfTI


def _nifti(tmp: Path, array: np.ndarray, name: str = "scan.nii.gz", affine=None) -> Path:
    path = tmp / name
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else affine), path)
    return path


@case
def nifti_nan_voxels(tmp):
    arr = np.zeros((6, 6, 4), np.float32)
    arr[2, 2, 2] = np.nan
    return convert(_nifti(tmp, arr)), "scan.nii.gz", "1 voxels are NaN or infinite"


@case
def nifti_inf_voxels(tmp):
    arr = np.zeros((6, 6, 4), np.float32)
    arr[1, 2, 3] = np.inf
    return convert(_nifti(tmp, arr)), "scan.nii.gz", "NaN or infinite"


@case
def nifti_truncated_gzip(tmp):
    path = _nifti(tmp, np.random.default_rng(0).random((20, 20, 20), dtype=np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return convert(path), "scan.nii.gz", "truncated or corrupt voxel data"


@case
def nifti_header_claims_more_data(tmp):
    full = _nifti(tmp, np.ones((10, 10, 10), np.float32), "full.nii")
    raw = full.read_bytes()
    path = tmp / "short.nii.gz"
    path.write_bytes(gzip.compress(raw[: len(raw) - 1000]))  # a valid gzip stream, too little data
    return convert(path), "short.nii.gz", "holds less than its header says"


@case
def nifti_uncompressed_truncated(tmp):
    full = _nifti(tmp, np.ones((10, 10, 10), np.int16), "full.nii")
    full.write_bytes(full.read_bytes()[:-500])
    return convert(full), "full.nii", "truncated or corrupt voxel data"


@case
def nifti_zero_size_dimension(tmp):
    return convert(_nifti(tmp, np.zeros((0, 6, 4), np.float32))), "scan.nii.gz", "zero-size dimension"


@case
def nifti_several_volumes(tmp):
    return convert(_nifti(tmp, np.zeros((6, 6, 4, 3), np.float32))), "scan.nii.gz", "3 volumes (4D)"


@case
def nifti_multichannel(tmp):
    return convert(_nifti(tmp, np.zeros((6, 6, 4, 1, 2), np.float32))), "scan.nii.gz", "multi-channel"


@case
def nifti_rgb(tmp):
    rgb = np.zeros((6, 6, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return convert(_nifti(tmp, rgb)), "scan.nii.gz", "is not a scalar image"


@case
def nifti_singular_affine(tmp):
    plain = _nifti(tmp, np.zeros((6, 6, 4), np.float32), "plain.nii")
    data = bytearray(plain.read_bytes())
    data[252:254] = np.int16(0).tobytes()  # qform_code 0: only the sform counts
    data[296:312] = np.zeros(4, np.float32).tobytes()  # srow_y = 0: a zero voxel size
    path = tmp / "scan.nii.gz"
    path.write_bytes(gzip.compress(bytes(data)))
    return convert(path), "scan.nii.gz", "singular"


@case
def nifti_infinite_scaling(tmp):
    img = nib.Nifti1Image(np.ones((6, 6, 4), np.int16), np.eye(4))
    img.header["scl_slope"], img.header["scl_inter"] = 2.0, np.inf
    nib.save(img, tmp / "scan.nii.gz")
    return convert(tmp / "scan.nii.gz"), "scan.nii.gz", "invalid intercept inf"


@case
def nifti_not_nifti(tmp):
    (tmp / "scan.nii.gz").write_bytes(b"\x1f\x8b" + bytes(range(200)))
    return convert(tmp / "scan.nii.gz"), "scan.nii.gz", "not a readable NIfTI file"


def _pred_ref(tmp: Path, pred: np.ndarray, ref: np.ndarray, pred_affine=None) -> list[str]:
    (tmp / "pred").mkdir()
    (tmp / "ref").mkdir()
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    write_nifti(Volume(pred, affine if pred_affine is None else pred_affine), tmp / "pred" / "c1_seg.nii.gz")
    write_nifti(Volume(ref, affine), tmp / "ref" / "c1.nii.gz")
    return ["evaluate", "--pred", "pred", "--ref", "ref", "--out", "out/metrics.csv"]


@case
def label_grid_differs_from_image(tmp):
    lab = np.zeros((6, 6, 4), np.uint8)
    shifted = np.diag([0.8, 0.8, 2.0, 1.0])
    shifted[:3, 3] = 5.0
    args = _pred_ref(tmp, lab, lab, pred_affine=shifted)
    return (
        args,
        "c1_seg.nii.gz: mask grid differs from reference ref/c1.nii.gz",
        "affines differ by up to 5 mm",
    )


@case
def label_shape_differs_from_image(tmp):
    args = _pred_ref(tmp, np.zeros((6, 6, 5), np.uint8), np.zeros((6, 6, 4), np.uint8))
    return args, "c1_seg.nii.gz: mask shape (6, 6, 5) differs from reference ref/c1.nii.gz", "shape (6, 6, 4)"


@case
def label_non_integer_values(tmp):
    pred = np.zeros((6, 6, 4), np.float32)
    pred[2, 2, 2] = 0.5
    return _pred_ref(tmp, pred, np.zeros((6, 6, 4), np.uint8)), "c1_seg.nii.gz", "non-integer values"


@case
def label_negative_values(tmp):
    pred = np.zeros((6, 6, 4), np.int16)
    pred[2, 2, 2] = -1
    return _pred_ref(tmp, pred, np.zeros((6, 6, 4), np.uint8)), "c1_seg.nii.gz", "negative values"


@pytest.fixture(scope="module")
def battery(tmp_path_factory) -> dict[str, tuple[Path, list[str], str, str, subprocess.CompletedProcess]]:
    """Build every case, then run them two at a time (each is a fresh ``python -m medseg``)."""
    built = {}
    for name, make in CASES.items():
        tmp = tmp_path_factory.mktemp(name)
        built[name] = (tmp, *make(tmp))
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = {name: pool.submit(run_cli, *args, cwd=tmp) for name, (tmp, args, *_rest) in built.items()}
        return {name: (*built[name], future.result()) for name, future in procs.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_broken_input_gives_one_line_and_exit_2(battery, name):
    tmp, _args, names, problem, proc = battery[name]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert names in lines[0], lines[0]
    assert problem in lines[0], lines[0]
    out = tmp / "out"
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    print(f"\n{name}: {lines[0]}")  # the table in the closing note is printed from here (pytest -s)


def test_existing_output_is_not_overwritten(tmp_path):
    dc.series(tmp_path / "ct")
    run_cli("convert", "ct", "out.nii.gz", cwd=tmp_path, check=True)
    before = (tmp_path / "out.nii.gz").read_bytes()
    proc = run_cli("convert", "ct", "out.nii.gz", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "medseg convert: error: out.nii.gz: already exists (pass --overwrite to replace it)"
    )
    assert (tmp_path / "out.nii.gz").read_bytes() == before
    run_cli("convert", "ct", "out.nii.gz", "--overwrite", cwd=tmp_path, check=True)


def test_check_reports_bad_cases_naming_files(tmp_path):
    """``check`` is a report (exit 1 on problems): each broken case is one line naming its file."""
    from medseg.synthetic import make_dataset

    root = make_dataset(tmp_path / "ds", cases=4, size=24, seed=0, test_fraction=0.0).parent
    labels = sorted((root / "labelsTr").glob("*.nii.gz"))
    images = sorted((root / "imagesTr").glob("*.nii.gz"))
    arr = nib.load(labels[0]).get_fdata().astype(np.uint8)
    arr[0, 0, 0] = 9  # a value dataset.json does not declare
    nib.save(nib.Nifti1Image(arr, nib.load(labels[0]).affine), labels[0])
    shutil.copy(images[2], images[1])  # image 1 now has image 2's grid; label 1 no longer fits
    images[2].write_bytes(images[2].read_bytes()[:200])  # truncated image
    proc = run_cli("check", str(root), cwd=tmp_path)
    assert proc.returncode == 1
    out = proc.stdout
    assert f"{labels[0]}: label values [9] are not in dataset.json labels" in out
    assert f"{images[2]}: not a readable NIfTI file" in out
    assert f"{labels[1]}: label shape" in out
    assert f"differs from image {images[1]} shape" in out
    assert "Traceback" not in proc.stderr


def test_a_failing_write_is_reported_and_leaves_nothing(tmp_path):
    """A full disk, simulated with a file-size limit: one line, exit 2, no partial output."""
    import os
    import resource
    import signal
    import sys

    from tests.conftest import REPO

    vol = dc.ramp_volume((64, 64, 16))
    dc.series(tmp_path / "ct", vol)

    def limit():  # runs in the child: writes past 20 kB fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run(
        [sys.executable, "-m", "medseg", "convert", "ct", "out/big.nii", "--overwrite"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "out/big.nii: could not be written (File too large)" in lines[0]
    assert not any((tmp_path / "out").iterdir())
