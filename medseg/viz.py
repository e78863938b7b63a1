"""Pictures a person can check: colour-mapped label overlays on axial, coronal and sagittal slices
through each structure, and training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.io import Volume, atomic_path

# A fixed colour per label index, so the same structure always has the same colour: background black,
# then 10 distinct colours for the usual few labels, then 40 more (matplotlib's tab20b and tab20c) for
# whole-body label sets; beyond 50 labels the colours repeat.
_FIRST = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
]


# matplotlib's tab20b and tab20c, written out so that colouring a label table needs no matplotlib import
# (0.1-0.3 s of every inference run); ``tests/test_label_tables.py`` checks them against matplotlib.
_MORE = [
    "393b79", "5254a3", "6b6ecf", "9c9ede", "637939", "8ca252", "b5cf6b", "cedb9c", "8c6d31", "bd9e39",
    "e7ba52", "e7cb94", "843c39", "ad494a", "d6616b", "e7969c", "7b4173", "a55194", "ce6dbd", "de9ed6",
    "3182bd", "6baed6", "9ecae1", "c6dbef", "e6550d", "fd8d3c", "fdae6b", "fdd0a2", "31a354", "74c476",
    "a1d99b", "c7e9c0", "756bb1", "9e9ac8", "bcbddc", "dadaeb", "636363", "969696", "bdbdbd", "d9d9d9",
]
_RGB_MORE = [[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in _MORE]
OVERLAY_ALPHA = 0.45  # label colour over the grey slice
# zlib level of the overlay PNG: 3 encodes a 1500x1580 picture in 0.11 s against 0.25 s at the default 6,
# for a file 15 % larger (829 against 724 KB)
PNG_COMPRESS_LEVEL = 3
PALETTE = np.vstack([[[0, 0, 0]], _FIRST, _RGB_MORE]).astype(np.float32) / 255.0


def label_colour(label: int | np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of a label (or an array of labels); 0 is black, others never are."""
    k = np.asarray(label)
    return PALETTE[np.where(k == 0, 0, 1 + (k - 1) % (len(PALETTE) - 1))]


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` reoriented to RAS axes (no resampling) and its voxel spacing along them (mm)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[ornt[:, 0].astype(int).argsort()]
    return nib.orientations.apply_orientation(array, ornt), spacing


def _slice_centre(region: np.ndarray, label: int) -> np.ndarray:
    """A voxel of ``label`` in ``region`` near the centre of its largest component (so a slice always
    cuts through it; the centroid of two kidneys lies between them), searched in the label's own box
    and that component's (cc3d's statistics give both)."""
    import cc3d

    from medseg.postprocess import foreground_box

    box = foreground_box(region == label)
    if box is None:
        return np.asarray(region.shape) // 2
    components = cc3d.connected_components(region[box] == label, connectivity=26)
    stats = cc3d.statistics(components)
    largest = 1 + int(np.argmax(stats["voxel_counts"][1:]))
    own = stats["bounding_boxes"][largest]
    pts = np.argwhere(components[own] == largest) + np.array([b.start for b in own])
    centroid = np.asarray(stats["centroids"][largest])
    return pts[np.argmin(((pts - centroid) ** 2).sum(axis=1))] + np.array([b.start for b in box])


def present_labels(labels: np.ndarray) -> list[int]:
    """The non-zero labels in ``labels``: counted by ``torch.bincount`` on the array's own memory
    order where it is an unsigned integer array (``np.unique`` sorts: 2.6 s on a 512x512x600 mask)."""
    import torch

    arr = np.asarray(labels)
    if arr.dtype.kind == "b":
        arr = arr.view(np.uint8)
    # flipped axes (a view reoriented to RAS) read forwards: the same labels, positive strides
    arr = np.flip(arr, axis=tuple(d for d in range(arr.ndim) if arr.strides[d] < 0))
    if arr.dtype.kind != "u" or arr.dtype.itemsize > 1:
        values = np.unique(arr).tolist()
    else:
        order = np.argsort(arr.strides)[::-1]  # memory order, so that flattening reads it in sequence
        values = torch.bincount(torch.from_numpy(arr.transpose(order).reshape(-1))).nonzero().flatten().tolist()
    return [int(k) for k in values if k != 0]


def overlay_png_bytes(
    image: Volume,
    mask: np.ndarray,
    *,
    labels: dict[int, str],
    window: tuple[float, float] | None = None,
    title: str = "",
    per_structure: bool = True,
    max_rows: int = 12,
    dpi: int = 100,
) -> bytes:
    """PNG bytes: axial, coronal and sagittal slices, one row through each structure present.

    Radiological convention (the patient's right on the viewer's left); a fixed colour
    per label with a legend; CT shown in a soft-tissue window (-160..240 HU), MR and
    others between the 1st and 99th percentiles. With ``per_structure=False`` (or no
    structure present) a single row goes through the centre of the mask (or volume).
    """
    import io

    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from medseg.postprocess import foreground_box

    img, spacing = to_ras(image.array, image.affine)
    lab, _ = to_ras(np.asarray(mask), image.affine)
    # the labels present and the voxels to slice through are found in the box around the foreground
    # (whole-scan searches took 17 s on a 512x512x600 mask), computed once
    box = foreground_box(lab)
    if window is None:
        modality = str(image.meta.get("modality", "CT"))
        lo, hi = (-160.0, 240.0) if modality == "CT" else np.percentile(img, [1, 99])
        window = (float(lo), float(hi))
    present = present_labels(lab[box]) if box is not None else []
    rows = _overlay_rows(lab, box, labels, present, per_structure=per_structure, max_rows=max_rows)
    if per_structure and len(present) > max_rows:
        title = f"{title} (slices through the first {max_rows} structures)".strip()
    # fixed margins (in inches) rather than constrained layout, which drew the figure twice: 0.3 s a case
    height = 5.0 * len(rows) + 0.8
    top, bottom = (0.55 if title else 0.15) + 0.3, 0.6 if labels else 0.1
    fig = Figure(figsize=(15, height))
    axes = fig.subplots(
        len(rows),
        3,
        squeeze=False,
        gridspec_kw={
            "left": 0.005, "right": 0.995, "top": 1 - top / height, "bottom": bottom / height,
            "wspace": 0.02, "hspace": 0.35 / 5.0,
        },
    )
    for r, (name, centre) in enumerate(rows):
        views = [  # (name, image slice, label slice, aspect, letters left/right/top/bottom)
            ("axial", img[::-1, :, centre[2]].T, lab[::-1, :, centre[2]].T, spacing[1] / spacing[0], "RLAP"),
            ("coronal", img[::-1, centre[1], :].T, lab[::-1, centre[1], :].T, spacing[2] / spacing[0], "RLSI"),
            ("sagittal", img[centre[0], :, :].T, lab[centre[0], :, :].T, spacing[2] / spacing[1], "PASI"),
        ]
        for ax, (view, sl, ml, aspect, letters) in zip(axes[r], views, strict=True):
            # the windowed slice and its labels blended into one RGB picture: one image for matplotlib
            # to resample instead of two (half the drawing time)
            grey = np.clip((sl.astype(np.float32) - window[0]) / max(window[1] - window[0], 1e-6), 0.0, 1.0)
            rgb = np.repeat(grey[..., None], 3, axis=-1)
            fg = ml > 0
            rgb[fg] = (1.0 - OVERLAY_ALPHA) * rgb[fg] + OVERLAY_ALPHA * label_colour(ml[fg])
            ax.imshow(rgb, origin="lower", aspect=aspect)
            # a title placed (y=1) rather than positioned by matplotlib, which measured each axes'
            # (hidden) ticks for it: 0.18 of 0.6 s a picture
            ax.set_title(f"{view} through {name}" if name else view, fontsize=11, y=1.0, pad=4)
            ax.axis("off")
            _orientation_letters(ax, letters)
    handles = [Patch(color=tuple(label_colour(k)), label=f"{k}: {v}") for k, v in sorted(labels.items()) if k]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    if title:
        fig.suptitle(title, fontsize=13, y=1 - 0.12 / height, va="top")
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return buf.getvalue()


def _overlay_rows(
    lab: np.ndarray,
    box: tuple[slice, ...] | None,
    labels: dict[int, str],
    present: list[int],
    *,
    per_structure: bool,
    max_rows: int,
) -> list[tuple[str, np.ndarray]]:
    """(structure name, voxel to slice through) per row: one row per structure ``present``, or one
    central row; searched in ``box``, the box around ``lab``'s foreground (None: there is none)."""
    if box is None:
        return [("", np.array(lab.shape) // 2)]
    region, offset = lab[box], np.array([b.start for b in box])
    if per_structure and present:
        return [(labels.get(k, str(k)), _slice_centre(region, k) + offset) for k in present[:max_rows]]
    return [("", np.argwhere(region > 0).mean(axis=0).round().astype(int) + offset)]


def _orientation_letters(ax, letters: str) -> None:
    """Patient directions at the four edges of a view (left, right, top, bottom)."""
    style = {"color": "yellow", "fontsize": 11, "fontweight": "bold", "transform": ax.transAxes}
    left, right, top, bottom = tuple(letters)  # one letter per edge
    ax.text(0.01, 0.5, left, ha="left", va="center", **style)
    ax.text(0.99, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.99, top, ha="center", va="top", **style)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)


def overlay_png(
    image: Volume,
    mask: np.ndarray,
    path: str | Path,
    *,
    labels: dict[int, str],
    window: tuple[float, float] | None = None,
    title: str = "",
    per_structure: bool = True,
) -> Path:
    """Write :func:`overlay_png_bytes` to ``path`` (atomically)."""
    data = overlay_png_bytes(
        image, mask, labels=labels, window=window, title=title, per_structure=per_structure
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def training_curves_png(history: list[dict[str, float]], path: str | Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5), layout="tight")
    ax = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax[0].plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    val = [(h["epoch"], h["val_dice"]) for h in history if "val_dice" in h]
    if val:
        ax[1].plot(*zip(*val, strict=True), marker="o", label="val mean Dice")
        ax[1].set_ylim(0, 1)
        ax[1].set_xlabel("epoch")
        ax[1].legend()
    return save_figure(fig, path, dpi=80)


def save_figure(fig, path: str | Path, *, dpi: int = 90) -> Path:
    """Write a matplotlib ``Figure`` (made without pyplot: no global backend switch) as PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path
