"""A CT-like abdominal phantom generator for the demo and the tests.

Anatomy is defined once, analytically, in world space (RAS, mm): a body outline
with a fat layer over soft tissue, a spine, and three labelled organs with smooth
irregular surfaces (a liver on the patient's right, two kidneys, and a spleen on the
left that touches the left kidney), plus unlabelled distractor blobs. Each case samples this anatomy (with
its own random shape perturbations) on its own voxel grid: anisotropic spacing
(0.7-1.0 mm in-plane, 1.5-3 mm between slices) and its own orientation (RAS,
LPS, sagittal, coronal or oblique), so labels are exact in every grid. Images get
Hounsfield-unit intensities, slice-profile blur and noise.

``make_dataset(out, cases=..., size=..., seed=...)`` writes a Decathlon folder
(``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``, and ``labelsTs`` with
the held-out references); ``dicom=True`` adds every image as a DICOM series under
``dicom/<case>/``. Output is deterministic for a seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.io import Volume, write_dicom_series, write_nifti, write_text_atomic

LABELS = {0: "background", 1: "liver", 2: "kidney", 3: "spleen"}
ORIENTATIONS = ("RAS", "LPS", "RAS", "LPS", "sagittal", "coronal", "oblique")

_HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft": 40.0,
    "bone": 450.0,
    "liver": 105.0,
    "kidney": 190.0,
    "spleen": 70.0,
}


@dataclass(frozen=True)
class _Blob:
    center: np.ndarray  # mm
    radii: np.ndarray  # mm
    rotation: np.ndarray  # 3x3
    waves: np.ndarray  # (n, 3) wave vectors (1/mm)
    phases: np.ndarray  # (n,)
    amplitude: float

    def inside(self, pts: np.ndarray) -> np.ndarray:
        local = (pts - self.center) @ self.rotation
        r2 = np.sum((local / self.radii) ** 2, axis=-1)
        bumps = np.sin(pts @ self.waves.T + self.phases).sum(axis=-1) * self.amplitude
        return r2 + bumps < 1.0


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.radians(rng.uniform(-max_deg, max_deg, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _blob(rng: np.random.Generator, center, radii, scale: float, *, jitter: float = 0.06) -> _Blob:
    n_waves = 4
    return _Blob(
        center=np.asarray(center) * scale + rng.normal(0, jitter * scale, 3),
        radii=np.asarray(radii) * scale * rng.uniform(0.88, 1.12, 3),
        rotation=_rotation(rng, 12.0),
        waves=rng.normal(0, 1.0, (n_waves, 3)) * (2.5 / scale),
        phases=rng.uniform(0, 2 * np.pi, n_waves),
        amplitude=0.06,
    )


def _grid_affine(
    orientation: str, extent: np.ndarray, inplane: float, between: float, rng
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine and shape of a grid covering a box of ``extent`` mm centred at the origin."""
    ex, ey, ez = np.eye(3)
    axes = {
        "RAS": (ex, ey, ez),
        "LPS": (-ex, -ey, ez),
        "sagittal": (ey, -ez, ex),
        "coronal": (ex, -ez, ey),
        "oblique": (ex, ey, ez),
    }[orientation]
    directions = np.stack(axes, axis=1)
    if orientation == "oblique":
        directions = _rotation(rng, 20.0) @ directions
    spacing = np.array([inplane, inplane, between])
    # extent covered along each voxel axis (box projected on the axis)
    reach = np.abs(directions.T) @ extent
    shape = tuple(int(np.ceil(r / s)) for r, s in zip(reach, spacing, strict=True))
    affine = np.eye(4)
    affine[:3, :3] = directions * spacing[None, :]
    centre_vox = (np.asarray(shape) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre_vox
    return affine, shape


def make_case(
    seed: int | tuple[int, ...], *, size: int = 64, orientation: str | None = None
) -> tuple[Volume, Volume]:
    """One phantom: (CT image in HU, label map), both on the same grid."""
    rng = np.random.default_rng(seed)
    orientation = orientation or str(rng.choice(ORIENTATIONS))
    scale = size / 64.0  # anatomy in mm scales with the field of view
    extent = np.array([64.0, 52.0, 44.0]) * scale
    inplane = float(rng.uniform(0.7, 1.0))
    between = float(rng.uniform(1.5, 3.0))
    affine, shape = _grid_affine(orientation, extent, inplane, between, rng)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    pts = idx @ affine[:3, :3].T + affine[:3, 3]

    # body: elliptic cylinder along z, fat rim, spine posterior
    body_r = np.array([30.0, 23.0]) * scale * rng.uniform(0.95, 1.05, 2)
    body = ((pts[:, 0] / body_r[0]) ** 2 + (pts[:, 1] / body_r[1]) ** 2) < 1.0
    inner = (
        (pts[:, 0] / (body_r[0] - 3.5 * scale)) ** 2 + (pts[:, 1] / (body_r[1] - 3.5 * scale)) ** 2
    ) < 1.0
    spine = (pts[:, 0] ** 2 + (pts[:, 1] + 15.0 * scale) ** 2) < (5.0 * scale) ** 2

    liver = _blob(rng, (10.0, 3.0, 4.0), (15.0, 13.0, 14.0), scale)
    kidney_r = _blob(rng, (13.0, -11.0, -6.0), (5.0, 6.0, 9.0), scale)
    kidney_l = _blob(rng, (-13.0, -11.0, -6.0), (5.0, 6.0, 9.0), scale)
    spleen = _blob(rng, (-17.0, -3.0, 5.0), (6.0, 8.0, 9.0), scale)

    label = np.zeros(len(pts), dtype=np.uint8)
    tissue = np.full(len(pts), _HU["air"], dtype=np.float32)
    tissue[body] = _HU["fat"]
    tissue[inner] = _HU["soft"]
    for _ in range(4):  # unlabelled distractors (bowel-like), drawn under the organs
        c = rng.uniform(-1, 1, 3) * np.array([12.0, 8.0, 14.0])
        blob = _blob(rng, c, (4.0, 4.0, 5.0), scale).inside(pts) & inner
        tissue[blob] = float(rng.uniform(-20.0, 60.0))
    tissue[spine & inner] = _HU["bone"]
    for value, name, blob in (
        (2, "kidney", kidney_r),
        (2, "kidney", kidney_l),
        (3, "spleen", spleen),
        (1, "liver", liver),
    ):
        voxels = blob.inside(pts) & inner & ~spine
        label[voxels] = value
        tissue[voxels] = _HU[name]

    label = label.reshape(shape)
    image = tissue.reshape(shape)
    # slice profile and in-plane blur in voxel units, then scanner noise
    image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.5))
    image = image + rng.normal(0.0, rng.uniform(8.0, 16.0), size=image.shape).astype(np.float32)
    image = np.clip(image, -1024.0, 3071.0).astype(np.float32)
    image = np.rint(image).astype(np.float32)  # integer HU, as scanners store
    meta = {"modality": "CT", "orientation": orientation, "source_format": "synthetic"}
    return (
        Volume(array=image, affine=affine, meta={**meta, "kind": "image"}),
        Volume(array=label, affine=affine, meta={**meta, "kind": "label"}),
    )


def make_dataset(
    out: str | Path,
    *,
    cases: int = 20,
    size: int = 64,
    seed: int = 0,
    test_fraction: float = 0.2,
    dicom: bool = False,
) -> Path:
    """Write a Decathlon-layout synthetic dataset; returns the ``dataset.json`` path."""
    out = Path(out)
    if cases < 2:
        raise ValueError("need at least 2 cases (one to train, one to test)")
    n_test = max(1, round(cases * test_fraction))
    training, test = [], []
    for index in range(cases):
        name = f"case_{index:03d}"
        image, label = make_case((seed, index), size=size)
        split_img, split_lbl = (
            ("imagesTs", "labelsTs") if index >= cases - n_test else ("imagesTr", "labelsTr")
        )
        write_nifti(image, out / split_img / f"{name}.nii.gz", dtype="int16")
        write_nifti(label, out / split_lbl / f"{name}.nii.gz", dtype="uint8")
        entry = {"image": f"./{split_img}/{name}.nii.gz", "label": f"./{split_lbl}/{name}.nii.gz"}
        (test if split_img == "imagesTs" else training).append(entry)
        if dicom:
            write_dicom_series(image, out / "dicom" / name, series_description=f"synthetic {name}")
    dataset = {
        "name": "medseg-synthetic",
        "description": f"CT-like phantoms generated by medseg (seed {seed}, size {size})",
        "reference": "medseg.synthetic",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": [t["image"] for t in test],
        "test_labels": [t["label"] for t in test],
    }
    return write_text_atomic(out / "dataset.json", json.dumps(dataset, indent=2))
