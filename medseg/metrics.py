"""Segmentation metrics per label and case, and folder-to-folder evaluation.

Per case and label: Dice, HD95 (mm), surface Dice at a tolerance (mm), and the
predicted and reference volumes (ml). Distances are physical: they use the voxel
spacing of the grid (anisotropic grids are handled exactly by the Euclidean
distance transform).

Conventions (also written into the JSON summary):

- Surfaces are the mask voxels with at least one 6-neighbour outside the mask
  (a mask touching the edge of the grid has its surface there).
- HD95 is the larger of the two directed 95th percentiles of surface-to-surface
  distances (as MONAI's ``compute_hausdorff_distance(percentile=95)``).
- Surface Dice at tolerance t (Nikolov et al. 2021): the fraction of surface voxels
  of both masks lying within t mm of the other mask's surface.
- Both empty: Dice 1, HD95 0 mm, surface Dice 1 (nothing to find, nothing found).
- One empty, the other not: Dice 0, surface Dice 0, HD95 undefined (NaN in Python
  and empty in the CSV, ``null`` in JSON). The summary takes HD95 statistics over
  the cases where it is defined and counts the others as ``hd95_undefined``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.errors import ConfigError, InputError, OutputError
from medseg.io import Volume, case_stem, check_same_grid, is_medseg_output, read_nifti, write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE_MM = 2.0
CONVENTIONS = {
    "surface": "mask voxels with a 6-neighbour outside the mask",
    "hd95": "max of the two directed 95th percentiles of surface distances, mm",
    "surface_dice": "fraction of both surfaces within the tolerance of the other surface",
    "both_empty": "dice 1, hd95 0, surface_dice 1",
    "one_empty": "dice 0, surface_dice 0, hd95 undefined (null), counted in hd95_undefined",
}


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    denom = int(pred.sum()) + int(ref.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / denom


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> dict[int, float]:
    return {k: dice(pred == k, ref == k) for k in labels if k != 0}


_CROSS = ndimage.generate_binary_structure(3, 1)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to ``ref``'s surface, and the reverse.

    Both masks must be non-empty. Work is limited to the bounding box of both masks
    plus a margin, so small structures in large scans stay cheap.
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    both = pred | ref
    lo = np.argwhere(both).min(axis=0)
    hi = np.argwhere(both).max(axis=0) + 1
    box = tuple(slice(max(0, a - 1), min(n, b + 1)) for a, b, n in zip(lo, hi, both.shape, strict=True))
    sp, sr = _surface(pred[box]), _surface(ref[box])
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return to_ref[sp], to_pred[sr]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (see the module conventions)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return float("nan")
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float], *, tolerance_mm: float
) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (see the module conventions)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    return float(((d_pr <= tolerance_mm).sum() + (d_rp <= tolerance_mm).sum()) / (d_pr.size + d_rp.size))


def label_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: list[int],
    spacing: tuple[float, float, float],
    *,
    surface: bool = True,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> dict[str, float]:
    """``dice_<k>`` (and with ``surface`` ``hd95_<k>`` mm and ``nsd_<k>``) per foreground label.

    The one implementation behind validation during training and ``evaluate``; an undefined
    HD95 (one mask empty) is left out, as in the summaries.
    """
    out: dict[str, float] = {}
    for k in labels:
        if k == 0:
            continue
        p, r = pred == k, ref == k
        out[f"dice_{k}"] = dice(p, r)
        if surface:
            h = hd95(p, r, spacing)
            if math.isfinite(h):
                out[f"hd95_{k}"] = h
            out[f"nsd_{k}"] = surface_dice(p, r, spacing, tolerance_mm=tolerance_mm)
    return out


@dataclass
class EvalRow:
    case: str
    label: int
    name: str
    dice: float
    pred_ml: float
    ref_ml: float
    hd95_mm: float = float("nan")
    surface_dice: float = float("nan")


def evaluate_pair(
    pred: Volume,
    ref: Volume,
    *,
    case: str,
    labels: dict[int, str] | None = None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> list[EvalRow]:
    """Metrics per foreground label for one prediction against its reference (same grid)."""
    check_same_grid(
        ref, pred, other_kind="mask", reference_kind="reference", fix="masks must be in the reference grid"
    )
    spacing = ref.spacing
    voxel_ml = float(abs(np.linalg.det(ref.affine[:3, :3]))) / 1000.0
    ids = sorted(labels) if labels else sorted(set(np.unique(ref.array)) | set(np.unique(pred.array)))
    rows = []
    for label in ids:
        if label == 0:
            continue
        p, r = pred.array == label, ref.array == label
        rows.append(
            EvalRow(
                case=case,
                label=int(label),
                name=(labels or {}).get(label, str(label)),
                dice=dice(p, r),
                pred_ml=float(p.sum()) * voxel_ml,
                ref_ml=float(r.sum()) * voxel_ml,
                hd95_mm=hd95(p, r, spacing),
                surface_dice=surface_dice(p, r, spacing, tolerance_mm=tolerance_mm),
            )
        )
    return rows


def _pred_case_name(path: Path) -> str:
    stem = case_stem(path)
    return stem[: -len("_seg")] if stem.endswith("_seg") else stem


def _prediction_files(pred_dir: Path) -> list[Path]:
    """The masks in a prediction folder: no dot-files, none of medseg's probability/entropy maps."""
    return [
        p
        for p in sorted(pred_dir.glob("*.nii*"))
        if not p.name.startswith(".")
        and not (is_medseg_output(p) and not p.name.endswith(("_seg.nii.gz", "_seg.nii")))
    ]


def check_outputs_are_not_inputs(
    outputs: list[str | Path], pred_dir: str | Path, ref_dir: str | Path
) -> None:
    """Refuse to write ``outputs`` over a file ``evaluate`` reads (a mask, a reference, a sidecar)."""
    read = {p.resolve() for folder in (pred_dir, ref_dir) for p in Path(folder).glob("*.nii*")}
    read |= {p.resolve() for p in Path(pred_dir).glob("*_seg.json")}
    for out in outputs:
        if Path(out).resolve() in read:
            raise OutputError(
                f"{out}: is an input of evaluate (a mask, reference or sidecar); choose another --out"
            )


def match_cases(pred_dir: str | Path, ref_dir: str | Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Pairs (case, prediction, reference) matched by name, and the reference cases with no prediction.

    ``<case>_seg.nii.gz`` (or ``<case>.nii.gz``) in ``pred_dir`` matches ``<case>.nii.gz`` in ``ref_dir``.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise InputError(folder, "not a folder")
    preds = {_pred_case_name(p): p for p in _prediction_files(pred_dir)}
    refs = {case_stem(p): p for p in sorted(ref_dir.glob("*.nii*")) if not p.name.startswith(".")}
    common = sorted(set(preds) & set(refs))
    if not common:
        raise InputError(pred_dir, f"no case names in common with {ref_dir}")
    unmatched = sorted(set(preds) - set(refs))
    if unmatched:
        log.warning(
            "%d prediction(s) have no reference in %s (not evaluated): %s",
            len(unmatched),
            ref_dir,
            ", ".join(unmatched[:10]),
        )
    return [(c, preds[c], refs[c]) for c in common], sorted(set(refs) - set(preds))


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    *,
    labels: dict[int, str] | None = None,
    model: str | Path | None = None,
    labels_file: str | Path | None = None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> list[EvalRow]:
    """Evaluate every prediction in ``pred_dir`` that has a reference of the same case name in ``ref_dir``.

    The label scheme (:func:`resolve_label_scheme`) comes from the model (``labels``, the bundle
    ``model``, or the masks' sidecars) and from the references' ``labels_file`` (a ``dataset.json``);
    schemes that differ are refused, and so is a reference holding a value outside the scheme.
    """
    pairs, missing = match_cases(pred_dir, ref_dir)
    if missing:
        log.warning("%d reference case(s) have no prediction: %s", len(missing), ", ".join(missing[:10]))
    scheme = resolve_label_scheme(
        [pred for _, pred, _ in pairs], labels=labels, model=model, labels_file=labels_file
    )
    rows: list[EvalRow] = []
    for case, pred_path, ref_path in pairs:
        pred = read_nifti(pred_path, kind="label")
        ref = read_nifti(ref_path, kind="label")
        if scheme is not None:
            check_label_values(ref_path, ref.array, scheme)
        rows.extend(
            evaluate_pair(
                pred, ref, case=case, labels=scheme.labels if scheme else None, tolerance_mm=tolerance_mm
            )
        )
    return rows


@dataclass(frozen=True)
class LabelScheme:
    """Label values and their names, and where they were read (a sidecar, a bundle, a dataset.json)."""

    labels: dict[int, str]
    source: str

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items()))


def _name_key(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").casefold().split())


def _same_name(a: str, b: str) -> bool:
    return _name_key(a) == _name_key(b)


def scheme_differences(a: LabelScheme, b: LabelScheme) -> list[str]:
    """What differs between two label schemes (values, or names compared case- and separator-blind)."""
    out = []
    for k in sorted(set(a.labels) | set(b.labels)):
        x, y = a.labels.get(k), b.labels.get(k)
        if x is None or y is None or not _same_name(x, y):
            out.append(f"label {k} is {x or 'absent'!r} vs {y or 'absent'!r}")
    return out


def check_same_scheme(reference: LabelScheme, model: LabelScheme) -> None:
    """Refuse (ConfigError, one line) a reference scheme that is not the model's."""
    diff = scheme_differences(reference, model)
    if diff:
        raise ConfigError(
            f"the references' label scheme ({reference.source}: {reference.describe()}) differs from the "
            f"model's ({model.source}: {model.describe()}): {'; '.join(diff[:5])}; evaluate masks against "
            "references labelled the same way (or pass the right --labels dataset.json)"
        )


def check_label_values(path: str | Path, array: np.ndarray, scheme: LabelScheme) -> None:
    """Refuse (InputError naming ``path``) a mask holding values that are not labels of ``scheme``."""
    outside = sorted(int(v) for v in np.unique(array) if int(v) not in scheme.labels)
    if outside:
        shown = ", ".join(str(v) for v in outside[:10]) + (", ..." if len(outside) > 10 else "")
        raise InputError(
            path,
            f"holds label value(s) {shown} outside the label scheme ({scheme.source}: {scheme.describe()})",
        )


def labels_from_dataset_json(path: str | Path) -> LabelScheme:
    """The ``labels`` map of a Decathlon (``{"1": "liver"}``) or nnU-Net (``{"liver": 1}``) dataset.json."""
    from medseg.data import _parse_labels

    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise InputError(path, f"is not valid JSON ({exc})") from exc
    if not isinstance(spec, dict):
        raise InputError(path, "is not a dataset.json (expected an object with a 'labels' map)")
    return LabelScheme(_parse_labels(path, spec), str(path))


def labels_from_model(model: str | Path) -> LabelScheme:
    """The label names of a bundle folder or MLflow model URI by the values its masks hold (its
    config, without loading the network)."""
    import yaml

    from medseg.bundle import CONFIG, resolve_model
    from medseg.config import config_from_dict

    folder = resolve_model(model)
    try:
        cfg = config_from_dict(yaml.safe_load((folder / CONFIG).read_text()), source=str(folder / CONFIG))
    except OSError as exc:
        raise InputError(folder, f"not a medseg bundle (cannot read {CONFIG})") from exc
    if not cfg.labels:
        raise InputError(folder / CONFIG, "bundle config has no labels")
    return LabelScheme(cfg.stored_labels(), str(model))  # the values its masks hold


def labels_from_sidecars(masks: list[Path]) -> LabelScheme | None:
    """The label scheme the masks' sidecars record; sidecars that disagree are refused."""
    found: LabelScheme | None = None
    for mask in masks:
        labels = _labels_from_sidecar(mask)
        if labels is None:
            continue
        scheme = LabelScheme(labels, str(_sidecar_of(mask)))
        if found is None:
            found = scheme
        elif diff := scheme_differences(found, scheme):
            raise InputError(
                scheme.source,
                f"records another label scheme than {found.source} ({'; '.join(diff[:5])}): "
                "the predictions come from different models; evaluate them separately",
            )
    return found


def resolve_label_scheme(
    masks: list[Path],
    *,
    labels: dict[int, str] | None = None,
    model: str | Path | None = None,
    labels_file: str | Path | None = None,
) -> LabelScheme | None:
    """The label scheme to evaluate with, refusing the combinations that disagree.

    The model's scheme is ``labels`` (given by the caller), the bundle ``model``'s, or what the
    masks' sidecars record (which must then agree with it); the references' scheme is ``labels_file``.
    The model's wins when both exist and agree; None when nothing names the labels (the values found
    are evaluated then).
    """
    model_scheme = None
    if labels:
        model_scheme = LabelScheme({int(k): str(v) for k, v in labels.items()}, "the model")
    elif model is not None:
        model_scheme = labels_from_model(model)
    recorded = labels_from_sidecars(masks)
    if (
        model_scheme is not None
        and recorded is not None
        and (diff := scheme_differences(model_scheme, recorded))
    ):
        raise InputError(
            recorded.source,
            f"the predictions were made with another label scheme than {model_scheme.source}'s "
            f"({'; '.join(diff[:5])})",
        )
    model_scheme = model_scheme or recorded
    reference_scheme = labels_from_dataset_json(labels_file) if labels_file is not None else None
    if model_scheme is not None and reference_scheme is not None:
        check_same_scheme(reference_scheme, model_scheme)
    return model_scheme or reference_scheme


def _sidecar_of(mask_path: Path) -> Path:
    return mask_path.with_name(case_stem(mask_path) + ".json")


def _labels_from_sidecar(mask_path: Path) -> dict[int, str] | None:
    """Label names from the ``<stem>.json`` medseg writes beside each mask, when present."""
    try:
        return {int(k): str(v) for k, v in json.loads(_sidecar_of(mask_path).read_text())["labels"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _stats(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.median(finite))


def _summary_of(rows: list[EvalRow]) -> dict[str, float]:
    mean_d, median_d = _stats([r.dice for r in rows])
    mean_h, median_h = _stats([r.hd95_mm for r in rows])
    mean_s, median_s = _stats([r.surface_dice for r in rows])
    return {
        "mean_dice": mean_d,
        "median_dice": median_d,
        "mean_hd95_mm": mean_h,
        "median_hd95_mm": median_h,
        "hd95_undefined": sum(1 for r in rows if math.isnan(r.hd95_mm)),
        "mean_surface_dice": mean_s,
        "median_surface_dice": median_s,
        "n": len(rows),
    }


def summarise(rows: list[EvalRow]) -> dict[str, dict[str, float]]:
    """Mean and median per label name, and over all rows (``"all"``)."""
    by_label: dict[str, list[EvalRow]] = {}
    for row in rows:
        by_label.setdefault(row.name, []).append(row)
    summary = {name: _summary_of(v) for name, v in by_label.items()}
    summary["all"] = _summary_of(rows)
    return summary


def _fmt(value: float, digits: int) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def _json_safe(tree):
    if isinstance(tree, dict):
        return {k: _json_safe(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_json_safe(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def write_csv(rows: list[EvalRow], path: str | Path, *, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> Path:
    """Per-case CSV at ``path`` and the JSON summary beside it (same name, ``.json``)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["case", "label", "name", "dice", "hd95_mm", f"surface_dice_{tolerance_mm:g}mm", "pred_ml", "ref_ml"]
    )
    for r in rows:
        writer.writerow(
            [
                r.case,
                r.label,
                r.name,
                _fmt(r.dice, 6),
                _fmt(r.hd95_mm, 4),
                _fmt(r.surface_dice, 6),
                f"{r.pred_ml:.4f}",
                f"{r.ref_ml:.4f}",
            ]
        )
    path = Path(path)
    write_text_atomic(path, buf.getvalue())
    summary = {
        "tolerance_mm": tolerance_mm,
        "conventions": CONVENTIONS,
        "labels": summarise(rows),
        "cases": [asdict(r) for r in rows],
    }
    write_text_atomic(path.with_suffix(".json"), json.dumps(_json_safe(summary), indent=2))
    return path


def markdown_table(rows: list[EvalRow], *, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> str:
    summary = summarise(rows)
    lines = [
        f"| label | mean Dice | median Dice | mean HD95 (mm) | median HD95 (mm) | "
        f"surface Dice @{tolerance_mm:g} mm | cases |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        label = "**all**" if name == "all" else name
        undefined = f" ({s['hd95_undefined']} undefined)" if s["hd95_undefined"] else ""
        lines.append(
            f"| {label} | {_fmt(s['mean_dice'], 4)} | {_fmt(s['median_dice'], 4)} | "
            f"{_fmt(s['mean_hd95_mm'], 2)}{undefined} | {_fmt(s['median_hd95_mm'], 2)} | "
            f"{_fmt(s['mean_surface_dice'], 4)} | {s['n']} |"
        )
    return "\n".join(lines)
