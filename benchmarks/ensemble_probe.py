"""Finished bundles alone and as ensembles (``medseg infer -m A -m B``), scored on a set's test cases.

Does averaging two 11-minute models lift the cases a single model misses? Each ``--arm NAME=BUNDLE[+BUNDLE...]``
is inferred with ``medseg infer`` (an ensemble takes the first bundle's post-processing) on the test
cases of ``--data`` (an ``accuracy.py`` set) and scored as ``accuracy.py`` scores. Prints a line per
arm and writes JSON with the per-case Dice and HD95 (benchmarks/README.md, nineteenth session).

Run: python benchmarks/ensemble_probe.py --data W/phantoms_seed24_test20 \\
         --arm budget=W/a/medseg_run/bundle --arm both=W/a/medseg_run/bundle+W/b/medseg_run/bundle \\
         [--work /tmp/medseg-ensemble-probe] [--out results/ensemble_probe.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from accuracy import _spec, score_predictions, summary


def run_arm(data: Path, bundles: list[str], preds: Path) -> tuple[dict, float]:
    spec = _spec(data)
    images = [str(data / t) for t in spec["test"]]
    models = [arg for bundle in bundles for arg in ("--model", bundle)]
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "medseg", "infer", *models, "--input", *images, "--output", str(preds), "--overwrite"],
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    seconds = time.monotonic() - start
    labels = {int(k): v for k, v in spec["labels"].items()}
    return score_predictions(data, preds, labels), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--arm", action="append", required=True, help="NAME=BUNDLE[+BUNDLE...]")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medseg-ensemble-probe"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ensemble_probe.json")
    args = ap.parse_args()
    labels = {int(k): v for k, v in _spec(args.data)["labels"].items()}
    results = {}
    for arm in args.arm:
        name, _, bundles = arm.partition("=")
        cases, seconds = run_arm(args.data, bundles.split("+"), args.work / name)
        figures = summary({"cases": cases}, labels)
        results[name] = {"bundles": bundles.split("+"), "infer_s": round(seconds, 1), "summary": figures, "cases": cases}
        per_label = ", ".join(
            f"{n} {figures[f'dice_{n}_mean']:.3f} ({figures[f'dice_{n}_min']:.3f})" for k, n in labels.items() if k
        )
        print(f"{name}: mean {figures['dice_mean']:.4f}; {per_label}; every label >= 0.90 on "
              f"{figures['cases_every_label_at_target']} of {figures['cases']}; infer {seconds:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
