"""CPU inference in float32 versus the opt-in bfloat16 autocast with channels-last 3D (``infer.cpu_bf16``).

For a bundle and one or more images: network seconds both ways, and the agreement of
the two masks (voxels and Dice per label). bf16 stays opt-in: it is only worth turning
on where the CPU has native bf16 (AVX512-BF16 / AMX) and the Dice is unchanged.

Run: python benchmarks/infer_cpu_bf16.py --model BUNDLE --input IMAGE [IMAGE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.bundle import load_bundle
from medseg.io import load_volume
from medseg.metrics import dice
from medseg.predict import predict_volume

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True, nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "infer_cpu_bf16.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"cpu_count": os.cpu_count(), "threads": args.threads, "cases": []}
    for path in args.input:
        volume = load_volume(path)
        runs = {}
        for name in ("fp32", "bf16"):
            bundle = load_bundle(args.model)  # fresh network: bf16 switches it to channels-last
            predict_volume([bundle], volume, crf=False, precision=name, backend="torch")  # warm-up
            pred = predict_volume([bundle], volume, crf=False, precision=name, backend="torch", postprocess=False)
            runs[name] = pred
        a, b = runs["fp32"].mask.array, runs["bf16"].mask.array
        labels = [int(k) for k in load_bundle(args.model).labels if k]
        case = {
            "case": Path(path).name,
            "shape": list(volume.shape),
            "network_s_fp32": round(runs["fp32"].timings["network_s"], 3),
            "network_s_bf16": round(runs["bf16"].timings["network_s"], 3),
            "voxel_agreement": round(float((a == b).mean()), 5),
            "dice_bf16_vs_fp32": {k: round(dice(a == k, b == k), 4) for k in labels},
        }
        results["cases"].append(case)
        print(json.dumps(case))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
