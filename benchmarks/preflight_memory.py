"""Memory preflight: the estimate from the header beside the measured peak RSS of segmenting the case.

One synthetic int16 CT per shape (0.8x0.8x2.0 mm) is segmented on CPU by an untrained default
U-Net (classic_unet, features 16, depth 4, patch 96x96x64, model grid 1.5x1.5x2.5 mm, 3 labels),
each shape in a fresh process so that peak RSS (ru_maxrss) belongs to that case. Prints the
estimate by stage, the peak and their ratio; writes JSON to benchmarks/results/preflight_memory.json.

Run: python benchmarks/preflight_memory.py [--shapes 128x128x64 256x256x100 512x512x600]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "preflight_memory.json"
OVERRIDES = [
    "labels={0: bg, 1: a, 2: b}",
    "preprocess.spacing=[1.5,1.5,2.5]",
    "preprocess.intensity.window=[-100,200]",
    "preprocess.intensity.mean=50",
    "preprocess.intensity.std=50",
    "preprocess.crop_foreground=false",
    "train.patch_size=[96,96,64]",
]


def one_case(shape: tuple[int, int, int], folder: Path) -> dict:
    """Segment one synthetic CT of ``shape`` in this process; the estimate and the measured peak."""
    import numpy as np
    import torch

    from medseg.bundle import load_bundle, save_bundle
    from medseg.config import load_config
    from medseg.io import Volume, load_volume, write_nifti
    from medseg.io.preflight import preflight_inference
    from medseg.models import build_model
    from medseg.predict import predict_volume

    torch.manual_seed(0)
    cfg = load_config(None, OVERRIDES)
    save_bundle(folder / "bundle", build_model(cfg.model, out_channels=3), cfg, {})
    image = (np.random.default_rng(0).random(shape, dtype=np.float32) * 400 - 200).astype(np.float32)
    nii = write_nifti(Volume(image, np.diag([0.8, 0.8, 2.0, 1.0])), folder / "ct.nii.gz", dtype="int16")
    del image
    bundle = load_bundle(folder / "bundle")
    estimate = preflight_inference(nii, [bundle], max_memory=2**50)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    predict_volume([bundle], load_volume(nii))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "shape": list(shape),
        "estimate_bytes": estimate.total,
        "estimate_parts": estimate.parts,
        "rss_before_case_bytes": before,
        "peak_rss_bytes": peak,
        "peak_over_estimate": round(peak / estimate.total, 3),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["128x128x64", "256x256x100"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one shape in this process
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            shape = tuple(int(x) for x in args.one.split("x"))
            print(json.dumps(one_case(shape, Path(tmp))))  # type: ignore[arg-type]
        return
    rows = []
    for text in args.shapes:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, __file__, "--one", text], env=env, capture_output=True, text=True, check=True
        )
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{text:>12}: estimate {row['estimate_bytes'] / 2**30:.2f} GiB, peak RSS "
            f"{row['peak_rss_bytes'] / 2**30:.2f} GiB (x{row['peak_over_estimate']}), {row['seconds']} s"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    RESULTS.write_text(json.dumps({"machine": machine, "cases": rows}, indent=2))
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
