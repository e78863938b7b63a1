"""NRRD and MetaImage in (SimpleITK) with NIfTI's geometry guarantees; masks out on the input's exact grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.io import find_inputs, is_dicom_input, load_label, load_volume, mask_path, read_nifti, write_mask
from medseg.io.nifti import read_label_names

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_image(rng, shape=(12, 9, 7), dtype=np.int16) -> sitk.Image:
    """A SimpleITK image (LPS) on an oblique grid with anisotropic spacing and a flipped axis."""
    direction = _rotation(0.3, -0.2, 0.5) @ np.diag([1.0, -1.0, 1.0])
    array = rng.integers(-1000, 1500, shape[::-1]).astype(dtype)  # numpy view is (k, j, i)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 1.3, 2.5))
    image.SetOrigin((-12.5, 40.25, 101.0))
    image.SetDirection(tuple(direction.ravel()))
    return image


def expected_ras_affine(image: sitk.Image) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_sitk_formats_read_with_the_geometry_nifti_gives(tmp_path, rng, suffix):
    image = oblique_image(rng)
    sitk.WriteImage(image, str(tmp_path / f"scan{suffix}"))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))  # SimpleITK converts LPS -> RAS itself
    volume = load_volume(tmp_path / f"scan{suffix}")
    reference = read_nifti(tmp_path / "scan.nii.gz")  # nibabel: an independent reader of the same grid
    np.testing.assert_allclose(volume.affine, expected_ras_affine(image), atol=1e-9)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    assert volume.array.dtype == np.float32
    assert volume.meta["source_format"] == ("nrrd" if suffix in (".nrrd", ".nhdr") else "metaimage")
    # LPS -> RAS: the first voxel's world position is the origin with x and y negated
    np.testing.assert_allclose(volume.affine[:3, 3], np.array(image.GetOrigin()) * [-1, -1, 1])


@pytest.mark.parametrize(
    ("suffix", "mask_suffix"), [(".nrrd", ".nrrd"), (".nhdr", ".nrrd"), (".mha", ".mha"), (".mhd", ".mha")]
)
def test_mask_written_in_the_input_format_has_its_exact_grid(tmp_path, rng, suffix, mask_suffix):
    image = oblique_image(rng)
    source = tmp_path / f"case_7{suffix}"
    sitk.WriteImage(image, str(source))
    volume = load_volume(source)
    mask = (volume.array > 500).astype(np.uint8) + (volume.array > 1200).astype(np.uint8)
    labels = {0: "background", 1: "liver", 2: "liver tumour"}
    target = mask_path(tmp_path / "out", source, output_format="input")
    assert target.name == f"case_7_seg{mask_suffix}"
    write_mask(mask, volume, target, labels=labels)
    back, given = sitk.ReadImage(str(target)), sitk.ReadImage(str(source))
    assert back.GetSize() == given.GetSize()
    # copied from the input's header; NRRD stores direction x spacing, which ITK splits again on
    # reading, so a NRRD grid read twice can differ in the last bit: a nanometre is the bound
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(back, get)(), getattr(given, get)(), rtol=0, atol=1e-9)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0), mask)
    assert (tmp_path / "out" / "case_7_seg.json").is_file()
    # and read back through medseg as a label map on the image's grid
    label = load_label(target, image=volume, expected_labels=[1, 2])
    np.testing.assert_array_equal(label.array, mask)


def test_mask_as_nifti_for_a_nrrd_input_and_as_nrrd_for_a_nifti_input(tmp_path, rng):
    image = oblique_image(rng)
    sitk.WriteImage(image, str(tmp_path / "a.nrrd"))
    volume = load_volume(tmp_path / "a.nrrd")
    mask = (volume.array > 0).astype(np.uint8)
    nifti = write_mask(mask, volume, mask_path(tmp_path, tmp_path / "a.nrrd"), labels={1: "spleen"})
    assert nifti.name == "a_seg.nii.gz"
    img = nib.load(nifti)
    np.testing.assert_allclose(img.affine, expected_ras_affine(image), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)
    assert read_label_names(nifti) == {1: "spleen"}
    # a NIfTI input written out as NRRD: the grid comes from the affine
    nifti_in = read_nifti(tmp_path / "a_seg.nii.gz")
    nrrd = write_mask(mask, nifti_in, mask_path(tmp_path / "o", "b.nii.gz", output_format="nrrd"), labels={})
    np.testing.assert_allclose(load_volume(nrrd).affine, nifti_in.affine, atol=1e-6)


def test_labels_embedded_in_the_nifti_header_are_ignored_by_plain_readers(tmp_path, rng):
    volume = read_nifti_from(tmp_path, rng)
    labels = {0: "background", 1: "kidney left", 2: "rein gauche é", 3: "x" * 200}
    path = write_mask(np.ones(volume.shape, np.uint8), volume, tmp_path / "m_seg.nii.gz", labels=labels)
    assert read_label_names(path) == labels
    back = sitk.ReadImage(str(path))  # ITK skips the extension
    np.testing.assert_allclose(LPS_TO_RAS @ _sitk_lps(back), np.asarray(nib.load(path).affine), atol=1e-5)
    assert read_nifti(path, kind="label").shape == volume.shape


def read_nifti_from(tmp_path, rng):
    image = oblique_image(rng, shape=(6, 5, 4))
    sitk.WriteImage(image, str(tmp_path / "in.nii.gz"))
    return read_nifti(tmp_path / "in.nii.gz")


def _sitk_lps(image: sitk.Image) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return lps


def test_find_inputs_lists_nrrd_metaimage_and_zips_but_not_dot_files(tmp_path, rng):
    image = oblique_image(rng, shape=(4, 4, 3))
    for name in ("a.nrrd", "b.mha", "c.mhd", "d.nii.gz"):
        sitk.WriteImage(image, str(tmp_path / name))
    (tmp_path / "._a.nrrd").write_bytes(b"\0\5\26\7")  # macOS AppleDouble
    (tmp_path / "e.zip").write_bytes(b"")
    names = [p.name for p in find_inputs([tmp_path])]
    assert names == ["a.nrrd", "b.mha", "c.mhd", "d.nii.gz", "e.zip"]  # c.raw is c.mhd's data
    # what a DICOM SEG or RTSTRUCT can reference
    assert [is_dicom_input(tmp_path / n) for n in names] == [False, False, False, False, True]
    assert is_dicom_input(tmp_path)


@pytest.mark.parametrize("problem", ["truncated", "vector", "2d"])
def test_broken_nrrd_gives_one_line(tmp_path, rng, problem):
    path = tmp_path / "bad.nrrd"
    if problem == "truncated":
        sitk.WriteImage(oblique_image(rng), str(path), useCompression=False)
        path.write_bytes(path.read_bytes()[:-300])
    elif problem == "vector":
        sitk.WriteImage(sitk.Compose([oblique_image(rng)] * 3), str(path))
    else:
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(path))
    with pytest.raises(InputError) as info:
        load_volume(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


# ---- zipped DICOM studies -------------------------------------------------------------------------


def _study(folder):
    """Two series in one study: an oblique main series (7 slices) and a shorter one (3 slices)."""
    from tests.dicom_cases import ramp_volume, series

    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.2, 0.1, -0.3) @ np.diag([0.8, 0.9, 2.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    main = series(folder / "SE1", ramp_volume((10, 9, 7), affine), series_description="main")
    other = series(folder / "SE2", ramp_volume((10, 9, 3), seed=5), series_description="other")
    return main, other


def _zip(folder, path, extra=()):
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                zf.write(file, f"PATIENT/STUDY/{file.relative_to(folder)}")
        for info, data in extra:
            zf.writestr(info, data)
    return path


def test_zipped_study_reads_as_the_folder_does_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import pydicom

    from medseg.io import uid_hash

    _study(tmp_path / "study")
    zipped = _zip(tmp_path / "study", tmp_path / "study.zip", extra=[("__MACOSX/._x", b"\0\5\26\7")])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))  # where extraction happens, to check clean-up
    from_folder, from_zip = load_volume(tmp_path / "study"), load_volume(zipped)
    np.testing.assert_array_equal(from_zip.array, from_folder.array)
    np.testing.assert_array_equal(from_zip.affine, from_folder.affine)
    assert from_zip.meta == from_folder.meta
    assert from_zip.shape[2] == 7
    assert from_zip.source == str(zipped)
    # --series picks the other series, as in a folder
    uid = pydicom.dcmread(next((tmp_path / "study" / "SE2").iterdir())).SeriesInstanceUID
    other = load_volume(zipped, series_id=uid_hash(uid))
    np.testing.assert_array_equal(other.array, load_volume(tmp_path / "study", series_id=uid).array)
    with pytest.raises(InputError, match=r"^.*study\.zip: "):
        load_volume(zipped, series_id="nonexistent")
    assert list(scratch.iterdir()) == []


def _hostile(tmp_path, kind):
    import zipfile

    path = tmp_path / f"{kind}.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok/slice.dcm", b"x" * 100)
        if kind == "dotdot":
            zf.writestr("ok/../../evil.dcm", b"x")
        elif kind == "absolute":
            zf.writestr("/tmp/evil.dcm", b"x")
        elif kind == "symlink":
            info = zipfile.ZipInfo("ok/link.dcm")
            info.create_system = 3
            info.external_attr = (0o120777) << 16
            zf.writestr(info, "/etc/passwd")
        elif kind == "bomb":
            zf.writestr("ok/zeros.dcm", bytes(64 << 20))  # 64 MiB of zeros -> about 64 KiB
        elif kind == "entries":
            for i in range(60):
                zf.writestr(f"ok/{i}.dcm", b"x")
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("dotdot", "'..'"),
        ("absolute", "absolute path"),
        ("symlink", "symbolic link"),
        ("bomb", "zip bomb"),
        ("entries", "entries, more than"),
        ("notzip", "not a readable zip"),
    ],
)
def test_hostile_zips_are_refused_before_anything_is_written(tmp_path, monkeypatch, kind, says):
    from medseg.io.archive import ZipLimits, extracted_zip

    if kind == "notzip":
        path = tmp_path / "notzip.zip"
        path.write_bytes(b"PK\3\4 not really")
    else:
        path = _hostile(tmp_path, kind)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    with pytest.raises(InputError, match=says) as info, extracted_zip(path, limits=ZipLimits(max_entries=50)):
        pass
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)
    assert list(scratch.iterdir()) == []
    assert not (tmp_path.parent / "evil.dcm").exists()


def test_convert_refuses_a_hostile_zip_with_one_line(tmp_path):
    from tests.conftest import run_cli

    _hostile(tmp_path, "dotdot")
    proc = run_cli("convert", "dotdot.zip", "out.nii.gz", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "'..'" in proc.stderr
    assert not (tmp_path / "out.nii.gz").exists()


# ---- end to end: `medseg infer` on NRRD, MetaImage and a zipped study -------------------------------


@pytest.mark.slow
def test_infer_on_nrrd_metaimage_and_a_zipped_study(tmp_path):
    """Masks on the input's exact grid for .nrrd/.mha inputs; the same mask from a zip as from its folder."""
    from tests.conftest import run_cli
    from tests.test_end_to_end import TINY

    run_cli(
        "synth",
        "--out",
        "data",
        "--cases",
        "3",
        "--size",
        "24",
        "--seed",
        "2",
        "--dicom",
        cwd=tmp_path,
        check=True,
    )
    run_cli("train", "--data", "data", "--epochs", "1", "--out", "run", *TINY, cwd=tmp_path, check=True)
    image = sitk.ReadImage(str(tmp_path / "data" / "imagesTs" / "case_002.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "a.nrrd"))
    sitk.WriteImage(image, str(tmp_path / "b.mha"))
    _zip(tmp_path / "data" / "dicom" / "case_002", tmp_path / "study.zip")
    files = ["a.nrrd", "b.mha", "data/imagesTs/case_002.nii.gz"]
    infer = [
        "infer",
        "--model",
        "run/bundle",
        "--output-format",
        "input",
        "--input",
        *files,
        "--output",
        "pred",
    ]
    run_cli(*infer, cwd=tmp_path, check=True)
    studies = ["study.zip", "data/dicom/case_002"]
    infer = [
        "infer",
        "--model",
        "run/bundle",
        "--dicom-seg",
        "--rtstruct",
        "--input",
        *studies,
        "--output",
        "dcm",
    ]
    run_cli(*infer, cwd=tmp_path, check=True)
    pred, dcm = tmp_path / "pred", tmp_path / "dcm"
    nifti_mask = nib.load(pred / "case_002_seg.nii.gz")
    assert np.asarray(nifti_mask.dataobj).any()  # the model found something to compare
    for name, suffix in (("a", "nrrd"), ("b", "mha")):
        mask, given = (
            sitk.ReadImage(str(pred / f"{name}_seg.{suffix}")),
            sitk.ReadImage(str(tmp_path / f"{name}.{suffix}")),
        )
        assert mask.GetSize() == given.GetSize()
        for get in ("GetOrigin", "GetSpacing", "GetDirection"):
            np.testing.assert_allclose(getattr(mask, get)(), getattr(given, get)(), rtol=0, atol=1e-9)
        voxels = sitk.GetArrayFromImage(mask).transpose(2, 1, 0)
        np.testing.assert_array_equal(voxels, np.asarray(nifti_mask.dataobj))
        assert (pred / f"{name}_seg.ctbl").is_file()
        assert (pred / f"{name}_seg.itksnap.txt").is_file()
    for stem in ("study", "case_002"):
        assert (dcm / f"{stem}_seg.dcm").is_file()
        assert (dcm / f"{stem}_seg_rtstruct.dcm").is_file()
    from_zip, from_folder = nib.load(dcm / "study_seg.nii.gz"), nib.load(dcm / "case_002_seg.nii.gz")
    np.testing.assert_array_equal(from_zip.affine, from_folder.affine)
    np.testing.assert_array_equal(np.asarray(from_zip.dataobj), np.asarray(from_folder.dataobj))


def test_convert_reads_a_zipped_study_and_a_nrrd(tmp_path, rng):
    from tests.conftest import run_cli

    _study(tmp_path / "study")
    _zip(tmp_path / "study", tmp_path / "study.zip")
    sitk.WriteImage(oblique_image(rng), str(tmp_path / "scan.nrrd"))
    run_cli("convert", "study.zip", "study.nii.gz", cwd=tmp_path, check=True)
    run_cli("convert", "scan.nrrd", "scan.nii.gz", cwd=tmp_path, check=True)
    study = load_volume(tmp_path / "study")
    np.testing.assert_allclose(read_nifti(tmp_path / "study.nii.gz").affine, study.affine, atol=1e-6)
    np.testing.assert_array_equal(read_nifti(tmp_path / "study.nii.gz").array, study.array)
    scan = load_volume(tmp_path / "scan.nrrd")
    np.testing.assert_allclose(read_nifti(tmp_path / "scan.nii.gz").affine, scan.affine, atol=1e-6)


# ---- the batch writer: --output-format, label tables, --series, --dicom-seg and --rtstruct on a zip ----


def _untrained_bundle(tmp_path):
    import torch

    from medseg.bundle import load_bundle, save_bundle
    from medseg.config import config_from_dict
    from medseg.models import build_model
    from tests.test_batch import TINY as BATCH_TINY

    cfg = config_from_dict(BATCH_TINY)
    torch.manual_seed(0)
    save_bundle(tmp_path / "bundle", build_model(cfg.model, out_channels=4), cfg, {})
    return load_bundle(tmp_path / "bundle")


def test_batch_writes_masks_in_the_input_format_with_label_tables(tmp_path, rng):
    import json

    from medseg.batch import run_inference
    from medseg.io.labeltables import label_table_paths
    from medseg.synthetic import make_case

    bundle = _untrained_bundle(tmp_path)
    image, _ = make_case(3, size=24, orientation="oblique")
    (tmp_path / "in").mkdir()
    from medseg.io import write_nifti

    write_nifti(image, tmp_path / "in" / "c.nii.gz", dtype="int16")
    as_sitk = sitk.ReadImage(str(tmp_path / "in" / "c.nii.gz"))
    sitk.WriteImage(as_sitk, str(tmp_path / "in" / "a.nrrd"))
    sitk.WriteImage(as_sitk, str(tmp_path / "in" / "b.mha"))
    out = tmp_path / "out"
    summary = run_inference([bundle], [tmp_path / "in"], out, output_format="input")
    assert sorted(p.name for p in summary.written) == ["a_seg.nrrd", "b_seg.mha", "c_seg.nii.gz"]
    reference = np.asarray(nib.load(out / "c_seg.nii.gz").dataobj)
    assert read_label_names(out / "c_seg.nii.gz") == bundle.labels
    for name, suffix in (("a", "nrrd"), ("b", "mha")):
        mask, given = (
            sitk.ReadImage(str(out / f"{name}_seg.{suffix}")),
            sitk.ReadImage(str(tmp_path / "in" / f"{name}.{suffix}")),
        )
        assert mask.GetSize() == given.GetSize()
        for get in ("GetOrigin", "GetSpacing", "GetDirection"):
            np.testing.assert_allclose(getattr(mask, get)(), getattr(given, get)(), rtol=0, atol=1e-9)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask).transpose(2, 1, 0), reference)
        sidecar = json.loads((out / f"{name}_seg.json").read_text())
        tables = [p.name for p in label_table_paths(out / f"{name}_seg.{suffix}")]
        assert sidecar["outputs"][:3] == [f"{name}_seg.{suffix}", *tables]
        assert all((out / t).is_file() for t in tables)
    # a second run finds every case done (the NRRD/MetaImage masks and tables count as outputs)
    again = run_inference([bundle], [tmp_path / "in"], out, output_format="input")
    assert (len(again.written), len(again.skipped)) == (0, 3)
    # and the masks are never taken as inputs
    from medseg.io import find_inputs

    assert [p.name for p in find_inputs([out])] == []


def test_batch_on_a_zipped_study_with_series_seg_and_rtstruct(tmp_path):
    import json

    import highdicom as hd
    import pydicom

    from medseg.batch import run_inference
    from medseg.io import uid_hash
    from tests.test_rtstruct import dice, rasterise

    bundle = _untrained_bundle(tmp_path)
    _study(tmp_path / "study")
    _zip(tmp_path / "study", tmp_path / "study.zip")
    other_uid = pydicom.dcmread(next((tmp_path / "study" / "SE2").iterdir())).SeriesInstanceUID
    options = {"dicom_seg": True, "rtstruct": True}
    zipped = run_inference([bundle], [tmp_path / "study.zip"], tmp_path / "z", **options)
    folder = run_inference(
        [bundle], [tmp_path / "study" / "SE1"], tmp_path / "f", **options
    )  # its main series
    assert [p.name for p in zipped.written] == ["study_seg.nii.gz"]
    assert [p.name for p in folder.written] == ["SE1_seg.nii.gz"]
    from_zip = np.asarray(nib.load(tmp_path / "z" / "study_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(from_zip, np.asarray(nib.load(tmp_path / "f" / "SE1_seg.nii.gz").dataobj))
    assert from_zip.any()
    sidecar = json.loads((tmp_path / "z" / "study_seg.json").read_text())
    assert {"study_seg.dcm", "study_seg_rtstruct.dcm"} <= set(sidecar["outputs"])
    assert sidecar["series"]["n_slices"] == 7
    assert sidecar["series"]["description"] == "main"
    seg = hd.seg.segread(tmp_path / "z" / "study_seg.dcm")
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "medseg dynunet"
    assert len(algorithm.AlgorithmVersion) == 12  # the bundle's content hash
    filled = rasterise(tmp_path / "z" / "study_seg_rtstruct.dcm", tmp_path / "study" / "SE1")
    for value, name in bundle.labels.items():
        if value and (from_zip == value).sum() > 0:
            assert dice(filled[name], from_zip == value) >= 0.95
    # --series: the other series of the same zip, recorded in the sidecar
    picked = run_inference(
        [bundle], [tmp_path / "study.zip"], tmp_path / "s", series=uid_hash(other_uid), **options
    )
    assert [p.name for p in picked.written] == ["study_seg.nii.gz"]
    sidecar = json.loads((tmp_path / "s" / "study_seg.json").read_text())
    assert sidecar["series"] == {"uid_hash": uid_hash(other_uid), "description": "other", "n_slices": 3}
    assert sidecar["options"]["series"] == uid_hash(other_uid)
    assert nib.load(tmp_path / "s" / "study_seg.nii.gz").shape[2] == 3
