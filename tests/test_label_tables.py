"""Label tables beside a mask, parsed back as ITK-SNAP and 3D Slicer read them; names inside the NIfTI."""

from __future__ import annotations

import shlex

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import OutputError
from medseg.io import Volume, write_mask
from medseg.io.labeltables import label_table_paths, write_label_tables
from medseg.io.nifti import read_label_names
from medseg.viz import label_colour

LABELS = {0: "background", 1: "liver", 2: "kidney left", 3: 'odd "quoted" name', 12: "pancreas"}


def parse_itksnap(text: str) -> dict[int, tuple[tuple[int, int, int], float, int, int, str]]:
    """ITK-SNAP's reader: comment lines start with #; then IDX R G B A VIS MSH "LABEL"."""
    rows = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = shlex.split(line)
        assert len(fields) == 8, line
        idx, r, g, b = (int(f) for f in fields[:4])
        rows[idx] = ((r, g, b), float(fields[4]), int(fields[5]), int(fields[6]), fields[7])
    return rows


def parse_ctbl(text: str) -> dict[int, tuple[str, tuple[int, int, int, int]]]:
    """Slicer's colour table reader: whitespace-separated index name R G B A, # comments."""
    rows = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        idx, name, *rgba = line.split()
        assert len(rgba) == 4, line
        rows[int(idx)] = (name, tuple(int(v) for v in rgba))
    return rows


def palette_rgb(value: int) -> tuple[int, int, int]:
    return tuple(round(float(c) * 255) for c in label_colour(value))


def test_tables_parse_back_with_the_report_colours(tmp_path):
    itksnap, ctbl = write_label_tables(tmp_path / "case_seg.nii.gz", LABELS)
    assert (itksnap.name, ctbl.name) == ("case_seg.itksnap.txt", "case_seg.ctbl")
    snap = parse_itksnap(itksnap.read_text())
    assert sorted(snap) == sorted(LABELS)
    for value, name in LABELS.items():
        rgb, alpha, visible, mesh, text = snap[value]
        assert rgb == palette_rgb(value)
        assert text == name.replace('"', "'")
        assert (alpha, visible, mesh) == ((0.0, 0, 0) if value == 0 else (1.0, 1, 1))
    slicer = parse_ctbl(ctbl.read_text())
    assert sorted(slicer) == sorted(LABELS)
    assert slicer[2] == ("kidney_left", (*palette_rgb(2), 255))
    assert slicer[12][1][:3] == palette_rgb(12)
    assert slicer[0] == ("background", (0, 0, 0, 0))
    assert len({slicer[v][1] for v in LABELS}) == len(LABELS)  # distinct colours
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_seg.ctbl", "case_seg.itksnap.txt"]


def test_background_is_added_when_missing(tmp_path):
    itksnap, ctbl = write_label_tables(tmp_path / "a_seg.nrrd", {1: "spleen"})
    assert itksnap.name == "a_seg.itksnap.txt"
    assert parse_itksnap(itksnap.read_text())[0][4] == "background"
    assert parse_ctbl(ctbl.read_text())[1][0] == "spleen"


def test_both_tables_or_neither(tmp_path):
    mask = tmp_path / "case_seg.nii.gz"
    itksnap, ctbl = label_table_paths(mask)
    ctbl.mkdir()  # the second rename fails: the first file must not appear either
    with pytest.raises(OutputError):
        write_label_tables(mask, LABELS)
    assert not itksnap.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_seg.ctbl"]


def test_write_mask_with_tables_and_embedded_names(tmp_path):
    source = Volume(np.zeros((6, 5, 4), np.float32), np.diag([0.8, 0.8, 2.5, 1.0]), source="x.nii.gz")
    mask = np.zeros(source.shape, np.uint8)
    mask[1:3, 1:3, 1:3] = 12
    path = write_mask(mask, source, tmp_path / "x_seg.nii.gz", labels=LABELS, label_tables=True)
    assert read_label_names(path) == LABELS
    img = nib.load(path)
    assert [e.get_code() for e in img.header.extensions] == [6]  # a comment extension
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)
    assert parse_ctbl((tmp_path / "x_seg.ctbl").read_text())[12][0] == "pancreas"
    assert parse_itksnap((tmp_path / "x_seg.itksnap.txt").read_text())[12][4] == "pancreas"


def test_palette_holds_matplotlibs_tab20b_and_tab20c():
    """Written out to spare the matplotlib import; it must stay the colours the pictures always had."""
    from matplotlib import colormaps

    from medseg.viz import PALETTE

    more = [colormaps[name](i)[:3] for name in ("tab20b", "tab20c") for i in range(20)]
    np.testing.assert_allclose(PALETTE[11:], np.asarray(more), atol=1e-6)
    assert PALETTE.shape == (51, 3)
    assert PALETTE[1:].sum(axis=1).min() > 0  # no label is black
