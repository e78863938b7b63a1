"""Export a medseg bundle as a MONAI bundle that runs without medseg.

``export_monai_bundle(bundle, out)`` writes::

    out/configs/metadata.json   MONAI's bundle metadata (versions, network data format, labels)
    out/configs/inference.json  LoadImage -> RAS -> planned spacing -> foreground crop -> intensity
                                -> sliding window -> softmax -> resampled back onto the input's grid
                                -> argmax -> post-processing -> SaveImage
    out/models/model.ts         the network, TorchScript (no medseg import needed to load it)
    out/docs/README.md

Run it with MONAI alone::

    python -m monai.bundle run --config_file out/configs/inference.json \\
        --bundle_root out --dataset_dir /data/images --output_dir /data/masks

Every NIfTI in ``dataset_dir`` gives ``<name>_seg.nii.gz`` in ``output_dir``, on the input's grid. The
transforms mirror ``medseg.transforms.build_preprocess`` and ``medseg.infer`` one for one; what MONAI's
stock post-processing cannot express (``per_label`` overrides, more than one kept component,
``largest_of: foreground``, the dense CRF) is listed in ``metadata.json`` under ``not_exported``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from medseg.bundle import Bundle, bundle_hash, load_bundle
from medseg.config import Config
from medseg.errors import ConfigError, OutputError
from medseg.transforms import foreground_threshold

log = logging.getLogger(__name__)


def preprocessing(cfg: Config) -> list[dict[str, Any]]:
    """MONAI dict transforms equal to medseg's inference preprocessing (``build_preprocess``)."""
    pre = cfg.preprocess
    chain: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        # the input's own grid, kept for resampling the prediction back to it
        {"_target_": "CopyItemsd", "keys": "image", "names": "source"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": pre.orientation, "labels": None},
        {
            "_target_": "Spacingd",
            "keys": "image",
            "pixdim": [float(s) for s in pre.spacing or ()],
            "mode": "bilinear",
            "padding_mode": "border",
            "dtype": "$numpy.float32",
        },
    ]
    if pre.crop_foreground:
        chain.append(
            {
                "_target_": "CropForegroundd",
                "keys": "image",
                "source_key": "image",
                "select_fn": f"$lambda x: x > {float(foreground_threshold(cfg))!r}",
                "margin": 4,
                "allow_smaller": True,
            }
        )
    it = pre.intensity
    if it.kind == "ct":
        lo, hi = it.window  # type: ignore[misc]
        chain += [
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": lo,
                "a_max": hi,
                "b_min": lo,
                "b_max": hi,
                "clip": True,
            },
            {
                "_target_": "NormalizeIntensityd",
                "keys": "image",
                "subtrahend": it.mean,
                "divisor": max(float(it.std or 0.0), 1e-6),
            },
        ]
    elif it.kind in ("mr", "zscore"):
        chain.append({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True})
    chain.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    return chain


def postprocessing(cfg: Config) -> tuple[list[dict[str, Any]], list[str]]:
    """MONAI's stock post-processing for the bundle's settings, and what it cannot express."""
    post = cfg.postprocess
    ids = sorted(int(k) for k in cfg.labels or {} if int(k) != 0)
    connectivity = {6: 1, 18: 2, 26: 3}[post.connectivity]
    chain: list[dict[str, Any]] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        # probabilities resampled from the model grid onto the input's grid (as medseg.infer does:
        # trilinear, voxel centres aligned, outside the model grid's field of view = background)
        {"_target_": "ToDeviced", "keys": "pred", "device": "cpu"},
        {
            "_target_": "ResampleToMatchd",
            "keys": "pred",
            "key_dst": "source",
            "mode": "bilinear",
            "padding_mode": "zeros",
            "align_corners": True,
            "dtype": "$torch.float32",
        },
        {
            "_target_": "Lambdad",
            "keys": "pred",
            "func": "$lambda p: torch.cat([p[:1] + (1.0 - p.sum(0, keepdim=True)).clamp_min(0.0), p[1:]])",
        },
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]
    skipped = []
    if post.per_label:
        skipped.append("postprocess.per_label")
    if post.crf.enabled:
        skipped.append("postprocess.crf")
    if post.min_volume_mm3 > 0:
        chain.append(
            {
                "_target_": "RemoveSmallObjectsd",
                "keys": "pred",
                "min_size": post.min_volume_mm3,
                "connectivity": connectivity,
                "independent_channels": True,
                "by_measure": True,
            }
        )
    if post.keep_largest:
        if post.components != 1 or post.largest_of != "label":
            skipped.append("postprocess.components/largest_of (one largest component per label exported)")
        chain.append(
            {
                "_target_": "KeepLargestConnectedComponentd",
                "keys": "pred",
                "applied_labels": ids,
                "is_onehot": False,
                "independent": True,
                "connectivity": connectivity,
            }
        )
    if post.fill_holes:
        chain.append({"_target_": "FillHolesd", "keys": "pred", "applied_labels": ids})
    chain.append(
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_postfix": "seg",
            "output_ext": ".nii.gz",
            "output_dtype": "$numpy.uint8",
            "resample": False,
            "separate_folder": False,
            "print_log": False,
        }
    )
    return chain, skipped


def inference_config(cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """``configs/inference.json`` for the bundle's config, and the settings it leaves out."""
    post, skipped = postprocessing(cfg)
    config = {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))",
        "network": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing(cfg)},
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': f} for f in @datalist]",
            "transform": "@preprocessing",
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [int(p) for p in cfg.train.patch_size or ()],
            "sw_batch_size": cfg.infer.sw_batch_size,
            "overlap": cfg.infer.overlap,
            "mode": cfg.infer.blend_mode,
        },
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "predict": "$lambda d: dict(d, pred=@inferer(d['image'][None].to(@device), @network)[0])",
        "run": [
            "$torch.set_grad_enabled(False)",
            "$[@postprocessing(@predict(d)) for d in @dataset]",
        ],
    }
    return config, skipped


def metadata(bundle: Bundle, skipped: list[str]) -> dict[str, Any]:
    """MONAI's ``configs/metadata.json`` schema fields, with medseg's provenance."""
    import monai

    from medseg import __version__

    cfg = bundle.config
    labels = {str(k): v for k, v in sorted((cfg.labels or {}).items())}
    patch = [int(p) for p in cfg.train.patch_size or ()]
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported from a medseg {__version__} bundle"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": __import__("numpy").__version__,
        "required_packages_version": {"nibabel": __import__("nibabel").__version__},
        "name": f"medseg {cfg.model.name}",
        "task": "3D segmentation",
        "description": "Exported from medseg: preprocessing, sliding window, inverse to the input grid.",
        "authors": "medseg",
        "copyright": "see the training data's licence",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if cfg.preprocess.intensity.kind == "ct" else "magnitude",
                    "modality": "CT" if cfg.preprocess.intensity.kind == "ct" else "MR",
                    "num_channels": 1,
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(labels),
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": labels,
                }
            },
        },
        "medseg": {
            "source": bundle.source or str(bundle.path),
            "bundle_hash": bundle_hash(bundle.path),
            "not_exported": skipped,
        },
    }


def _torchscript(network: torch.nn.Module, patch: list[int]) -> torch.jit.ScriptModule:
    network = network.to("cpu").eval()
    example = torch.zeros((1, 1, *patch), dtype=torch.float32)
    with torch.no_grad():
        try:
            return torch.jit.script(network)
        except Exception:  # not scriptable: traced on one patch (the shapes are the sliding windows')
            return torch.jit.trace(network, example, check_trace=False)


def export_monai_bundle(model: str | Path | Bundle, out: str | Path) -> Path:
    """Write the MONAI bundle folder ``out`` (staged, then renamed: never half written)."""
    bundle = model if isinstance(model, Bundle) else load_bundle(model, device="cpu")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"{out}: exists and is not empty; choose another -o")
    cfg = bundle.config
    if not cfg.preprocess.spacing or not cfg.train.patch_size:
        raise ConfigError(f"{bundle.path}: the bundle has no planned spacing or patch size")
    config, skipped = inference_config(cfg)
    for item in skipped:
        log.warning("MONAI bundle: %s is not reproduced by MONAI's stock transforms", item)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (staging / "configs").mkdir()
        (staging / "models").mkdir()
        (staging / "docs").mkdir()
        (staging / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
        (staging / "configs" / "metadata.json").write_text(json.dumps(metadata(bundle, skipped), indent=2))
        scripted = _torchscript(bundle.network, [int(p) for p in cfg.train.patch_size])
        torch.jit.save(scripted, str(staging / "models" / "model.ts"))
        (staging / "docs" / "README.md").write_text(_README)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


_README = """\
# medseg model as a MONAI bundle

    python -m monai.bundle run --config_file configs/inference.json \\
        --bundle_root . --dataset_dir /path/to/niftis --output_dir /path/to/masks

Each `NAME.nii.gz` gives `NAME_seg.nii.gz` (uint8 labels, see `configs/metadata.json`) on the
input's own grid. The network is TorchScript (`models/model.ts`): MONAI and PyTorch suffice.
"""
