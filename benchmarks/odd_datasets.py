"""Datasets a hospital might hand medseg that the demo never makes: train each with a time budget,
infer its held-out scan, and check the mask's grid, its labels and its Dice.

Each variant is a small Decathlon folder (6 training cases of blobs in a noisy body, one held-out
scan with its reference) that differs from the plain case in one way a real dataset does:
non-contiguous label values, one small organ, a label absent from half the cases, 0.5 x 0.5 x 6 mm
voxels, MR-like float intensities, two channels (T1 + T2), an oblique or LPS affine, int16 stored
with scl_slope / scl_inter, labels stored as float, cases of very different sizes (one smaller
than a patch), a 4D image with one volume, two training cases only, uint16 intensities, a binary
mask stored as 0/255, five, seven or ten organs side by side.

``medseg train --data VARIANT --time-budget B`` then ``medseg infer``, each a subprocess as a user
runs them; prints one row per variant and writes JSON (exit codes, the last error line, whether
the mask's shape and affine are the scan's, labels present, Dice per label).

Run: python benchmarks/odd_datasets.py --work /tmp/odd [--budget 2m] [--only lps oblique]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent


def _case(rng, shape, labels, *, mr: bool, absent=()) -> tuple[np.ndarray, np.ndarray]:
    """A noisy body with one ellipsoid per label (each brighter than the last)."""
    img = rng.normal(300.0 if mr else 40.0, 40.0 if mr else 10.0, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    many = len(labels) > 4  # organs side by side on a 5-wide grid, none overlapping another
    for i, value in enumerate(labels):
        if value in absent:
            continue
        if many:
            cells = (5, (len(labels) + 4) // 5)
            centre = [(i % 5 + 0.5 + rng.uniform(-0.1, 0.1)) * shape[0] / cells[0],
                      (i // 5 + 0.5 + rng.uniform(-0.1, 0.1)) * shape[1] / cells[1], rng.uniform(0.4, 0.6) * shape[2]]
            radii = [rng.uniform(0.25, 0.4) * shape[0] / cells[0], rng.uniform(0.25, 0.4) * shape[1] / cells[1],
                     rng.uniform(0.2, 0.35) * shape[2]]
        else:
            centre = [rng.uniform(0.3, 0.7) * s for s in shape]
            radii = [max(2.0, rng.uniform(0.1, 0.2) * s) for s in shape]
        inside = sum(((grid[k] - centre[k]) / radii[k]) ** 2 for k in range(3)) < 1
        lab[inside] = value
        img[inside] += (400 + 300 * i) if mr else (80 + 60 * i)
    return img, lab


def _oblique(affine: np.ndarray) -> np.ndarray:
    turn = 0.3
    rot = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])
    out = affine.copy()
    out[:3, :3] = rot @ affine[:3, :3]
    out[:3, 3] = [-100, 50, 20]
    return out


def _lps(affine: np.ndarray) -> np.ndarray:
    return affine @ np.diag([-1.0, -1.0, 1.0, 1.0])


VARIANTS: dict[str, dict] = {
    "noncontiguous_labels": {"labels": (2, 7)},
    "one_small_organ": {"labels": (1,), "shape": (64, 64, 24)},
    "label_absent_in_half": {"labels": (1, 2, 3), "absent_every": 2},
    "thick_slices": {"shape": (96, 96, 6), "spacing": (0.5, 0.5, 6.0)},
    "mr_float": {"mr": True, "dtype": np.float32, "modality": "MRI"},
    "two_channels": {"channels": 2, "dtype": np.float32},
    "oblique": {"affine": _oblique},
    "lps": {"affine": _lps},
    "scl_slope": {"slope": (0.5, -100.0)},
    "float_labels": {"label_dtype": np.float32},
    "mixed_sizes": {"shapes": [(48, 48, 20), (20, 24, 8), (64, 40, 30)]},
    "4d_one_volume": {"fourd": True},
    "two_cases": {"n": 2},
    "uint16": {"dtype": np.uint16},
    "binary_255": {"labels": (255,)},
    "five_labels": {"labels": tuple(range(1, 6)), "shape": (120, 64, 32)},
    "seven_labels": {"labels": tuple(range(1, 8)), "shape": (120, 64, 32)},
    "many_labels": {"labels": tuple(range(1, 11)), "shape": (120, 64, 32)},
}


def write_variant(root: Path, name: str, spec: dict) -> Path:
    """The variant's Decathlon folder, plus ``reference.nii.gz`` for its one held-out scan."""
    folder = root / name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = spec.get("labels", (1, 2))
    spacing = spec.get("spacing", (1.5, 1.5, 3.0))
    n = spec.get("n", 6)

    def save_image(img: np.ndarray, affine: np.ndarray, path: Path) -> None:
        if spec.get("channels", 1) > 1:
            img = np.stack([img, 2000 - img * 0.5], -1)  # a second contrast: dark where the first is bright
        elif spec.get("fourd"):
            img = img[..., None]
        if "slope" in spec:  # stored = (value - inter) / slope, read back as value
            slope, inter = spec["slope"]
            image = nib.Nifti1Image(np.round((img - inter) / slope).astype(np.int16), affine)
            image.header.set_slope_inter(slope, inter)
        else:
            dtype = spec.get("dtype", np.int16)
            image = nib.Nifti1Image((np.clip(img, 0, None) if dtype == np.uint16 else img).astype(dtype), affine)
        nib.save(image, path)

    affine = np.diag([*spacing, 1.0])
    affine = spec["affine"](affine) if "affine" in spec else affine
    training = []
    for i in range(n):
        shape = spec["shapes"][i % len(spec["shapes"])] if "shapes" in spec else spec.get("shape", (48, 48, 20))
        absent = (labels[-1],) if spec.get("absent_every") and i % spec["absent_every"] == 0 else ()
        img, lab = _case(rng, shape, labels, mr=spec.get("mr", False), absent=absent)
        save_image(img, affine, folder / "imagesTr" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(lab.astype(spec.get("label_dtype", np.uint8)), affine),
                 folder / "labelsTr" / f"case_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    img, lab = _case(rng, spec.get("shape", (48, 48, 20)), labels, mr=spec.get("mr", False))
    save_image(img, affine, folder / "imagesTs" / "held_out.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), folder / "reference.nii.gz")
    modality = {"0": "T1", "1": "T2"} if spec.get("channels", 1) > 1 else {"0": spec.get("modality", "CT")}
    dataset = {
        "name": name, "modality": modality, "labels": {"0": "background", **{str(v): f"organ_{v}" for v in labels}},
        "numTraining": n, "training": training, "test": ["./imagesTs/held_out.nii.gz"],
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return folder


def _medseg(*args: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True)
    last = proc.stderr.strip().splitlines()[-1] if proc.returncode and proc.stderr.strip() else ""
    return proc.returncode, last, time.perf_counter() - start


def run_variant(root: Path, name: str, spec: dict, budget: str) -> dict:
    folder = write_variant(root, name, spec)
    run, masks = root / f"run_{name}", root / f"masks_{name}"
    rc, err, train_s = _medseg("train", "--data", str(folder), "--out", str(run), "--time-budget", budget,
                               "--set", "tracking.enabled=false")
    row: dict = {"variant": name, "train_rc": rc, "train_s": round(train_s, 1), "error": err}
    if rc:
        return row
    meta = json.loads((run / "bundle" / "metadata.json").read_text())
    row["precision"] = meta.get("precision")
    row["skipped_nonfinite_steps"] = meta.get("skipped_nonfinite_steps", 0)
    rc, err, _ = _medseg("infer", "-m", str(run / "bundle"), "-i", str(folder / "imagesTs"), "-o", str(masks))
    row.update(infer_rc=rc, error=err)
    if rc:
        return row
    mask_img, ref_img = nib.load(next(masks.glob("held_out*.nii*"))), nib.load(folder / "reference.nii.gz")
    mask, ref = np.asarray(mask_img.dataobj), np.asarray(ref_img.dataobj)
    row["grid_ok"] = mask.shape == ref.shape and bool(np.allclose(mask_img.affine, ref_img.affine, atol=1e-4))
    row["labels_out"] = sorted(int(v) for v in np.unique(mask))
    row["dice"] = {
        int(v): round(float(2 * ((mask == v) & (ref == v)).sum() / max(1, (mask == v).sum() + (ref == v).sum())), 3)
        for v in np.unique(ref) if v > 0
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the datasets, runs and masks")
    parser.add_argument("--budget", default="2m", help="medseg train --time-budget per variant")
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="these variants only")
    parser.add_argument("--json", default=str(HERE / "results" / "odd_datasets.json"))
    args = parser.parse_args()
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, spec in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        row = run_variant(root, name, spec, args.budget)
        rows.append(row)
        dice = " ".join(f"{k}:{v:.3f}" for k, v in row.get("dice", {}).items())
        status = "ok" if row.get("infer_rc") == 0 and row.get("grid_ok") else f"FAILED {row['error']}"
        print(f"{name:22s} {status:8s} {row.get('precision', ''):5s} skipped {row.get('skipped_nonfinite_steps', '-')!s:3s}"
              f" train {row['train_s']:6.1f} s  Dice {dice}", flush=True)
    Path(args.json).write_text(json.dumps({"budget": args.budget, "rows": rows}, indent=1))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
