"""Export a bundle's network for other runtimes, with a parity record against torch fp32.

``export_bundle(model, ["onnx", "openvino"], out_dir=None)`` writes the exported network into the
bundle folder (or into a copy of the bundle at ``out_dir``) and records in the bundle's
``metadata.json`` (rewritten atomically) under ``exports.<format>``: the file, its hash, the hash
of the weights it came from, the settings, and ``parity``: argmax agreement and per-label Dice of
the exported network against torch fp32 on a synthetic CT phantom preprocessed by the bundle's
own chain, per backend and precision that can run here.

Formats are an explicit registry (``FORMATS``); another format (a MONAI bundle, an MLflow pyfunc)
is one more entry: a function ``(bundle, out_dir) -> record dict``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medseg.errors import ConfigError, MedsegError, OutputError, one_line

if TYPE_CHECKING:
    from medseg.bundle import Bundle

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
OPENVINO_DIR = "openvino"
OPSET = 18


def export_onnx(
    network: torch.nn.Module, path: str | Path, *, window_shape: tuple[int, ...], opset: int = OPSET
) -> Path:
    """The network as ONNX (batch and spatial axes dynamic), written atomically at ``path``."""
    from medseg.io import atomic_path

    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError as exc:
        raise ConfigError("ONNX export needs the onnx package (pip install onnx)") from exc
    path = Path(path)
    network = network.eval()
    example = torch.zeros(1, *window_shape[1:])
    axes = {0: "batch", **{i + 2: f"d{i}" for i in range(len(window_shape) - 2)}}
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks in forward()
        torch.onnx.export(
            network,
            (example,),
            str(tmp),
            opset_version=opset,
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
        )
    return path


def _base_record(bundle: Bundle, file: str) -> dict[str, Any]:
    from medseg.backends import file_sha256
    from medseg.bundle import WEIGHTS

    return {
        "file": file,
        "sha256": file_sha256(Path(bundle.path) / file),
        "weights_sha256": file_sha256(Path(bundle.path) / WEIGHTS),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def _parity_record(bundle: Bundle, runs: list[tuple[str, str]], window_shape: tuple[int, ...]) -> dict:
    """Parity against torch fp32 for each (backend, precision) in ``runs`` that can run here."""
    from medseg.backends import (
        build_predictor,
        parity,
        parity_batch,
        parity_settings,
        torch_predictor,
    )

    batch = parity_batch(bundle, window_shape)
    with torch.no_grad():
        reference = torch_predictor(bundle.network, "fp32", "cpu")(batch)
    results: dict[str, Any] = {}
    for backend, precision in runs:
        name = f"{backend}/{precision}"
        try:
            predictor = build_predictor(bundle, backend, precision, "cpu", window_shape=window_shape)
            results[name] = parity(reference, predictor(batch), bundle.config.labels or {})  # by channel
        except MedsegError as exc:
            results[name] = {"skipped": one_line(exc)}
        log.info("parity %s: %s", name, json.dumps(results[name]))
    return {"settings": parity_settings(window_shape), "results": results}


def _export_onnx_format(bundle: Bundle, out_dir: Path) -> dict[str, Any]:
    from medseg.backends import default_window_shape

    window_shape = default_window_shape(bundle)
    export_onnx(bundle.network, out_dir / ONNX_FILE, window_shape=window_shape)
    record = {**_base_record(bundle, ONNX_FILE), "opset": OPSET, "dynamic_axes": ["batch", "spatial"]}
    _write_export_record(bundle, "onnx", record)  # the parity run below reads it back from the bundle
    record["parity"] = _parity_record(bundle, [("onnxruntime", "fp32")], window_shape)
    return record


def _export_openvino_format(bundle: Bundle, out_dir: Path) -> dict[str, Any]:
    """OpenVINO IR (``openvino/model.xml`` + ``.bin``, weights kept f32) converted from the ONNX export."""
    from medseg.backends import INSTALL_HINT, default_window_shape, onnx_for

    try:
        import openvino as ov
    except ImportError as exc:
        raise ConfigError(f"OpenVINO export needs openvino ({INSTALL_HINT['openvino']})") from exc
    window_shape = default_window_shape(bundle)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as tmp:
        onnx_path = onnx_for(bundle, Path(tmp))
        model = ov.Core().read_model(str(onnx_path))
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        target = out_dir / OPENVINO_DIR
        target.mkdir(exist_ok=True)
        os.replace(Path(tmp) / "model.bin", target / "model.bin")  # the .xml last: its presence means done
        os.replace(Path(tmp) / "model.xml", target / "model.xml")
    record = {
        **_base_record(bundle, f"{OPENVINO_DIR}/model.xml"),
        "weights_file": f"{OPENVINO_DIR}/model.bin",
        "openvino": ov.__version__,
        "weights_precision": "f32",
    }
    _write_export_record(bundle, "openvino", record)
    record["parity"] = _parity_record(bundle, [("openvino", "fp32"), ("openvino", "bf16")], window_shape)
    return record


# An explicit registry: a format name -> a function writing it into a bundle folder and returning its record.
FORMATS: dict[str, Callable[[Bundle, Path], dict[str, Any]]] = {
    "onnx": _export_onnx_format,
    "openvino": _export_openvino_format,
}
ALL_FORMATS = ("onnx", "openvino")  # what ``--format all`` stands for


def _write_export_record(bundle: Bundle, fmt: str, record: dict[str, Any]) -> None:
    """Update ``exports.<fmt>`` in the bundle's metadata.json (atomically) and in ``bundle.metadata``."""
    from medseg.bundle import METADATA
    from medseg.io import write_text_atomic

    path = Path(bundle.path) / METADATA
    tree = json.loads(path.read_text()) if path.is_file() else {}
    tree.setdefault("exports", {})[fmt] = record
    write_text_atomic(path, json.dumps(tree, indent=2, default=str))
    bundle.metadata = tree


def _copy_bundle(source: Path, target: Path) -> None:
    from medseg.bundle import CONFIG, METADATA, WEIGHTS

    if target.resolve() == source.resolve():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, CONFIG, METADATA):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def resolve_formats(formats: str | list[str]) -> list[str]:
    names = [formats] if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for name in names:
        for fmt in ALL_FORMATS if name == "all" else (name,):
            if fmt not in FORMATS:
                raise ConfigError(
                    f"unknown export format {fmt!r}. Available options are: {sorted(FORMATS)} or all"
                )
            if fmt not in out:
                out.append(fmt)
    return out


def export_bundle(
    model: str | Path, formats: str | list[str], out_dir: str | Path | None = None
) -> dict[str, dict[str, Any]]:
    """Export the bundle at ``model`` (folder or MLflow URI) in ``formats``; return the records written.

    Without ``out_dir`` the files go into the bundle folder itself; with it, into a copy of the bundle
    there (so the copy is a complete bundle). An MLflow URI needs ``out_dir``.
    """
    from medseg.bundle import load_bundle, resolve_model

    wanted = resolve_formats(formats)
    text = str(model)
    if out_dir is None and text.startswith(("runs:/", "models:/")):
        raise ConfigError(f"{text}: an MLflow model is exported into a new folder; pass -o DIR")
    source = resolve_model(model)
    load_bundle(source)  # validates the source before anything is copied
    target = Path(out_dir) if out_dir is not None else source
    try:
        _copy_bundle(source, target)
    except OSError as exc:
        raise OutputError(f"{target}: could not copy the bundle there ({exc.strerror or exc})") from exc
    bundle = load_bundle(target)
    records: dict[str, dict[str, Any]] = {}
    for fmt in wanted:
        log.info("exporting %s as %s", target, fmt)
        records[fmt] = FORMATS[fmt](bundle, target)
        _write_export_record(bundle, fmt, records[fmt])
    return records
