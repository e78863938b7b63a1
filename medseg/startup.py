"""Process start-up for the commands that infer: MONAI imported without the parts inference never uses.

``import monai`` imports every MONAI submodule (``monai.utils.module.load_submodules``), and with them
the optional packages of handlers, plots, readers and downloads that inference never touches: MLflow
(for MONAI's ``MLFlowHandler``), matplotlib's pyplot, pandas, ``scipy.signal``, scikit-learn,
scikit-image, tifffile and requests. Measured on a 2-core EPYC, they were about 2.5 of the 4.8 s it
took to import MONAI, which was most of a one-scan ``medseg infer`` once the network ran on OpenVINO.

``import_monai_lean`` hides those packages (a ``None`` in ``sys.modules``, Python's documented way to
make an import fail) while MONAI loads: MONAI's ``optional_import`` then keeps a placeholder in the
few MONAI modules that wanted them, and everything else imports as usual. The packages are visible
again as soon as MONAI is loaded, so medseg's own MLflow tracking and its matplotlib pictures import
them normally. Only the CLI calls this, for the commands that infer (a process medseg owns); the
library never does, and it does nothing when MONAI is already imported.

Hands on: ``import_monai_lean``.
"""

from __future__ import annotations

import importlib
import sys

# What each hidden package is for inside MONAI; medseg's inference uses none of these MONAI parts
# (it tracks with MLflow's client, draws with matplotlib.figure and finds components with cc3d).
MONAI_OPTIONAL_UNUSED_BY_INFERENCE = {
    "mlflow": "monai.handlers.MLFlowHandler",
    "matplotlib": "monai.visualize / monai.utils.jupyter_utils (pyplot)",
    "pandas": "monai.data CSV datasets, monai.utils.profiling",
    "scipy.signal": "monai.transforms.signal, monai.data.ultrasound_confidence_map",
    "sklearn": "monai.metrics.embedding_collapse",
    "skimage": "monai.transforms connected components and morphology",
    "tifffile": "monai.data.wsi_reader (whole-slide images)",
    "requests": "monai.apps.tcia (downloads from The Cancer Imaging Archive)",
}


def import_monai_lean() -> None:
    """Import MONAI with ``MONAI_OPTIONAL_UNUSED_BY_INFERENCE`` hidden, then make them importable again."""
    if "monai" in sys.modules:
        return
    hidden = [name for name in MONAI_OPTIONAL_UNUSED_BY_INFERENCE if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        importlib.import_module("monai")
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
