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
from medseg.io.nifti import write_nifti_channels

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


# tissue classes of the anatomy map; intensities are looked up per modality (and per MR channel)
_AIR, _FAT, _SOFT, _BONE, _LIVER, _KIDNEY, _SPLEEN, _DISTRACTOR = range(8)
_ORGANS = ((2, _KIDNEY), (2, _KIDNEY), (3, _SPLEEN), (1, _LIVER))
_CT_BY_CLASS = np.array(
    [_HU["air"], _HU["fat"], _HU["soft"], _HU["bone"], _HU["liver"], _HU["kidney"], _HU["spleen"]],
    dtype=np.float32,
)
# MR contrasts (arbitrary units) per channel, as in MSD Task01's order: no channel alone separates
# every organ (kidney and spleen are alike in T1w, liver and spleen in FLAIR), together they do.
MR_CHANNELS = {
    "FLAIR": (0.0, 500.0, 350.0, 120.0, 300.0, 430.0, 290.0),
    "T1w": (0.0, 800.0, 400.0, 250.0, 540.0, 380.0, 370.0),
    "T1gd": (0.0, 780.0, 450.0, 260.0, 600.0, 760.0, 640.0),
    "T2w": (0.0, 600.0, 300.0, 150.0, 210.0, 610.0, 560.0),
}


@dataclass(frozen=True)
class _Anatomy:
    affine: np.ndarray
    shape: tuple[int, ...]
    orientation: str
    tissue: np.ndarray  # tissue class per voxel (flat), _DISTRACTOR + k for distractor k
    distractor_hu: tuple[float, ...]
    label: np.ndarray  # (shape) uint8


def _anatomy(rng: np.random.Generator, size: int, orientation: str | None) -> _Anatomy:
    """Sample one case's anatomy on its own grid (orientation, spacing, shapes)."""
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
    tissue = np.full(len(pts), _AIR, dtype=np.uint8)
    tissue[body] = _FAT
    tissue[inner] = _SOFT
    distractor_hu = []
    for k in range(4):  # unlabelled distractors (bowel-like), drawn under the organs
        c = rng.uniform(-1, 1, 3) * np.array([12.0, 8.0, 14.0])
        blob = _blob(rng, c, (4.0, 4.0, 5.0), scale).inside(pts) & inner
        tissue[blob] = _DISTRACTOR + k
        distractor_hu.append(float(rng.uniform(-20.0, 60.0)))
    tissue[spine & inner] = _BONE
    for (value, klass), blob in zip(_ORGANS, (kidney_r, kidney_l, spleen, liver), strict=True):
        voxels = blob.inside(pts) & inner & ~spine
        label[voxels] = value
        tissue[voxels] = klass
    return _Anatomy(affine, shape, orientation, tissue, tuple(distractor_hu), label.reshape(shape))


def _intensities(anatomy: _Anatomy, by_class: np.ndarray, distractors) -> np.ndarray:
    table = np.concatenate([by_class, np.asarray(distractors, dtype=np.float32)])
    return table[anatomy.tissue].reshape(anatomy.shape)


def make_case(
    seed: int | tuple[int, ...], *, size: int = 64, orientation: str | None = None
) -> tuple[Volume, Volume]:
    """One phantom: (CT image in HU, label map), both on the same grid."""
    rng = np.random.default_rng(seed)
    anatomy = _anatomy(rng, size, orientation)
    image = _intensities(anatomy, _CT_BY_CLASS, anatomy.distractor_hu)
    # slice profile and in-plane blur in voxel units, then scanner noise
    image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.5))
    image = image + rng.normal(0.0, rng.uniform(8.0, 16.0), size=image.shape).astype(np.float32)
    image = np.clip(image, -1024.0, 3071.0).astype(np.float32)
    image = np.rint(image).astype(np.float32)  # integer HU, as scanners store
    meta = {"modality": "CT", "orientation": anatomy.orientation, "source_format": "synthetic"}
    return (
        Volume(array=image, affine=anatomy.affine, meta={**meta, "kind": "image"}),
        Volume(array=anatomy.label, affine=anatomy.affine, meta={**meta, "kind": "label"}),
    )


def make_mr_case(
    seed: int | tuple[int, ...], *, size: int = 64, channels: int = 4, orientation: str | None = None
) -> tuple[list[Volume], Volume]:
    """One multi-channel MR phantom: (one image per channel, label map), all on one grid.

    The anatomy (and label) is the CT phantom's for the same seed; each channel has its own
    contrast (``MR_CHANNELS``, repeated when more are asked for), and all share one smooth
    multiplicative bias field, as coils give; magnitude (Rician-like) noise, integer values.
    """
    rng = np.random.default_rng(seed)
    anatomy = _anatomy(rng, size, orientation)
    mr_rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 7919])  # the CT stream stays as it is
    names = channel_names(channels)
    coarse = mr_rng.normal(0.0, 0.12, size=(3, 3, 3))
    zoom = [n / 3 for n in anatomy.shape]
    bias = np.exp(ndimage.zoom(coarse, zoom, order=3, mode="nearest"))[
        tuple(slice(0, n) for n in anatomy.shape)
    ]
    volumes = []
    for name in names:
        table = np.asarray(MR_CHANNELS[name], dtype=np.float32)
        distractors = table[_SOFT] * mr_rng.uniform(0.6, 1.3, size=4)
        image = ndimage.gaussian_filter(_intensities(anatomy, table, distractors), sigma=(0.6, 0.6, 0.5))
        sigma = mr_rng.uniform(10.0, 20.0)
        real = image * bias + mr_rng.normal(0.0, sigma, size=image.shape)
        imag = mr_rng.normal(0.0, sigma, size=image.shape)
        image = np.rint(np.hypot(real, imag)).astype(np.float32)
        meta = {"modality": "MR", "orientation": anatomy.orientation, "source_format": "synthetic"}
        volumes.append(Volume(array=image, affine=anatomy.affine, meta={**meta, "kind": "image"}))
    label_meta = {"modality": "MR", "orientation": anatomy.orientation, "source_format": "synthetic"}
    return volumes, Volume(array=anatomy.label, affine=anatomy.affine, meta={**label_meta, "kind": "label"})


def channel_names(channels: int) -> list[str]:
    """Names of the synthetic MR channels (Task01's FLAIR, T1w, T1gd, T2w, then repeated)."""
    if channels < 1:
        raise ValueError(f"channels must be at least 1, got {channels}")
    base = list(MR_CHANNELS)
    return [base[i % len(base)] for i in range(channels)]


def make_dataset(
    out: str | Path,
    *,
    cases: int = 20,
    size: int = 64,
    seed: int = 0,
    test_fraction: float = 0.2,
    dicom: bool = False,
    modality: str = "ct",
    channels: int = 1,
    layout: str = "msd",
) -> Path:
    """Write a synthetic dataset; returns the ``dataset.json`` path.

    ``modality="mr"`` writes ``channels`` MR contrasts per case (``make_mr_case``).
    ``layout="msd"``: a Decathlon folder, several channels as one 4D NIfTI per image;
    ``layout="nnunet"``: an nnU-Net v2 raw folder (``CASE_0000.nii.gz`` per channel,
    ``channel_names``, labels name -> int), held-out cases in imagesTs/labelsTs.
    With ``dicom`` every image channel is also a DICOM series under ``dicom/<case>/``
    (one study; several channels are several series in it).
    """
    out = Path(out)
    if cases < 2:
        raise ValueError("need at least 2 cases (one to train, one to test)")
    if modality not in ("ct", "mr"):
        raise ValueError(f"modality {modality!r}: expected 'ct' or 'mr'")
    if modality == "ct" and channels != 1:
        raise ValueError("synthetic CT has one channel; use modality 'mr' for several")
    if layout not in ("msd", "nnunet"):
        raise ValueError(f"layout {layout!r}: expected 'msd' or 'nnunet'")
    names = channel_names(channels) if modality == "mr" else ["CT"]
    n_test = max(1, round(cases * test_fraction))
    training: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    for index in range(cases):
        name = f"case_{index:03d}"
        if modality == "mr":
            images, label = make_mr_case((seed, index), size=size, channels=channels)
        else:
            image, label = make_case((seed, index), size=size)
            images = [image]
        held_out = index >= cases - n_test
        split_img, split_lbl = ("imagesTs", "labelsTs") if held_out else ("imagesTr", "labelsTr")
        image_files = _write_images(images, out / split_img, name, layout)
        write_nifti(label, out / split_lbl / f"{name}.nii.gz", dtype="uint8")
        entry = {"image": f"./{split_img}/{image_files[0]}", "label": f"./{split_lbl}/{name}.nii.gz"}
        (test if held_out else training).append(entry)
        if dicom:
            _write_dicom_study(images, names, out / "dicom" / name, modality)
    spec = _nnunet_spec(names, len(training)) if layout == "nnunet" else _msd_spec(names, training, test)
    spec = {
        "name": "medseg-synthetic",
        "description": f"{modality.upper()}-like phantoms generated by medseg (seed {seed}, size {size})",
        "reference": "medseg.synthetic",
        "licence": "CC0",
        **spec,
    }
    return write_text_atomic(out / "dataset.json", json.dumps(spec, indent=2))


def _write_images(images: list[Volume], folder: Path, name: str, layout: str) -> list[str]:
    """One case's channels: ``name_000k.nii.gz`` each (nnU-Net) or one (4D) ``name.nii.gz`` (Decathlon)."""
    dtype = "int16"
    if layout == "nnunet":
        files = [f"{name}_{c:04d}.nii.gz" for c in range(len(images))]
        for volume, file in zip(images, files, strict=True):
            write_nifti(volume, folder / file, dtype=dtype)
        return files
    if len(images) == 1:
        write_nifti(images[0], folder / f"{name}.nii.gz", dtype=dtype)
    else:
        write_nifti_channels(images, folder / f"{name}.nii.gz", dtype=dtype)
    return [f"{name}.nii.gz"]


def _write_dicom_study(images: list[Volume], names: list[str], folder: Path, modality: str) -> None:
    from pydicom.uid import generate_uid

    if len(images) == 1:  # one series in the case folder; an MR one is MR Image Storage, stored as is
        write_dicom_series(
            images[0],
            folder,
            modality=modality.upper(),
            series_description=f"synthetic {folder.name}",
            intercept=-1024.0 if modality.upper() == "CT" else 0.0,
        )
        return
    study_uid = generate_uid()
    for volume, channel in zip(images, names, strict=True):
        write_dicom_series(
            volume,
            folder / channel,
            modality=modality.upper(),
            series_description=channel,
            study_uid=study_uid,
            intercept=0.0,
        )


def _msd_spec(names: list[str], training: list[dict], test: list[dict]) -> dict:
    return {
        "tensorImageSize": "3D" if len(names) == 1 else "4D",
        "modality": {str(c): n for c, n in enumerate(names)},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": [t["image"] for t in test],
        "test_labels": [t["label"] for t in test],
    }


def _nnunet_spec(names: list[str], n_training: int) -> dict:
    return {
        "channel_names": {str(c): n for c, n in enumerate(names)},
        "labels": {v: k for k, v in LABELS.items()},
        "numTraining": n_training,
        "file_ending": ".nii.gz",
    }
