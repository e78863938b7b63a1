"""Batch inference bookkeeping: a case is done only when its sidecar lists every output it owes, re-runs
redo what is incomplete, the report covers every case in the folder, signals roll back and report, inputs
are never outputs. A tiny untrained bundle is enough: these tests are about files, not accuracy."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from medseg.errors import InputError, StoppedError
from medseg.io import write_nifti
from tests.conftest import run_cli

TINY = {
    "labels": {0: "background", 1: "liver", 2: "spleen", 3: "kidney"},
    "preprocess": {
        "spacing": [2.0, 2.0, 3.0],
        "intensity": {"kind": "ct", "window": [-200.0, 300.0], "mean": 50.0, "std": 100.0},
    },
    "model": {"features": 4, "depth": 2},
    "train": {"patch_size": [16, 16, 16]},
    "tracking": {"enabled": False},
}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """An untrained tiny bundle (random weights: varied probabilities, no training time)."""
    import torch

    from medseg.bundle import save_bundle
    from medseg.config import config_from_dict
    from medseg.models import build_model

    cfg = config_from_dict(TINY)
    torch.manual_seed(0)
    network = build_model(cfg.model, out_channels=4)
    return save_bundle(tmp_path_factory.mktemp("bundle") / "bundle", network, cfg, {})


@pytest.fixture
def inputs(tmp_path) -> Path:
    from medseg.synthetic import make_case

    folder = tmp_path / "inputs"
    for i in range(3):
        image, _ = make_case(i, size=24)
        write_nifti(image, folder / f"case{i}.nii.gz")
    return folder


def _run(bundle_dir, inputs, out, **options):
    from medseg.batch import run_inference
    from medseg.bundle import load_bundle

    return run_inference([load_bundle(bundle_dir)], [inputs], out, **options)


def test_sidecar_is_written_last_and_names_every_output(bundle_dir, inputs, tmp_path):
    out = tmp_path / "out"
    summary = _run(bundle_dir, inputs, out, save_probabilities=True, report=True)
    assert len(summary.written) == 3
    sidecar = json.loads((out / "case0_seg.json").read_text())
    assert sidecar["outputs"][0] == "case0_seg.nii.gz"
    assert set(sidecar["outputs"]) >= {
        "case0_seg_prob_1.nii.gz",
        "case0_seg_prob_3.nii.gz",
        "case0_seg_entropy.nii.gz",
        "case0_seg_qc.png",
    }
    assert all((out / name).is_file() for name in sidecar["outputs"])
    assert sidecar["options"]["tta"] is False
    assert sidecar["options"]["precision"] in {"fp32", "bf16"}
    assert sidecar["provenance"]["device"] == "cpu"
    assert sidecar["provenance"]["timestamp"].endswith("Z")
    assert sidecar["provenance"]["medseg_version"]
    assert all(len(m["bundle_hash"]) >= 12 for m in sidecar["provenance"]["models"])
    assert {s["name"] for s in sidecar["qc"]["structures"]} == {"liver", "spleen", "kidney"}
    # the sidecar is the last file of the case to be written
    mtimes = {name: (out / name).stat().st_mtime_ns for name in sidecar["outputs"]}
    assert (out / "case0_seg.json").stat().st_mtime_ns >= max(mtimes.values())


def test_a_mask_without_its_sidecar_is_redone(bundle_dir, inputs, tmp_path):
    """An export killed between the mask and the sidecar (or a disk full at the sidecar) is finished next time."""
    out = tmp_path / "out"
    _run(bundle_dir, inputs, out)
    (out / "case1_seg.json").unlink()
    (out / "case2_seg.json").write_text('{"outputs": ["case2_seg.nii.gz"')  # truncated write
    summary = _run(bundle_dir, inputs, out)
    assert sorted(p.name for p in summary.written) == ["case1_seg.nii.gz", "case2_seg.nii.gz"]
    assert [p.name for p in summary.skipped] == ["case0_seg.nii.gz"]
    assert json.loads((out / "case1_seg.json").read_text())["outputs"] == [
        "case1_seg.nii.gz",
        "case1_seg.itksnap.txt",
        "case1_seg.ctbl",
    ]


def test_done_is_decided_per_requested_output(bundle_dir, inputs, tmp_path):
    out = tmp_path / "out"
    _run(bundle_dir, inputs, out)
    # probability maps were not written: every case owes them now
    summary = _run(bundle_dir, inputs, out, save_probabilities=True)
    assert len(summary.written) == 3
    assert (out / "case0_seg_entropy.nii.gz").is_file()
    # a deleted probability map makes its case incomplete
    (out / "case2_seg_prob_2.nii.gz").unlink()
    summary = _run(bundle_dir, inputs, out, save_probabilities=True)
    assert [p.name for p in summary.written] == ["case2_seg.nii.gz"]
    # TTA changes no file name: the cases are done, and the run says they were done without it
    summary = _run(bundle_dir, inputs, out, tta=True)
    assert (len(summary.written), len(summary.skipped)) == (0, 3)
    assert len(summary.differing) == 3
    assert "tta False (now True)" in summary.differing[0][1]


def test_report_is_rebuilt_from_every_sidecar(bundle_dir, inputs, tmp_path):
    from medseg.batch import run_inference
    from medseg.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    out = tmp_path / "out"
    run_inference([bundle], [inputs / "case0.nii.gz"], out, report=True)
    # a later run without the report, then one with it on other cases: the report holds all three
    run_inference([bundle], [inputs / "case1.nii.gz"], out, report=False)
    summary = run_inference([bundle], [inputs / "case2.nii.gz"], out, report=True)
    report = summary.report.read_text()
    for name in ("case0", "case1", "case2"):
        assert f'id="case-{name}"' in report
    # case1 was segmented without the report: its figures are in, its overlay is not
    assert report.count('<img class="overlay"') == 2
    # re-running case1 with the report draws its missing overlay without segmenting it again
    summary = run_inference([bundle], [inputs / "case1.nii.gz"], out, report=True)
    assert summary.written == []
    assert (out / "case1_seg_qc.png").is_file()
    assert summary.report.read_text().count('<img class="overlay"') == 3


def _signal_process(signum: int) -> None:
    """The signal as a scheduler or Ctrl-C sends it: to the process, whatever thread takes it (with
    OpenVINO loaded by earlier tests: see test_backends' signal-stack test)."""
    os.kill(os.getpid(), signum)


def test_sigterm_rolls_back_the_current_case_and_writes_the_report(bundle_dir, inputs, tmp_path, monkeypatch):
    import medseg.batch

    real = medseg.batch.ensemble_to_source_grid
    calls = []

    def predict_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # pre-empted while the second case is predicted
            _signal_process(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(medseg.batch, "ensemble_to_source_grid", predict_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    with pytest.raises(StoppedError) as err:
        _run(bundle_dir, inputs, out, report=True)
    assert err.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is put back
    assert (out / "case0_seg.json").is_file()
    assert not (out / "case1_seg.nii.gz").exists()  # rolled back, not left half-done
    assert not (out / "case1_seg.json").exists()
    assert not (out / "case2_seg.nii.gz").exists()
    assert not list(out.glob(".*partial*"))
    assert 'id="case-case0"' in (out / "report.html").read_text()
    # the next run finishes the batch
    monkeypatch.setattr(medseg.batch, "ensemble_to_source_grid", real)
    summary = _run(bundle_dir, inputs, out)
    assert (len(summary.written), len(summary.skipped)) == (2, 1)


def test_cli_exit_code_on_sigint_is_130(bundle_dir, inputs, tmp_path, monkeypatch):
    import medseg.batch
    from medseg.cli import main

    real = medseg.batch.ensemble_to_source_grid

    def predict_then_interrupt(*args, **kwargs):
        _signal_process(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(medseg.batch, "ensemble_to_source_grid", predict_then_interrupt)
    code = main(
        ["infer", "--model", str(bundle_dir), "--input", str(inputs), "--output", str(tmp_path / "o")]
    )
    assert code == 130
    assert not list((tmp_path / "o").glob("*_seg.nii.gz"))


def test_outputs_never_land_on_or_inside_inputs(bundle_dir, inputs, tmp_path):
    for out in (inputs, inputs / "pred"):
        proc = run_cli(
            "infer", "--model", str(bundle_dir), "--input", str(inputs), "--output", str(out), cwd=tmp_path
        )
        assert proc.returncode == 2, proc.stderr
        assert "inside the input folder" in proc.stderr.strip().splitlines()[-1]
        assert proc.stderr.count("error") == 1
    assert not list(inputs.rglob("*_seg*"))
    # an input where an output of the run would go is refused before anything is written
    from medseg.batch import run_inference
    from medseg.bundle import load_bundle

    other = tmp_path / "out2" / "case0_seg.nii.gz"
    other.parent.mkdir()
    other.write_bytes((inputs / "case0.nii.gz").read_bytes())
    with pytest.raises(InputError, match="would be overwritten"):
        run_inference([load_bundle(bundle_dir)], [inputs / "case0.nii.gz", other], tmp_path / "out2")
    assert sorted(p.name for p in other.parent.iterdir()) == ["case0_seg.nii.gz"]


def test_medseg_outputs_and_dot_files_are_not_inputs(tmp_path):
    from medseg.io import find_inputs
    from medseg.synthetic import make_case

    image, label = make_case(0, size=16)
    write_nifti(image, tmp_path / "a.nii.gz")
    write_nifti(label, tmp_path / "a_seg.nii.gz")  # a manual reference or an earlier mask
    for name in ("a_seg_prob_1.nii.gz", "a_seg_entropy.nii.gz", "._a.nii.gz", ".hidden.nii.gz"):
        (tmp_path / name).write_bytes(b"not an image")
    (tmp_path / "a_seg.json").write_text("{}")
    assert find_inputs([tmp_path]) == [tmp_path / "a.nii.gz"]
    only_outputs = tmp_path / "outputs"
    only_outputs.mkdir()
    write_nifti(label, only_outputs / "a_seg.nii.gz")
    assert find_inputs([only_outputs]) == []
    assert find_inputs([tmp_path / "a_seg.nii.gz"]) == [tmp_path / "a_seg.nii.gz"]  # named explicitly: taken


@pytest.mark.parametrize("tta", [False, True])
def test_progress_counts_every_window_of_a_case(bundle_dir, tta):
    """Progress inside a case: the stages in order, and windows done up to exactly the total."""
    from medseg.bundle import load_bundle
    from medseg.predict import ensemble_to_source_grid
    from medseg.synthetic import make_case

    image, _ = make_case(5, size=40)
    calls: list[tuple[str, int, int]] = []
    ensemble_to_source_grid(
        [load_bundle(bundle_dir)], image, tta=tta, precision="fp32", progress=lambda *c: calls.append(c)
    )
    stages = [s for s, done, _ in calls if done == 0]
    assert stages == ["preprocess", "network", "invert", "postprocess"]
    windows = [(done, total) for s, done, total in calls if done]
    assert windows[-1][0] == windows[-1][1] > 1
    assert [d for d, _ in windows] == sorted({d for d, _ in windows})  # strictly increasing
    assert len({t for _, t in windows}) == 1
    if tta:
        assert windows[-1][1] % 8 == 0


def test_a_second_run_into_the_same_output_folder_is_refused(bundle_dir, inputs, tmp_path):
    """Two runs into one folder would mix masks of different models: the second is refused in one line."""
    from medseg.locks import exclusive

    out = tmp_path / "out"
    with exclusive(out, what="inference"):
        proc = run_cli(
            "infer", "--model", str(bundle_dir), "--input", str(inputs), "--output", str(out), cwd=tmp_path
        )
    assert proc.returncode == 2
    assert f"PID {os.getpid()}" in proc.stderr.strip().splitlines()[-1]
    assert not list(out.glob("*_seg*"))
    # the holder gone, the next run goes ahead
    run_cli(
        "infer",
        "--model",
        str(bundle_dir),
        "--input",
        str(inputs),
        "--output",
        str(out),
        cwd=tmp_path,
        check=True,
    )
    assert len(list(out.glob("*_seg.json"))) == 3


def test_a_failed_sidecar_write_rolls_the_case_back(bundle_dir, inputs, tmp_path, monkeypatch):
    """Disk full at the sidecar: the case fails, its mask is removed, and the next run finishes it."""
    import medseg.batch
    from medseg.errors import OutputError

    real = medseg.batch.write_text_atomic

    def full_disk(path, text, **kwargs):
        if Path(path).name == "case1_seg.json":
            raise OutputError(f"{path}: could not be written (No space left on device)")
        return real(path, text, **kwargs)

    monkeypatch.setattr(medseg.batch, "write_text_atomic", full_disk)
    out = tmp_path / "out"
    summary = _run(bundle_dir, inputs, out, save_probabilities=True)
    assert [p.name for p, _ in summary.failed] == ["case1.nii.gz"]
    assert "No space left" in summary.failed[0][1]
    assert not list(out.glob("case1_*"))
    monkeypatch.setattr(medseg.batch, "write_text_atomic", real)
    summary = _run(bundle_dir, inputs, out, save_probabilities=True)
    assert [p.name for p in summary.written] == ["case1_seg.nii.gz"]


@pytest.mark.slow
def test_sigkill_at_any_moment_then_a_rerun_completes_every_case(bundle_dir, inputs, tmp_path):
    """Wherever the kill lands (mid-mask, between mask and maps, before the sidecar), the re-run ends
    with every case complete: a sidecar listing every owed output, each of them present, no temp files."""
    import subprocess
    import sys
    import time

    from tests.helpers import REPO

    out = tmp_path / "out"
    args = [
        "infer",
        "-m",
        str(bundle_dir),
        "-i",
        str(inputs),
        "-o",
        str(out),
        "--save-probabilities",
        "--no-report",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "medseg", *args], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not list(out.glob("*_seg.nii.gz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    run_cli(*args, cwd=tmp_path, check=True)
    for i in range(3):
        sidecar = json.loads((out / f"case{i}_seg.json").read_text())
        owed = {
            f"case{i}_seg.nii.gz",
            f"case{i}_seg_entropy.nii.gz",
            *(f"case{i}_seg_prob_{k}.nii.gz" for k in (1, 2, 3)),
        }
        assert owed <= set(sidecar["outputs"])
        assert all((out / name).is_file() for name in owed)
    assert not [p for p in out.iterdir() if "partial" in p.name]


def test_a_case_unlike_the_training_ct_is_segmented_logged_and_listed_to_look_at(bundle_dir, tmp_path, caplog):
    """A CT model given an image without air (here the phantom shifted by +1024, as values stored without
    their rescale): the case is segmented, one warning names the file, and the report lists it."""
    import logging

    import numpy as np

    from medseg.io import Volume
    from medseg.synthetic import make_case

    folder = tmp_path / "inputs"
    image, _ = make_case(0, size=24)
    write_nifti(image, folder / "ct.nii.gz")
    write_nifti(Volume(np.asarray(image.array) + 1024.0, image.affine, image.meta), folder / "raw.nii.gz")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="medseg"):
        summary = _run(bundle_dir, folder, out, report=True)
    assert len(summary.written) == 2
    assert not any("no air" in w for w in json.loads((out / "ct_seg.json").read_text())["qc"]["warnings"])
    warnings = json.loads((out / "raw_seg.json").read_text())["qc"]["warnings"]
    assert "no air in the image" in warnings[0]
    logged = [r.getMessage() for r in caplog.records if "no air" in r.getMessage()]
    assert logged == [f"raw.nii.gz: {warnings[0]}"]
    report = (out / "report.html").read_text()
    look_at = next(line for line in report.splitlines() if "Cases to look at" in line)
    assert "raw" in look_at
    assert report.count("no air in the image") == 1
