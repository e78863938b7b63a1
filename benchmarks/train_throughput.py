"""Training throughput on the demo's synthetic data: samples/s and the fraction of time waiting for data.

Generates (or reuses) the demo dataset, trains the demo configuration for a few
epochs with MLflow off, and reports the per-epoch figures the training loop
measures itself (``samples_per_s``, ``data_wait_fraction``), plus the wall time.
Writes JSON to benchmarks/results/train_throughput.json.

Run: python benchmarks/train_throughput.py [--epochs 4] [--data /tmp/medseg-bench-data]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.demo import packaged_config
from medseg.synthetic import make_dataset
from medseg.train import train

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "medseg-bench-data"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    data = Path(args.data)
    if not (data / "dataset.json").exists():
        make_dataset(data, cases=20, size=64, seed=0)
    overrides = [f"train.epochs={args.epochs}", "tracking.enabled=false", "train.val_every=1000", *args.set]
    cfg = packaged_config("demo", overrides, source="benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train(cfg, data, out_dir=Path(tmp) / "run")
        wall = time.perf_counter() - t0
    epochs = result.history
    steady = epochs[1:] or epochs  # the first epoch includes warm-up
    figures = {
        "epochs": len(epochs),
        "samples_per_s_mean": sum(e["samples_per_s"] for e in steady) / len(steady),
        "data_wait_fraction_mean": sum(e["data_wait_fraction"] for e in steady) / len(steady),
        "wall_s_total": wall,
        "per_epoch": [
            {k: e[k] for k in ("epoch", "samples_per_s", "data_wait_fraction", "train_loss")} for e in epochs
        ],
        "config": {"model": cfg.model.model_dump(), "patch_size": cfg.train.patch_size},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
    }
    print(f"samples/s (epochs 2..{len(epochs)}): {figures['samples_per_s_mean']:.2f}")
    print(f"data-wait fraction:             {figures['data_wait_fraction_mean']:.3f}")
    print(f"wall time for {len(epochs)} epochs:     {wall:.1f} s")
    out = HERE / "results" / "train_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
