"""Backends and export: ONNX / OpenVINO round trips, the parity record, ``auto``'s measured choice
and its fallbacks, and a backend failure as one line."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from medseg.backends import (
    BackendError,
    Predictor,
    build_predictor,
    bundle_hash,
    make_predictor,
    torch_predictor,
)
from medseg.bundle import load_bundle, save_bundle
from medseg.config import config_from_dict
from medseg.errors import ConfigError
from medseg.models import build_model

from .conftest import run_cli

LABELS = {0: "background", 1: "liver", 2: "kidney", 3: "spleen"}


@pytest.fixture(autouse=True)
def _measure_tiny_networks(monkeypatch):
    """These tiny networks are measured as a real one would be (auto skips networks this fast)."""
    import medseg.backends

    monkeypatch.setattr(medseg.backends, "MEASURE_ABOVE_S", 0.0)


def _tiny_config():
    return config_from_dict(
        {
            "labels": LABELS,
            "preprocess": {
                "spacing": [2, 2, 3],
                "intensity": {"kind": "ct", "window": [-200, 300], "mean": 50, "std": 100},
            },
            "model": {"features": 4, "depth": 2},
            "train": {"patch_size": [16, 16, 16]},
        }
    )


def _save_tiny_bundle(path: Path, seed: int = 0) -> Path:
    """Untrained weights: enough for speed and agreement checks, not for accuracy."""
    cfg = _tiny_config()
    torch.manual_seed(seed)
    return save_bundle(path, build_model(cfg.model, out_channels=len(LABELS)), cfg, {"note": "untrained"})


@pytest.fixture(scope="module")
def exported_pair(tmp_path_factory) -> tuple[Path, Path, str]:
    """A tiny bundle exported in every format into a copy, by the command a user runs."""
    root = tmp_path_factory.mktemp("bundle")
    source = _save_tiny_bundle(root / "src")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    proc = run_cli("export", "-m", str(source), "--format", "all", "-o", str(root / "out"), cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # the source bundle is untouched
    return source, root / "out", proc.stdout


@pytest.fixture(scope="module")
def exported_bundle(exported_pair) -> Path:
    return exported_pair[1]


def test_export_writes_files_and_parity_record(exported_bundle):
    meta = json.loads((exported_bundle / "metadata.json").read_text())
    assert meta["note"] == "untrained"  # what was there is kept
    onnx_rec, ov_rec = meta["exports"]["onnx"], meta["exports"]["openvino"]
    assert (exported_bundle / onnx_rec["file"]).is_file()
    assert (exported_bundle / ov_rec["file"]).is_file()
    assert (exported_bundle / ov_rec["weights_file"]).is_file()
    for record, run in ((onnx_rec, "onnxruntime/fp32"), (ov_rec, "openvino/fp32")):
        settings = record["parity"]["settings"]
        assert settings["reference"] == "torch fp32"
        assert settings["window_shape"] == [2, 1, 16, 16, 16]
        result = record["parity"]["results"][run]
        assert result["passed"]
        assert result["agreement"] >= 0.999
        assert set(result["dice"]) <= {"liver", "kidney", "spleen"}
        assert result["dice"]
    assert "openvino/bf16" in ov_rec["parity"]["results"]  # measured, or skipped with the reason


@pytest.mark.parametrize(("backend", "precision"), [("onnxruntime", "fp32"), ("openvino", "fp32")])
def test_exported_network_round_trip(exported_bundle, backend, precision):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    bundle = load_bundle(exported_bundle)
    x = torch.randn(3, 1, 16, 16, 16)  # a batch larger than the one compiled for, and then a smaller one
    expected = torch_predictor(bundle.network, "fp32", "cpu")(x)
    predictor = build_predictor(bundle, backend, precision, "cpu", window_shape=(2, 1, 16, 16, 16))
    assert predictor.backend == backend
    torch.testing.assert_close(predictor(x), expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(predictor(x[:1]), expected[:1], atol=1e-3, rtol=1e-3)


def test_export_command_prints_parity_and_refuses_unknown_formats(exported_pair, tmp_path):
    from medseg.export import export_bundle

    source, out, stdout = exported_pair
    assert "parity onnxruntime/fp32 vs torch fp32: agreement" in stdout
    assert "parity openvino/fp32 vs torch fp32: agreement" in stdout
    assert load_bundle(out).metadata["note"] == "untrained"
    assert "exports" not in load_bundle(source).metadata
    with pytest.raises(ConfigError, match=r"unknown export format 'tflite'.*onnx.*openvino"):
        export_bundle(source, "tflite", tmp_path / "x")


def test_auto_falls_back_to_torch_when_backends_missing(tmp_path, monkeypatch):
    bundle = load_bundle(_save_tiny_bundle(tmp_path / "b"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails, as when not installed
    monkeypatch.setitem(sys.modules, "openvino", None)
    predictor = make_predictor(bundle, "auto", "fp32", "cpu", cache_dir=tmp_path / "cache")
    assert (predictor.backend, predictor.precision) == ("torch", "fp32")
    assert "fallback" in predictor.reason
    assert "onnxruntime is not installed" in predictor.reason
    assert "openvino is not installed" in predictor.reason
    with pytest.raises(ConfigError, match="openvino is not installed"):
        make_predictor(bundle, "openvino", "fp32", "cpu", cache_dir=tmp_path / "cache")


def test_auto_falls_back_to_torch_when_parity_fails(tmp_path):
    """A stale export in the cache (other weights) is measured, fails parity, and is not chosen."""
    pytest.importorskip("onnxruntime")
    from medseg.export import export_onnx

    bundle = load_bundle(_save_tiny_bundle(tmp_path / "b", seed=0))
    other = load_bundle(_save_tiny_bundle(tmp_path / "other", seed=1))
    cache = tmp_path / "cache"
    stale = cache / "exports" / bundle_hash(bundle) / "model.onnx"
    export_onnx(other.network, stale, window_shape=(2, 1, 16, 16, 16))
    predictor = make_predictor(bundle, "auto", "fp32", "cpu", cache_dir=cache)
    assert (predictor.backend, predictor.precision) == ("torch", "fp32")
    assert "onnxruntime fp32: failed parity" in predictor.reason
    assert "openvino fp32: failed parity" in predictor.reason
    assert predictor.selection is not None
    assert not predictor.selection["cached"]


def test_auto_choice_is_cached_and_passes_parity(exported_bundle, tmp_path):
    bundle = load_bundle(exported_bundle)
    first = make_predictor(bundle, "auto", "auto", "cpu", cache_dir=tmp_path)
    assert first.selection is not None
    assert not first.selection["cached"]
    chosen = [
        c
        for c in first.selection["candidates"]
        if (c["backend"], c["precision"]) == (first.backend, first.precision)
    ]
    assert chosen[0]["passed"]
    assert {c["backend"] for c in first.selection["candidates"]} >= {"torch", "openvino"}
    again = make_predictor(bundle, "auto", "auto", "cpu", cache_dir=tmp_path)
    assert again.selection["cached"]
    assert again.name == first.name


def test_backend_failure_mid_batch_is_one_line(exported_bundle):
    from monai.inferers import sliding_window_inference

    bundle = load_bundle(exported_bundle)
    predictor = build_predictor(bundle, "openvino", "fp32", "cpu", window_shape=(2, 1, 16, 16, 16))
    image = torch.randn(1, 2, 40, 40, 40)  # two channels for a one-channel network: fails inside the runtime
    with pytest.raises(BackendError) as info:
        sliding_window_inference(image, (16, 16, 16), 2, predictor)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("backend openvino fp32 failed on a batch of shape")


def test_predictor_wraps_any_runtime_error():
    def broken(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("device lost\n  at layer 3\n  details")

    with pytest.raises(
        BackendError, match=r"^backend onnxruntime fp32 failed .*: device lost at layer 3 details$"
    ):
        Predictor("onnxruntime", "fp32", broken)(torch.zeros(1, 1, 4, 4, 4))


def test_unknown_backend_names_the_choices(exported_bundle):
    bundle = load_bundle(exported_bundle)
    with pytest.raises(ConfigError, match="onnxruntime, openvino"):
        make_predictor(bundle, "tensorrt", "fp32", "cpu")


def test_export_record_ignored_when_weights_change(exported_bundle, tmp_path):
    from medseg.backends import exported_file

    copy = tmp_path / "copy"
    shutil.copytree(exported_bundle, copy)
    _save_tiny_bundle(tmp_path / "new", seed=5)
    shutil.copy(tmp_path / "new" / "model.safetensors", copy / "model.safetensors")
    assert exported_file(load_bundle(copy), "onnx") is None
    assert exported_file(load_bundle(exported_bundle), "onnx") is not None


def _write_case(path: Path, seed: int) -> Path:
    from medseg.io import write_nifti
    from medseg.synthetic import make_case

    image, _ = make_case((seed, 1), size=32, orientation="LPS")
    return write_nifti(image, path, dtype="int16")


def test_infer_command_records_backend_in_sidecar(exported_bundle, tmp_path):
    image = _write_case(tmp_path / "in" / "case.nii.gz", 0)
    proc = run_cli(
        "infer", "--model", str(exported_bundle), "--input", str(image), "--output", str(tmp_path / "out"),
        "--backend", "openvino", "--precision", "fp32", "--device", "cpu", "--no-report", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads((tmp_path / "out" / "case_seg.json").read_text())
    assert sidecar["backend"]["backend"] == "openvino"
    assert sidecar["backend"]["reason"] == "openvino fp32: requested"


def test_backend_failure_mid_batch_is_one_line_and_the_batch_goes_on(
    exported_bundle, tmp_path, monkeypatch, caplog
):
    """A runtime error inside the backend on one window batch: that case fails with one line, the next runs."""
    import medseg.backends as backends
    from medseg.batch import run_inference

    real = backends.openvino_predictor
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        predictor = real(*args, **kwargs)
        run = predictor.run

        def failing_once(batch):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError(
                    "Exception from src/plugins/intel_cpu/src/node.cpp:\nout of memory\n  at conv 3"
                )
            return run(batch)

        predictor.run = failing_once
        return predictor

    monkeypatch.setattr(backends, "openvino_predictor", flaky)
    inputs = [_write_case(tmp_path / "in" / f"case{k}.nii.gz", k) for k in range(2)]
    bundle = load_bundle(exported_bundle)
    summary = run_inference(
        [bundle], inputs, tmp_path / "out", backend="openvino", precision="fp32", report=False
    )
    assert len(summary.failed) == 1
    assert len(summary.written) == 1
    reason = summary.failed[0][1]
    assert "\n" not in reason
    assert reason.startswith("backend openvino fp32 failed on a batch of shape")
    assert "out of memory at conv 3" in reason
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors
    assert all(r.exc_info is None for r in errors)


def test_parity_scores_labels_with_enough_voxels():
    from medseg.backends import MIN_LABEL_VOXELS, parity

    ref = torch.zeros(1, 3, 20, 20, 20)
    ref[:, 0] = 1.0
    ref[0, 1, :10] = 2.0  # label 1: 4000 voxels
    ref[0, 2, 15, 0, :5] = 2.0  # label 2: 5 voxels
    got = ref.clone()
    got[0, 1, 9] = 0.0  # 400 voxels of label 1 lost
    got[0, 2, 15, 0, :5] = 0.0  # label 2 gone: 5 voxels, not scored
    result = parity(ref, got, {0: "bg", 1: "big", 2: "tiny"})
    assert set(result["dice"]) == {"big"}
    assert result["dice"]["big"] == pytest.approx(2 * 3600 / 7600, abs=1e-6)
    assert result["agreement"] == pytest.approx(1 - 405 / 8000)
    assert not result["passed"]
    assert MIN_LABEL_VOXELS > 5
    assert parity(ref, ref.clone(), {0: "bg", 1: "big", 2: "tiny"})["passed"]


def test_openvino_keeps_its_compiled_models_in_the_user_cache(exported_bundle):
    """The second compile of the same network and window shape comes from OpenVINO's cache, with
    the same output; the cache holds compiled networks, nothing of a scan."""
    pytest.importorskip("openvino")
    from medseg.backends import user_cache_dir

    bundle = load_bundle(exported_bundle)
    cache = user_cache_dir() / "openvino"
    x = torch.randn(2, 1, 16, 16, 16)
    first = build_predictor(bundle, "openvino", "fp32", "cpu", window_shape=(2, 1, 16, 16, 16))(x)
    blobs = sorted(p.name for p in cache.iterdir())
    assert blobs, "nothing cached"
    again = build_predictor(bundle, "openvino", "fp32", "cpu", window_shape=(2, 1, 16, 16, 16))(x)
    assert sorted(p.name for p in cache.iterdir()) == blobs  # read from the cache, not compiled anew
    torch.testing.assert_close(again, first)


_SIGNAL_AFTER_OPENVINO = """
import faulthandler, gc, os, signal, sys
faulthandler.enable()  # as pytest does: the main thread has an alternate signal stack
from medseg.backends import openvino_predictor
from medseg.runtime import signal_stack
import torch
before = signal_stack()
predictor = openvino_predictor(sys.argv[1], "fp32", window_shape=(1, 1, 16, 16, 16))
predictor(torch.zeros(1, 1, 16, 16, 16))
after = signal_stack()
del predictor
gc.collect()
got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
for _ in range(50):
    os.kill(os.getpid(), signal.SIGTERM)
print(before == after, len(got))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack flags are Linux's")
def test_signals_after_openvino_land_on_the_process_own_signal_stack(exported_bundle, tmp_path):
    """OpenVINO's first compile replaces the thread's alternate signal stack; without putting it back,
    a SIGTERM after its memory was released killed the process with SIGSEGV (the batch SIGTERM test,
    about one run in two, after the backend tests)."""
    import subprocess

    pytest.importorskip("openvino")
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AFTER_OPENVINO, str(exported_bundle / "openvino" / "model.xml")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "50"]


def test_auto_does_not_measure_a_network_too_fast_to_gain(tmp_path, monkeypatch):
    import medseg.backends

    monkeypatch.setattr(medseg.backends, "MEASURE_ABOVE_S", 10.0)
    bundle = load_bundle(_save_tiny_bundle(tmp_path / "b"))
    # not tmp_path / "cache": that is the test's XDG_CACHE_HOME (conftest), where matplotlib may write
    predictor = make_predictor(bundle, "auto", "auto", "cpu", cache_dir=tmp_path / "backend_cache")
    assert (predictor.backend, predictor.precision) == ("torch", "fp32")
    assert "too fast for the other backends to repay measuring them" in predictor.reason
    assert predictor.selection is None
    assert not (tmp_path / "backend_cache").exists()  # nothing exported, nothing measured


def test_auto_does_not_measure_when_the_memory_limit_leaves_too_little(tmp_path):
    """Measuring keeps every backend alive at once; where the limit (``--max-memory``) leaves less than
    that needs, torch fp32 runs unmeasured and says why, instead of the process running out."""
    from medseg.backends import measurement_bytes
    from medseg.io.preflight import resident_bytes

    bundle = load_bundle(_save_tiny_bundle(tmp_path / "b"))
    window = (2, 1, 16, 16, 16)
    need = measurement_bytes(bundle, window)
    assert need == 3 * 16**3 * 4 * 4 * 8 * 2  # 3x two windows' eight 4-channel float32 maps
    limit = resident_bytes() + need // 2
    predictor = make_predictor(
        bundle, "auto", "auto", "cpu", window_shape=window, cache_dir=tmp_path / "backend_cache",
        max_memory=limit,
    )
    assert (predictor.backend, predictor.precision) == ("torch", "fp32")
    assert "measuring the other backends needs about" in predictor.reason
    assert "the memory limit leaves; not measured" in predictor.reason
    assert predictor.selection is None
    assert not (tmp_path / "backend_cache").exists()  # nothing exported, nothing measured
    measured = make_predictor(
        bundle, "auto", "auto", "cpu", window_shape=window, cache_dir=tmp_path / "backend_cache",
        max_memory=resident_bytes() + 100 * need,
    )
    assert measured.selection is not None
    assert (tmp_path / "backend_cache" / "backends").is_dir()


def test_auto_keeps_fp32_when_bf16_is_barely_faster():
    """bf16 wins only when clearly faster than the fastest fp32 that passed parity: within the
    machine's timing noise fp32 gives torch fp32's own mask at the same speed."""
    from medseg.backends import LOW_PRECISION_MARGIN, Candidate, choose

    def candidates(bf16_s: float) -> list[Candidate]:
        return [
            Candidate("torch", "fp32", 0.045, 1.0, passed=True),
            Candidate("torch", "bf16", bf16_s, 0.9998, passed=True),
            Candidate("openvino", "fp32", 0.0325, 1.0, passed=True),
            Candidate("openvino", "bf16", 0.020, 0.9997, passed=False, note="failed parity"),
        ]

    best, reason = choose(candidates(0.0307), "auto", "auto")
    assert best.name == "openvino fp32"
    assert "torch bf16 (0.031 s) is less than 1.1x faster: fp32 kept" in reason
    best, reason = choose(candidates(0.0325 / LOW_PRECISION_MARGIN - 0.001), "auto", "auto")
    assert best.name == "torch bf16"
    assert "fp32 kept" not in reason
    best, _ = choose(candidates(0.0307), "auto", "bf16")  # asked for bf16: no fp32 to fall back on
    assert best.name == "torch bf16"
