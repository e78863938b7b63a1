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
from collections.abc import Sequence
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

    ImageLike = (
        str
        | Path
        | Volume
        | nibabel.Nifti1Image
        | SimpleITK.Image
        | np.ndarray
        | tuple[np.ndarray, np.ndarray]
    )

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
        """The label names by the values its masks hold: those of the training label files, also
        where the network's channels are numbered otherwise (``config.labels``, ``medseg.labels``)."""
        return self.config.stored_labels()

    @property
    def device(self) -> torch.device:
        """The device the network's weights are on (``load_bundle(..., device=...)``)."""
        first = next(self.network.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def in_channels(self) -> int:
        """The image channels the network takes (several for multi-contrast MR, e.g. FLAIR, T1, T2)."""
        return int(self.config.model.in_channels or len(self.config.preprocess.channels or ()) or 1)

    def predict(
        self,
        image: ImageLike | Sequence[ImageLike],
        *,
        affine: np.ndarray | None = None,
        device: str | torch.device | None = None,
        tta: bool | None = None,
        backend: str | None = None,
        precision: str | None = None,
    ) -> Volume:
        """Segment ``image``; the mask (a label ``Volume``) has its exact shape and affine.

        ``image``: a file or DICOM folder path, a :class:`~medseg.io.Volume`, a nibabel image,
        a SimpleITK image, or a NumPy array with ``affine=`` (4x4, voxel -> RAS mm; ``(array, affine)``
        works too). A multi-channel model takes a 4D NIfTI path or image, a 4D array (x, y, z, C) with
        ``affine=``, or a list with one of the above per channel, in channel order.
        Runs on the bundle's device unless ``device`` says otherwise. ``tta``: flip TTA (None: the
        bundle's ``infer.tta``, which validation tuning sets when it helped). ``backend`` (auto, torch,
        onnxruntime, openvino) and ``precision`` (auto, fp32, bf16) default to the bundle's ``infer``
        config; see medseg.backends.

        Example:
            >>> bundle = medseg.load_bundle("runs/demo/bundle", device="cuda")
            >>> mask = bundle.predict("ct.nii.gz")
            >>> medseg.io.write_nifti(mask, "ct_seg.nii.gz")
            >>> mask = bundle.predict(array, affine=affine)  # a NumPy array indexed (i, j, k)
        """
        from medseg.predict import predict_volume

        channels = as_channels(image, affine=affine, n_channels=self.in_channels, names=self._channel_names())
        return predict_volume(
            [self],
            channels[0] if len(channels) == 1 else channels,
            device=device or self.device,
            tta=tta,
            backend=backend,
            precision=precision,
        ).mask

    def _channel_names(self) -> list[str]:
        return [c.name or str(i) for i, c in enumerate(self.config.preprocess.channels or [])]


def as_channels(
    image: ImageLike | Sequence[ImageLike],
    *,
    affine: np.ndarray | None = None,
    n_channels: int = 1,
    names: Sequence[str] = (),
) -> list[Volume]:
    """``image`` as the ``n_channels`` Volumes (one grid) a model takes; see :meth:`Bundle.predict`."""
    from medseg.data import load_input_channels, on_one_grid

    if n_channels == 1:
        return [as_volume(image, affine=affine)]  # type: ignore[arg-type]
    what = f"the model takes {n_channels} channels" + (f" ({', '.join(names)})" if names else "")
    if isinstance(image, (str, Path)):
        return load_input_channels([image], n_channels=n_channels, channel_names=list(names) or None)
    if isinstance(image, (list, tuple)) and not _is_array_and_affine(image):
        if len(image) != n_channels:
            raise TypeError(f"{what}; got a sequence of {len(image)}")
        if all(isinstance(x, (str, Path)) for x in image):
            return load_input_channels(list(image), n_channels=n_channels, channel_names=list(names) or None)
        return on_one_grid([as_volume(x) for x in image])
    item: Any = image
    if isinstance(item, tuple):
        item, affine = item
    if isinstance(item, np.ndarray) or hasattr(item, "dataobj"):
        array = np.asarray(getattr(item, "dataobj", item), dtype=np.float32)
        affine = np.asarray(item.affine if hasattr(item, "dataobj") else _need_affine(affine), np.float64)
        if array.ndim == 5 and array.shape[3] == 1:  # the NIfTI vector layout (x, y, z, 1, C)
            array = array[:, :, :, 0]
        if array.ndim != 4 or array.shape[-1] != n_channels:
            raise TypeError(f"{what}: expected a 4D image (x, y, z, {n_channels}), got shape {array.shape}")
        return [_checked_volume(array[..., c], affine, "image") for c in range(n_channels)]
    raise TypeError(
        f"{what}: pass a 4D NIfTI path or image, a 4D array with affine=, or one image per channel in a list"
    )


def _is_array_and_affine(value: Sequence[Any]) -> bool:
    """``(array, affine)``: two items, the second a 4x4 matrix."""
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], np.ndarray)
        and np.shape(value[1]) == (4, 4)
    )


def _need_affine(affine: np.ndarray | None) -> np.ndarray:
    if affine is None:
        raise TypeError(
            "an array has no geometry: pass predict(array, affine=A) or (array, affine), "
            "A a 4x4 voxel -> RAS (mm) matrix"
        )
    return np.asarray(affine)


def as_volume(image: ImageLike, *, affine: np.ndarray | None = None) -> Volume:
    """A path, Volume, nibabel image, SimpleITK image or NumPy array (with ``affine``) as a :class:`Volume`."""
    if affine is not None and not isinstance(image, np.ndarray):
        raise TypeError(f"affine= goes with a NumPy array; a {type(image).__name__} carries its own geometry")
    if isinstance(image, Volume):
        return image
    if isinstance(image, (str, Path)):
        from medseg.io import load_volume

        return load_volume(image)
    if isinstance(image, tuple) and len(image) == 2:
        array, affine = (np.asarray(x) for x in image)
        return _checked_volume(array, affine, "(array, affine)")
    if isinstance(image, np.ndarray):
        return _checked_volume(image, _need_affine(affine), "array")
    if hasattr(image, "dataobj") and hasattr(image, "affine"):  # nibabel
        array = np.asarray(image.dataobj, dtype=np.float32)
        return _checked_volume(array, np.asarray(image.affine, dtype=np.float64), "nibabel image")
    if hasattr(image, "GetDirection") and hasattr(image, "GetSpacing"):  # SimpleITK
        return _from_sitk(image)
    raise TypeError(
        f"cannot segment a {type(image).__name__}: expected a path, a medseg Volume, a nibabel image, "
        "a SimpleITK image or a NumPy array with affine="
    )


def _checked_volume(array: np.ndarray, affine: np.ndarray, what: str) -> Volume:
    array, affine = np.asarray(array), np.asarray(affine)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise TypeError(f"{what}: expected a 3D image, got shape {array.shape}")
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise TypeError(f"{what}: the affine must be a finite, invertible 4x4 matrix (voxel -> RAS mm)")
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
