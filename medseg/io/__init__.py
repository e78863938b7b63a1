"""File formats live here and nowhere else: NIfTI, DICOM series, DICOM SEG.

``load_volume(path)`` reads a NIfTI file or a DICOM series folder into a
``Volume``; ``write_mask`` writes a label map in the exact grid of its source.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.dicom import (
    ScanResult,
    SeriesInfo,
    read_dicom_series,
    scan_dicom,
    select_series,
    uid_hash,
    write_dicom_series,
)
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.nifti import is_nifti, read_nifti, write_nifti
from medseg.io.volume import Volume, atomic_path, case_stem, write_text_atomic

__all__ = [
    "ScanResult",
    "SeriesInfo",
    "Volume",
    "atomic_path",
    "case_stem",
    "find_inputs",
    "is_medseg_output",
    "is_nifti",
    "load_label",
    "load_volume",
    "read_dicom_series",
    "read_nifti",
    "scan_dicom",
    "select_series",
    "sidecar_fields",
    "uid_hash",
    "write_dicom_seg",
    "write_dicom_series",
    "write_mask",
    "write_nifti",
    "write_text_atomic",
]


def load_volume(
    path: str | Path,
    *,
    series_id: str | None = None,
    allow_tilt: bool = False,
    scan: ScanResult | None = None,
) -> Volume:
    """Read an image: a NIfTI file, a DICOM file, or a folder holding DICOM series.

    For DICOM, ``series_id`` picks a series (UID, its hash or a unique prefix); without it
    the main series is chosen (see ``select_series``). ``allow_tilt`` resamples a
    gantry-tilted series onto an orthogonal grid instead of refusing it.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "not found")
    if path.is_file() and is_nifti(path):
        if series_id is not None:
            raise InputError(path, "--series applies to DICOM folders, not to a NIfTI file")
        return read_nifti(path, kind="image")
    if path.is_dir() or path.is_file():
        return read_dicom_series(path, series_id=series_id, allow_tilt=allow_tilt, scan=scan)
    raise InputError(path, "neither a NIfTI file nor a DICOM series folder")


def load_label(
    path: str | Path, *, image: Volume | None = None, expected_labels: Iterable[int] | None = None
) -> Volume:
    """Read a label map; when ``image`` is given, its grid must match exactly; when
    ``expected_labels`` is given, no other value may occur."""
    label = read_nifti(path, kind="label")
    if image is not None:
        check_same_grid(image, label)
    if expected_labels is not None:
        allowed = {int(v) for v in expected_labels} | {0}
        found = {int(v) for v in np.unique(label.array)}
        unexpected = sorted(found - allowed)
        if unexpected:
            raise InputError(
                path,
                f"label map holds values {unexpected} that are not among the declared labels "
                f"{sorted(allowed)}; fix the labels or the label list",
            )
    return label


def check_same_grid(
    reference: Volume,
    other: Volume,
    *,
    atol: float = 1e-3,
    other_kind: str = "label",
    reference_kind: str = "image",
    fix: str = "resample the label onto the image grid (nearest neighbour)",
) -> None:
    """Refuse ``other`` unless it has ``reference``'s shape and affine; the message names both files."""
    if reference.shape != other.shape:
        raise InputError(
            other.source,
            f"{other_kind} shape {other.shape} differs from {reference_kind} {reference.source} "
            f"shape {reference.shape}",
        )
    if not np.allclose(reference.affine, other.affine, atol=atol):
        raise InputError(
            other.source,
            f"{other_kind} grid differs from {reference_kind} {reference.source}: affines differ by up to "
            f"{np.abs(reference.affine - other.affine).max():.4g} mm; {fix}",
        )


# medseg's own outputs beside a mask (see medseg.batch): never inputs
_OUTPUT_SUFFIXES = ("_seg.nii.gz", "_seg.nii", "_seg.json", "_seg.dcm", "_seg_entropy.nii.gz", "_seg_qc.png")


def is_medseg_output(path: str | Path) -> bool:
    """Whether ``path`` is named as medseg writes its outputs (mask, sidecar, SEG, maps, report)."""
    name = Path(path).name
    if name.endswith(_OUTPUT_SUFFIXES) or (name.startswith("report") and name.endswith(".html")):
        return True
    stem, _, rest = name.rpartition("_prob_")
    return stem.endswith("_seg") and rest.removesuffix(".nii.gz").isdigit()


def _candidates(folder: Path) -> list[Path]:
    """A folder's entries that may be inputs: no dot-files (macOS ``._*`` included), no medseg outputs."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    return [p for p in entries if not (p.is_file() and is_medseg_output(p))]


def find_inputs(paths: list[str | Path]) -> list[Path]:
    """Expand ``infer --input`` arguments: NIfTI files, DICOM series folders, or folders of either.

    Inside folders, dot-files (macOS ``._*`` AppleDouble files included) and medseg's own outputs
    (``*_seg.nii.gz``, sidecars, probability maps, reports) are never taken as inputs.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputError(path, "not found")
        if path.is_file():
            found.append(path)
            continue
        entries = _candidates(path)
        niftis = [p for p in entries if p.is_file() and is_nifti(p)]
        subdirs = [p for p in entries if p.is_dir()]
        if niftis:
            found.extend(niftis)
            found.extend(subdirs)
        elif subdirs and not any(p.is_file() for p in entries):
            found.extend(subdirs)  # a folder of DICOM series folders
        elif entries or not any(is_medseg_output(p) for p in path.iterdir()):
            found.append(path)  # a DICOM series folder (an empty one fails as such)
    return found


def sidecar_fields(source: Volume, labels: dict[int, str]) -> dict[str, Any]:
    """The label names and the source grid, as a mask's ``<stem>.json`` sidecar records them."""
    return {
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "source": {
            "name": Path(source.source).name,
            "format": source.meta.get("source_format", ""),
            "shape": list(source.shape),
            "spacing_mm": [round(s, 6) for s in source.spacing],
            "affine": np.asarray(source.affine).round(6).tolist(),
            "axcodes": source.axcodes(),
        },
    }


def write_mask(
    mask: np.ndarray,
    source: Volume,
    path: str | Path,
    *,
    labels: dict[int, str],
    extra: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``mask`` (in ``source``'s grid) as NIfTI plus ``<stem>.json`` with label names and geometry."""
    path = Path(path)
    if mask.shape != source.shape:
        raise ValueError(f"mask shape {mask.shape} differs from source grid {source.shape}")
    if mask.max(initial=0) > 255:
        raise ValueError("mask holds labels above 255")
    out = Volume(array=mask.astype(np.uint8), affine=source.affine, meta={"kind": "label"}, source=str(path))
    sidecar = {**sidecar_fields(source, labels), **(extra or {})}
    json_path = path.with_name(case_stem(path) + ".json")
    write_nifti(out, path, overwrite=overwrite)
    write_text_atomic(json_path, json.dumps(sidecar, indent=2), overwrite=True)
    return path
