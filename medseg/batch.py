"""Batch inference: ``medseg infer`` over many inputs, each case's outputs complete or redone.

The options of a batch are resolved once, into a frozen ``InferOptions`` (flags over
the first bundle's config). Per input ``X`` the case owes ``<stem>_seg.nii.gz`` (or, with
``--output-format``, ``<stem>_seg.nrrd``/``.mha``) with its label tables ``<stem>_seg.itksnap.txt``
and ``<stem>_seg.ctbl``, with
``--save-probabilities`` ``<stem>_seg_prob_<k>.nii.gz`` (``k`` a label value, as in the mask)
and ``<stem>_seg_entropy.nii.gz``,
with ``--dicom-seg`` (DICOM inputs) ``<stem>_seg.dcm``, with ``--rtstruct`` (DICOM inputs)
``<stem>_seg_rtstruct.dcm``; then, last and once, the sidecar
``<stem>_seg.json`` naming the files it completes and holding the case's QC figures.
With ``--report`` the QC overlay ``<stem>_seg_qc.png`` is report material, not an owed
output: it is drawn for a done case that lacks it. A case is done only when its sidecar
lists every output the requested options owe and they exist: a re-run redoes any
incomplete case, skips the done ones (saying when a sidecar records other options) and
``report.html`` is rebuilt from every sidecar in the folder. The output folder is locked
(``medseg.locks``) for the run, so two runs never mix their masks.

SIGTERM and SIGINT stop the batch at the next window: the current case is rolled back
(its new files removed; it is redone next time), the report of what was done is
written and ``StoppedError`` (exit 143 or 130) is raised. Under ``torchrun`` each rank
takes every WORLD_SIZE-th case.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medseg.data import group_channel_inputs, load_input_channels
from medseg.errors import InputError, MedsegError, StoppedError, one_line
from medseg.io import (
    Volume,
    atomic_path,
    case_stem,
    find_inputs,
    is_dicom_input,
    mask_path,
    sidecar_fields,
    write_dicom_seg,
    write_label_map,
    write_label_tables,
    write_nifti,
    write_rtstruct,
    write_text_atomic,
)
from medseg.io.labeltables import label_table_paths
from medseg.io.preflight import preflight_inference
from medseg.io.volume import sweep_partials
from medseg.labels import value_channels
from medseg.predict import (
    Prediction,
    crf_config,
    ensemble_to_source_grid,
    entropy_map,
    with_infer_overrides,
)
from medseg.runtime import rank_and_world

if TYPE_CHECKING:
    from medseg.bundle import Bundle
    from medseg.progress import CaseProgress
    from medseg.tracking import Tracker

log = logging.getLogger(__name__)

SIDECAR_SCHEMA = 2  # 2: "outputs" and "options" recorded; the sidecar is written last


@dataclass(frozen=True)
class InferOptions:
    """Every option of a batch, resolved once: flags over the first bundle's config."""

    device: str = "cpu"
    precision: str = "fp32"
    tta: bool = False
    tta_flips: int = 8  # the TTA passes (2 or 8; medseg.predict.flip_sets)
    crf: bool = False
    overlap: float = 0.5
    sw_batch_size: int = 2
    blend_mode: str = "gaussian"
    dicom_seg: bool = False
    save_probabilities: bool = False
    report: bool = False
    overwrite: bool = False
    max_memory: int | None = None  # bytes a case may need (--max-memory); None = half this machine's memory
    output_format: str = "nifti"  # nifti, nrrd, metaimage or input (see medseg.io.mask_path)
    rtstruct: bool = False
    series: tuple[str, ...] = ()  # DICOM series to read: one, or one per channel in channel order
    resample_channels: bool = False  # channels off the first one's grid are resampled onto it

    def recorded(self) -> dict[str, Any]:
        """The options that shape a mask's content, as its sidecar records them."""
        return {
            "tta": self.tta,
            **({"tta_flips": self.tta_flips} if self.tta else {}),
            "crf": self.crf,
            "overlap": self.overlap,
            "blend_mode": self.blend_mode,
            "precision": self.precision,
            # one series as given (a string), one per channel as a list
            "series": self.series[0] if len(self.series) == 1 else list(self.series) or None,
        }


def resolve_options(
    bundles: list[Bundle],
    *,
    device: str | torch.device = "cpu",
    precision: str | None = "auto",
    backend: str | None = None,
    tta: bool | None = None,
    crf: bool | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    blend_mode: str | None = None,
    cpu_bf16: bool | None = None,
    dicom_seg: bool = False,
    save_probabilities: bool = False,
    report: bool = False,
    overwrite: bool = False,
    max_memory: int | None = None,
    output_format: str = "nifti",
    rtstruct: bool = False,
    series: str | list[str] | None = None,
    resample_channels: bool = False,
) -> tuple[list[Bundle], InferOptions]:
    """The bundles with the sliding-window overrides applied, and the batch's ``InferOptions``.

    None means "the first bundle's setting" (``infer.tta``, ``postprocess.crf.enabled``, ...).
    ``backend``/``precision`` (None or auto: the bundle's ``infer.backend``/``infer.precision``) are
    resolved here, once, into a predictor per bundle (medseg.backends; ``auto`` measures once per
    machine and bundle); the precision recorded is the one that runs.
    """
    from medseg.backends import backend_predictors

    bundles = with_infer_overrides(
        bundles,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        blend_mode=blend_mode,
        cpu_bf16=cpu_bf16,
        backend=backend,
        precision=None if precision in (None, "auto") else precision,
    )
    cfg = bundles[0].config
    if crf and not cfg.postprocess.crf.enabled and (bundles[0].path / "postprocess_tuning.json").is_file():
        log.warning(
            "--crf: this model's validation tuning did not keep the CRF (it did not raise the validation "
            "Dice; see postprocess_tuning.json in the bundle); applying it because asked"
        )
    if tta is None and cfg.infer.tta:
        log.info("flip TTA on (%d passes): the model's validation tuning kept it (--no-tta skips it)",
                 cfg.infer.tta_flips)
    dev = torch.device(device)
    predictors = backend_predictors(bundles, dev, max_memory=max_memory)
    options = InferOptions(
        device=str(dev),
        precision=predictors[0].precision,
        tta=cfg.infer.tta if tta is None else tta,
        tta_flips=cfg.infer.tta_flips,
        crf=cfg.postprocess.crf.enabled if crf is None else crf,
        overlap=cfg.infer.overlap,
        sw_batch_size=cfg.infer.sw_batch_size,
        blend_mode=cfg.infer.blend_mode,
        dicom_seg=dicom_seg,
        save_probabilities=save_probabilities,
        report=report,
        overwrite=overwrite,
        max_memory=max_memory,
        output_format=output_format,
        rtstruct=rtstruct,
        series=(series,) if isinstance(series, str) else tuple(series or ()),
        resample_channels=resample_channels or cfg.preprocess.resample_channels,
    )
    return bundles, options


@dataclass(frozen=True)
class CaseFiles:
    """The files one input owes for the requested options; the sidecar comes last."""

    input: Path
    mask: Path
    sidecar: Path
    probabilities: tuple[Path, ...] = ()
    dicom_seg: Path | None = None
    qc_overlay: Path | None = None  # report material (see the module docstring)
    label_tables: tuple[Path, ...] = ()
    rtstruct: Path | None = None
    channels: tuple[Path, ...] = ()  # a case given as one file per channel (input is the first)

    def owed(self) -> list[Path]:
        """Every output the case owes but the sidecar, in the order they are written."""
        return [
            self.mask,
            *self.label_tables,
            *self.probabilities,
            *([self.dicom_seg] if self.dicom_seg else []),
            *([self.rtstruct] if self.rtstruct else []),
        ]


def case_files(
    output_dir: Path,
    input_path: Path,
    options: InferOptions,
    labels: dict[int, str],
    *,
    channels: tuple[Path, ...] = (),
    stem: str | None = None,
) -> CaseFiles:
    """Where each output of ``input_path`` goes (see the module docstring for the names); a case
    given as ``channels`` (``CASE_0000`` .. files) is named ``stem`` (``CASE``)."""
    mask = mask_path(output_dir, input_path, output_format=options.output_format, stem=stem)
    stem = case_stem(mask)
    probabilities: tuple[Path, ...] = ()
    if options.save_probabilities:
        probabilities = (
            *(output_dir / f"{stem}_prob_{k}.nii.gz" for k in sorted(labels) if k != 0),
            output_dir / f"{stem}_entropy.nii.gz",
        )
    dicom_input = is_dicom_input(input_path)
    return CaseFiles(
        input=input_path,
        mask=mask,
        sidecar=output_dir / f"{stem}.json",
        probabilities=probabilities,
        dicom_seg=output_dir / f"{stem}.dcm" if options.dicom_seg and dicom_input else None,
        qc_overlay=output_dir / f"{stem}_qc.png",
        label_tables=label_table_paths(mask),
        rtstruct=output_dir / f"{stem}_rtstruct.dcm" if options.rtstruct and dicom_input else None,
        channels=channels,
    )


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """A sidecar's content, or None when it is missing or unreadable (the case is then not done)."""
    try:
        tree = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return tree if isinstance(tree, dict) else None


def case_status(files: CaseFiles, options: InferOptions, models: list[str]) -> tuple[bool, list[str]]:
    """(done, differences): done when the sidecar lists every owed output and each exists;
    differences name the options (and models) its sidecar records otherwise."""
    tree = read_sidecar(files.sidecar)
    if tree is None:
        return False, []
    listed = set(tree.get("outputs") or [])
    if not all(p.name in listed and p.is_file() for p in files.owed()):
        return False, []
    recorded = tree.get("options") or {}
    differences = [
        f"{key} {recorded.get(key)!r} (now {value!r})"
        for key, value in options.recorded().items()
        if recorded.get(key) != value
    ]
    if tree.get("model") != models:
        differences.append("another model")
    return True, differences


@dataclass
class InferenceSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    differing: list[tuple[Path, str]] = field(default_factory=list)  # done with other options
    report: Path | None = None
    rank: int = 0
    world_size: int = 1
    stopped_by: int | None = None  # the signal that stopped the batch


class _Interrupted(BaseException):
    """Raised inside a case when a signal asked the batch to stop (never escapes ``run_inference``)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signum)


@dataclass
class _StopRequest:
    """The signal that asked the batch to stop, once one did."""

    signum: int | None = None

    def check(self) -> None:
        """Interrupt the case in progress when a stop was asked for."""
        if self.signum is not None:
            raise _Interrupted(self.signum)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    """While the batch runs: SIGTERM/SIGINT record the signal; a second SIGINT interrupts at once.

    The previous handlers come back afterwards. Off the main thread signals cannot be caught and
    no stop is ever requested.
    """
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("signal %d: rolling back the current case, writing the report, then stopping", signum)
        stop.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class _Batch:
    """What every case of one batch shares."""

    bundles: list[Bundle]
    options: InferOptions
    output_dir: Path
    stop: _StopRequest
    progress: CaseProgress | None = None
    tracker: Tracker | None = None

    @property
    def labels(self) -> dict[int, str]:
        return self.bundles[0].labels

    @property
    def models(self) -> list[str]:
        """Each model as the user named it: the MLflow URI, or the bundle folder's absolute path."""
        return [b.source or str(b.path) for b in self.bundles]

    @functools.cached_property
    def provenance(self) -> dict[str, Any]:
        """medseg version and, per model, URI or path, registry version and run, bundle hash (once a batch)."""
        from medseg.bundle import provenance

        records = [provenance(b) for b in self.bundles]
        drop = ("medseg_version", "timestamp")
        return {
            "medseg_version": records[0]["medseg_version"],
            "models": [{k: v for k, v in r.items() if k not in drop} for r in records],
        }

    @functools.cached_property
    def algorithm(self) -> tuple[str, str]:
        """(name, version) of the model, as DICOM SEG and RTSTRUCT identify the algorithm: the registered
        MLflow name and version when there are some, else the network and the bundle's content hash."""
        from medseg.bundle import bundle_hash

        first = self.bundles[0]
        name = first.origin.get("name") or f"medseg {first.config.model.name}"
        version = first.origin.get("version") or bundle_hash(first.path)[:12]
        if len(self.bundles) > 1:
            name = f"{name} (ensemble of {len(self.bundles)})"
        return name, version

    def hook(self, stage: str, done: int, total: int) -> None:
        """Progress inside a case; the point where a requested stop interrupts it."""
        self.stop.check()
        if self.progress is not None:
            self.progress.update(stage, done, total)


def _write_probability_maps(
    batch: _Batch, pred: Prediction, volume: Volume, files: CaseFiles, written: list[Path]
) -> None:
    """Per-class probability maps (named by the label files' value of the class) and the entropy map,
    float32 NIfTI in the source grid."""
    assert pred.probabilities is not None
    *per_class, entropy = files.probabilities
    channel = value_channels(batch.bundles[0].config.label_values)
    for path in per_class:
        value = int(path.name[: -len(".nii.gz")].rsplit("_", 1)[1])
        k = channel.get(value, value)
        array = pred.probabilities[k] if k < pred.probabilities.shape[0] else np.zeros(volume.shape)
        written.append(path)
        write_nifti(volume.with_array(array.astype(np.float32), kind="image"), path, dtype="float32")
    written.append(entropy)
    write_nifti(volume.with_array(entropy_map(pred.probabilities), kind="image"), entropy, dtype="float32")


def _input_warnings(batch: _Batch, files: CaseFiles, channels: list[Volume]) -> list[str]:
    """``medseg.report.input_flags`` for this case against the (first) bundle's normalisation, each
    logged as a warning: the case is still segmented, and the report lists it among those to look at."""
    from medseg.report import input_flags

    pre = batch.bundles[0].config.preprocess
    flags = input_flags(channels, [c.kind for c in pre.channel_intensities()], pre.spacing)
    for flag in flags:
        log.warning("%s: %s", files.input.name, flag)
    return flags


def _write_qc(
    batch: _Batch,
    files: CaseFiles,
    volume: Volume,
    mask: Volume,
    tta: float | None,
    written: list[Path],
    input_warnings: list[str] | None = None,
) -> dict[str, Any]:
    """The case's QC figures (for the sidecar); with the report, its overlay PNG too."""
    from medseg.report import case_qc, qc_to_dict

    qc = case_qc(
        case_stem(files.input),
        volume,
        mask.array,
        labels=batch.labels,
        tta_disagreement=tta,
        volume_ranges=batch.bundles[0].metadata.get("label_volumes_ml"),
        connectivity=batch.bundles[0].config.postprocess.connectivity,
        overlay=batch.options.report,
        input_warnings=input_warnings,
    )
    if batch.options.report and files.qc_overlay is not None:
        written.append(files.qc_overlay)
        with atomic_path(files.qc_overlay) as tmp:
            tmp.write_bytes(qc.overlay_png)
    return qc_to_dict(qc)


def _draw_missing_overlay(batch: _Batch, files: CaseFiles) -> None:
    """A done case without its QC overlay (segmented without the report): draw it from input and mask."""
    from medseg.io import load_label

    if files.qc_overlay is None or files.qc_overlay.is_file():
        return
    try:
        volume = _load_case(batch, files)[0]
        mask = load_label(files.mask, image=volume)
        tta = (read_sidecar(files.sidecar) or {}).get("tta_disagreement")
        _write_qc(batch, files, volume, mask, tta, [])
    except Exception as exc:  # report material only: the case itself is done
        log.warning("%s: no QC overlay for the report: %s", files.input.name, exc)


def _write_outputs(
    batch: _Batch, files: CaseFiles, volume: Volume, pred: Prediction, written: list[Path]
) -> None:
    """Every owed output but the sidecar."""
    written.append(files.mask)
    write_label_map(pred.mask.array, volume, files.mask, labels=batch.labels)
    written.extend(files.label_tables)
    write_label_tables(files.mask, batch.labels)
    if files.probabilities:
        _write_probability_maps(batch, pred, volume, files, written)
    name, version = batch.algorithm
    series = batch.options.series[0] if batch.options.series else None
    dicom_outputs = (
        ("DICOM SEG", files.dicom_seg, batch.options.dicom_seg, write_dicom_seg),
        ("RTSTRUCT", files.rtstruct, batch.options.rtstruct, write_rtstruct),
    )
    for what, target, asked, writer in dicom_outputs:
        if target is None:
            if asked:
                log.warning("%s: no %s written: %s needs a DICOM series as input", files.input.name, what, what)
            continue
        written.append(target)
        writer(pred.mask.array, files.input, target, labels=batch.labels, series_id=series,
               algorithm_name=name, algorithm_version=version)


def _load_case(batch: _Batch, files: CaseFiles) -> list[Volume]:
    """The case's image channels (one, or the model's ``in_channels``), on one grid."""
    cfg = batch.bundles[0].config
    return load_input_channels(
        files.channels or [files.input],
        n_channels=cfg.model.in_channels or 1,
        series=batch.options.series,
        resample=batch.options.resample_channels,
        channel_names=[c.name or str(i) for i, c in enumerate(cfg.preprocess.channels or [])],
    )


def _segment_case(batch: _Batch, files: CaseFiles, written: list[Path]) -> dict[str, float]:
    """Load, predict and write one case, the sidecar last; returns the stage timings."""
    t0 = time.perf_counter()
    batch.hook("load", 0, 0)
    options = batch.options
    # sized from the header before any voxel is read: a case over the budget fails alone
    preflight_inference(
        list(files.channels) or files.input,  # every channel counted: one file each, or a 4D file
        batch.bundles,
        max_memory=options.max_memory,
        tta=options.tta,
        save_probabilities=options.save_probabilities,
        series_id=list(options.series) or None,  # one DICOM series per channel
    )
    channels = _load_case(batch, files)
    volume = channels[0]
    input_warnings = _input_warnings(batch, files, channels)
    timings = {"load_s": time.perf_counter() - t0}
    from medseg.backends import backend_predictors, describe

    predictors = backend_predictors(batch.bundles, options.device)  # built in resolve_options
    pred = ensemble_to_source_grid(
        batch.bundles,
        channels,
        device=options.device,
        tta=options.tta,
        crf=crf_config(batch.bundles[0], options.crf),
        probabilities=options.save_probabilities,
        precision=options.precision,  # type: ignore[arg-type]
        predictors=list(predictors),
        progress=batch.hook,
    )
    timings.update(pred.timings)
    batch.hook("write", 0, 0)
    t0 = time.perf_counter()
    _write_outputs(batch, files, volume, pred, written)
    timings["write_s"] = time.perf_counter() - t0
    batch.hook("qc", 0, 0)
    t0 = time.perf_counter()
    qc = _write_qc(batch, files, volume, pred.mask, pred.tta_disagreement, written, input_warnings)
    timings["qc_s"] = time.perf_counter() - t0
    sidecar = {
        **sidecar_fields(volume, batch.labels),
        "model": batch.models,
        "provenance": {
            **batch.provenance,
            "device": options.device,
            "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "tta": options.tta,
        "crf": options.crf,
        "tta_disagreement": pred.tta_disagreement,
        "backend": describe(predictors[0]) if len(predictors) == 1 else [describe(p) for p in predictors],
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "options": options.recorded(),
        "outputs": [p.name for p in written],
        "schema": SIDECAR_SCHEMA,
        "qc": qc,
        **_series_record(volume),
    }
    batch.hook("write", 0, 0)  # last point to stop before the case counts as done
    write_text_atomic(files.sidecar, json.dumps(sidecar, indent=2))
    return timings


def _series_record(volume: Volume) -> dict[str, Any]:
    """Which DICOM series was segmented (hashed UID, description, slices), for the sidecar."""
    if volume.meta.get("source_format") != "dicom":
        return {}
    keys = {"series_uid_hash": "uid_hash", "series_description": "description", "n_slices": "n_slices"}
    return {"series": {out: volume.meta.get(key) for key, out in keys.items()}}


def _roll_back(written: list[Path]) -> None:
    """Remove what an unfinished case wrote (without a sidecar it is not done; the next run redoes it)."""
    for path in written:
        path.unlink(missing_ok=True)


def _run_case(batch: _Batch, files: CaseFiles, index: int, total: int, summary: InferenceSummary) -> None:
    """One case: skipped when done, else segmented; a failure is recorded and the batch goes on."""
    where = f"[{index + 1}/{total}] {files.input.name}"
    done, differences = case_status(files, batch.options, batch.models)
    if done and not batch.options.overwrite:
        summary.skipped.append(files.mask)
        if differences:
            summary.differing.append((files.mask, ", ".join(differences)))
            log.warning(
                "%s: done with other options: %s; --overwrite redoes it", where, ", ".join(differences)
            )
        else:
            log.info("%s: %s done, skipped", where, files.mask.name)
        if batch.options.report:
            _draw_missing_overlay(batch, files)
        return
    files.sidecar.unlink(missing_ok=True)  # from here until the new sidecar, the case is not done
    written: list[Path] = []
    try:
        timings = _segment_case(batch, files, written)
    except MedsegError as exc:
        _roll_back(written)
        log.error("%s failed: %s", where, exc)
        summary.failed.append((files.input, str(exc)))
        return
    except Exception as exc:  # a batch goes on past one bad case; the traceback goes to the log
        _roll_back(written)
        log.exception("%s failed unexpectedly", where)
        summary.failed.append((files.input, one_line(exc, with_type=True)))
        return
    except BaseException:
        _roll_back(written)
        raise
    summary.written.append(files.mask)
    log.info("%s -> %s %s", where, files.mask.name, json.dumps({k: round(v, 3) for k, v in timings.items()}))
    if batch.tracker is not None:
        batch.tracker.log_metrics({f"infer_{k}": v for k, v in timings.items()}, step=index)


def expand_models(models: list[str | Path]) -> list[str]:
    """``--model`` values to bundle locations: a bundle folder or MLflow URI as is; a folder holding
    several fold bundles (``fold_*/bundle``, as ``train`` writes them) becomes all of them (an ensemble)."""
    out: list[str] = []
    for model in models:
        path = Path(str(model))
        text = str(model)
        if text.startswith(("runs:/", "models:/")) or not path.is_dir() or (path / "config.yaml").is_file():
            out.append(text)
            continue
        found = sorted(
            {p.parent for p in path.glob("*/model.safetensors")}
            | {p.parent for p in path.glob("*/bundle/model.safetensors")}
        )
        if not found:
            raise InputError(path, "neither a bundle folder nor a folder of fold bundles (fold_*/bundle)")
        log.info(
            "%s: ensemble of %d bundles (%s)",
            path,
            len(found),
            ", ".join(str(f.relative_to(path)) for f in found),
        )
        out.extend(str(f) for f in found)
    return out


def check_ensemble(bundles: list[Bundle]) -> None:
    """Refuse an ensemble whose bundles would average different things: every bundle must have the
    first one's labels on the same network channels (``Config.label_values``) and take as many image
    channels; otherwise the averaged probabilities would mix organs, silently."""
    first = bundles[0]
    for other in bundles[1:]:
        for what, mine, theirs in (
            ("labels", first.labels, other.labels),
            ("label channels", first.config.labels, other.config.labels),
            ("image channels", first.config.model.in_channels or 1, other.config.model.in_channels or 1),
        ):
            if mine != theirs:
                raise InputError(
                    other.source or other.path,
                    f"cannot ensemble with {first.source or first.path}: its {what} are {theirs}, the "
                    f"first model's {mine}; an ensemble averages models of the same labels and inputs",
                )


def _is_within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output_folder(inputs: list[str | Path], output_dir: str | Path) -> None:
    """Refuse an output folder equal to or inside an input folder (cheap: before any model loads)."""
    for raw in inputs:
        if Path(raw).is_dir() and _is_within(Path(output_dir), Path(raw)):
            raise InputError(
                output_dir,
                f"the output folder is inside the input folder {raw}; its masks would be read as inputs "
                "next time: choose an output folder outside the inputs",
            )


def plan_cases(
    inputs: list[str | Path],
    output_dir: Path,
    options: InferOptions,
    labels: dict[int, str],
    *,
    n_channels: int = 1,
) -> list[CaseFiles]:
    """The cases of a batch, in input order, after refusing what would write over an input:
    an output folder equal to or inside an input folder, two inputs with one output name, an
    output path that is an input."""
    check_output_folder(inputs, output_dir)
    # --series once per channel: each input is one study (its series folders are not separate cases)
    paths = [Path(p) for p in inputs] if len(options.series) > 1 else find_inputs(list(inputs))
    if not paths:
        raise InputError(None, "no inputs to segment")
    resolved_inputs = {p.resolve() for p in paths}
    cases: dict[Path, CaseFiles] = {}
    # a model taking several channels: CASE_0000 .. CASE_000N files are one case (a 4D file is one)
    for stem, group in group_channel_inputs(paths, n_channels):
        path = group[0]
        files = case_files(
            output_dir, path, options, labels, channels=tuple(group) if len(group) > 1 else (), stem=stem
        )
        if files.sidecar in cases:
            raise InputError(
                path,
                f"has the same output name {files.mask.name} as {cases[files.sidecar].input}; segment them "
                "into separate output folders",
            )
        for out in (*files.owed(), files.sidecar):
            if out.resolve() in resolved_inputs:
                raise InputError(out, "is an input of this run and would be overwritten by an output")
        cases[files.sidecar] = files
    return list(cases.values())


def rebuild_report(
    output_dir: Path, name: str, *, labels: dict[int, str], summary: InferenceSummary, model: str
):
    """``report.html`` from every sidecar in the folder (this run's cases and earlier ones)."""
    from medseg.report import CaseQC, qc_from_dict, write_report

    cases: list[CaseQC] = []
    without_qc: list[str] = []
    for sidecar in sorted(output_dir.glob("*_seg.json")):
        tree = read_sidecar(sidecar)
        if tree is None:
            continue
        stem = sidecar.name[: -len("_seg.json")]
        overlay = output_dir / f"{stem}_seg_qc.png"
        if isinstance(tree.get("qc"), dict):
            cases.append(qc_from_dict(tree["qc"], overlay.read_bytes() if overlay.is_file() else b""))
        else:
            without_qc.append(stem)
    if without_qc:
        log.info("report: %d case(s) have sidecars without QC figures: %s", len(without_qc), without_qc)
    return write_report(
        cases,
        output_dir / name,
        labels=labels,
        failed=[(p.name, r) for p, r in summary.failed],
        skipped=[p.name for p in summary.skipped],
        model=model,
    )


def run_inference(
    bundles: list[Bundle],
    inputs: list[str | Path],
    output_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    precision: str | None = "auto",
    backend: str | None = None,
    tta: bool | None = None,
    overwrite: bool = False,
    progress: bool = False,
    dicom_seg: bool = False,
    crf: bool | None = None,
    save_probabilities: bool = False,
    report: bool = False,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    blend_mode: str | None = None,
    cpu_bf16: bool | None = None,
    tracker: Tracker | None = None,
    max_memory: int | None = None,
    output_format: str = "nifti",
    rtstruct: bool = False,
    series: str | list[str] | None = None,
    resample_channels: bool = False,
) -> InferenceSummary:
    """Segment every input into ``output_dir``: done cases are skipped unless ``overwrite``, a failing
    case is reported and the batch goes on. Under torchrun each rank takes every WORLD_SIZE-th case.

    The options are resolved once (``resolve_options``); the files per case are described in the
    module docstring. With ``report``, ``report.html`` is rebuilt from every sidecar in the folder at
    the end. With a started ``tracker`` (an MLflow run), per-case stage timings go to it as metrics
    (step = case index) and the report as an artifact. ``progress`` shows cases, the current
    case's stage and windows with an ETA on a terminal. ``max_memory`` (bytes; None = half this
    machine's memory) is each case's budget: a case whose header says it needs more
    (``medseg.io.preflight``) fails with the estimate before any voxel is read.

    Raises:
        StoppedError: SIGTERM or SIGINT stopped the batch (after the rollback and the report).
    """
    check_output_folder(list(inputs), output_dir)
    check_ensemble(bundles)
    bundles, options = resolve_options(
        bundles, device=device, precision=precision, backend=backend, tta=tta, crf=crf, overlap=overlap,
        sw_batch_size=sw_batch_size, blend_mode=blend_mode, cpu_bf16=cpu_bf16, dicom_seg=dicom_seg,
        save_probabilities=save_probabilities, report=report, overwrite=overwrite, max_memory=max_memory,
        output_format=output_format, rtstruct=rtstruct, series=series, resample_channels=resample_channels,
    )
    output_dir = Path(output_dir)
    cases, rank, world = _cases_of_this_rank(list(inputs), output_dir, options, bundles)
    summary = InferenceSummary(rank=rank, world_size=world)
    with _output_lock(output_dir, rank), _stop_on_signals() as stop:
        sweep_partials(output_dir, recursive=False)  # temp files of writes a killed run left behind
        batch = _Batch(bundles, options, output_dir, stop, tracker=tracker)
        _run_cases(batch, cases, summary, progress=progress)
        _finish(batch, summary)
    return summary


def _cases_of_this_rank(
    inputs: list[str | Path], output_dir: Path, options: InferOptions, bundles: list[Bundle]
) -> tuple[list[CaseFiles], int, int]:
    """The cases of the batch (``plan_cases``) this rank segments, with the rank and world size:
    under torchrun each rank takes every WORLD_SIZE-th case."""
    cases = plan_cases(
        inputs, output_dir, options, bundles[0].labels, n_channels=bundles[0].config.model.in_channels or 1
    )
    rank, world = rank_and_world()
    if world > 1:
        cases = cases[rank::world]
        log.info("rank %d of %d: %d case(s)", rank, world, len(cases))
    return cases, rank, world


@contextlib.contextmanager
def _output_lock(output_dir: Path, rank: int) -> Iterator[None]:
    """The output folder's exclusive lock: a second run into it is refused, naming this one's PID.

    Under torchrun the ranks share the folder by design: rank 0 holds the lock for them all, every
    rank hears whether it got it (a second distributed run is refused on every rank), and rank 0
    releases it only once every rank is done. Ranks set by hand (``RANK``/``WORLD_SIZE`` without
    torchrun's rendezvous) cannot coordinate: rank 0 locks, the others trust it.
    """
    from medseg.locks import exclusive, exclusive_on_every_rank
    from medseg.runtime import coordination_group

    with coordination_group() as dist:
        lock: contextlib.AbstractContextManager[Path | None]
        if dist is not None:
            lock = exclusive_on_every_rank(output_dir, dist, what="inference", wait_for_all=True)
        else:
            lock = exclusive(output_dir, what="inference") if rank == 0 else contextlib.nullcontext()
        with lock:
            yield


def _run_cases(batch: _Batch, cases: list[CaseFiles], summary: InferenceSummary, *, progress: bool) -> None:
    from medseg.progress import CaseProgress

    batch.progress = CaseProgress(total_cases=len(cases), enabled=progress)
    try:
        for index, files in enumerate(cases):
            batch.stop.check()
            batch.progress.start_case(case_stem(files.input))
            _run_case(batch, files, index, len(cases), summary)
            batch.progress.end_case()
    except _Interrupted as stop:
        summary.stopped_by = stop.signum
    finally:
        batch.progress.close()


def _finish(batch: _Batch, summary: InferenceSummary) -> None:
    """The report (of every case in the folder), the tracker's artifact, the closing line; the stop."""
    if batch.options.report:
        name = "report.html" if summary.world_size == 1 else f"report_rank{summary.rank}.html"
        summary.report = rebuild_report(
            batch.output_dir, name, labels=batch.labels, summary=summary, model=", ".join(batch.models)
        )
        if batch.tracker is not None:
            batch.tracker.log_artifact(summary.report, "inference")
    log.info(
        "%d written, %d skipped (done), %d failed",
        len(summary.written),
        len(summary.skipped),
        len(summary.failed),
    )
    if summary.stopped_by is not None:
        name = signal.Signals(summary.stopped_by).name
        raise StoppedError(
            f"{name}: stopped after {len(summary.written)} case(s) written, {len(summary.skipped)} skipped, "
            f"{len(summary.failed)} failed; the unfinished case was rolled back; run the same command "
            "again to finish",
            signum=summary.stopped_by,
        )
