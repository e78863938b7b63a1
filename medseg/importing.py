"""DICOM studies -> a training dataset: every RTSTRUCT or DICOM SEG under a folder, with the series it
was drawn on, becomes a case of a Decathlon-layout dataset that ``medseg train`` reads.

A radiotherapy department's planning CTs and contours (or a PACS export of CTs and segmentations)
arrive as one folder of studies; ``medseg import-dicom`` finds the label objects, reads each one's
referenced series as the image and the ROIs asked for as the label map on that series' grid
(``medseg.io.dicom_labels``), and writes ``imagesTr``/``labelsTr`` with ``dataset.json``. Cases are
named ``case_000``, ``case_001``, ... (never after a folder, file or header: those may carry a
patient's name), and ``sources.json`` says which series (by hashed UID) and which object each came
from. An object that cannot be a case (an ROI missing or empty, its series not there, a second
object for a series already taken) is skipped with one line saying why; the dataset is written as a
whole or not at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class ImportSummary:
    out: Path
    cases: list[dict] = field(default_factory=list)  # one per case, as in sources.json
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (label object, why)


def _label_objects(scan, root: Path) -> list[Path]:
    from medseg.io.dicom_labels import label_object_modality

    found = [p for p, why in scan.skipped if why.startswith("non-image object") and label_object_modality(p)]
    if not found:
        raise InputError(root, "no RTSTRUCT or DICOM SEG file under it (the contours to import)")
    return sorted(found)


def _case(obj: Path, folder: Path, scan, rois: Sequence[tuple[str, str]]):
    """(image, labels) for one label object, or an InputError saying why it cannot be a case."""
    from medseg.io import read_dicom_series
    from medseg.io.dicom_labels import read_label_object

    labels = read_label_object(obj, folder, rois=rois, scan=scan, require_referenced=True)
    empty = [labels.labels[v] for v, n in labels.counts.items() if n == 0]
    if empty:
        raise InputError(obj, f"{', '.join(map(repr, empty))} enclose(s) no voxel: a case without it would teach its absence")
    image = read_dicom_series(folder, series_id=labels.series, scan=scan)
    if image.shape != labels.volume.shape or not np.allclose(image.affine, labels.volume.affine, atol=1e-4):
        raise InputError(obj, f"its label map and series {labels.series} do not share a grid")
    return image, labels


def _dataset_json(name: str, modality: str, rois: Sequence[tuple[str, str]], cases: list[str]) -> dict:
    return {
        "name": name,
        "description": "imported by medseg import-dicom from DICOM series and their RTSTRUCT/SEG",
        "modality": {"0": modality or "CT"},
        "labels": {"0": "background", **{str(n): label for n, (label, _) in enumerate(rois, start=1)}},
        "numTraining": len(cases),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        "test": [],
    }


def import_dicom_dataset(
    root: str | Path,
    out: str | Path,
    rois: Sequence[tuple[str, str]],
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> ImportSummary:
    """Write a Decathlon dataset at ``out`` from the label objects and series under ``root``.

    Args:
        root: a folder (or zipped export) of DICOM studies, searched recursively.
        out: the dataset folder to write (``imagesTr``, ``labelsTr``, ``dataset.json``, ``sources.json``).
        rois: (label name, ROI or segment name) pairs: labels 1..N of every case.
        name: the dataset's name in ``dataset.json`` (default: ``out``'s folder name).
        overwrite: replace an existing ``out``.

    Raises:
        InputError: nothing under ``root`` to import, or no object gave a case.
    """
    from medseg.io import scan_dicom, write_nifti
    from medseg.io.archive import dicom_source
    from medseg.io.nifti import compact_dtype
    from medseg.io.volume import atomic_dir

    if not rois:
        raise InputError(Path(root), "name the ROIs to import (--roi NAME ...): they are the dataset's labels")
    out = Path(out)
    summary = ImportSummary(out=out)
    modality = ""
    with dicom_source(root) as folder:
        scan = scan_dicom(folder)
        objects = _label_objects(scan, Path(root))
        taken: dict[str, Path] = {}
        with atomic_dir(out, overwrite=overwrite) as staging:
            for sub in ("imagesTr", "labelsTr"):
                (staging / sub).mkdir()
            for obj in objects:
                shown = obj.relative_to(folder) if obj.is_relative_to(folder) else obj
                try:
                    image, labels = _case(obj, folder, scan, rois)
                    if labels.series in taken:
                        raise InputError(shown, f"series {labels.series} already has its labels from {taken[labels.series]}")
                    this = str(image.meta.get("modality", "") or "")
                    if modality and this != modality:
                        raise InputError(shown, f"its series is {this or 'of no modality'}, the dataset's first case {modality}")
                except InputError as exc:
                    summary.skipped.append((Path(shown), exc.problem))
                    continue
                modality = modality or this
                taken[labels.series] = Path(shown)
                case = f"case_{len(summary.cases):03d}"
                write_nifti(image, staging / "imagesTr" / f"{case}.nii.gz", overwrite=False, dtype=compact_dtype(image.array))
                write_nifti(labels.volume, staging / "labelsTr" / f"{case}.nii.gz", overwrite=False, labels=labels.labels)
                summary.cases.append(
                    {
                        "case": case,
                        "series": labels.series,
                        "labels_from": labels.source,
                        "voxels": {labels.labels[v]: n for v, n in labels.counts.items()},
                        "notes": labels.notes,
                    }
                )
            if not summary.cases:
                why = "; ".join(f"{p}: {w}" for p, w in summary.skipped[:3])
                raise InputError(Path(root), f"no case could be imported ({why})")
            spec = _dataset_json(name or out.name, modality, rois, [c["case"] for c in summary.cases])
            (staging / "dataset.json").write_text(json.dumps(spec, indent=2))
            (staging / "sources.json").write_text(json.dumps(summary.cases, indent=1, ensure_ascii=False))
    log.debug("%s: %d case(s) imported, %d object(s) skipped", out, len(summary.cases), len(summary.skipped))
    return summary
