"""Quality-control report of an inference batch: one self-contained ``report.html``.

Per case: the overlays (base64 PNG, slices through each structure), and per
structure its volume (ml), number of connected components, whether the mask
touches the border of the field of view (a cut-off organ), the TTA disagreement
when TTA ran, and a flag when a volume is far from the training range. The
training range comes from the bundle metadata ``label_volumes_ml`` (``{label:
[min, max]}`` or ``{label: {"min": .., "max": ..}}``); without it no flag is
raised. "Far" means below half the smallest or above 1.5 times the largest
training volume, or absent when every training case had the structure.

No external resource is referenced: the file opens offline, and can be mailed.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io import Volume, write_text_atomic
from medseg.postprocess import Connectivity, count_components, foreground_box
from medseg.viz import label_colour, overlay_png_bytes

log = logging.getLogger(__name__)

FAR_BELOW = 0.5
FAR_ABOVE = 1.5


@dataclass
class StructureQC:
    label: int
    name: str
    volume_ml: float
    components: int
    touches_border: bool
    range_flag: str | None = None  # why the volume is far from the training range, or None


@dataclass
class CaseQC:
    name: str
    structures: list[StructureQC]
    tta_disagreement: float | None
    overlay_png: bytes
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    warnings: list[str] = field(default_factory=list)


def _training_range(ranges: Any, label: int) -> tuple[float, float] | None:
    if not isinstance(ranges, dict):
        return None
    entry = ranges.get(str(label), ranges.get(label))
    try:
        if isinstance(entry, dict):
            return float(entry["min"]), float(entry["max"])
        if isinstance(entry, (list, tuple)) and len(entry) == 2:
            return float(entry[0]), float(entry[1])
    except (KeyError, TypeError, ValueError):
        return None
    return None


def range_flag(volume_ml: float, training: tuple[float, float] | None) -> str | None:
    """Why ``volume_ml`` is far from the training range ``(min, max)`` (None when it is not, or unknown)."""
    if training is None:
        return None
    lo, hi = training
    if volume_ml == 0.0 and lo > 0:
        return f"absent (training {lo:.1f}-{hi:.1f} ml)"
    if volume_ml < FAR_BELOW * lo:
        return f"small: {volume_ml:.1f} ml < {FAR_BELOW:g} x training minimum {lo:.1f} ml"
    if volume_ml > FAR_ABOVE * hi:
        return f"large: {volume_ml:.1f} ml > {FAR_ABOVE:g} x training maximum {hi:.1f} ml"
    return None


def touches_border(mask: np.ndarray, label: int) -> bool:
    """Whether ``label`` has voxels on any face of the label map's grid."""
    faces = (mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1])
    return any(bool((face == label).any()) for face in faces)


# A CT's field of view holds air (about -1000 HU) around the body and in lungs and bowel; an image
# with no voxel this dark is not in Hounsfield units (another modality, values stored without their
# rescale, or already normalised), and a model trained on CT reads it as something else.
AIR_HU = -200.0
AIR_PERCENTILE = 0.5  # of the voxels: a few dark ones (noise, a padding value) are not air
# voxels this many times coarser than the model's (its coarsest axis against the case's): a model
# trained at 2.5 mm slices given 8 mm ones is interpolating structures it never saw whole
COARSE_FACTOR = 2.5
LABEL_MAP_LEVELS = 32  # an image of this few whole values is a label map (a scan has hundreds)


def _subgrid(array: np.ndarray, voxels: int = 1_000_000) -> np.ndarray:
    """About ``voxels`` of ``array`` on an even subgrid, flat: a percentile needs no more, and a strided
    view copies only what it keeps (``ravel`` of a reoriented 512x512x600 scan copied all 600 MB)."""
    step = max(1, math.ceil((array.size / voxels) ** (1 / array.ndim)))
    return np.ascontiguousarray(array[(slice(None, None, step),) * array.ndim]).ravel()


def input_flags(
    channels: list[Volume], kinds: list[str], model_spacing: tuple[float, ...] | None = None
) -> list[str]:
    """Why a case looks unlike what the model was trained on, one line each: per channel normalised
    as CT (``kinds[i] == "ct"``), a DICOM series of another modality, or values with no air in them;
    for any model, voxels far coarser than ``model_spacing`` (mm, the bundle's), or a channel of a
    few whole values (a label map given as the image). Channels normalised per image (MR, z-score)
    are not judged by their intensity range."""
    flags = []
    if model_spacing and channels:
        coarsest, model = max(channels[0].spacing), max(model_spacing)
        if coarsest > COARSE_FACTOR * model:
            flags.append(f"voxels {coarsest:.3g} mm apart along one axis, {coarsest / model:.1f}x the "
                         f"model's {model:.3g} mm: thin structures may be missed or blocky")
    for i, (volume, kind) in enumerate(zip(channels, kinds, strict=False)):
        which = f"channel {i}: " if len(channels) > 1 else ""
        sample = _subgrid(np.asarray(volume.array))
        levels = np.unique(sample[:: max(1, sample.size // 200_000)])
        if len(levels) == 1:
            flags.append(f"{which}every voxel sampled is {levels[0]:g}: an empty image")
            continue
        if len(levels) <= LABEL_MAP_LEVELS and np.array_equal(levels, np.round(levels)):
            flags.append(f"{which}only {len(levels)} distinct whole values ({levels.min():g} to "
                         f"{levels.max():g}): a label map given as the image?")
            continue
        if kind != "ct":
            continue
        modality = str(volume.meta.get("modality") or "").upper()
        if volume.meta.get("source_format") == "dicom" and modality and modality != "CT":
            flags.append(f"{which}the series is {modality}, but the model was trained on CT: "
                         "its masks are unlikely to mean anything")
            continue
        dark = float(np.percentile(sample, AIR_PERCENTILE))
        if dark > AIR_HU:
            flags.append(f"{which}no air in the image (the darkest voxels at {dark:.0f}, CT air is about "
                         "-1000 HU): not CT in Hounsfield units (another modality, or values stored "
                         "without their rescale?), but the model was trained on CT")
    return flags


def case_qc(
    name: str,
    image: Volume,
    mask: np.ndarray,
    *,
    labels: dict[int, str],
    tta_disagreement: float | None = None,
    volume_ranges: Any = None,
    connectivity: Connectivity = 26,
    overlay: bool = True,
    input_warnings: list[str] | None = None,
) -> CaseQC:
    """QC figures of one segmented case (the mask in the image's grid); without ``overlay`` no PNG.
    ``input_warnings`` (``input_flags``) come first among the case's warnings."""
    voxel_ml = float(abs(np.linalg.det(image.affine[:3, :3]))) / 1000.0
    structures = []
    warnings = list(input_warnings or [])
    box = foreground_box(mask)  # volumes and components are counted there, not over the whole scan
    region = mask[box] if box is not None else np.zeros((0, 0, 0), dtype=mask.dtype)
    for k, label_name in sorted(labels.items()):
        if k == 0:
            continue
        m = region == k
        volume = float(np.count_nonzero(m)) * voxel_ml
        s = StructureQC(
            label=int(k),
            name=label_name,
            volume_ml=volume,
            components=count_components(m, connectivity=connectivity),
            touches_border=touches_border(mask, k),
            range_flag=range_flag(volume, _training_range(volume_ranges, k)),
        )
        if s.range_flag:
            warnings.append(f"{label_name}: {s.range_flag}")
        if s.touches_border:
            warnings.append(f"{label_name} touches the border of the field of view")
        structures.append(s)
    png = overlay_png_bytes(image, mask, labels=labels, title=name) if overlay else b""
    return CaseQC(
        name=name,
        structures=structures,
        tta_disagreement=tta_disagreement,
        overlay_png=png,
        shape=image.shape,
        spacing=image.spacing,
        warnings=warnings,
    )


def qc_to_dict(qc: CaseQC) -> dict[str, Any]:
    """A case's QC figures as JSON (the overlay PNG is kept apart, as a file beside the mask)."""
    tree = asdict(qc)
    del tree["overlay_png"]
    return tree


def qc_from_dict(tree: dict[str, Any], overlay_png: bytes) -> CaseQC:
    """The ``CaseQC`` that ``qc_to_dict`` recorded, with its overlay."""
    return CaseQC(
        name=str(tree["name"]),
        structures=[StructureQC(**s) for s in tree["structures"]],
        tta_disagreement=tree.get("tta_disagreement"),
        overlay_png=overlay_png,
        shape=tuple(tree["shape"]),
        spacing=tuple(tree["spacing"]),
        warnings=list(tree.get("warnings", [])),
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-top: 1px solid #ccc; padding-top: 16px; }
table { border-collapse: collapse; margin: 8px 0; background: white; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; font-size: 14px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 6px; border: 1px solid #555; }
.flag { color: #b00020; font-weight: 600; } .ok { color: #1b7f3b; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: 6px 10px; margin: 6px 0; }
img.overlay { max-width: 100%; border: 1px solid #ccc; background: black; }
"""


def _swatch(label: int) -> str:
    r, g, b = (int(np.rint(v * 255)) for v in label_colour(label))
    return f'<span class="swatch" style="background: rgb({r},{g},{b})"></span>'


def render_html(
    cases: list[CaseQC],
    *,
    labels: dict[int, str],
    failed: list[tuple[str, str]] | None = None,
    skipped: list[str] | None = None,
    model: str = "",
) -> str:
    esc = html.escape
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>medseg QC report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>medseg segmentation QC report</h1>",
        f"<p>Model: {esc(model)}<br>Written {now}. {len(cases)} case(s) segmented, "
        f"{len(skipped or [])} skipped (output existed), {len(failed or [])} failed.</p>",
    ]
    flagged = [c.name for c in cases if c.warnings]
    if flagged:
        parts.append(f'<p class="flag">Cases to look at: {esc(", ".join(flagged))}</p>')
    if failed:
        parts.append("<h2>Failed cases</h2><table><tr><th>input</th><th>reason</th></tr>")
        parts += [f"<tr><td>{esc(n)}</td><td>{esc(r)}</td></tr>" for n, r in failed]
        parts.append("</table>")
    # overview: one row per case, one column per structure
    names = [v for k, v in sorted(labels.items()) if k]
    parts.append('<h2>Overview (volume, ml)</h2><table id="overview"><tr><th>case</th>')
    parts += [f"<th>{esc(n)}</th>" for n in names]
    parts.append("<th>TTA disagreement</th><th>flags</th></tr>")
    for c in cases:
        cells = "".join(
            f'<td class="num{" flag" if s.range_flag else ""}">{s.volume_ml:.1f}</td>' for s in c.structures
        )
        tta = "" if c.tta_disagreement is None else f"{100 * c.tta_disagreement:.1f} %"
        parts.append(
            f'<tr><td><a href="#case-{esc(c.name)}">{esc(c.name)}</a></td>{cells}'
            f'<td class="num">{tta}</td><td>{len(c.warnings)}</td></tr>'
        )
    parts.append("</table>")
    for c in cases:
        parts.append(f'<h2 id="case-{esc(c.name)}" class="case">{esc(c.name)}</h2>')
        spacing = " x ".join(f"{s:.3g}" for s in c.spacing)
        parts.append(f"<p>Grid {' x '.join(map(str, c.shape))} voxels, spacing {spacing} mm.")
        if c.tta_disagreement is not None:
            parts.append(
                f" TTA disagreement: <b>{100 * c.tta_disagreement:.2f} %</b> of predicted-foreground voxels "
                "where at least one flip disagrees."
            )
        parts.append("</p>")
        for w in c.warnings:
            parts.append(f'<div class="warn">{esc(w)}</div>')
        parts.append(
            '<table class="structures"><tr><th>structure</th><th>volume (ml)</th><th>components</th>'
            "<th>touches FOV border</th><th>training range</th></tr>"
        )
        for s in c.structures:
            border = '<span class="flag">yes</span>' if s.touches_border else "no"
            flag = (
                f'<span class="flag">{esc(s.range_flag)}</span>'
                if s.range_flag
                else '<span class="ok">ok</span>'
            )
            parts.append(
                f"<tr><td>{_swatch(s.label)}{esc(s.name)}</td><td class='num'>{s.volume_ml:.2f}</td>"
                f"<td class='num'>{s.components}</td><td>{border}</td><td>{flag}</td></tr>"
            )
        parts.append("</table>")
        if not c.overlay_png:
            parts.append("<p>No overlay: segmented without the report.</p>")
            continue
        b64 = base64.b64encode(c.overlay_png).decode("ascii")
        parts.append(
            f'<img class="overlay" alt="overlays of {esc(c.name)}" src="data:image/png;base64,{b64}">'
        )
    if skipped:
        parts.append(f"<h2>Skipped (output existed)</h2><p>{esc(', '.join(skipped))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    cases: list[CaseQC],
    path: str | Path,
    *,
    labels: dict[int, str],
    failed: list[tuple[str, str]] | None = None,
    skipped: list[str] | None = None,
    model: str = "",
) -> Path:
    """Write the self-contained QC report (atomically)."""
    path = Path(path)
    write_text_atomic(path, render_html(cases, labels=labels, failed=failed, skipped=skipped, model=model))
    log.info("QC report: %s", path)
    return path
