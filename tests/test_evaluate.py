"""`medseg evaluate`: Dice, HD95, surface Dice and volumes agree with independent computations."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from medseg.io import Volume, write_nifti
from medseg.metrics import dice, hd95, surface_dice
from tests.conftest import run_cli


def _surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Surface voxels by brute force: a mask voxel with a 6-neighbour outside (or the grid edge)."""
    padded = np.pad(mask, 1)
    pts = []
    for i, j, k in np.argwhere(mask):
        i1, j1, k1 = i + 1, j + 1, k + 1
        nb = [
            padded[i1 - 1, j1, k1],
            padded[i1 + 1, j1, k1],
            padded[i1, j1 - 1, k1],
            padded[i1, j1 + 1, k1],
            padded[i1, j1, k1 - 1],
            padded[i1, j1, k1 + 1],
        ]
        if not all(nb):
            pts.append((i, j, k))
    return np.asarray(pts, float) * np.asarray(spacing, float)


def _brute_hd95_and_nsd(pred, ref, spacing, tol):
    a, b = _surface_points(pred, spacing), _surface_points(ref, spacing)
    d = cdist(a, b)
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    hd = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    nsd = ((d_ab <= tol).sum() + (d_ba <= tol).sum()) / (len(d_ab) + len(d_ba))
    return hd, nsd


def _sphere(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) * np.asarray(spacing)
    return np.linalg.norm(idx - np.asarray(centre) * np.asarray(spacing), axis=-1) <= radius


def test_known_answers():
    # two cubes, one shifted by 3 voxels of 2 mm along x: every distance is 0 or 6 mm along x ...
    ref = np.zeros((20, 12, 12), bool)
    ref[4:12, 3:9, 3:9] = True
    pred = np.roll(ref, 3, axis=0)
    spacing = (2.0, 1.0, 1.0)
    assert dice(pred, ref) == pytest.approx(2 * 5 / 16)
    assert hd95(pred, ref, spacing) == pytest.approx(6.0)
    # identical masks: 0 mm, surface Dice 1
    assert hd95(ref, ref, spacing) == 0.0
    assert surface_dice(ref, ref, spacing, tolerance_mm=0.5) == 1.0
    # concentric cubes 2 voxels apart on every side (1 mm voxels): HD95 of the outer surface is >= 2 mm
    outer = np.zeros((16, 16, 16), bool)
    outer[2:14, 2:14, 2:14] = True
    inner = np.zeros_like(outer)
    inner[4:12, 4:12, 4:12] = True
    hd, nsd = _brute_hd95_and_nsd(inner, outer, (1, 1, 1), 1.0)
    assert hd95(inner, outer, (1, 1, 1)) == pytest.approx(hd)
    assert hd >= 2.0
    assert surface_dice(inner, outer, (1, 1, 1), tolerance_mm=1.0) == pytest.approx(nsd)
    assert surface_dice(inner, outer, (1, 1, 1), tolerance_mm=1.0) == 0.0  # nothing within 1 mm


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.3, 2.5)])
def test_agrees_with_brute_force_and_monai(spacing):
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    shape = (22, 20, 14)
    ref = _sphere(shape, (10, 10, 7), 6.5, spacing)
    pred = _sphere(shape, (11.5, 9, 7.5), 5.5, spacing)
    pred[2:4, 2:4, 2:4] = True  # a stray blob far away: HD95 must see it
    hd, nsd = _brute_hd95_and_nsd(pred, ref, spacing, 2.0)
    assert hd95(pred, ref, spacing) == pytest.approx(hd, rel=1e-6)
    assert surface_dice(pred, ref, spacing, tolerance_mm=2.0) == pytest.approx(nsd, rel=1e-6)
    as_onehot = lambda m: torch.as_tensor(np.stack([~m, m])[None].astype(np.float32))
    monai_hd = compute_hausdorff_distance(
        as_onehot(pred), as_onehot(ref), percentile=95, spacing=list(spacing)
    ).item()
    assert hd95(pred, ref, spacing) == pytest.approx(monai_hd, rel=1e-4)
    monai_nsd = compute_surface_dice(as_onehot(pred), as_onehot(ref), [2.0], spacing=list(spacing)).item()
    assert surface_dice(pred, ref, spacing, tolerance_mm=2.0) == pytest.approx(monai_nsd, abs=0.02)


def test_empty_conventions():
    empty = np.zeros((6, 6, 6), bool)
    full = empty.copy()
    full[2:4, 2:4, 2:4] = True
    assert (
        dice(empty, empty),
        hd95(empty, empty, (1, 1, 1)),
        surface_dice(empty, empty, (1, 1, 1), tolerance_mm=1),
    ) == (
        1.0,
        0.0,
        1.0,
    )
    for a, b in ((empty, full), (full, empty)):
        assert dice(a, b) == 0.0
        assert math.isnan(hd95(a, b, (1, 1, 1)))
        assert surface_dice(a, b, (1, 1, 1), tolerance_mm=1) == 0.0


def _write(path, array, affine):
    write_nifti(Volume(array.astype(np.uint8), affine, meta={"kind": "label"}), path, dtype="uint8")


def test_cli_evaluate_folders(tmp_path):
    spacing = (1.5, 1.0, 2.0)
    affine = np.diag([*spacing, 1.0])
    shape = (24, 26, 14)
    ref_a = _sphere(shape, (10, 12, 7), 7.0, spacing).astype(np.uint8)
    ref_a[18:22, 18:22, 4:8] = 2
    pred_a = np.roll(ref_a, 1, axis=1)
    ref_b = np.zeros(shape, np.uint8)
    ref_b[5:9, 5:9, 5:9] = 1  # label 2 absent in both -> both-empty convention
    pred_b = np.zeros(shape, np.uint8)  # label 1 missed -> one-empty convention
    for name, arr in (("a", ref_a), ("b", ref_b)):
        _write(tmp_path / "ref" / f"{name}.nii.gz", arr, affine)
    for name, arr in (("a", pred_a), ("b", pred_b)):
        _write(tmp_path / "pred" / f"{name}_seg.nii.gz", arr, affine)
    (tmp_path / "pred" / "a_seg.json").write_text(
        json.dumps({"labels": {"0": "bg", "1": "liver", "2": "kidney"}})
    )
    proc = run_cli(
        "evaluate",
        "--pred",
        "pred",
        "--ref",
        "ref",
        "--out",
        "m.csv",
        "--tolerance",
        "1.5",
        cwd=tmp_path,
        check=True,
    )
    assert "| liver |" in proc.stdout
    assert "| kidney |" in proc.stdout
    assert "1 undefined" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert len(rows) == 4
    by = {(r["case"], r["name"]): r for r in rows}
    liver = by[("a", "liver")]
    spacing_hd, nsd = _brute_hd95_and_nsd(pred_a == 1, ref_a == 1, spacing, 1.5)
    assert float(liver["dice"]) == pytest.approx(dice(pred_a == 1, ref_a == 1), abs=1e-6)
    assert float(liver["hd95_mm"]) == pytest.approx(spacing_hd, abs=1e-3)
    assert float(liver["surface_dice_1.5mm"]) == pytest.approx(nsd, abs=1e-5)
    assert float(liver["ref_ml"]) == pytest.approx((ref_a == 1).sum() * 3.0 / 1000, abs=1e-4)
    assert by[("b", "liver")]["hd95_mm"] == ""
    assert float(by[("b", "liver")]["dice"]) == 0.0
    assert float(by[("b", "kidney")]["dice"]) == 1.0
    summary = json.loads((tmp_path / "m.json").read_text())
    assert summary["labels"]["liver"]["hd95_undefined"] == 1
    assert summary["labels"]["liver"]["mean_hd95_mm"] == pytest.approx(spacing_hd, abs=1e-3)
    assert summary["labels"]["liver"]["median_dice"] == pytest.approx(float(liver["dice"]) / 2, abs=1e-5)
    assert summary["cases"][2]["hd95_mm"] is None

    # a grid mismatch is an error naming both files
    _write(tmp_path / "pred" / "a_seg.nii.gz", pred_a, np.diag([1.0, 1.0, 2.0, 1.0]))
    proc = run_cli("evaluate", "--pred", "pred", "--ref", "ref", cwd=tmp_path)
    assert proc.returncode == 2
    assert "a_seg.nii.gz" in proc.stderr
    assert "a.nii.gz" in proc.stderr.replace("a_seg.nii.gz", "")
