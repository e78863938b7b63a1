"""Every config field and CLI flag is range-checked: a bad value is one line and exit 2, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.config import load_config
from medseg.errors import ConfigError
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]

BAD_OVERRIDES = {
    "train.batch_size=0": "train.batch_size",
    "train.patch_size=[0,0,0]": "train.patch_size",
    "train.lr=-1": "train.lr",
    "train.val_fraction=1.0": "train.val_fraction",
    "train.epochs=0": "train.epochs",
    "train.iterations_per_epoch=0": "train.iterations_per_epoch",
    "train.val_every=0": "train.val_every",
    "train.num_folds=1": "train.num_folds",
    "train.fold=5": "fold 5",
    "train.grad_clip=0": "train.grad_clip",
    "train.weight_decay=-0.1": "train.weight_decay",
    "train.num_workers=-1": "train.num_workers",
    "train.checkpoint_every_minutes=0": "train.checkpoint_every_minutes",
    "train.device=gpu": "train.device",
    "train.patch_size=[24,16,16]": "multiple of 16",
    "train.patch_size=[16.5,16,16]": "whole voxels",
    "augment.samples_per_volume=0": "augment.samples_per_volume",
    "augment.flip_prob=1.5": "augment.flip_prob",
    "augment.rotate_prob=-0.1": "augment.rotate_prob",
    "augment.zoom_range=[1.2,0.8]": "augment.zoom_range",
    "augment.low_res_zoom=[0,1]": "augment.low_res_zoom",
    "model.depth=9": "model.depth",
    "model.depth=0": "model.depth",
    "model.features=0": "model.features",
    "model.dropout=1.0": "model.dropout",
    "preprocess.spacing=[0,1,1]": "preprocess.spacing",
    "preprocess.orientation=RAX": "preprocess.orientation",
    "preprocess.intensity.window=[400,-100]": "preprocess.intensity.window",
    "preprocess.intensity.std=0": "preprocess.intensity.std",
    "infer.overlap=1.5": "infer.overlap",
    "infer.sw_batch_size=0": "infer.sw_batch_size",
    "tracking.http_timeout_s=0": "tracking.http_timeout_s",
    "seed=-1": "seed",
    "labels={0: bg, 300: x}": "labels",
}


@pytest.mark.parametrize("override", sorted(BAD_OVERRIDES))
def test_out_of_range_config_value_is_refused(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert BAD_OVERRIDES[override] in msg
    assert "\n" not in msg


def test_shipped_workflows_and_tiny_settings_pass(tmp_path):
    for path in sorted((REPO / "workflows").glob("*.yaml")):
        load_config(path)
    cfg = load_config(
        None,
        ["preprocess.spacing=[2,2,3]", "train.patch_size=[16,16,16]", "model.features=4", "model.depth=2"],
    )
    assert cfg.train.patch_size == (16.0, 16.0, 16.0)
    assert load_config(None, ["preprocess.orientation=lps"]).preprocess.orientation == "LPS"


def test_train_epochs_zero_is_one_line_exit_2(tmp_path):
    """train.epochs=0 exited 0 and printed a bundle path that did not exist."""
    for args in (["--epochs", "0"], ["--set", "train.epochs=0"]):
        proc = run_cli("train", "--data", str(tmp_path), "--out", "run", *args, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
        assert "epochs" in proc.stderr
        assert not (tmp_path / "run").exists()


BAD_FLAGS = {
    ("infer", "--overlap", "1.5"): "--overlap",
    ("infer", "--overlap", "nan"): "--overlap",
    ("infer", "--sw-batch-size", "0"): "--sw-batch-size",
    ("infer", "--device", "gpu"): "invalid choice 'gpu'",
    ("infer", "--input", "/dev/zero"): "not a file or folder",
    ("infer", "--input", "missing_scan.nii.gz"): "missing_scan.nii.gz: not found",
    ("infer", "--output", "a_file.txt"): "is not a folder",
    ("train", "--fold", "-1"): "--fold",
    ("synth", "--cases", "0"): "--cases",
    ("evaluate", "--tolerance", "-1"): "--tolerance",
}


@pytest.mark.parametrize("flag", sorted(BAD_FLAGS), ids=lambda f: "_".join(f).replace("/", ""))
def test_bad_flag_is_one_line_before_any_model_loads(tmp_path, flag):
    (tmp_path / "a_file.txt").write_text("x")
    (tmp_path / "scans").mkdir()
    command, name, value = flag
    base = {
        "infer": ["--model", "no_such_bundle", "--input", "scans", "--output", "out"],
        "train": ["--data", "no_such_dataset"],
        "synth": ["--out", "synth"],
        "evaluate": ["--pred", "p", "--ref", "r"],
    }[command]
    proc = run_cli(command, *base, name, value, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"medseg {command}: error:")
    assert BAD_FLAGS[flag] in proc.stderr
    assert "no_such" not in proc.stderr  # refused before the bundle or dataset was looked at
    assert not (tmp_path / "out").exists()


def test_version_short_flags_and_help():
    from medseg import __version__
    from medseg.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--version"])
    assert done.value.code == 0
    args = parser.parse_args(["infer", "-m", "b", "-i", str(REPO), "-o", "out"])
    assert (args.model, args.input, args.output) == (["b"], [str(REPO)], "out")
    assert __version__
    helps = {name: sub.format_help() for name, sub in parser._subparsers._group_actions[0].choices.items()}
    assert "examples:" in parser.format_help()
    assert "examples:" in helps["infer"]
    assert "examples:" in helps["train"]
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"medseg {name} {action.option_strings or action.dest}: no help text"
    assert "(default: 20)" in helps["synth"]
