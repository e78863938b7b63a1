"""A second phantom generator for the accuracy benchmark, with rules of its own.

Independent of both ``medseg.synthetic`` and ``benchmarks/phantoms.py``: the same brief (three organs
of different contrast, CT-like HU and noise, about 1 x 1 x 2.3 mm; issue 9), other rules everywhere.

- **Shapes** are metaballs: each organ is the level set of a sum of 3-7 Gaussian kernels with
  random centres and widths, so organs have lobes, necks and concavities (``phantoms.py`` deforms
  single ellipsoids). The body is a superellipse tapering along z, with a fat layer of varying
  thickness, ribs (bone arcs near the wall) and a spine with a cortical rim.
- **Organs** (labels): 1 ``enhancing_organ`` (large, 60-130 HU above the muscle, its own texture),
  2 ``bright_organ`` (a pair, 140-300 HU, a cortex brighter than its core), 3 ``fatty_organ``
  (25-75 HU *below* the muscle: between muscle and fat, its own texture). Unlabelled
  distractors that share their intensities: a contrast-filled vessel (as bright as the bright
  organ), a stomach with an air-fluid level, fluid bowel loops, and a second soft-tissue blob of
  the fatty organ's mean intensity in some cases.
- **Image formation**: partial volume from a blur that is wider across slices, correlated noise
  (white noise smoothed, then rescaled to 8-35 HU), a cupping of up to -25 HU towards the centre,
  int16; some cases stored with a rescale slope (``scl_slope`` 0.5 / ``scl_inter`` -1024) and
  some in LPS instead of RAS orientation.
- **Grids**: in-plane 0.65-1.25 mm, 1.8-3.0 mm between slices, field of view varying per case.

``python benchmarks/metaballs.py --out DIR [--train 12] [--test 4] [--seed 0]``; writes a Decathlon
folder like ``phantoms.py`` (``labelsTs`` for the test references).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

LABELS = {0: "background", 1: "enhancing_organ", 2: "bright_organ", 3: "fatty_organ"}


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Smoothed white noise with unit standard deviation (an organ's texture, or correlated noise)."""
    field = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape).astype(np.float32), sigma_vox)
    return field / max(float(field.std()), 1e-6)


def _metaball(
    rng: np.random.Generator, pts: tuple[np.ndarray, ...], centre: np.ndarray, spread: np.ndarray,
    width: tuple[float, float], balls: int,
) -> np.ndarray:
    """An organ: where the sum of ``balls`` Gaussian kernels (centres within ``spread`` mm of
    ``centre``, widths in ``width`` mm) exceeds a level that keeps it connected-looking."""
    field = np.zeros(pts[0].shape, np.float32)
    for _ in range(balls):
        c = centre + rng.uniform(-1, 1, 3) * spread
        s = rng.uniform(*width, 3)
        field += np.exp(-0.5 * sum(((p - ci) / si) ** 2 for p, ci, si in zip(pts, c, s, strict=True)))
    return field > rng.uniform(0.45, 0.65)


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """One phantom: (image HU float, label uint8, affine, rescaled) on its own grid and anatomy."""
    rng = np.random.default_rng(seed + 7_000_003)
    inplane = rng.uniform(0.65, 1.25)
    spacing = np.array([inplane, inplane, rng.uniform(1.8, 3.0)])
    fov = np.array([rng.uniform(160, 220), rng.uniform(125, 170), rng.uniform(90, 140)])
    shape = tuple(int(n) for n in np.round(fov / spacing))
    axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    pts = (x, y, z)

    # body: a superellipse tapering along z, a fat layer of varying thickness, muscle inside
    taper = 1.0 + rng.uniform(-0.12, 0.12) * z / (fov[2] / 2)
    a, b = fov[0] * rng.uniform(0.40, 0.47) * taper, fov[1] * rng.uniform(0.40, 0.47) * taper
    power = rng.uniform(2.2, 3.4)
    radial = (np.abs(x / a) ** power + np.abs(y / b) ** power) ** (1 / power)
    body = radial < 1.0
    fat_mm = rng.uniform(5, 22) * (1 + 0.4 * np.sin(np.arctan2(y, x) * rng.integers(1, 4) + rng.uniform(0, 6)))
    inner = radial < 1.0 - fat_mm / float(min(fov[:2].min() * 0.45, 90))
    muscle = rng.uniform(35, 65)
    image = np.full(shape, -1000.0, np.float32)
    image[body] = rng.uniform(-115, -85)
    image[inner] = muscle + 6 * _texture(rng, shape, 2.0)[inner]
    label = np.zeros(shape, np.uint8)

    # ribs: arcs of bone just inside the fat layer, a few per side
    angle = np.arctan2(y, x)
    shell = (radial > 0.80) & (radial < 0.86) & inner
    for _ in range(int(rng.integers(4, 9))):
        centre_angle, zc = rng.uniform(-np.pi, np.pi), rng.uniform(-0.4, 0.4) * fov[2]
        rib = shell & (np.abs(np.angle(np.exp(1j * (angle - centre_angle)))) < rng.uniform(0.3, 0.7))
        rib &= np.abs(z - zc) < rng.uniform(3, 6)
        image[rib] = rng.uniform(300, 700)
    # spine: a vertebral body with a cortical rim
    sy = -0.70 * b  # per slice (the body tapers)
    sy0 = float(sy.mean())
    spine_d = np.sqrt((x / 16) ** 2 + ((y - sy) / 14) ** 2)
    image[(spine_d < 1) & inner] = rng.uniform(180, 300)
    image[(spine_d >= 0.8) & (spine_d < 1) & inner] = rng.uniform(600, 1000)
    spine = spine_d < 1.15

    # a contrast-filled vessel as bright as the bright organ, anterior-left of the spine
    vessel = ((x - rng.uniform(-5, 20)) ** 2 + (y - sy - rng.uniform(28, 40)) ** 2) < rng.uniform(5, 11) ** 2
    bright = rng.uniform(140, 300)
    image[vessel & inner] = bright + rng.uniform(-40, 40)

    # the organs, claimed in order (a voxel belongs to the first): bright pair, enhancing, fatty
    taken = spine | vessel | ~inner
    for side in (-1, 1):
        c = np.array([side * rng.uniform(0.32, 0.48) * a.mean(), sy0 + rng.uniform(8, 22), rng.uniform(-20, 20)])
        organ = _metaball(rng, pts, c, np.array([6, 6, 14]), (7, 13), int(rng.integers(3, 5))) & ~taken
        core = ndimage.binary_erosion(organ, iterations=int(rng.integers(2, 4)))
        image[organ] = bright + 25 * rng.uniform(0.5, 1.5)
        image[core] = bright - rng.uniform(20, 90) + 8 * _texture(rng, shape, 1.0)[core]
        label[organ] = 2
        taken |= organ
    c = np.array([-rng.uniform(0.2, 0.45) * a.mean(), rng.uniform(-0.2, 0.25) * b.mean(), rng.uniform(-15, 15)])
    organ = _metaball(rng, pts, c, np.array([22, 18, 22]), (11, 22), int(rng.integers(4, 8))) & ~taken
    image[organ] = muscle + rng.uniform(60, 130) + rng.uniform(4, 12) * _texture(rng, shape, 1.5)[organ]
    label[organ] = 1
    taken |= organ
    c = np.array([rng.uniform(0.15, 0.45) * a.mean(), rng.uniform(-0.25, 0.3) * b.mean(), rng.uniform(-15, 15)])
    organ = _metaball(rng, pts, c, np.array([14, 12, 16]), (10, 20), int(rng.integers(3, 6))) & ~taken
    fatty = muscle - rng.uniform(25, 75)
    image[organ] = fatty + rng.uniform(3, 10) * _texture(rng, shape, 1.5)[organ]
    label[organ] = 3
    taken |= organ

    # distractors: a stomach with an air-fluid level, fluid bowel loops, sometimes a fatty-looking blob
    c = np.array([rng.uniform(0.0, 0.35) * a.mean(), rng.uniform(0.2, 0.5) * b.mean(), rng.uniform(-10, 30)])
    stomach = _metaball(rng, pts, c, np.array([15, 10, 12]), (10, 18), 3) & ~taken
    level = c[1] + rng.uniform(-4, 8)
    image[stomach] = rng.uniform(5, 30)
    image[stomach & (y > level)] = -950
    taken |= stomach
    for _ in range(int(rng.integers(2, 6))):
        c = np.array([rng.uniform(-0.4, 0.4) * a.mean(), rng.uniform(-0.1, 0.5) * b.mean(), rng.uniform(-40, 40)])
        loop = _metaball(rng, pts, c, np.array([10, 10, 10]), (5, 10), 2) & ~taken
        image[loop] = rng.uniform(0, 35)
        taken |= loop
    if rng.random() < 0.5:
        c = np.array([rng.uniform(-0.4, 0.4) * a.mean(), rng.uniform(-0.4, 0.4) * b.mean(), rng.uniform(-30, 30)])
        mimic = _metaball(rng, pts, c, np.array([8, 8, 8]), (6, 11), 2) & ~taken
        image[mimic] = fatty + 5 * _texture(rng, shape, 1.5)[mimic]

    # image formation: cupping, partial volume (wider across slices), correlated noise
    image += inner * -rng.uniform(0, 25) * np.clip(1 - radial, 0, 1)
    blur = rng.uniform(0.5, 1.0)
    image = ndimage.gaussian_filter(image, sigma=(blur, blur, blur * rng.uniform(0.4, 0.8)))
    image += rng.uniform(8, 35) * _texture(rng, shape, rng.uniform(0.5, 1.1))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [float(axes[i][0]) for i in range(3)]
    if rng.random() < 0.4:  # stored LPS: x and y reversed, the affine says so
        image, label = image[::-1, ::-1].copy(), label[::-1, ::-1].copy()
        affine = affine @ np.array(
            [[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float
        )
    return np.clip(image, -1024, 3071), label, affine, bool(rng.random() < 0.3)


def make_dataset(out: str | Path, *, train: int = 12, test: int = 4, seed: int = 0) -> Path:
    """Write a Decathlon folder of ``train`` + ``test`` metaball phantoms; returns ``dataset.json``'s path."""
    from phantoms import write_decathlon

    def cases():
        for index in range(train + test):
            image, label, affine, rescaled = make_case(seed * 1000 + index)
            if rescaled:  # stored as (HU + 1024) * 2 with a slope of 0.5 and an intercept of -1024
                img = nib.Nifti1Image(np.rint((image + 1024) * 2).astype(np.int16), affine)
                img.header.set_slope_inter(0.5, -1024)
            else:
                img = nib.Nifti1Image(np.rint(image).astype(np.int16), affine)
            yield f"mb_{index:03d}.nii.gz", img, nib.Nifti1Image(label, affine)

    return write_decathlon(out, cases(), train=train, test=test, labels=LABELS, name="metaball-phantoms",
                           description=f"independent metaball phantoms (benchmarks/metaballs.py, seed {seed})")


def main() -> None:
    from phantoms import generator_main

    generator_main(make_dataset, __doc__ or "")


if __name__ == "__main__":
    main()
