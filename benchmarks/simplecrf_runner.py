"""Run SimpleCRF's 3D dense CRF on .npy files; called by crf_benchmark.py with the separate venv's python.

Usage: python simplecrf_runner.py WORKDIR   (reads image.npy, probs.npy, params.json; writes labels.npy, time.json)
SimpleCRF stays out of medseg's dependencies: it is built in its own venv (see crf_benchmark.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import denseCRF3D
import numpy as np


def main() -> None:
    work = Path(sys.argv[1])
    image = np.load(work / "image.npy")
    probs = np.load(work / "probs.npy")
    params = json.loads((work / "params.json").read_text())
    params["BilateralModsStds"] = tuple(params["BilateralModsStds"])
    t0 = time.perf_counter()
    labels = denseCRF3D.densecrf3d(image, probs, params)
    seconds = time.perf_counter() - t0
    np.save(work / "labels.npy", np.asarray(labels, dtype=np.uint8))
    (work / "time.json").write_text(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
