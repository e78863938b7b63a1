"""An abdominal phantom generator independent of ``medseg.synthetic``, for the accuracy benchmark.

Different anatomy and intensity rules from medseg's own generator, so that a model tuned on the
demo data is not judged on data made the same way:

- shapes are ellipsoids deformed by a smooth random field (trilinear upsampling of coarse
  Gaussian noise), not sums of sine waves; organ positions, sizes and orientations vary widely;
- three labelled organs of different contrast: an enhancing **liver** (large, 80-140 HU above
  water), a bright **kidney** pair (150-280 HU, a darker medulla inside), and a **fatty** organ of
  low contrast (-60 to -15 HU against soft tissue of 30-60 HU), plus unlabelled distractors
  (bowel with air and fluid, vessels, a spine);
- per case: spacing 0.7-1.3 mm in plane and 1.5-3.5 mm between slices (about 1 x 1 x 2.3 mm
  on average), field of view, soft-tissue level, contrast, noise (8-30 HU) and blur all random;
- stored as RAS NIfTI (int16 HU, uint8 labels) in a Decathlon folder, written with nibabel.

``python benchmarks/phantoms.py --out DIR [--train 12] [--test 4] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

LABELS = {0: "background", 1: "liver", 2: "kidney", 3: "fatty_organ"}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 6) -> np.ndarray:
    """A smooth random field in [-1, 1]-ish on ``shape``: coarse Gaussian noise, cubic upsampling."""
    grid = rng.normal(0.0, 1.0, (coarse, coarse, coarse))
    zoom = [s / coarse for s in shape]
    return ndimage.zoom(grid, zoom, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]


def _organ(
    rng: np.random.Generator,
    pts: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: np.ndarray,
    radii: np.ndarray,
    roughness: float,
) -> np.ndarray:
    """A randomly rotated ellipsoid whose surface is pushed in and out by a smooth random field."""
    x, y, z = (p - c for p, c in zip(pts, centre, strict=True))
    a, b = rng.uniform(-0.5, 0.5, 2)
    ca, sa, cb, sb = np.cos(a), np.sin(a), np.cos(b), np.sin(b)
    u = ca * x - sa * y
    v = sa * x + ca * y
    w = cb * z - sb * v
    v = sb * z + cb * v
    r = (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (w / radii[2]) ** 2
    field = _smooth_field(rng, r.shape, coarse=int(rng.integers(4, 8)))
    return r + roughness * field < 1.0


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom: (image HU int16, label uint8, RAS affine) with its own spacing and anatomy."""
    rng = np.random.default_rng(seed)
    inplane = rng.uniform(0.7, 1.3)
    spacing = np.array([inplane, inplane, rng.uniform(1.5, 3.5)])
    fov = np.array([rng.uniform(150, 200), rng.uniform(120, 160), rng.uniform(90, 130)])
    shape = tuple(int(n) for n in np.round(fov / spacing))
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    pts = (x, y, z)

    soft = rng.uniform(30, 60)
    body_r = np.array([fov[0] * rng.uniform(0.40, 0.47), fov[1] * rng.uniform(0.40, 0.47)])
    wobble = 1 + 0.05 * _smooth_field(rng, shape, coarse=4)
    body_d = np.sqrt((x / body_r[0]) ** 2 + (y / body_r[1]) ** 2) * wobble
    body = body_d < 1.0
    fat_mm = rng.uniform(6, 18)
    inner = body_d < 1.0 - fat_mm / body_r.min()
    image = np.full(shape, -1000.0)
    image[body] = rng.uniform(-120, -80)
    image[inner] = soft + 8 * _smooth_field(rng, shape, coarse=8)[inner]
    label = np.zeros(shape, np.uint8)

    # spine and a vessel (unlabelled), posterior and central
    spine = ((x / 14) ** 2 + ((y + body_r[1] * 0.62) / 14) ** 2) < 1
    image[spine & inner] = rng.uniform(350, 700)
    aorta = ((x - 10) ** 2 + (y + body_r[1] * 0.35) ** 2) < rng.uniform(6, 10) ** 2
    image[aorta & inner] = rng.uniform(120, 250)

    # bowel: air pockets and fluid loops, anywhere left-anterior
    for _ in range(int(rng.integers(2, 6))):
        c = np.array(
            [rng.uniform(-0.3, 0.4) * body_r[0], rng.uniform(0.0, 0.5) * body_r[1], rng.uniform(-40, 40)]
        )
        loop = _organ(rng, pts, c, rng.uniform(8, 18, 3), 0.4) & inner
        image[loop] = rng.choice([-950.0, rng.uniform(0, 30)])

    # fatty organ (label 3): left, low contrast
    c3 = np.array(
        [rng.uniform(0.25, 0.5) * body_r[0], rng.uniform(-0.3, 0.2) * body_r[1], rng.uniform(-15, 15)]
    )
    fatty = _organ(rng, pts, c3, rng.uniform([18, 16, 22], [32, 28, 40]), rng.uniform(0.2, 0.6)) & inner
    image[fatty] = soft + rng.uniform(-60, -15) + 5 * _smooth_field(rng, shape)[fatty]
    label[fatty] = 3

    # liver (label 1): large, right-anterior, enhancing
    c1 = np.array(
        [-rng.uniform(0.25, 0.45) * body_r[0], rng.uniform(-0.1, 0.25) * body_r[1], rng.uniform(-15, 15)]
    )
    liver = _organ(rng, pts, c1, rng.uniform([35, 30, 35], [55, 50, 55]), rng.uniform(0.2, 0.6)) & inner
    image[liver] = soft + rng.uniform(50, 100) + 6 * _smooth_field(rng, shape, coarse=10)[liver]
    label[liver] = 1

    # kidneys (label 2): two, posterior, bright cortex and darker medulla
    cortex = rng.uniform(150, 280)
    for side in (-1, 1):
        ck = np.array(
            [
                side * rng.uniform(0.3, 0.45) * body_r[0],
                -rng.uniform(0.35, 0.5) * body_r[1],
                rng.uniform(-20, 20),
            ]
        )
        radii = rng.uniform([12, 10, 20], [18, 15, 32])
        kidney = _organ(rng, pts, ck, radii, rng.uniform(0.1, 0.4)) & inner & ~spine
        image[kidney] = cortex
        medulla = _organ(rng, pts, ck, radii * 0.5, 0.2) & kidney
        image[medulla] = cortex - rng.uniform(40, 100)
        label[kidney] = 2

    blur = rng.uniform(0.4, 1.0)
    image = ndimage.gaussian_filter(image, sigma=(blur, blur, blur * 0.6))
    image = image + rng.normal(0.0, rng.uniform(8, 30), shape)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [float(axes[i][0]) for i in range(3)]
    return image, label, affine


def write_decathlon(
    out: str | Path, cases, *, train: int, test: int, labels: dict[int, str], name: str, description: str
) -> Path:
    """Write ``cases`` (an iterable of (file name, image, label) nibabel images: ``train`` training
    cases, then ``test`` test cases) as a Decathlon folder with ``labelsTs`` for the test references;
    returns ``dataset.json``'s path. Shared by this generator and ``metaballs.py``."""
    out = Path(out)
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for index, (file_name, image, label) in enumerate(cases):
        split = "training" if index < train else "test"
        img_dir, lbl_dir = ("imagesTr", "labelsTr") if split == "training" else ("imagesTs", "labelsTs")
        (out / img_dir).mkdir(parents=True, exist_ok=True)
        (out / lbl_dir).mkdir(parents=True, exist_ok=True)
        nib.save(image, out / img_dir / file_name)
        nib.save(label, out / lbl_dir / file_name)
        entries[split].append({"image": f"./{img_dir}/{file_name}", "label": f"./{lbl_dir}/{file_name}"})
    spec = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in labels.items()},
        "numTraining": train,
        "numTest": test,
        "training": entries["training"],
        "test": [e["image"] for e in entries["test"]],
        "test_labels": [e["label"] for e in entries["test"]],
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def make_dataset(out: str | Path, *, train: int = 12, test: int = 4, seed: int = 0) -> Path:
    """Write a Decathlon folder of ``train`` + ``test`` phantoms; returns ``dataset.json``'s path."""

    def cases():
        for index in range(train + test):
            image, label, affine = make_case(seed * 1000 + index)
            yield f"phantom_{index:03d}.nii.gz", nib.Nifti1Image(image, affine), nib.Nifti1Image(label, affine)

    return write_decathlon(out, cases(), train=train, test=test, labels=LABELS, name="abdominal-phantoms",
                           description=f"independent abdominal phantoms (benchmarks/phantoms.py, seed {seed})")


def generator_main(make, doc: str) -> None:
    """A generator's command line: ``--out DIR [--train 12] [--test 4] [--seed 0]``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=12)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make(args.out, train=args.train, test=args.test, seed=args.seed))


def main() -> None:
    generator_main(make_dataset, __doc__ or "")


if __name__ == "__main__":
    main()
