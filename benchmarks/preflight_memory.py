"""Memory preflight: the estimate from the header beside the measured peak RSS of segmenting the case.

One synthetic int16 CT per shape (0.8x0.8x2.0 mm) is segmented on CPU by an untrained network
(by default the classic U-Net, features 16, depth 4, patch 96x96x64; model grid 1.5x1.5x2.5 mm,
3 labels), each shape in a fresh process so that peak RSS (ru_maxrss) belongs to that case. The
first shape runs twice: first with an empty cache, so the ``auto`` backend is measured (once per
machine and bundle, before any case), then, like every other shape, with the choice cached. Prints
the estimate by stage, the peak and their ratio; writes JSON to benchmarks/results/ (``--out``).

Run: python benchmarks/preflight_memory.py [--shapes 128x128x64 256x256x100 512x512x600]
     python benchmarks/preflight_memory.py --model dynunet --features 8 --patch 80x96x32 \
         --out benchmarks/results/preflight_memory_dynunet.json   # the budget plan's usual network
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
]


def one_case(shape: tuple[int, int, int], folder: Path, network: list[str]) -> dict:
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
    cfg = load_config(None, OVERRIDES + network)
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
    parser.add_argument("--model", default="classic_unet", help="model.name (default: classic_unet)")
    parser.add_argument("--features", type=int, default=16, help="model.features (default: 16)")
    parser.add_argument("--patch", default="96x96x64", help="the sliding window, voxels (default: 96x96x64)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON written (default: {RESULTS})")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one shape in this process
    args = parser.parse_args()
    patch = ",".join(args.patch.split("x"))
    network = [f"model.name={args.model}", f"model.features={args.features}", f"train.patch_size=[{patch}]"]
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            shape = tuple(int(x) for x in args.one.split("x"))
            print(json.dumps(one_case(shape, Path(tmp), network)))  # type: ignore[arg-type]
        return
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        # a cache of its own: the first case pays the backend measurement (once per machine and
        # bundle, before any case is read), measured apart; every case is then timed with it cached
        env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": cache}
        for i, text in enumerate([args.shapes[0], *args.shapes]):
            proc = subprocess.run(
                [sys.executable, __file__, "--one", text, "--model", args.model,
                 "--features", str(args.features), "--patch", args.patch],
                env=env, capture_output=True, text=True, check=True,
            )
            row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "backend_measured": i == 0}
            rows.append(row)
            print(
                f"{text:>12}: estimate {row['estimate_bytes'] / 2**30:.2f} GiB, peak RSS "
                f"{row['peak_rss_bytes'] / 2**30:.2f} GiB (x{row['peak_over_estimate']}), {row['seconds']} s"
                + (" (first run: the backends measured)" if i == 0 else "")
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    setting = {"model": args.model, "features": args.features, "patch": args.patch}
    args.out.write_text(json.dumps({"machine": machine, "network": setting, "cases": rows}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
