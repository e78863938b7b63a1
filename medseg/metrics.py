"""Segmentation metrics per label and case, and folder-to-folder evaluation.

Conventions: Dice of an empty prediction against an empty reference is 1.0 (nothing
to find, nothing found); empty against non-empty (either way) is 0.0.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io import case_stem, check_same_grid, read_nifti, write_text_atomic


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    denom = int(pred.sum()) + int(ref.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / denom


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> dict[int, float]:
    return {k: dice(pred == k, ref == k) for k in labels if k != 0}


@dataclass
class EvalRow:
    case: str
    label: int
    name: str
    dice: float
    pred_ml: float
    ref_ml: float


def _pred_case_name(path: Path) -> str:
    stem = case_stem(path)
    return stem[: -len("_seg")] if stem.endswith("_seg") else stem


def evaluate_folders(
    pred_dir: str | Path, ref_dir: str | Path, *, labels: dict[int, str] | None = None
) -> list[EvalRow]:
    """Match ``<case>_seg.nii.gz`` (or ``<case>.nii.gz``) in ``pred_dir`` to ``<case>.nii.gz`` in ``ref_dir``."""
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise InputError(folder, "not a folder")
    preds = {_pred_case_name(p): p for p in sorted(pred_dir.glob("*.nii*"))}
    refs = {case_stem(p): p for p in sorted(ref_dir.glob("*.nii*"))}
    common = sorted(set(preds) & set(refs))
    if not common:
        raise InputError(pred_dir, f"no case names in common with {ref_dir}")
    if labels is None:
        labels = _labels_from_sidecar(preds[common[0]])
    rows: list[EvalRow] = []
    for case in common:
        pred = read_nifti(preds[case], kind="label")
        ref = read_nifti(refs[case], kind="label")
        check_same_grid(ref, pred)
        voxel_ml = float(abs(np.linalg.det(ref.affine[:3, :3]))) / 1000.0
        ids = sorted(labels) if labels else sorted(set(np.unique(ref.array)) | set(np.unique(pred.array)))
        for label in ids:
            if label == 0:
                continue
            p, r = pred.array == label, ref.array == label
            rows.append(
                EvalRow(
                    case,
                    int(label),
                    (labels or {}).get(label, str(label)),
                    dice(p, r),
                    float(p.sum()) * voxel_ml,
                    float(r.sum()) * voxel_ml,
                )
            )
    return rows


def _labels_from_sidecar(mask_path: Path) -> dict[int, str] | None:
    """Label names from the ``<stem>.json`` medseg writes beside each mask, when present."""
    sidecar = mask_path.with_name(case_stem(mask_path) + ".json")
    try:
        return {int(k): str(v) for k, v in json.loads(sidecar.read_text())["labels"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def summarise(rows: list[EvalRow]) -> dict[str, dict[str, float]]:
    by_label: dict[str, list[float]] = {}
    for row in rows:
        by_label.setdefault(row.name, []).append(row.dice)
    summary = {
        name: {"mean_dice": float(np.mean(v)), "median_dice": float(np.median(v)), "n": len(v)}
        for name, v in by_label.items()
    }
    summary["all"] = {
        "mean_dice": float(np.mean([r.dice for r in rows])) if rows else float("nan"),
        "n": len(rows),
    }
    return summary


def write_csv(rows: list[EvalRow], path: str | Path) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case", "label", "name", "dice", "pred_ml", "ref_ml"])
    for r in rows:
        writer.writerow([r.case, r.label, r.name, f"{r.dice:.6f}", f"{r.pred_ml:.4f}", f"{r.ref_ml:.4f}"])
    path = Path(path)
    write_text_atomic(path, buf.getvalue())
    write_text_atomic(path.with_suffix(".json"), json.dumps(summarise(rows), indent=2))
    return path


def markdown_table(rows: list[EvalRow]) -> str:
    summary = summarise(rows)
    lines = ["| label | mean Dice | median Dice | cases |", "|---|---|---|---|"]
    for name, s in summary.items():
        if name == "all":
            continue
        lines.append(f"| {name} | {s['mean_dice']:.4f} | {s['median_dice']:.4f} | {s['n']} |")
    lines.append(f"| **all** | {summary['all']['mean_dice']:.4f} | | {summary['all']['n']} |")
    return "\n".join(lines)
