"""Label tables the viewers load beside a mask: ITK-SNAP's label description file and 3D Slicer's
colour table, with the colours of medseg's QC overlays (``medseg.viz.label_colour``).

For a mask ``case_seg.nii.gz`` they are ``case_seg.itksnap.txt`` (ITK-SNAP: Segmentation > Import
Label Descriptions) and ``case_seg.ctbl`` (3D Slicer: load it as a colour table and pick it for the
segmentation). Both are written together: either both are replaced or neither is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medseg.io.volume import atomic_path, case_stem


def label_rgb(value: int) -> tuple[int, int, int]:
    """The 0-255 RGB colour of a label value, as the QC report draws it."""
    from medseg.viz import label_colour

    rgb = np.rint(np.asarray(label_colour(int(value)), dtype=np.float64) * 255).astype(int)
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def label_table_paths(mask_path: str | Path) -> tuple[Path, Path]:
    """(ITK-SNAP file, Slicer ``.ctbl``) beside ``mask_path``."""
    mask_path = Path(mask_path)
    stem = case_stem(mask_path)
    return mask_path.with_name(f"{stem}.itksnap.txt"), mask_path.with_name(f"{stem}.ctbl")


def _with_background(labels: Mapping[int, str]) -> dict[int, str]:
    table = {int(k): str(v) for k, v in labels.items()}
    table.setdefault(0, "background")
    return dict(sorted(table.items()))


def itksnap_text(labels: Mapping[int, str]) -> str:
    """ITK-SNAP label description file: ``IDX R G B A VIS MSH "LABEL"`` per line."""
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File (written by medseg)",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields:",
        "#    IDX:   Zero-based index",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description",
        "################################################",
    ]
    for value, name in _with_background(labels).items():
        r, g, b = label_rgb(value)
        alpha, shown = (0, 0) if value == 0 else (1, 1)
        text = name.replace('"', "'").replace("\n", " ")
        lines.append(f'{value:5d} {r:5d} {g:4d} {b:4d} {alpha:8d} {shown:2d} {shown:2d}    "{text}"')
    return "\n".join(lines) + "\n"


def slicer_ctbl_text(labels: Mapping[int, str]) -> str:
    """3D Slicer colour table: ``index name R G B A`` per line (names without spaces, as Slicer reads them)."""
    table = _with_background(labels)
    lines = ["# Color table file written by medseg", f"# {len(table)} values"]
    for value, name in table.items():
        r, g, b = label_rgb(value)
        alpha = 0 if value == 0 else 255
        text = "_".join(name.split()) or f"label_{value}"
        lines.append(f"{value} {text} {r} {g} {b} {alpha}")
    return "\n".join(lines) + "\n"


def write_label_tables(
    mask_path: str | Path, labels: Mapping[int, str], *, overwrite: bool = True
) -> tuple[Path, Path]:
    """Write the ITK-SNAP and 3D Slicer label tables for the mask at ``mask_path``.

    Both are staged first and renamed into place only when both are complete, so a failure
    leaves the previous pair (or none) and no partial file.

    Returns:
        (ITK-SNAP path, Slicer path).
    """
    itksnap, ctbl = label_table_paths(mask_path)
    with contextlib.ExitStack() as stack:
        tmp_snap = stack.enter_context(atomic_path(itksnap, overwrite=overwrite))
        tmp_ctbl = stack.enter_context(atomic_path(ctbl, overwrite=overwrite))
        tmp_snap.write_text(itksnap_text(labels), encoding="utf-8")
        tmp_ctbl.write_text(slicer_ctbl_text(labels), encoding="utf-8")
    return itksnap, ctbl
