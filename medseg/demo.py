"""The demo workflow: synthetic data -> train -> infer on held-out cases -> evaluate -> MLflow.

Uses ``workflows/demo.yaml`` settings (packaged as ``DEMO_CONFIG``) so it finishes
in minutes on two CPU cores; every stage is the real one.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from medseg.batch import run_inference
from medseg.config import Config, apply_overrides, config_from_dict
from medseg.data import load_dataset
from medseg.metrics import EvalRow, evaluate_folders, summarise, write_csv
from medseg.synthetic import make_dataset

log = logging.getLogger(__name__)

# The fast path is the real path with smaller numbers (kept in sync with workflows/demo.yaml).
DEMO_CONFIG: dict = {
    "seed": 0,
    "preprocess": {"spacing": [1.5, 1.5, 2.5]},
    "model": {"name": "classic_unet", "features": 16, "depth": 3, "norm": "instance"},
    "train": {"epochs": 40, "batch_size": 2, "patch_size": [48, 48, 16], "lr": 3e-3, "val_every": 10},
    "augment": {"samples_per_volume": 2, "rotate_prob": 0.15, "scale_prob": 0.15},
    "infer": {"overlap": 0.25},
    "postprocess": {"keep_largest": False, "min_volume_mm3": 30.0},
}


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
    cfg: Config = config_from_dict(
        apply_overrides(copy.deepcopy(DEMO_CONFIG), overrides), source="demo config"
    )
    run_dir = out / "run"
    resume = (run_dir / "checkpoints" / "last.pt").exists()
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
