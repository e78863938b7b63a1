"""QC report: the HTML holds the right figures per case and structure, and renders in headless Chromium."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from medseg.report import case_qc, range_flag, write_report
from medseg.synthetic import LABELS, make_case

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("script", "link") or (tag == "img" and not a.get("src", "").startswith("data:")):
            self.external.append(tag)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _cases():
    image, label = make_case((5, 1), size=32, orientation="LPS")
    mask = label.array.copy()
    mask[0, 10:14, 5:9] = 1  # a piece of liver on the edge of the field of view
    image2, label2 = make_case((5, 2), size=32, orientation="RAS")
    liver_ml = (mask == 1).sum() * abs(np.linalg.det(image.affine[:3, :3])) / 1000
    # liver far above its training range, kidneys within theirs
    ranges = {"1": [liver_ml / 4, liver_ml / 3], "2": {"min": 0.01, "max": 500.0}}
    a = case_qc("case_a", image, mask, labels=LABELS, tta_disagreement=0.0425, volume_ranges=ranges)
    b = case_qc("case_b", image2, label2.array, labels=LABELS)
    return (image, mask), (image2, label2.array), a, b


def test_report_content(tmp_path):
    (image, mask), _, a, b = _cases()
    path = write_report(
        [a, b], tmp_path / "report.html", labels=LABELS, failed=[("bad.nii.gz", "not a NIfTI")], model="m"
    )
    text = path.read_text()
    parser = _Collect()
    parser.feed(text)
    assert parser.external == []  # self-contained: no scripts, stylesheets or remote images
    assert len(parser.images) == 2
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        pixels = matplotlib.image.imread(io.BytesIO(png))
        assert pixels.shape[0] > 600  # three rows: one through each structure
        assert pixels[..., :3].std() > 0.05
    voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
    structures = [r for r in parser.rows if len(r) == 5 and r[0] in ("liver", "kidney", "spleen")]
    assert len(structures) == 6
    liver, kidney, spleen = structures[:3]
    assert float(liver[1]) == pytest.approx((mask == 1).sum() * voxel_ml, abs=0.01)
    assert int(liver[2]) == 2  # the organ and the piece on the edge
    assert int(kidney[2]) == 2  # two kidneys, one label
    assert int(spleen[2]) == 1
    assert liver[3] == "yes"  # touches the field-of-view border
    assert kidney[3] == "no"
    assert liver[4].startswith("large")
    assert kidney[4] == "ok"
    assert [r[4] for r in structures[3:]] == ["ok", "ok", "ok"]  # case_b: no ranges in metadata, no flag
    assert "4.25 %" in text  # TTA disagreement of case_a
    assert "bad.nii.gz" in text
    assert "Cases to look at: case_a" in text


def test_range_flag_rules():
    assert range_flag(10.0, None) is None
    assert range_flag(10.0, (8.0, 12.0)) is None
    assert range_flag(3.0, (8.0, 12.0)).startswith("small")
    assert range_flag(19.0, (8.0, 12.0)).startswith("large")
    assert range_flag(0.0, (8.0, 12.0)).startswith("absent")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    _, _, a, b = _cases()
    path = write_report([a, b], tmp_path / "report.html", labels=LABELS, model="m")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1800",
            path.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), proc.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (1800, 1200)
    rgb = pixels[..., :3]
    # rendered: text and the embedded overlay images, not a blank page
    dark = (rgb.mean(axis=-1) < 0.2).mean()
    assert dark > 0.05
    assert rgb.std() > 0.1


def test_overlay_finds_labels_and_slices_in_the_foreground_box():
    """The labels present (``torch.bincount`` in memory order, ``np.unique`` otherwise) and the voxel
    each row slices through (the largest component's, found in the label's box)."""
    from medseg.viz import _slice_centre, present_labels

    rng = np.random.default_rng(0)
    mask = np.zeros((30, 24, 20), np.uint8)
    mask[3:6, 3:6, 3:6] = 2  # a small component of label 2 ...
    mask[12:22, 10:20, 8:16] = 2  # ... and its largest one
    mask[rng.random(mask.shape) < 0.01] = 5
    for arr in (mask, np.asfortranarray(mask), mask[::-1, :, ::-1], mask.transpose(2, 0, 1)[:, 2:, :]):
        assert present_labels(arr) == [int(k) for k in np.unique(arr) if k]
    assert present_labels(mask.astype(np.int16)) == [2, 5]
    assert present_labels(mask == 2) == [1]
    assert present_labels(np.zeros((3, 3, 3), np.uint8)) == []
    centre = _slice_centre(mask, 2)
    assert mask[tuple(centre)] == 2
    assert all(lo <= c < hi for c, lo, hi in zip(centre, (12, 10, 8), (22, 20, 16), strict=True))


def _image(array: np.ndarray, **meta):
    from medseg.io import Volume

    return Volume(array.astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]), meta)


def test_input_flags_name_what_a_ct_model_does_not_expect():
    from medseg.report import input_flags

    ct, _ = make_case(0, size=24)
    assert input_flags([ct], ["ct"]) == []
    # the same scan without air: an MR's range, or stored values without their -1024 rescale
    shifted = _image(np.asarray(ct.array) + 1024.0)
    (flag,) = input_flags([shifted], ["ct"])
    assert "no air" in flag
    assert "trained on CT" in flag
    # a DICOM series of another modality is named as such, whatever its values
    mr = _image(np.asarray(ct.array), source_format="dicom", modality="MR")
    (flag,) = input_flags([mr], ["ct"])
    assert flag.startswith("the series is MR, but the model was trained on CT")
    # channels normalised per image are not judged by their values; several channels are numbered
    assert input_flags([shifted], ["mr"]) == []
    (flag,) = input_flags([ct, shifted], ["ct", "ct"])
    assert flag.startswith("channel 1: no air")


def test_input_flags_name_voxels_far_coarser_than_the_models():
    from medseg.io import Volume
    from medseg.report import input_flags

    ct, _ = make_case(0, size=24)
    thick = Volume(np.asarray(ct.array), np.diag([0.8, 0.8, 8.0, 1.0]), {})
    (flag,) = input_flags([thick], ["ct"], (1.5, 1.5, 2.5))
    assert flag.startswith("voxels 8 mm apart along one axis, 3.2x the model's 2.5 mm")
    assert input_flags([thick], ["ct"], (1.5, 1.5, 4.0)) == []  # 2x: within what resampling bridges
    assert input_flags([thick], ["ct"]) == []


def test_input_flags_name_a_label_map_given_as_the_image():
    from medseg.report import input_flags

    ct, label = make_case(0, size=24)
    as_image = _image(np.asarray(label.array))
    for kind in ("ct", "mr"):
        (flag,) = input_flags([as_image], [kind])
        assert flag == "only 4 distinct whole values (0 to 3): a label map given as the image?"
    assert input_flags([_image(np.full((8, 8, 8), -1024.0))], ["ct"]) == [
        "every voxel sampled is -1024: an empty image"
    ]
    # an MR of few grey levels is still a scan: a real one has hundreds
    mr = _image(np.round(np.asarray(ct.array) / 10.0) + 200.0)
    assert input_flags([mr], ["mr"]) == []


def test_input_flags_reach_the_case_warnings_first():
    ct, label = make_case(1, size=24)
    qc = case_qc("c", ct, np.asarray(label.array), labels=LABELS, overlay=False, input_warnings=["odd input"])
    assert qc.warnings[0] == "odd input"


def test_an_mr_dicom_series_given_to_a_ct_model_is_named_mr(tmp_path):
    """Through the real DICOM reader: a one-channel synthetic MR study is MR Image Storage (it was written
    as CT before), its values as the NIfTI holds them, and a CT model's input check says what it is."""
    import nibabel as nib

    from medseg.io import load_volume
    from medseg.report import input_flags
    from medseg.synthetic import make_dataset

    make_dataset(tmp_path / "mr", cases=2, size=16, seed=3, dicom=True, modality="mr", channels=1)
    series = load_volume(tmp_path / "mr" / "dicom" / "case_000")
    assert series.meta["modality"] == "MR"
    nifti = np.asarray(nib.load(tmp_path / "mr" / "imagesTr" / "case_000.nii.gz").dataobj)
    assert np.allclose(np.sort(series.array.ravel()), np.sort(np.rint(nifti.ravel())), atol=0.5)
    (flag,) = input_flags([series], ["ct"])
    assert flag.startswith("the series is MR, but the model was trained on CT")
