"""Datasets: Decathlon ``dataset.json`` folders, splits, fingerprint and integrity check.

``load_dataset(root)`` returns a :class:`Dataset` (cases with absolute paths and
label names); ``split_cases`` gives a deterministic train/validation split (or a
k-fold split); ``fingerprint`` summarises spacings, sizes and foreground
intensities, from which ``plan`` derives what the config leaves out.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io import check_same_grid, load_label, load_volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path | None = None


@dataclass
class Dataset:
    root: Path
    labels: dict[int, str]
    modality: str
    training: list[Case]
    test: list[Case] = field(default_factory=list)


def _case_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_dataset(root: str | Path) -> Dataset:
    """Read a Decathlon-layout folder (``dataset.json`` + ``imagesTr``/``labelsTr``)."""
    root = Path(root)
    if root.is_file() and root.name.endswith(".json"):
        root = root.parent
    spec_path = root / "dataset.json"
    if not spec_path.is_file():
        raise InputError(root, "no dataset.json (expected a Medical Segmentation Decathlon layout folder)")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(spec_path, f"not valid JSON ({exc})") from exc
    try:
        labels = {int(k): str(v) for k, v in spec["labels"].items()}
        training_raw = spec["training"]
    except (KeyError, AttributeError, ValueError) as exc:
        raise InputError(spec_path, f"missing or malformed 'labels'/'training' entry ({exc})") from exc
    if 0 not in labels:
        raise InputError(spec_path, "labels must include 0 (background)")
    modality = (
        str(spec.get("modality", {}).get("0", "CT")) if isinstance(spec.get("modality"), dict) else "CT"
    )

    def resolve(rel: str) -> Path:
        path = (root / rel).resolve()
        if not path.exists():
            raise InputError(spec_path, f"lists {rel}, which does not exist")
        return path

    training = []
    for entry in training_raw:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputError(spec_path, f"training entry {entry!r} lacks 'image'/'label'")
        training.append(Case(_case_name(entry["image"]), resolve(entry["image"]), resolve(entry["label"])))
    if not training:
        raise InputError(spec_path, "lists no training cases")
    test_labels = {_case_name(p): p for p in spec.get("test_labels", [])}
    test = []
    for rel in spec.get("test", []):
        rel = rel["image"] if isinstance(rel, dict) else rel
        name = _case_name(rel)
        label = resolve(test_labels[name]) if name in test_labels else None
        test.append(Case(name, resolve(rel), label))
    return Dataset(root=root, labels=labels, modality=modality, training=training, test=test)


def split_cases(
    cases: list[Case], *, seed: int, val_fraction: float = 0.2, fold: int | None = None, num_folds: int = 5
) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split; with ``fold`` a k-fold split (nnU-Net style)."""
    order = np.random.default_rng(seed).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    if fold is not None:
        if not 0 <= fold < num_folds:
            raise InputError(None, f"--fold {fold}: expected 0..{num_folds - 1}")
        folds = np.array_split(np.arange(len(shuffled)), num_folds)
        val_idx = set(folds[fold].tolist())
    else:
        n_val = max(1, round(len(shuffled) * val_fraction)) if len(shuffled) > 1 else 0
        val_idx = set(range(n_val))
    train = [c for i, c in enumerate(shuffled) if i not in val_idx]
    val = [c for i, c in enumerate(shuffled) if i in val_idx]
    return train, val


def _ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing re-ordered to the RAS axis each voxel axis is closest to."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axis_of = np.argmax(np.abs(affine[:3, :3] / spacing), axis=0)
    out = np.empty(3)
    out[axis_of] = spacing
    return out


def fingerprint(dataset: Dataset, *, max_samples_per_case: int = 20000, seed: int = 0) -> dict[str, Any]:
    """Spacings, sizes (RAS order), foreground intensity statistics and label counts."""
    rng = np.random.default_rng(seed)
    spacings, extents, samples = [], [], []
    label_voxels = {k: 0 for k in dataset.labels}
    label_ml: dict[int, list[float]] = {k: [] for k in dataset.labels if k}
    for case in dataset.training:
        image = load_volume(case.image)
        label = load_label(case.label, image=image)
        spacing = _ras_spacing(image.affine)
        spacings.append(spacing)
        extents.append(_ras_shape(image) * spacing)
        fg = image.array[label.array > 0]
        if fg.size:
            samples.append(rng.choice(fg, size=min(fg.size, max_samples_per_case), replace=False))
        counts = np.bincount(label.array.ravel(), minlength=max(dataset.labels) + 1)
        voxel_ml = float(abs(np.linalg.det(image.affine[:3, :3]))) / 1000.0
        for k in label_voxels:
            n = int(counts[k]) if k < len(counts) else 0
            label_voxels[k] += n
            if k:
                label_ml[k].append(n * voxel_ml)
    fg_values = np.concatenate(samples) if samples else np.zeros(1, np.float32)
    fp = {
        "n_cases": len(dataset.training),
        "modality": dataset.modality,
        "labels": {str(k): v for k, v in dataset.labels.items()},
        "spacing_median": np.median(spacings, axis=0).round(4).tolist(),
        "spacing_min": np.min(spacings, axis=0).round(4).tolist(),
        "spacing_max": np.max(spacings, axis=0).round(4).tolist(),
        "spacing_p10": np.percentile(spacings, 10, axis=0).round(4).tolist(),
        "extent_mm_median": np.median(extents, axis=0).round(2).tolist(),
        "foreground_intensity": {
            "mean": float(fg_values.mean()),
            "std": float(fg_values.std()),
            "p00_5": float(np.percentile(fg_values, 0.5)),
            "p99_5": float(np.percentile(fg_values, 99.5)),
        },
        "label_voxels": {str(k): v for k, v in label_voxels.items()},
        # per-label volume range over the training cases: inference flags volumes far outside it
        "label_volumes_ml": {str(k): [round(min(v), 3), round(max(v), 3)] for k, v in label_ml.items() if v},
    }
    fp["hash"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def _ras_shape(volume) -> np.ndarray:
    spacing = np.asarray(volume.spacing)
    axis_of = np.argmax(np.abs(volume.affine[:3, :3] / spacing), axis=0)
    out = np.empty(3)
    out[axis_of] = volume.shape
    return out


def check_dataset(root: str | Path) -> list[str]:
    """Integrity report: every image readable, every label on its image's grid with known values."""
    problems: list[str] = []
    try:
        dataset = load_dataset(root)
    except InputError as exc:
        return [str(exc)]
    known = set(dataset.labels)
    for case in dataset.training:
        try:
            image = load_volume(case.image)
            label = load_label(case.label)
            check_same_grid(image, label)
            values = set(np.unique(label.array).tolist())
            if values - known:
                problems.append(
                    f"{case.label}: label values {sorted(values - known)} are not in dataset.json labels"
                )
        except InputError as exc:
            problems.append(str(exc))
    return problems
