"""``evaluate`` never writes over what it reads, and says which predictions and references went unmatched."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.io import write_nifti
from tests.conftest import run_cli


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    from medseg.synthetic import make_case

    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for case, seed in (("a", 0), ("b", 1)):
        _, label = make_case(seed, size=16)
        write_nifti(label, ref / f"{case}.nii.gz")
    _, label = make_case(0, size=16)
    write_nifti(label, pred / "a_seg.nii.gz")
    (pred / "a_seg.json").write_text(
        '{"labels": {"0": "background", "1": "liver", "2": "spleen", "3": "kidney"}}'
    )
    write_nifti(label.with_array(label.array.astype("float32"), kind="image"), pred / "a_seg_prob_1.nii.gz")
    write_nifti(label, pred / "extra_seg.nii.gz")
    return pred, ref


@pytest.mark.parametrize("out", ["ref/a.nii.gz", "pred/a_seg.nii.gz", "pred/a_seg.csv"])
def test_evaluate_refuses_to_write_over_its_inputs(folders, tmp_path, out, capsys):
    from medseg.cli import main

    pred, ref = folders
    before = {p: p.read_bytes() for p in [*pred.iterdir(), *ref.iterdir()]}
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / out)])
    assert code == 2
    assert "is an input of evaluate" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in [*pred.iterdir(), *ref.iterdir()]} == before


def test_evaluate_warns_about_unmatched_cases(folders, tmp_path):
    pred, ref = folders
    proc = run_cli(
        "evaluate", "--pred", str(pred), "--ref", str(ref), "--out", "m.csv", cwd=tmp_path, check=True
    )
    assert "1 prediction(s) have no reference" in proc.stderr
    assert "extra" in proc.stderr
    assert "1 reference case(s) have no prediction: b" in proc.stderr
    assert "prob" not in proc.stderr  # probability maps are not predictions
    assert (tmp_path / "m.csv").read_text().count("\na,") == 3
