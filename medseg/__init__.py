"""medseg: medical image segmentation, from DICOM/NIfTI to masks in the source grid.

Importing medseg prints nothing and changes no global state. The public API:
``load_bundle(path)`` for inference, and the stage modules (``medseg.io``,
``medseg.train``, ``medseg.predict``, ``medseg.batch``, ...).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_bundle"]


def load_bundle(path, *, device="cpu"):
    """Load a trained bundle folder or MLflow model URI; see :func:`medseg.bundle.load_bundle`."""
    from medseg.bundle import load_bundle as _load

    return _load(path, device=device)
