"""medseg: medical image segmentation, from DICOM/NIfTI to masks in the source grid.

Importing medseg prints nothing, changes no global state and imports neither torch nor
MLflow. The public API: ``load_bundle(path, device=...)`` for inference (its
``predict(image)`` takes a path, a Volume, a nibabel or SimpleITK image, or
``(array, affine)``), and the stage modules (``medseg.io``, ``medseg.train``, ``medseg.predict``,
``medseg.batch``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["__version__", "load_bundle"]

if TYPE_CHECKING:
    import torch

    from medseg.bundle import Bundle


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu") -> Bundle:
    """Load a trained bundle folder or MLflow model URI; see :func:`medseg.bundle.load_bundle`."""
    from medseg.bundle import load_bundle as _load

    return _load(path, device=device)
