"""Dense CRF: medseg's PyTorch CRF beside SimpleCRF's C++ 3D dense CRF on noisy sphere predictions.

A sphere (radius 30 voxels) in a 120x150x100 volume with a noisy image (contrast 1,
noise 0.35, in normalised units) and a noisy prediction (each voxel's logit flipped
by Gaussian noise: Dice about 0.72). Both CRFs get the same probabilities and image,
5 mean-field iterations, 2 labels. Prints Dice, HD95 (mm) and seconds per volume,
and a 256^3 timing on CPU; writes JSON to benchmarks/results/crf_benchmark.json.

SimpleCRF is built in a separate venv, never a medseg dependency:

    python3 -m venv /tmp/crfvenv
    /tmp/crfvenv/bin/pip install 'numpy<2' cython setuptools wheel
    /tmp/crfvenv/bin/pip install --no-build-isolation simplecrf

Run: python benchmarks/crf_benchmark.py [--simplecrf-python /tmp/crfvenv/bin/python] [--skip-256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.config import CRFConfig
from medseg.crf import dense_crf
from medseg.metrics import dice, hd95

HERE = Path(__file__).resolve().parent
SHAPE = (120, 150, 100)
ITERATIONS = 5
INTENSITY_RANGE = (-1.5, 2.5)  # normalised units mapped to 0..255 for SimpleCRF


def phantom(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, image, probabilities (2, ...)) of a noisy sphere."""
    rng = np.random.default_rng(seed)
    centre = np.asarray(shape) / 2.0
    radius = 0.2 * min(shape) * 1.5
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    dist2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    truth = dist2 <= radius**2
    image = truth.astype(np.float32) + rng.normal(0.0, 0.35, shape).astype(np.float32)
    logit = 2.0 * (2.0 * truth - 1.0) + rng.normal(0.0, 1.19, shape)
    p1 = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return truth, image, np.stack([1.0 - p1, p1])


def run_medseg(
    probs: np.ndarray, image: np.ndarray, cfg: CRFConfig, threads: int
) -> tuple[np.ndarray, float]:
    torch.set_num_threads(threads)
    p, im = torch.from_numpy(probs), torch.from_numpy(image)
    dense_crf(
        p[:, :8, :8, :8].contiguous(), im[:8, :8, :8].contiguous(), spacing=(1, 1, 1), cfg=cfg
    )  # warm-up
    t0 = time.perf_counter()
    q = dense_crf(p, im, spacing=(1.0, 1.0, 1.0), cfg=cfg)
    seconds = time.perf_counter() - t0
    return q.argmax(0).numpy().astype(np.uint8), seconds


def simplecrf_params(cfg: CRFConfig, pos_w: float, bil_w: float, intensity_scale: float = 1.0) -> dict:
    lo, hi = INTENSITY_RANGE
    return {
        "MaxIterations": float(ITERATIONS),
        "PosW": pos_w,
        "PosRStd": cfg.smooth_sigma_mm,
        "PosCStd": cfg.smooth_sigma_mm,
        "PosZStd": cfg.smooth_sigma_mm,
        "BilateralW": bil_w,
        "BilateralRStd": cfg.bilateral_sigma_mm,
        "BilateralCStd": cfg.bilateral_sigma_mm,
        "BilateralZStd": cfg.bilateral_sigma_mm,
        "ModalityNum": 1,
        "BilateralModsStds": [intensity_scale * cfg.bilateral_intensity_sigma * 255.0 / (hi - lo)],
    }


def run_simplecrf(
    python: str, probs: np.ndarray, image: np.ndarray, params: dict
) -> tuple[np.ndarray, float]:
    lo, hi = INTENSITY_RANGE
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        img8 = np.clip((image - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)[..., None]
        np.save(work / "image.npy", np.ascontiguousarray(img8))
        np.save(work / "probs.npy", np.ascontiguousarray(np.moveaxis(probs, 0, -1).astype(np.float32)))
        (work / "params.json").write_text(json.dumps(params))
        subprocess.run(
            [python, str(HERE / "simplecrf_runner.py"), str(work)], check=True, stdout=subprocess.DEVNULL
        )
        labels = np.load(work / "labels.npy")
        seconds = json.loads((work / "time.json").read_text())["seconds"]
    return labels, seconds


def scores(labels: np.ndarray, truth: np.ndarray) -> dict:
    return {
        "dice": round(dice(labels == 1, truth), 4),
        "hd95_mm": round(hd95(labels == 1, truth, (1, 1, 1)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--simplecrf-python", default="/tmp/crfvenv/bin/python")
    parser.add_argument("--skip-256", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "crf_benchmark.json"))
    args = parser.parse_args()

    cfg = CRFConfig(iterations=ITERATIONS)
    truth, image, probs = phantom(SHAPE)
    before = probs.argmax(0).astype(np.uint8)
    results: dict = {
        "volume": list(SHAPE),
        "labels": 2,
        "iterations": ITERATIONS,
        "crf_config": cfg.model_dump(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "before": scores(before, truth),
        "medseg": {},
        "simplecrf": {},
    }
    print(f"noisy prediction: {results['before']}")
    for threads in (1, 2):
        labels, seconds = run_medseg(probs, image, cfg, threads)
        results["medseg"][f"threads_{threads}"] = {**scores(labels, truth), "seconds": round(seconds, 3)}
        print(f"medseg CRF, {threads} thread(s): {results['medseg'][f'threads_{threads}']}")

    have_simplecrf = Path(args.simplecrf_python).exists()
    if have_simplecrf:
        # SimpleCRF's kernels are not normalised like medseg's, so the same weights mean other things:
        # its demo weights, and the two best of a small sweep run here (12 settings)
        for pos_w, bil_w, scale in ((2.0, 3.0, 1.0), (0.5, 2.0, 0.5), (0.3, 2.0, 0.5)):
            params = simplecrf_params(cfg, pos_w, bil_w, scale)
            labels, seconds = run_simplecrf(args.simplecrf_python, probs, image, params)
            key = f"PosW_{pos_w:g}_BilateralW_{bil_w:g}_intensity_x{scale:g}"
            results["simplecrf"][key] = {**scores(labels, truth), "seconds": round(seconds, 3)}
            print(f"SimpleCRF {key}: {results['simplecrf'][key]}")
    else:
        print(f"SimpleCRF not found at {args.simplecrf_python}: skipped (see the module docstring)")

    if not args.skip_256:
        truth256, image256, probs256 = phantom((256, 256, 256), seed=1)
        for threads in (1, 2):
            labels, seconds = run_medseg(probs256, image256, cfg, threads)
            results["medseg"][f"256^3_threads_{threads}"] = {
                **scores(labels, truth256),
                "seconds": round(seconds, 3),
            }
            print(f"medseg CRF 256^3, {threads} thread(s): {results['medseg'][f'256^3_threads_{threads}']}")
        if have_simplecrf:
            labels, seconds = run_simplecrf(
                args.simplecrf_python, probs256, image256, simplecrf_params(cfg, 0.3, 2.0, 0.5)
            )
            results["simplecrf"]["256^3_PosW_0.3_BilateralW_2_intensity_x0.5"] = {
                **scores(labels, truth256),
                "seconds": round(seconds, 3),
            }
            print(f"SimpleCRF 256^3: {results['simplecrf']['256^3_PosW_0.3_BilateralW_2_intensity_x0.5']}")
        results["before_256^3"] = scores(probs256.argmax(0).astype(np.uint8), truth256)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
