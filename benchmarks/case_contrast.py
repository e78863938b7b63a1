"""Why a label fails on some test cases: its intensity, its contrast and the noise, case by case,
beside the Dice an accuracy run scored there, and the range the training cases covered.

    python benchmarks/case_contrast.py --data /tmp/medseg-accuracy/phantoms_seed7_test20 \
        --results benchmarks/results/accuracy_phantoms_seed7_test20_intel.json --label 3 [--out F.json]

For each case of a Decathlon-style folder (``imagesTr``/``labelsTr`` and ``imagesTs``/``labelsTs``):
the label's mean intensity two voxels inside its surface, the median of the unlabelled tissue one to
three voxels outside it (contrast = outside - inside), and the noise (standard deviation of the
image minus its 3x3x3 mean, inside the label). Test cases are listed by the label's intensity with
the Dice of ``--method`` from ``benchmarks/accuracy.py``'s JSON; the training cases give the range
the model saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def label_stats(image: np.ndarray, label: np.ndarray, k: int) -> dict[str, float] | None:
    """Inside mean, outside median, contrast and noise of label ``k`` (None when it is absent)."""
    organ = label == k
    if not organ.any():
        return None
    inside = ndimage.binary_erosion(organ, iterations=2)
    inside = inside if inside.any() else organ
    ring = ndimage.binary_dilation(organ, iterations=3) & ~ndimage.binary_dilation(organ, iterations=1) & (label == 0)
    high_pass = image - ndimage.uniform_filter(image, 3)
    outside = float(np.median(image[ring])) if ring.any() else float("nan")
    mean = float(image[inside].mean())
    return {
        "inside": round(mean, 1),
        "outside": round(outside, 1),
        "contrast": round(outside - mean, 1),
        "noise": round(float(high_pass[inside].std() * np.sqrt(27 / 26)), 1),
        "voxels": int(organ.sum()),
    }


def cases(root: Path, split: str, k: int) -> dict[str, dict[str, float]]:
    out = {}
    for path in sorted((root / f"images{split}").glob("*.nii.gz")):
        stem = path.name.removesuffix(".nii.gz")
        image = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(root / f"labels{split}" / path.name).dataobj)
        stats = label_stats(image, label, k)
        if stats is not None:
            out[stem] = stats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (imagesTr, imagesTs, ...)")
    parser.add_argument("--results", type=Path, required=True, help="benchmarks/accuracy.py's JSON")
    parser.add_argument("--label", type=int, required=True)
    parser.add_argument("--method", default="medseg")
    parser.add_argument("--out", type=Path, help="write the table as JSON")
    args = parser.parse_args()

    results = json.loads(args.results.read_text())["results"][args.method]["cases"]
    train = cases(args.data, "Tr", args.label)
    test = cases(args.data, "Ts", args.label)
    labels = json.loads((args.data / "dataset.json").read_text())["labels"]
    # Decathlon: {"1": "liver"}; nnU-Net v2: {"liver": 1}
    names = {int(v): k for k, v in labels.items()} if all(isinstance(v, int) for v in labels.values()) else {
        int(k): v for k, v in labels.items()}
    key = f"dice_{names[args.label]}"
    for stem, stats in test.items():
        stats["dice"] = round(float(results[stem][key]), 3) if stem in results else float("nan")
    inside = [s["inside"] for s in train.values()]
    print(f"label {args.label} ({key}): training cases inside {min(inside):.0f} to {max(inside):.0f}")
    print("| test case | inside | outside | contrast | noise | Dice |\n|---|---|---|---|---|---|")
    for stem, s in sorted(test.items(), key=lambda kv: kv[1]["inside"]):
        flag = " (above training)" if s["inside"] > max(inside) else ""
        print(f"| {stem} | {s['inside']:.0f}{flag} | {s['outside']:.0f} | {s['contrast']:.0f} | "
              f"{s['noise']:.0f} | {s['dice']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"label": args.label, "dice_key": key, "train": train, "test": test}, indent=1))


if __name__ == "__main__":
    main()
