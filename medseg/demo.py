"""The demo workflow: synthetic data -> train -> infer on held-out cases -> evaluate -> MLflow.

Uses ``medseg/configs/demo.yaml`` (shipped in the package; ``workflows/demo.yaml`` links to it) so it finishes
in minutes on two CPU cores; every stage is the real one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from medseg.batch import run_inference
from medseg.checkpoint import has_checkpoint
from medseg.config import Config, apply_overrides, config_from_dict
from medseg.data import load_dataset
from medseg.metrics import EvalRow, evaluate_folders, summarise, write_csv
from medseg.synthetic import make_dataset

log = logging.getLogger(__name__)

# The fast path is the real path with smaller numbers (kept in sync with workflows/demo.yaml).
CONFIGS = resources.files("medseg") / "configs"


def packaged_config(name: str, overrides: list[str] | None = None, *, source: str | None = None) -> Config:
    """A config shipped with medseg (``medseg/configs/<name>.yaml``) with ``--set`` overrides applied."""
    tree = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()) or {}
    return config_from_dict(apply_overrides(tree, overrides), source=source or f"{name} config")


@dataclass
class DemoResult:
    data: Path
    predictions: Path
    metrics_csv: Path
    rows: list[EvalRow]
    run_id: str | None
    tracking_uri: str
    overlays: list[Path]
    report: Path | None = None


def run_demo(
    out: str | Path = "runs/demo", *, cases: int = 20, size: int = 64, overrides: list[str] | None = None
) -> DemoResult:
    from medseg.bundle import load_bundle
    from medseg.io import load_volume, read_nifti
    from medseg.train import train
    from medseg.viz import overlay_png

    out = Path(out)
    data = out / "data"
    if not (data / "dataset.json").exists():
        log.info("generating %d synthetic cases in %s", cases, data)
        make_dataset(data, cases=cases, size=size, seed=0)
    cfg = packaged_config("demo", overrides)
    run_dir = out / "run"
    resume = has_checkpoint(run_dir)  # any checkpoint, timed.pt after an early SIGTERM included
    result = train(cfg, data, out_dir=run_dir, resume=resume)
    bundle = load_bundle(result.bundle)
    dataset = load_dataset(data)
    predictions = out / "predictions"
    inference = run_inference(
        [bundle],
        [c.image for c in dataset.test],
        predictions,
        overwrite=True,
        report=True,
        progress=True,
    )
    rows = evaluate_folders(predictions, data / "labelsTs", labels=bundle.labels)
    metrics_csv = write_csv(rows, out / "metrics.csv")
    overlays = []
    for case in dataset.test[:2]:
        image = load_volume(case.image)
        mask = read_nifti(predictions / f"{case.name}_seg.nii.gz", kind="label")
        overlays.append(
            overlay_png(
                image,
                mask.array,
                out / "overlays" / f"{case.name}.png",
                labels=bundle.labels,
                title=f"{case.name}: predicted mask",
            )
        )
    from medseg.tracking import Tracker

    tracker = Tracker(cfg.tracking)
    if result.run_id:
        tracker.start(run_id=result.run_id)
        summary = summarise(rows)
        tracker.log_metrics(
            {f"test_dice_{k}": v["mean_dice"] for k, v in summary.items()}, step=cfg.train.epochs
        )
        tracker.log_artifact(metrics_csv, "evaluation")
        for png in overlays:
            tracker.log_artifact(png, "overlays")
        tracker.end()
    return DemoResult(
        data, predictions, metrics_csv, rows, result.run_id, tracker.uri, overlays, report=inference.report
    )
