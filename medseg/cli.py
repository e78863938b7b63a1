"""The ``medseg`` command: one small function per subcommand over the library.

A ``MedsegError`` becomes one line on stderr and exit code 2 (``--debug`` shows
the traceback); every other exception is a bug and is shown in full.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from medseg.errors import ConfigError, MedsegError

log = logging.getLogger("medseg")


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("medseg")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # MLflow sets its own loggers' level, handler and format when it is imported (later than this):
    # its INFO lines ("Creating initial MLflow database tables...") broke into medseg's log in
    # another format. Its warnings and errors still show; --verbose leaves its level alone.
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Decoders log their own errors before raising; medseg reports the failure itself, on one line.
    for decoder in ("pydicom", "openjpeg", "pylibjpeg", "libjpeg", "jpeg_ls", "rle", "highdicom", "nibabel"):
        logging.getLogger(decoder).setLevel(logging.WARNING if verbose else logging.CRITICAL)


def cmd_demo(args: argparse.Namespace) -> int:
    from medseg.demo import run_demo

    overrides = list(args.set or [])
    if args.time_budget:
        overrides.append(_time_budget_override(args.time_budget))
    result = run_demo(args.out, cases=args.cases, size=args.size, overrides=overrides)
    from medseg.metrics import markdown_table, summarise

    summary = summarise(result.rows)
    print(markdown_table(result.rows))
    print(
        f"\nmean foreground Dice on {len({r.case for r in result.rows})} held-out cases: {summary['all']['mean_dice']:.4f}"
    )
    print(f"masks:     {result.predictions}")
    print(f"metrics:   {result.metrics_csv}")
    print(f"overlays:  {', '.join(str(p) for p in result.overlays)}")
    if result.report:
        print(f"QC report: {result.report}")
    if result.run_id:
        print(f"MLflow run {result.run_id} in {result.tracking_uri}")
        if result.tracking_uri.startswith("sqlite:"):
            print(f"open it with: mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.synthetic import make_dataset

    if args.modality == "ct" and args.channels != 1:
        raise ConfigError(f"--channels {args.channels}: synthetic CT has one channel; use --modality mr")
    if args.channels < 1:
        raise ConfigError(f"--channels {args.channels}: expected at least 1")
    path = make_dataset(
        args.out,
        cases=args.cases,
        size=args.size,
        seed=args.seed,
        dicom=args.dicom,
        modality=args.modality,
        channels=args.channels,
        layout=args.layout,
    )
    print(path)
    return 0


def cmd_series(args: argparse.Namespace) -> int:
    from medseg.errors import InputError
    from medseg.io import scan_dicom

    scan = scan_dicom(args.dir)
    for s in scan.series:
        spacing = " x ".join(f"{v:.4g}" for v in s.spacing)
        size = " x ".join(str(v) for v in s.size)
        print(f"series {s.series_id}  (hash {s.uid_hash})")
        print(
            f"  {s.modality or '-'}  {s.description or '(no description)'!r}  {s.n_slices} slices  "
            f"size {size}  spacing {spacing} mm  {s.orientation}  {'original' if s.original else 'derived'}"
        )
        print(f"  {len(s.files)} files, transfer syntax {_ts_name(s.transfer_syntax)}")
        for problem in s.problems:
            print(f"  PROBLEM: {problem}")
    if scan.skipped:
        print(f"skipped {len(scan.skipped)} file(s):")
        for path, reason in scan.skipped:
            print(f"  {path}: {reason}")
    if not scan.series:
        reasons = sorted({reason for _, reason in scan.skipped})
        detail = (
            f" (skipped {len(scan.skipped)} files: {'; '.join(reasons[:4])})"
            if scan.skipped
            else " (no files)"
        )
        raise InputError(args.dir, f"no DICOM image series found{detail}")
    return 0


def _ts_name(uid: str) -> str:
    from pydicom.uid import UID

    return f"{UID(uid).name}" if uid else "unknown"


def cmd_convert(args: argparse.Namespace) -> int:
    from medseg.errors import InputError, OutputError
    from medseg.io import is_image_file, is_nifti, load_volume, scan_dicom, select_series, write_nifti
    from medseg.io.nifti import compact_dtype

    source, out = Path(args.input), Path(args.output)
    if not is_nifti(out):
        raise OutputError(f"{out}: the output must be a NIfTI file (.nii.gz or .nii)")
    if out.exists() and not args.overwrite:
        raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
    if not source.exists():
        raise InputError(source, "not found")
    if out.resolve() == source.resolve():
        raise OutputError(f"{out}: is the input; medseg never overwrites its inputs")
    if source.is_file() and not is_image_file(source):
        from medseg.io.dicom_labels import label_object_modality

        if label_object_modality(source):
            return _convert_label_object(source, out, args)
    if args.roi or args.reference:
        raise InputError(source, "--roi and --reference are for an RTSTRUCT or DICOM SEG file, and this is not one")
    scan = None
    if not (source.is_file() and is_image_file(source)):  # NIfTI, NRRD, MetaImage, zip: no folder scan
        scan = scan_dicom(source)
        info = select_series(scan, source, args.series)
        if len(scan.series) > 1:
            how = "chosen with --series" if args.series else "the main one; pick another with --series"
            print(f"{source}: {len(scan.series)} series found; converting {info.label()}, {how}")
    volume = load_volume(source, series_id=args.series, allow_tilt=args.resample_tilt, scan=scan)
    dtype = compact_dtype(volume.array)
    write_nifti(volume, out, overwrite=args.overwrite, dtype=dtype)
    print(
        f"{out}: {volume.shape} voxels, spacing {tuple(round(s, 4) for s in volume.spacing)} mm, {volume.axcodes()}, "
        f"{dtype or volume.array.dtype}"
    )
    return 0


def _convert_label_object(source: Path, out: Path, args: argparse.Namespace) -> int:
    """``medseg convert RTSTRUCT|SEG labels.nii.gz``: the label map on its series' grid, with label tables."""
    from medseg.errors import ConfigError, OutputError
    from medseg.io import write_label_tables, write_nifti
    from medseg.io.dicom_labels import parse_roi_specs, read_label_object
    from medseg.io.labeltables import label_table_paths

    try:
        rois = parse_roi_specs(args.roi)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    for table in label_table_paths(out):  # the mask and its tables are one result: refused before either
        if table.exists() and not args.overwrite:
            raise OutputError(f"{table}: already exists (pass --overwrite to replace it)")
    imported = read_label_object(source, args.reference, rois=rois, series_id=args.series)
    write_nifti(imported.volume, out, overwrite=args.overwrite, labels=imported.labels)
    itksnap, slicer = write_label_tables(out, imported.labels, overwrite=args.overwrite)
    for note in imported.notes:
        print(f"{source.name}: {note}")
    listed = ", ".join(f"{v} {imported.labels[v]} ({n} voxels)" for v, n in imported.counts.items())
    print(f"{out}: {listed}; series {imported.series}, {imported.volume.shape} voxels, "
          f"label tables {itksnap.name} and {slicer.name}")
    return 0


def cmd_import_dicom(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.importing import import_dicom_dataset
    from medseg.io.dicom_labels import parse_roi_specs

    try:
        rois = parse_roi_specs(args.roi)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    summary = import_dicom_dataset(args.studies, args.out, rois, name=args.name, overwrite=args.overwrite)
    for case in summary.cases:
        voxels = ", ".join(f"{label} {n}" for label, n in case["voxels"].items())
        print(f"{case['case']}: series {case['series']}, {case['labels_from']} ({voxels} voxels)")
        for note in case["notes"]:
            print(f"  {note}")
    for path, why in summary.skipped:
        print(f"SKIPPED {path}: {why}", file=sys.stderr)
    print(f"{summary.out}: {len(summary.cases)} case(s), {len(summary.skipped)} skipped; "
          f"train with: medseg train --data {summary.out}")
    return 1 if summary.skipped else 0


def cmd_check(args: argparse.Namespace) -> int:
    from medseg.data import check_dataset

    problems = check_dataset(
        args.dataset, allow_outside_root=args.allow_outside_root, resample_channels=args.resample_channels
    )
    for p in problems:
        print(p)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_train(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.train import train

    overrides = [*(args.set or []), *_dataset_overrides(args)]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.time_budget:
        overrides.append(_time_budget_override(args.time_budget))
    if args.register:
        overrides.append(f"tracking.registered_model_name={args.register}")
    if args.alias:
        if not args.register:
            raise ConfigError("--alias needs --register NAME (the registered model the alias belongs to)")
        overrides.append(f"tracking.alias={args.alias}")
    cfg = load_config(args.config, overrides)
    if args.fold:
        from medseg.folds import train_folds

        results = train_folds(cfg, args.data, args.fold, out_dir=args.out, resume=args.resume or False)
    else:
        results = [train(cfg, args.data, out_dir=args.out, resume=args.resume or False)]
    from medseg.runtime import rank_and_world

    if rank_and_world()[0] != 0:
        return 0  # under torchrun, rank 0 reports
    for result in results:
        print(f"run folder: {result.run_dir}")
        print(f"bundle: {result.bundle}")
        print(f"best validation Dice: {result.best_dice:.4f}")
        if result.run_id:
            print(f"MLflow run: {result.run_id}")
    if len(results) > 1:
        print(f"ensemble of the folds: medseg infer -m {results[0].run_dir.parent} -i SCANS -o MASKS")
    return 0


def _fold(text: str) -> int | str:
    """An argparse type: a fold index (0, 1, ...) or ``all``."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number or all, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a fold number of at least 0 or all, got {text}")
    return value


def _dataset_overrides(args: argparse.Namespace) -> list[str]:
    """``--allow-outside-root`` and ``--resample-channels`` as config overrides."""
    out = []
    if args.allow_outside_root:
        out.append("data.allow_outside_root=true")
    if args.resample_channels:
        out.append("preprocess.resample_channels=true")
    return out


def _add_dataset_options(commands: Mapping[str, argparse.ArgumentParser]) -> None:
    """Dataset options (nnU-Net v2 and multi-channel datasets, entries outside the root, MR phantoms)."""
    for name in ("check", "train", "augment-preview"):
        p = commands[name]
        p.description = f"{p.description or ''}. DATASET: a Decathlon or nnU-Net v2 raw dataset folder."
        p.add_argument(
            "--allow-outside-root",
            action="store_true",
            help="accept dataset.json entries that lead outside the dataset folder (default: refuse them)",
        )
        p.add_argument(
            "--resample-channels",
            action="store_true",
            help="resample channels of a case onto its first channel's grid (default: refuse a mismatch)",
        )
    p = commands["infer"]
    p.add_argument(
        "--series",
        action="append",
        metavar="UID",
        help="DICOM series to segment (UID or hash); once per channel, in channel order, for a "
        "multi-channel model",
    )
    p.add_argument(
        "--resample-channels",
        action="store_true",
        help="resample a case's channels onto its first channel's grid (default: refuse a mismatch)",
    )
    p = commands["synth"]
    p.add_argument("--modality", choices=["ct", "mr"], default="ct", help="CT phantoms or multi-contrast MR")
    p.add_argument(
        "--channels", type=int, default=1, help="MR channels per case (FLAIR, T1w, T1gd, T2w, ...)"
    )
    p.add_argument(
        "--layout",
        choices=["msd", "nnunet"],
        default="msd",
        help="Decathlon folder (several channels as one 4D NIfTI) or nnU-Net v2 raw (CASE_000k files)",
    )


def cmd_augment_preview(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.transforms import augment_preview

    cfg = load_config(args.config, list(args.set or []) + _dataset_overrides(args))
    path = augment_preview(cfg, args.data, args.out, samples=args.samples, seed=args.seed)
    print(path)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from medseg.startup import import_monai_lean

    import_monai_lean()  # before anything imports MONAI: about 2 s less start-up (see medseg.startup)
    from medseg.batch import check_output_folder, expand_models, run_inference
    from medseg.bundle import load_bundle
    from medseg.errors import StoppedError
    from medseg.runtime import resolve_device

    check_output_folder(args.input, args.output)
    device = resolve_device(args.device)
    bundles = [load_bundle(m, device=device) for m in expand_models(args.model)]
    tracker = None
    if args.mlflow_run:
        from medseg.config import TrackingConfig
        from medseg.tracking import Tracker

        tracker = Tracker(TrackingConfig())
        tracker.start(run_id=args.mlflow_run)
    status = "FAILED"
    try:
        summary = run_inference(
            bundles,
            args.input,
            args.output,
            device=device,
            tta=args.tta,
            overwrite=args.overwrite,
            progress=True,
            dicom_seg=args.dicom_seg,
            crf=args.crf,
            save_probabilities=args.save_probabilities,
            report=args.report,
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            blend_mode=args.blend_mode,
            cpu_bf16=True if args.cpu_bf16 else None,
            backend=args.backend,
            precision=args.precision,
            tracker=tracker,
            max_memory=args.max_memory,
            output_format=args.output_format,
            rtstruct=args.rtstruct,
            series=args.series,
            resample_channels=args.resample_channels,
        )
        status = "FINISHED"
    except StoppedError:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.end(status)
    rank = f"rank {summary.rank}/{summary.world_size}: " if summary.world_size > 1 else ""
    print(
        f"{rank}{len(summary.written)} written, {len(summary.skipped)} skipped (done), "
        f"{len(summary.failed)} failed"
    )
    if summary.differing:
        print(
            f"{len(summary.differing)} skipped case(s) were done with other options; --overwrite redoes them"
        )
    if summary.report:
        print(f"QC report: {summary.report}")
    for path, reason in summary.failed:
        print(f"FAILED {path}: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "monai-bundle":
        from medseg.errors import ConfigError
        from medseg.monai_bundle import export_monai_bundle

        if not args.output:
            raise ConfigError("--format monai-bundle writes a new folder: pass -o DIR")
        out = export_monai_bundle(args.model, args.output)
        print(f"monai-bundle: {out}")
        print(
            f"run it: python -m monai.bundle run --config_file {out}/configs/inference.json "
            f"--bundle_root {out} --dataset_dir IMAGES --output_dir MASKS"
        )
        return 0
    from medseg.export import export_bundle

    records = export_bundle(args.model, args.format, args.output)
    for fmt, record in records.items():
        print(f"{fmt}: {Path(args.output or args.model) / record['file']}")
        for name, result in (record.get("parity") or {}).get("results", {}).items():
            if "skipped" in result:
                print(f"  parity {name}: not measured ({result['skipped']})")
                continue
            dice = ", ".join(f"{k} {v:.4f}" for k, v in result["dice"].items())
            verdict = "passed" if result["passed"] else "FAILED (auto will not choose it)"
            print(
                f"  parity {name} vs torch fp32: agreement {100 * result['agreement']:.3f} %, "
                f"Dice {dice}: {verdict}"
            )
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from medseg.tuning import tune_on_dataset

    report = tune_on_dataset(args.model, args.data, args.output, max_cases=args.max_cases)
    print(report.table())
    kept = report.kept_summary() or "nothing"
    print(f"\nkept: {kept}\ntuned bundle: {args.output} (infer -m {args.output} applies it)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg.metrics import check_outputs_are_not_inputs, evaluate_folders, markdown_table, write_csv

    check_outputs_are_not_inputs([args.out, Path(args.out).with_suffix(".json")], args.pred, args.ref)
    rows = evaluate_folders(
        args.pred, args.ref, model=args.model, labels_file=args.labels, tolerance_mm=args.tolerance
    )
    out = write_csv(rows, args.out, tolerance_mm=args.tolerance)
    print(markdown_table(rows, tolerance_mm=args.tolerance))
    print(f"\nper-case metrics: {out}\nsummary: {out.with_suffix('.json')}")
    return 0


# ----------------------------------------------------------------------------- argument checks
# A bad flag value is one line and exit 2 from argparse, before any model or data is loaded.


class _Parser(argparse.ArgumentParser):
    """argparse with medseg's error format: one line on stderr naming the command, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; every option's help ends with its default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and "default" not in text.lower()
        ):
            text += " (default: %(default)s)"
        return text


def _bounded(kind: type, *, low: float | None = None, high: float | None = None, high_open: bool = False):
    """An argparse type: a ``kind`` (int or float) within [low, high] (or [low, high) when high_open)."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if (
            value != value
            or (low is not None and value < low)
            or (high is not None and (value >= high if high_open else value > high))
        ):
            upper = "" if high is None else (f" and below {high}" if high_open else f" and at most {high}")
            raise argparse.ArgumentTypeError(f"expected a value of at least {low}{upper}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_positive_int = _bounded(int, low=1)
_non_negative_int = _bounded(int, low=0)


def _device(text: str) -> str:
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from auto, cpu, cuda, cuda:N)")
    return text


def _memory_size(text: str) -> int:
    from medseg.io.preflight import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _input_path(text: str) -> str:
    """An input that exists and is a regular file or a folder (not a device, pipe or socket)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: not found")
    if not (path.is_file() or path.is_dir()):
        raise argparse.ArgumentTypeError(f"{text}: not a file or folder (a device, pipe or socket)")
    return text


def _output_folder(text: str) -> str:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a folder; --output names a folder")
    return text


_MAIN_EXAMPLES = """\
examples:
  medseg demo --out runs/demo
  medseg convert dicom/ct_study ct.nii.gz
  medseg train --data data/Task09_Spleen --config workflows/spleen_ct.yaml --out runs/spleen
  medseg infer -m runs/spleen/bundle -i scans/ -o masks/
  medseg evaluate --pred masks/ --ref data/Task09_Spleen/labelsTs --out metrics.csv

Errors a user can fix are one line on stderr and exit code 2 (--debug shows the traceback).
"""

_TRAIN_EXAMPLES = """\
examples:
  medseg train --data data/Task09_Spleen --out runs/spleen
  medseg train --data data/Task09_Spleen --config workflows/spleen_ct.yaml -f 0 1 2 3 4 --out runs/spleen
  medseg train --data data/tiny --set train.epochs=2 model.features=4 model.depth=2 --out runs/tiny
  medseg train --data data/Task09_Spleen --out runs/spleen --resume
"""

_INFER_EXAMPLES = """\
examples:
  medseg infer -m runs/spleen/bundle -i scan.nii.gz -o masks/
  medseg infer -m runs/spleen/bundle -i dicom/study1 dicom/study2 -o masks/ --dicom-seg
  medseg infer -m runs/spleen -i scans/ -o masks/ --tta          # ensemble of fold_*/bundle
  medseg infer -m models:/spleen/3 -i scans/ -o masks/ --device cpu --overlap 0.5
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``medseg`` parser: global options, then one small function per subcommand."""
    from medseg import __version__

    parser = _Parser(
        prog="medseg",
        description="Medical image segmentation: DICOM/NIfTI -> U-Net -> masks.",
        epilog=_MAIN_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_synth, _add_series, _add_convert, _add_import_dicom, _add_check, _add_train, _add_augment_preview,
                _add_infer, _add_evaluate, _add_export, _add_tune):
        add(sub)
    _add_dataset_options(sub.choices)
    return parser


def _command(sub: Any, name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose description is its help line, with medseg's help format."""
    return sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=_HelpFormatter)


# shared option groups


def _add_set_option(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help=f"config overrides, e.g. --set {example} (repeatable)",
    )


def _time_budget_override(text: str) -> str:
    """``train.time_budget_s=...`` from ``--time-budget``. A number without a unit is seconds, as
    documented; under a minute that is said (``--time-budget 11`` meant as minutes trained for 11 s
    and shipped a model with Dice 0.06, with nothing but the plan's "0.2 min" to say why)."""
    import re

    from medseg.plan import parse_duration

    seconds, bare = parse_duration(text), text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", bare) and seconds < 60:
        log.warning("--time-budget %s is %g seconds (a number without a unit is seconds): for minutes write %sm",
                    bare, seconds, bare)
    return f"train.time_budget_s={seconds}"


def _add_time_budget_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--time-budget", help="wall-clock budget, e.g. 15m or 8h: a measured warm-up plans patch, batch, width and steps to end within it")


def _add_seed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed")


# one function per subcommand


def _add_demo(sub: Any) -> None:
    p = _command(sub, "demo", "synthetic data -> train -> infer -> evaluate -> MLflow")
    p.add_argument("--out", default="runs/demo", help="folder for the data, the run and the predictions")
    p.add_argument("--cases", type=_bounded(int, low=4), default=20, help="synthetic cases to make")
    p.add_argument("--size", type=_bounded(int, low=16, high=512), default=64, help="voxels per side")
    _add_set_option(p, "train.epochs=5 model.depth=3")
    _add_time_budget_option(p)
    p.set_defaults(func=cmd_demo)


def _add_synth(sub: Any) -> None:
    p = _command(sub, "synth", "write a Decathlon-layout synthetic CT dataset")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--cases", type=_positive_int, default=20, help="cases to make")
    p.add_argument("--size", type=_bounded(int, low=8, high=512), default=64, help="voxels per side")
    _add_seed_option(p)
    p.add_argument("--dicom", action="store_true", help="also write every image as a DICOM series")
    p.set_defaults(func=cmd_synth)


def _add_series(sub: Any) -> None:
    p = _command(sub, "series", "list the DICOM series under a folder")
    p.add_argument("dir", help="folder to scan (recursively)")
    p.set_defaults(func=cmd_series)


_CONVERT_EXAMPLES = """\
examples:
  medseg convert dicom/ct_study ct.nii.gz
  medseg convert dicom/ct_study/RS.dcm labels.nii.gz                  # RTSTRUCT, its CT in the same folder
  medseg convert RS.dcm labels.nii.gz --reference dicom/ct_study --roi liver --roi spleen=Spleen_1
  medseg convert seg.dcm labels.nii.gz --reference dicom/ct_study     # DICOM SEG
"""


def _add_convert(sub: Any) -> None:
    p = _command(
        sub,
        "convert",
        "DICOM series (or NIfTI) -> NIfTI with exact geometry; RTSTRUCT or DICOM SEG -> label map",
        epilog=_CONVERT_EXAMPLES,
    )
    p.add_argument("input", help="DICOM folder or file, a NIfTI file, or an RTSTRUCT / DICOM SEG file")
    p.add_argument("output", help="NIfTI file to write (.nii.gz or .nii)")
    p.add_argument("--series", help="SeriesInstanceUID (or its hash) when the folder holds several")
    p.add_argument(
        "--reference",
        help="RTSTRUCT/SEG: the folder (or zipped study) of the series it was drawn on (default: the file's folder)",
    )
    p.add_argument(
        "--roi",
        action="append",
        metavar="NAME|LABEL=ROI",
        help="RTSTRUCT/SEG: an ROI or segment to read, as label 1, 2, ... in the order given (names matched "
        "without regard to case; LABEL=ROI renames it; LABEL=A|B takes the first of those the file holds); "
        "default: all. Where ROIs overlap, the smallest is kept",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--resample-tilt",
        action="store_true",
        help="resample a gantry-tilted series onto an orthogonal grid (default: refuse it)",
    )
    p.set_defaults(func=cmd_convert)


def _add_import_dicom(sub: Any) -> None:
    p = _command(
        sub,
        "import-dicom",
        "a folder of DICOM studies with RTSTRUCT or DICOM SEG -> a training dataset (Decathlon layout)",
        epilog="""\
examples:
  medseg import-dicom planning_export/ --roi liver --roi "spleen=Spleen|Milz|spleen_1" --out data/abdomen
  medseg train --data data/abdomen --time-budget 8h

Each RTSTRUCT/SEG under the folder, with the series it references, becomes case_000, case_001, ...;
one whose ROIs are missing or empty, or whose series is not there, is skipped (exit code 1).
""",
    )
    p.add_argument("studies", help="folder (or zipped export) of DICOM studies, searched recursively")
    p.add_argument("--out", required=True, help="dataset folder to write (imagesTr, labelsTr, dataset.json)")
    p.add_argument(
        "--roi",
        action="append",
        required=True,
        metavar="NAME|LABEL=ROI",
        help="an ROI or segment every case must hold, as label 1, 2, ... in the order given (names matched "
        "without regard to case; LABEL=ROI renames it; LABEL=A|B|C takes the first of those names a file holds)",
    )
    p.add_argument("--name", help="the dataset's name in dataset.json (default: the folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.set_defaults(func=cmd_import_dicom)


def _add_check(sub: Any) -> None:
    p = _command(sub, "check", "dataset integrity report; exit 1 on problems")
    p.add_argument("dataset", help="Decathlon or nnU-Net v2 dataset folder (with dataset.json)")
    p.set_defaults(func=cmd_check)


def _add_train(sub: Any) -> None:
    p = _command(sub, "train", "train a model on a Decathlon dataset folder", _TRAIN_EXAMPLES)
    p.add_argument("--data", required=True, help="Decathlon or nnU-Net v2 dataset folder (with dataset.json)")
    p.add_argument("--config", help="YAML config (default: the built-in defaults, then the plan)")
    p.add_argument(
        "--epochs",
        type=_positive_int,
        help="shortcut for --set train.epochs=N (on a CPU with no --time-budget and no patch given: the patch "
        "measured for the default 15-min budget, each epoch a tenth of its steps)",
    )
    p.add_argument(
        "-f",
        "--fold",
        nargs="+",
        type=_fold,
        metavar="K",
        help="folds to train, as nnU-Net: each into <out>/fold_<k>, split in <out>/splits.json "
        "(train.num_folds folds, made once, reused); all = every case (validation on the training "
        "cases) (default: one run into --out, split by train.val_fraction)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="auto|CHECKPOINT",
        help="continue the run in --out: 'auto' (default) picks the newest checkpoint that loads",
    )
    _add_set_option(p, "train.epochs=5 model.depth=3")
    _add_time_budget_option(p)
    p.add_argument(
        "--out",
        help="run folder (default runs/<dataset>/<model>/fold_<k>); with -f, the folder of the folds "
        "(default runs/<dataset>/<model>)",
    )
    p.add_argument(
        "--register",
        metavar="NAME",
        help="register the logged MLflow model as a new version of NAME (default: not registered)",
    )
    p.add_argument(
        "--alias",
        metavar="ALIAS",
        help="point ALIAS (e.g. champion) of the registered model at the new version: models:/NAME@ALIAS",
    )
    p.set_defaults(func=cmd_train)


def _add_augment_preview(sub: Any) -> None:
    p = _command(sub, "augment-preview", "picture of augmented training patches with their labels")
    p.add_argument("--data", required=True, help="Decathlon dataset folder")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--config", help="YAML config (default: the built-in defaults)")
    p.add_argument("--samples", type=_positive_int, default=8, help="patches to show")
    _add_seed_option(p)
    _add_set_option(p, "augment.flip_prob=0")
    p.set_defaults(func=cmd_augment_preview)


def _add_infer(sub: Any) -> None:
    p = _command(sub, "infer", "segment NIfTI files / DICOM series with a bundle", _INFER_EXAMPLES)
    p.add_argument(
        "-m",
        "--model",
        required=True,
        action="append",
        help="bundle folder, folder of fold bundles (fold_*/bundle) or MLflow URI; repeat to ensemble",
    )
    p.add_argument(
        "-i",
        "--input",
        required=True,
        nargs="+",
        type=_input_path,
        help="NIfTI, NRRD or MetaImage files, DICOM series folders, zipped DICOM studies, or folders of these",
    )
    p.add_argument(
        "-o", "--output", required=True, type=_output_folder, help="folder for <case>_seg.nii.gz and sidecars"
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average predictions over axis flips (infer.tta_flips: 2 or 8 passes, about 2x or 3-8x "
        "the time), or never (--no-tta); default: what the model's validation tuning chose",
    )
    p.add_argument(
        "--crf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refine with the dense CRF (postprocess.crf in the bundle), or never (--no-crf); "
        "default: what the model's validation tuning chose",
    )
    p.add_argument(
        "--device", type=_device, default=None, help="auto, cpu, cuda or cuda:N (default: cuda when present)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo every case (default: skip the done ones; incomplete ones are always redone)",
    )
    _add_infer_outputs(p)
    _add_infer_runtime(p)
    p.add_argument(
        "--mlflow-run",
        metavar="RUN_ID",
        help="log per-case stage timings and the QC report to this MLflow run ($MLFLOW_TRACKING_URI)",
    )
    p.set_defaults(func=cmd_infer)


def _add_infer_outputs(p: argparse.ArgumentParser) -> None:
    """What ``infer`` writes besides the mask: DICOM SEG, RTSTRUCT, format, probabilities, report."""
    p.add_argument(
        "--dicom-seg", action="store_true", help="also write <stem>_seg.dcm (DICOM SEG) for DICOM inputs"
    )
    p.add_argument(
        "--rtstruct",
        action="store_true",
        help="also write <stem>_seg_rtstruct.dcm (RT Structure Set, contours per label) for DICOM inputs",
    )
    p.add_argument(
        "--output-format",
        choices=["nifti", "nrrd", "metaimage", "input"],
        default="nifti",
        help="mask format: nifti (.nii.gz), nrrd, metaimage (.mha), or input (NRRD/MetaImage inputs keep "
        "their format, others NIfTI)",
    )
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <stem>_seg_prob_<k>.nii.gz per class and <stem>_seg_entropy.nii.gz (uncertainty)",
    )
    p.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write report.html (QC: overlays, volumes, components, flags) in the output folder",
    )


def _add_infer_runtime(p: argparse.ArgumentParser) -> None:
    """How ``infer`` runs the network: sliding window, memory, backend and precision."""
    p.add_argument(
        "--overlap",
        type=_bounded(float, low=0.0, high=1.0, high_open=True),
        help="sliding-window overlap in [0, 1) (default: the bundle's)",
    )
    p.add_argument(
        "--sw-batch-size", type=_positive_int, help="windows per forward pass (default: the bundle's)"
    )
    p.add_argument(
        "--blend-mode", choices=["gaussian", "constant"], help="window blending (default: the bundle's)"
    )
    p.add_argument(
        "--max-memory",
        type=_memory_size,
        metavar="SIZE",
        help="memory a case may need, e.g. 8G or 512M: a case whose header says it needs more fails with "
        "the estimate and the batch goes on (default: half of this machine's memory)",
    )
    p.add_argument("--cpu-bf16", action="store_true", help="CPU only: bfloat16 autocast, channels-last 3D")
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime", "openvino"],
        help="network runtime (default: the bundle's; auto = the fastest that passed parity with torch "
        "fp32, measured once on this machine and cached)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="network precision (default: the bundle's; auto: bf16/fp16 on CUDA, on CPU the fastest that "
        "passed parity, measured on this machine)",
    )


def _add_evaluate(sub: Any) -> None:
    p = _command(
        sub, "evaluate", "Dice, HD95, surface Dice and volumes per label and case between two folders of masks"
    )
    p.add_argument("--pred", required=True, help="folder of <case>_seg.nii.gz (or <case>.nii.gz)")
    p.add_argument("--ref", required=True, help="folder of reference <case>.nii.gz")
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help="bundle folder or MLflow model URI whose label scheme the predictions use "
        "(default: the one the masks' sidecars record)",
    )
    p.add_argument(
        "--labels",
        metavar="DATASET_JSON",
        default=None,
        help="the references' dataset.json (Decathlon 'labels' map): refused when it differs from the model's",
    )
    p.add_argument("--out", default="metrics.csv", help="per-case CSV; the JSON summary goes beside it")
    p.add_argument(
        "--tolerance", type=_bounded(float, low=0.0), default=2.0, help="surface Dice tolerance in mm"
    )
    p.set_defaults(func=cmd_evaluate)


def _add_export(sub: Any) -> None:
    p = _command(
        sub,
        "export",
        "export a bundle for other tools: ONNX and OpenVINO (into the bundle, with a parity record), "
        "or a MONAI bundle that runs with MONAI alone",
    )
    p.add_argument("-m", "--model", required=True, help="bundle folder or MLflow model URI")
    p.add_argument(
        "--format",
        default="all",
        choices=["onnx", "openvino", "all", "monai-bundle"],
        help="what to write; all = onnx and openvino",
    )
    p.add_argument(
        "-o",
        "--output",
        help="onnx/openvino: a copy of the bundle with the exports goes here (default: into the bundle); "
        "monai-bundle: the new folder (required)",
    )
    p.set_defaults(func=cmd_export)


def _add_tune(sub: Any) -> None:
    p = _command(
        sub,
        "tune",
        "choose a bundle's post-processing again (flip TTA, CRF, per-label steps) on labelled cases it has "
        "not seen, e.g. a site's own annotated scans; writes a tuned copy",
        epilog="example:\n  medseg tune -m runs/spleen/bundle --data data/site_cases -o runs/spleen/bundle_site\n",
    )
    p.add_argument("-m", "--model", required=True, help="bundle folder or MLflow model URI (not modified)")
    p.add_argument("--data", required=True, type=_input_path,
                   help="dataset folder (Decathlon or nnU-Net layout) whose labelled cases to tune on")
    p.add_argument("-o", "--output", required=True, type=_output_folder, help="the tuned bundle's folder")
    p.add_argument("--max-cases", type=_bounded(int, low=1), default=20,
                   help="tune on the first N labelled cases by name (their probabilities are held in memory)")
    p.set_defaults(func=cmd_tune)


COMPUTE_COMMANDS = frozenset({"demo", "train", "infer", "tune"})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from medseg.tracking import no_usage_telemetry

    no_usage_telemetry()  # before MLflow is imported (MLFLOW_DISABLE_TELEMETRY=false keeps it on)
    if args.command in COMPUTE_COMMANDS:  # the commands that run a network
        from medseg.runtime import fit_threads_to_cpus

        fit_threads_to_cpus()
    try:
        return int(args.func(args) or 0)
    except MedsegError as exc:
        if args.debug:
            raise
        print(f"medseg {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130


def console_main() -> NoReturn:
    """The ``medseg`` executable: ``main`` on ``sys.argv``, then exit without the interpreter's last
    full garbage collection over the millions of objects torch and MONAI leave behind (about 1 s of
    every run on 2 cores). ``atexit`` handlers (log flushing, MLflow, temporary folders) still run."""
    code = main()
    gc.freeze()
    sys.exit(code)
