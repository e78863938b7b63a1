"""A trained model as one self-describing folder.

``<bundle>/model.safetensors`` (weights, no pickle), ``config.yaml`` (network, plan,
preprocessing, post-processing, label names) and ``metadata.json`` (versions,
fingerprint hash, metrics). ``load_bundle(path)`` returns a :class:`Bundle` whose
``predict(image)`` gives a mask in the image's own grid; a bundle logged to MLflow
(``runs:/...``, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) is fetched into a local
cache first. :func:`provenance` says which model made a mask (URI or path, version,
content hash) for the sidecars.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from medseg.config import Config, config_from_dict, dump_config
from medseg.errors import InputError
from medseg.io import Volume
from medseg.io.volume import atomic_dir
from medseg.models import build_model
from medseg.tracking import package_versions

if TYPE_CHECKING:
    import nibabel
    import SimpleITK

    ImageLike = str | Path | Volume | nibabel.Nifti1Image | SimpleITK.Image | tuple[np.ndarray, np.ndarray]

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
METADATA = "metadata.json"
BUNDLE_FILES = (WEIGHTS, CONFIG, METADATA)


@dataclass
class Bundle:
    """A loaded bundle: the eval-mode network on its device, the config, and where it came from.

    ``source`` is the MLflow model URI it was loaded from, or the folder's absolute path;
    ``origin`` holds the MLflow run id, registered name and version when there are any.
    """

    path: Path
    network: nn.Module
    config: Config
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    origin: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> dict[int, str]:
        return dict(self.config.labels or {})

    @property
    def device(self) -> torch.device:
        """The device the network's weights are on (``load_bundle(..., device=...)``)."""
        first = next(self.network.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def predict(
        self,
        image: ImageLike,
        *,
        device: str | torch.device | None = None,
        tta: bool = False,
        backend: str | None = None,
        precision: str | None = None,
    ) -> Volume:
        """Segment ``image``; the mask (a label ``Volume``) has its exact shape and affine.

        ``image``: a file or DICOM folder path, a :class:`~medseg.io.Volume`, a nibabel image,
        a SimpleITK image, or ``(array, affine)`` with a 4x4 voxel -> RAS (mm) affine.
        Runs on the bundle's device unless ``device`` says otherwise. ``backend`` (auto, torch,
        onnxruntime, openvino) and ``precision`` (auto, fp32, bf16) default to the bundle's ``infer``
        config; see medseg.backends.

        Example:
            >>> bundle = medseg.load_bundle("runs/demo/bundle", device="cuda")
            >>> mask = bundle.predict("ct.nii.gz")
            >>> medseg.io.write_nifti(mask, "ct_seg.nii.gz")
        """
        from medseg.predict import predict_volume

        volume = as_volume(image)
        return predict_volume(
            [self], volume, device=device or self.device, tta=tta, backend=backend, precision=precision
        ).mask


def as_volume(image: ImageLike) -> Volume:
    """A path, Volume, nibabel image, SimpleITK image or ``(array, affine)`` as a :class:`Volume`."""
    if isinstance(image, Volume):
        return image
    if isinstance(image, (str, Path)):
        from medseg.io import load_volume

        return load_volume(image)
    if isinstance(image, tuple) and len(image) == 2:
        array, affine = (np.asarray(x) for x in image)
        return _checked_volume(array, affine, "(array, affine)")
    if hasattr(image, "dataobj") and hasattr(image, "affine"):  # nibabel
        array = np.asarray(image.dataobj, dtype=np.float32)
        return _checked_volume(array, np.asarray(image.affine, dtype=np.float64), "nibabel image")
    if hasattr(image, "GetDirection") and hasattr(image, "GetSpacing"):  # SimpleITK
        return _from_sitk(image)
    if isinstance(image, np.ndarray):
        raise TypeError("an array has no geometry: pass (array, affine) with a 4x4 voxel -> RAS affine")
    raise TypeError(
        f"cannot segment a {type(image).__name__}: expected a path, a medseg Volume, a nibabel image, "
        "a SimpleITK image or (array, affine)"
    )


def _checked_volume(array: np.ndarray, affine: np.ndarray, what: str) -> Volume:
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise TypeError(f"{what}: expected a 3D image, got shape {array.shape}")
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise TypeError(f"{what}: the affine must be a finite, invertible 4x4 matrix")
    return Volume(np.ascontiguousarray(array, dtype=np.float32), affine.astype(np.float64))


def _from_sitk(image: SimpleITK.Image) -> Volume:
    """SimpleITK (LPS, array indexed z, y, x) to a Volume (RAS affine, array indexed i, j, k)."""
    import SimpleITK as sitk

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise TypeError("SimpleITK image: expected a 3D single-component image")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :]
    lps[:3, 3] = image.GetOrigin()
    return _checked_volume(array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, "SimpleITK image")


def save_bundle(path: str | Path, network: nn.Module, cfg: Config, metadata: dict[str, Any]) -> Path:
    """Write the bundle folder as one unit: weights, config and metadata always belong together
    (staged beside ``path``, then swapped in; a reader never sees epoch-19 weights beside epoch-2
    metadata). Anything else in an earlier bundle folder (exports made from older weights) goes."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    with atomic_dir(path) as staging:
        save_file(state, str(staging / WEIGHTS))
        (staging / CONFIG).write_text(dump_config(cfg))
        (staging / METADATA).write_text(
            json.dumps({**metadata, "versions": package_versions()}, indent=2, default=str)
        )
    return path


def is_model_uri(model: str | Path) -> bool:
    return str(model).startswith(("runs:/", "models:/"))


def resolve_model(model: str | Path, *, tracking_uri: str | None = None) -> Path:
    """A bundle folder, or an MLflow model URI fetched into the local bundle cache."""
    if is_model_uri(model):
        from medseg.tracking import download_bundle

        return download_bundle(str(model), tracking_uri=tracking_uri)[0]
    return Path(model)


def bundle_hash(path: str | Path) -> str:
    """SHA-256 over the bundle's files (weights, config, metadata) and their names: same hash, same model."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in BUNDLE_FILES:
        file = path / name
        if not file.is_file():
            continue
        inner = hashlib.sha256()
        with file.open("rb") as fh:
            while block := fh.read(1 << 20):
                inner.update(block)
        digest.update(f"{name}\0{inner.hexdigest()}\n".encode())
    return digest.hexdigest()


def provenance(bundle: Bundle) -> dict[str, Any]:
    """What a mask's sidecar records about the model: enough to find it again months later.

    ``model`` is the MLflow URI as given (``models:/NAME@champion``) or the bundle folder's absolute
    path; ``model_version``/``model_run_id`` what the URI resolved to; ``bundle_hash`` the content
    hash (:func:`bundle_hash`); ``medseg_version`` and a UTC ``timestamp``.
    """
    from medseg import __version__

    out: dict[str, Any] = {
        "medseg_version": __version__,
        "model": bundle.source or str(Path(bundle.path).resolve()),
        "bundle_hash": bundle_hash(bundle.path),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key in ("run_id", "name", "version"):
        if bundle.origin.get(key):
            out[f"model_{key}"] = bundle.origin[key]
    return out


def load_bundle(
    path: str | Path, *, device: str | torch.device = "cpu", tracking_uri: str | None = None
) -> Bundle:
    """Load a bundle folder (or ``runs:/``/``models:/`` URI) for inference on ``device``."""
    origin: dict[str, str] = {}
    if is_model_uri(path):
        from medseg.tracking import download_bundle

        folder, source = download_bundle(str(path), tracking_uri=tracking_uri)
        origin = {"run_id": source.run_id, "name": source.name or "", "version": source.version or ""}
        where = str(path)
    else:
        folder = Path(path)
        where = str(folder.resolve())
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise InputError(folder, f"not a medseg bundle (missing {name})")
    try:
        cfg = config_from_dict(yaml.safe_load((folder / CONFIG).read_text()), source=str(folder / CONFIG))
    except yaml.YAMLError as exc:
        raise InputError(folder / CONFIG, f"not valid YAML ({exc})") from exc
    if not cfg.labels:
        raise InputError(folder / CONFIG, "bundle config has no labels")
    network = build_model(cfg.model, out_channels=max(cfg.labels) + 1)
    try:
        state = load_file(str(folder / WEIGHTS), device="cpu")
        network.load_state_dict(state)
    except Exception as exc:
        raise InputError(
            folder / WEIGHTS, f"weights do not match the network in config.yaml ({exc})"
        ) from exc
    network.to(device).eval()
    metadata = json.loads((folder / METADATA).read_text()) if (folder / METADATA).is_file() else {}
    return Bundle(path=folder, network=network, config=cfg, metadata=metadata, source=where, origin=origin)
