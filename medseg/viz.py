"""Pictures a person can check: colour-mapped label overlays on axial, coronal and sagittal slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.io import Volume, atomic_path

# A fixed colour per label index (tab10-like), so the same structure always has the same colour.
PALETTE = (
    np.array(
        [
            [0, 0, 0],
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
        ],
        dtype=np.float32,
    )
    / 255.0
)


def _to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, ornt)


def overlay_png(
    image: Volume,
    mask: np.ndarray,
    path: str | Path,
    *,
    labels: dict[int, str],
    window: tuple[float, float] | None = None,
    title: str = "",
) -> Path:
    """Axial, coronal and sagittal slices through the mask's centre of mass, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    img = _to_ras(image.array, image.affine)
    lab = _to_ras(mask, image.affine)
    spacing = np.abs(np.diag(_to_ras_affine(image.affine)))
    if window is None:
        modality = str(image.meta.get("modality", "CT"))
        window = (-160.0, 240.0) if modality == "CT" else tuple(np.percentile(img, [1, 99]))
    centre = (
        np.argwhere(lab > 0).mean(axis=0).round().astype(int) if (lab > 0).any() else np.array(img.shape) // 2
    )
    # radiological convention: the patient's right on the viewer's left (RAS x reversed)
    views = [
        ("axial", img[::-1, :, centre[2]].T, lab[::-1, :, centre[2]].T, spacing[1] / spacing[0]),
        ("coronal", img[::-1, centre[1], :].T, lab[::-1, centre[1], :].T, spacing[2] / spacing[0]),
        ("sagittal", img[centre[0], :, :].T, lab[centre[0], :, :].T, spacing[2] / spacing[1]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, sl, ml, aspect) in zip(axes, views, strict=True):
        ax.imshow(sl, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=aspect)
        rgba = np.zeros((*ml.shape, 4), dtype=np.float32)
        present = ml > 0
        rgba[present, :3] = PALETTE[ml[present] % len(PALETTE)]
        rgba[present, 3] = 0.45
        ax.imshow(rgba, origin="lower", aspect=aspect)
        ax.set_title(name)
        ax.axis("off")
    handles = [
        Patch(color=PALETTE[k % len(PALETTE)], label=f"{k}: {v}") for k, v in sorted(labels.items()) if k
    ]
    fig.legend(handles=handles, loc="lower center", ncol=max(1, len(handles)), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def _to_ras_affine(affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    shape = (2, 2, 2)
    return affine @ nib.orientations.inv_ornt_aff(ornt, shape)


def training_curves_png(history: list[dict[str, float]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
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
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
