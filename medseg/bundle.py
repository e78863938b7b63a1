"""A trained model as one self-describing folder.

``<bundle>/model.safetensors`` (weights, no pickle), ``config.yaml`` (network, plan,
preprocessing, post-processing, label names) and ``metadata.json`` (versions,
fingerprint hash, metrics). ``load_bundle(path)`` returns a :class:`Bundle` whose
``predict(volume)`` gives a mask in the volume's own grid.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from medseg.config import Config, config_from_dict, dump_config
from medseg.errors import InputError
from medseg.io import Volume, atomic_path, write_text_atomic
from medseg.models import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
METADATA = "metadata.json"


@dataclass
class Bundle:
    path: Path
    network: nn.Module
    config: Config
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> dict[int, str]:
        return dict(self.config.labels or {})

    def predict(
        self,
        volume: Volume,
        *,
        device: str | torch.device = "cpu",
        tta: bool = False,
        backend: str | None = None,
        precision: str | None = None,
    ) -> Volume:
        """Segment ``volume``; the mask has its exact shape and affine.

        ``backend`` (auto, torch, onnxruntime, openvino) and ``precision`` (auto, fp32, bf16) default to
        the bundle's ``infer`` config; see medseg.backends.
        """
        from medseg.infer import predict_volume

        return predict_volume([self], volume, device=device, tta=tta, backend=backend, precision=precision).mask


def versions() -> dict[str, str]:
    import monai
    import numpy

    from medseg import __version__

    return {
        "medseg": __version__,
        "monai": monai.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }


def save_bundle(path: str | Path, network: nn.Module, cfg: Config, metadata: dict[str, Any]) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    with atomic_path(path / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_text_atomic(path / CONFIG, dump_config(cfg))
    write_text_atomic(
        path / METADATA, json.dumps({**metadata, "versions": versions()}, indent=2, default=str)
    )
    return path


def resolve_model(model: str | Path, *, tracking_uri: str | None = None) -> Path:
    """A bundle folder, or an MLflow model URI downloaded to a temporary folder."""
    text = str(model)
    if text.startswith(("runs:/", "models:/")):
        from medseg.tracking import download_bundle

        return download_bundle(text, tempfile.mkdtemp(prefix="medseg-bundle-"), tracking_uri=tracking_uri)
    return Path(model)


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle folder (or ``runs:/``/``models:/`` URI) for inference."""
    path = resolve_model(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise InputError(path, f"not a medseg bundle (missing {name})")
    try:
        cfg = config_from_dict(yaml.safe_load((path / CONFIG).read_text()), source=str(path / CONFIG))
    except yaml.YAMLError as exc:
        raise InputError(path / CONFIG, f"not valid YAML ({exc})") from exc
    if not cfg.labels:
        raise InputError(path / CONFIG, "bundle config has no labels")
    network = build_model(cfg.model, out_channels=max(cfg.labels) + 1)
    try:
        state = load_file(str(path / WEIGHTS), device="cpu")
        network.load_state_dict(state)
    except Exception as exc:
        raise InputError(path / WEIGHTS, f"weights do not match the network in config.yaml ({exc})") from exc
    network.to(device).eval()
    metadata = json.loads((path / METADATA).read_text()) if (path / METADATA).is_file() else {}
    return Bundle(path=path, network=network, config=cfg, metadata=metadata)
