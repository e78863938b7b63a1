"""Resampling probabilities back to the source grid (``medseg infer``'s ``invert`` stage), its three paths.

A CT as stored (LPS, 0.8 x 0.8 x 2.5 mm) and a model grid (RAS, 1.5 x 1.5 x 2.0 mm) holding smooth
synthetic probabilities (blobs about ``--blob`` model voxels wide, mostly background): CPU seconds
(process time, one torch thread, best of ``--repeats``, so a busy machine counts less) for

- ``general``: ``grid_sample`` on every voxel (any affine, the oblique case),
- ``separable``: three 1D interpolations (axis-aligned grids; also what ``--save-probabilities`` takes),
- ``picked``: labels picked per model-grid cell, interpolated only at class borders (the default),

with the voxels whose label differs from the general path's. Prints and writes
``benchmarks/results/resample_back.json``::

    python benchmarks/resample_back.py --shape 512 512 200 --classes 4
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from medseg.predict import MIXED_CELL, cell_labels, resample_to_grid

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_case(shape: tuple[int, int, int], n_classes: int, blob: int, seed: int = 0):
    """(model-grid probabilities, model affine, target affine) for a CT of ``shape``."""
    target = np.diag([-0.8, -0.8, 2.5, 1.0])
    target[:3, 3] = [100.0, 120.0, -50.0]
    extent = np.abs(np.diag(target)[:3]) * (np.asarray(shape) - 1)
    spacing = (1.5, 1.5, 2.0)
    model_shape = tuple(int(np.ceil(e / s)) + 1 for e, s in zip(extent, spacing, strict=True))
    model = np.diag([*spacing, 1.0])
    model[:3, 3] = [100.0 - extent[0] + 3.0, 120.0 - extent[1] - 2.0, -50.0 + 7.0]
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, n_classes, *(max(2, m // blob) for m in model_shape), generator=gen)
    logits[:, 0] += 1.0  # mostly background, as a CT's segmentation
    logits = torch.nn.functional.interpolate(logits, size=model_shape, mode="trilinear")[0]
    return torch.softmax(4.0 * logits, dim=0), model, target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 100])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--blob", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    shape = tuple(args.shape)
    probs, model, target = synthetic_case(shape, args.classes, args.blob)
    torch.set_num_threads(1)
    paths = {
        "general": {"axis_aligned": False},
        "separable": {"return_probabilities": True},
        "picked": {},
    }
    best = dict.fromkeys(paths, float("inf"))
    masks: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, kwargs in paths.items():
            t0 = time.process_time()
            out = resample_to_grid([(probs, model)], target, shape, **kwargs)
            best[name] = min(best[name], time.process_time() - t0)
            masks[name] = out[0] if isinstance(out, tuple) else out
    mixed = float((cell_labels(probs) == MIXED_CELL).float().mean())
    result = {
        "machine": platform.processor() or platform.machine(),
        "target_shape": list(shape),
        "model_shape": list(probs.shape[1:]),
        "classes": args.classes,
        "mixed_cell_fraction": round(mixed, 4),
        "cpu_s": {k: round(v, 3) for k, v in best.items()},
        "voxels_differing_from_general": {k: int((m != masks["general"]).sum()) for k, m in masks.items()},
    }
    print(
        f"target {shape}, model grid {tuple(probs.shape[1:])}, {args.classes} classes, {mixed:.1%} mixed cells"
    )
    for name in paths:
        speedup = best["general"] / best[name]
        differing = result["voxels_differing_from_general"][name]
        print(f"  {name:10s} {best[name]:7.3f} s CPU  x{speedup:4.1f}  {differing} voxels differ")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resample_back.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
