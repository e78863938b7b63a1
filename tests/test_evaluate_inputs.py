"""``evaluate`` never writes over what it reads, and says which predictions and references went unmatched."""

from __future__ import annotations

import csv
import json
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


def _evaluate(capsys, tmp_path, pred, ref, *extra: str) -> tuple[int, str]:
    from medseg.cli import main

    code = main(
        ["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "m.csv"), *extra]
    )
    return code, capsys.readouterr().err


def _dataset_json(path: Path, labels: dict) -> Path:
    path.write_text(json.dumps({"name": "refs", "labels": labels}))
    return path


def test_evaluate_takes_the_references_dataset_json_when_it_matches_the_model(folders, tmp_path, capsys):
    pred, ref = folders
    # the sidecar's scheme, as Decathlon writes it and as nnU-Net v2 does (name -> value, other case)
    for labels in (
        {"0": "background", "1": "liver", "2": "spleen", "3": "kidney"},
        {"background": 0, "Liver": 1, "Spleen": 2, "Kidney": 3},
    ):
        spec = _dataset_json(tmp_path / "dataset.json", labels)
        code, err = _evaluate(capsys, tmp_path, pred, ref, "--labels", str(spec))
        assert code == 0, err
        assert {r["name"] for r in csv.DictReader((tmp_path / "m.csv").open())} == {
            "liver",
            "spleen",
            "kidney",
        }


def test_evaluate_refuses_references_labelled_another_way(folders, tmp_path, capsys):
    pred, ref = folders
    # the synthetic dataset's own scheme: 2 is kidney and 3 spleen, the model's sidecar says the reverse
    spec = _dataset_json(
        tmp_path / "dataset.json", {"0": "background", "1": "liver", "2": "kidney", "3": "spleen"}
    )
    code, err = _evaluate(capsys, tmp_path, pred, ref, "--labels", str(spec))
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "label scheme" in line
    assert str(spec) in line
    assert "a_seg.json" in line
    assert "label 2 is 'kidney' vs 'spleen'" in line
    assert not (tmp_path / "m.csv").exists()
    # a scheme with another set of labels is refused too
    spec = _dataset_json(tmp_path / "dataset.json", {"0": "background", "1": "liver", "2": "spleen"})
    code, err = _evaluate(capsys, tmp_path, pred, ref, "--labels", str(spec))
    assert code == 2
    assert "label 3 is 'absent' vs 'kidney'" in err


def test_evaluate_refuses_a_reference_with_values_outside_the_scheme(folders, tmp_path, capsys):
    from medseg.io import read_nifti

    pred, ref = folders
    label = read_nifti(ref / "a.nii.gz", kind="label")
    array = label.array.copy()
    array[0, 0, :2] = (7, 9)
    write_nifti(label.with_array(array), ref / "a.nii.gz")
    code, err = _evaluate(capsys, tmp_path, pred, ref)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert str(ref / "a.nii.gz") in line
    assert "label value(s) 7, 9 outside the label scheme" in line
    assert "a_seg.json" in line  # where the scheme came from
    # the references' own dataset.json names the scheme when the masks have no sidecar
    (pred / "a_seg.json").unlink()
    spec = _dataset_json(
        tmp_path / "dataset.json", {"0": "background", "1": "liver", "2": "spleen", "3": "x"}
    )
    code, err = _evaluate(capsys, tmp_path, pred, ref, "--labels", str(spec))
    assert code == 2
    assert "label value(s) 7, 9 outside the label scheme (" + str(spec) in err
    # with no scheme named anywhere (no sidecar, no --model, no --labels) the values found are evaluated
    code, err = _evaluate(capsys, tmp_path, pred, ref)
    assert code == 0, err
    assert {r["label"] for r in csv.DictReader((tmp_path / "m.csv").open())} >= {"7", "9"}


def test_evaluate_takes_the_model_scheme_from_a_bundle(folders, tmp_path, capsys):
    import torch

    from medseg.bundle import save_bundle
    from medseg.config import config_from_dict
    from medseg.models import build_model

    pred, ref = folders
    labels = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}
    cfg = config_from_dict(
        {"labels": labels, "model": {"features": 4, "depth": 2}, "train": {"patch_size": [16, 16, 16]}}
    )
    torch.manual_seed(0)
    bundle = save_bundle(tmp_path / "bundle", build_model(cfg.model, out_channels=4), cfg, {})
    (pred / "a_seg.json").unlink()  # the bundle alone names the labels
    code, err = _evaluate(capsys, tmp_path, pred, ref, "-m", str(bundle))
    assert code == 0, err
    assert {r["name"] for r in csv.DictReader((tmp_path / "m.csv").open())} == {"liver", "spleen", "kidney"}
    # references from a dataset whose labels differ from the bundle's
    spec = _dataset_json(tmp_path / "dataset.json", {"0": "background", "1": "organ"})
    code, err = _evaluate(capsys, tmp_path, pred, ref, "-m", str(bundle), "--labels", str(spec))
    assert code == 2
    assert str(bundle) in err
    assert "label 1 is 'organ' vs 'liver'" in err
    # predictions whose sidecar records another scheme than the bundle named
    (pred / "a_seg.json").write_text(json.dumps({"labels": {"0": "background", "1": "tumour"}}))
    code, err = _evaluate(capsys, tmp_path, pred, ref, "-m", str(bundle))
    assert code == 2
    assert "a_seg.json" in err
    assert "another label scheme" in err


def test_evaluate_refuses_predictions_from_models_with_different_schemes(folders, tmp_path, capsys):
    pred, ref = folders
    from medseg.io import read_nifti

    write_nifti(read_nifti(ref / "b.nii.gz", kind="label"), pred / "b_seg.nii.gz")
    (pred / "b_seg.json").write_text(json.dumps({"labels": {"0": "background", "1": "tumour"}}))
    code, err = _evaluate(capsys, tmp_path, pred, ref)
    assert code == 2
    assert "b_seg.json" in err
    assert "a_seg.json" in err
    assert "different models" in err
