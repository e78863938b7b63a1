"""Folds as nnU-Net trains them: a saved deterministic k-fold split, fold_<k> folders, fold all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.checkpoint import load_state
from medseg.data import Case, load_dataset
from medseg.errors import ConfigError, InputError
from medseg.folds import load_or_make_splits, make_splits, parse_folds
from tests.helpers import TINY_ARGS


def _cases(n: int) -> list[Case]:
    return [Case(f"case_{i:03d}", (Path(f"case_{i:03d}.nii.gz"),)) for i in range(n)]


@pytest.mark.parametrize(("n", "k"), [(12, 5), (7, 3), (5, 5)])
def test_split_is_disjoint_and_covers_every_case(n, k):
    cases = _cases(n)
    names = {c.name for c in cases}
    splits = make_splits(cases, num_folds=k, seed=0)
    assert len(splits) == k
    vals = [set(s["val"]) for s in splits]
    assert set().union(*vals) == names, "every case is validated in some fold"
    assert sum(len(v) for v in vals) == n, "and in one fold only"
    for split, val in zip(splits, vals, strict=True):
        assert val
        assert set(split["train"]) == names - val
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    assert make_splits(cases, num_folds=k, seed=0) == splits, "deterministic"
    assert make_splits(cases, num_folds=k, seed=1) != splits, "the seed decides the shuffle"


def test_saved_split_is_reused_and_checked(tmp_path):
    path = tmp_path / "run" / "splits.json"
    first = load_or_make_splits(path, _cases(10), num_folds=5, seed=0)
    assert json.loads(path.read_text()) == first
    # reused as saved (as nnU-Net's splits_final.json), whatever the seed now
    assert load_or_make_splits(path, _cases(10), num_folds=5, seed=7) == first
    with pytest.raises(ConfigError, match="has 5 folds"):
        load_or_make_splits(path, _cases(10), num_folds=3, seed=0)
    with pytest.raises(InputError, match="does not have"):
        load_or_make_splits(path, _cases(8), num_folds=5, seed=0)
    with pytest.raises(ConfigError, match="choose fewer folds"):
        make_splits(_cases(3), num_folds=5, seed=0)


def test_fold_values_are_checked():
    assert parse_folds([2, "all", 0, 2], 5) == [2, "all", 0]
    with pytest.raises(ConfigError, match=r"--fold 5: expected 0..4"):
        parse_folds([5], 5)


@pytest.mark.slow
def test_fold_0_and_all_train_into_their_folders(tiny_dataset, tmp_path, capsys):
    from medseg.cli import main

    out = tmp_path / "run"
    fast = [*TINY_ARGS, *("--set", "train.num_folds=2", "train.val_surface_metrics=false",
                          "tracking.log_model=false", "postprocess.tune_on_validation=false")]
    assert main(["train", "--data", str(tiny_dataset), "--out", str(out), "-f", "0", "all", "--epochs", "1",
                 *fast]) == 0
    training = [c.name for c in load_dataset(tiny_dataset).training]
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits) == 2
    assert sorted(splits[0]["train"] + splits[0]["val"]) == sorted(training)
    # fold 0 trained on its split; its own record says so
    fold0 = json.loads((out / "fold_0" / "splits.json").read_text())
    assert fold0["fold"] == 0
    assert (fold0["train"], fold0["val"]) == (splits[0]["train"], splits[0]["val"])
    assert (out / "fold_0" / "bundle" / "model.safetensors").is_file()
    # fold all: every case, validated on the training cases (said in the log)
    every = json.loads((out / "fold_all" / "splits.json").read_text())
    assert sorted(every["train"]) == sorted(every["val"]) == sorted(training)
    assert (out / "fold_all" / "bundle" / "model.safetensors").is_file()
    assert "validation runs on the training cases" in capsys.readouterr().err  # the CLI's log
    assert not (out / "fold_1").exists()

    # infer -m <out>: the fold bundles as one ensemble
    case = load_dataset(tiny_dataset).test[0]
    assert main(["infer", "-m", str(out), "-i", str(case.image), "-o", str(tmp_path / "masks"), "--no-report",
                 "--device", "cpu"]) == 0
    assert "ensemble of 2 bundles (fold_0/bundle, fold_all/bundle)" in capsys.readouterr().err
    assert (tmp_path / "masks" / f"{case.name}_seg.nii.gz").is_file()

    # the fold folder is one run: a second run without --resume is refused there, not elsewhere
    assert main(["train", "--data", str(tiny_dataset), "--out", str(out), "-f", "0", "--epochs", "1", *fast]) == 2
    # resumed on its own (no -f), fold all goes on with the cases it was trained on
    assert main(["train", "--data", str(tiny_dataset), "--out", str(out / "fold_all"), "--resume", "--epochs", "2",
                 *fast]) == 0
    assert json.loads((out / "fold_all" / "splits.json").read_text()) == every
    assert load_state(out / "fold_all" / "checkpoints" / "last.pt").epoch == 2
