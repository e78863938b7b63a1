"""Export a medseg bundle as a MONAI bundle that runs without medseg.

``export_monai_bundle(bundle, out)`` writes::

    out/configs/metadata.json   MONAI's bundle metadata (versions, network data format, labels)
    out/configs/inference.json  LoadImage -> RAS -> planned spacing -> foreground crop -> intensity
                                -> sliding window -> softmax -> resampled back onto the input's grid
                                -> argmax -> post-processing -> label values -> SaveImage
    out/models/model.ts         the network, TorchScript (no medseg import needed to load it)
    out/docs/README.md

Run it with MONAI alone::

    python -m monai.bundle run --config_file out/configs/inference.json \\
        --bundle_root out --dataset_dir /data/images --output_dir /data/masks

Every NIfTI in ``dataset_dir`` gives ``<name>_seg.nii.gz`` in ``output_dir``, on the input's grid. The
transforms mirror ``medseg.transforms.build_preprocess`` and ``medseg.predict`` one for one; what MONAI's
stock post-processing cannot express (``per_label`` overrides other than the log-probability biases,
which are exported as a scaling of the probabilities, more than one kept component,
``largest_of: foreground``, the dense CRF, flip TTA) is listed in ``metadata.json`` under ``not_exported``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from medseg.bundle import Bundle, bundle_hash, load_bundle
from medseg.config import Config, IntensityConfig, PostprocessConfig
from medseg.errors import ConfigError, OutputError
from medseg.postprocess import label_biases
from medseg.transforms import CROP_MARGIN_MM, foreground_threshold

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
    ]
    if pre.crop_foreground:
        # medseg's BodyCropd keeps CROP_MARGIN_MM in each scan's own voxels; MONAI's crop takes a
        # margin in voxels: that many mm at the plan's finest spacing (a little more on coarser scans)
        spacing = [float(s) for s in pre.spacing or (1.0,)]
        chain.append(
            {
                "_target_": "CropForegroundd",
                "keys": "image",
                "source_key": "image",
                "select_fn": f"$lambda x: x > {float(foreground_threshold(cfg))!r}",
                "margin": max(1, math.ceil(CROP_MARGIN_MM / min(spacing))),
                "allow_smaller": True,
            }
        )
    chain.append(
        {
            "_target_": "Spacingd",
            "keys": "image",
            "pixdim": [float(s) for s in pre.spacing or ()],
            "mode": "bilinear",
            "padding_mode": "border",
            "dtype": "$numpy.float32",
        }
    )
    chain += intensity(cfg)
    chain.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    return chain


def _intensity_ops(it: IntensityConfig, key: str) -> list[dict[str, Any]]:
    """One channel's normalisation (``medseg.transforms._intensity_ops``) as MONAI dict transforms."""
    if it.kind == "ct":
        lo, hi = it.window  # type: ignore[misc]
        return [
            {
                "_target_": "ScaleIntensityRanged",
                "keys": key,
                "a_min": lo,
                "a_max": hi,
                "b_min": lo,
                "b_max": hi,
                "clip": True,
            },
            {
                "_target_": "NormalizeIntensityd",
                "keys": key,
                "subtrahend": it.mean,
                "divisor": max(float(it.std or 0.0), 1e-6),
            },
        ]
    if it.kind in ("mr", "zscore"):
        return [{"_target_": "NormalizeIntensityd", "keys": key, "nonzero": True}]
    return []


def intensity(cfg: Config) -> list[dict[str, Any]]:
    """The intensity normalisation: the plan's one, or one per channel (``ChannelIntensityd``): the
    image is split into ``image_0`` .. ``image_{N-1}``, each normalised its own way, then joined again."""
    channels = cfg.preprocess.channels
    if not channels:
        return _intensity_ops(cfg.preprocess.intensity, "image")
    keys = [f"image_{c}" for c in range(len(channels))]
    chain: list[dict[str, Any]] = [
        {"_target_": "SplitDimd", "keys": "image", "dim": 0, "keepdim": True, "update_meta": False}
    ]
    for key, it in zip(keys, channels, strict=True):
        chain += _intensity_ops(it, key)
    chain += [
        {"_target_": "ConcatItemsd", "keys": keys, "name": "image", "dim": 0},
        {"_target_": "DeleteItemsd", "keys": keys},
    ]
    return chain


def n_channels(cfg: Config) -> int:
    """The image channels the network takes."""
    return int(cfg.model.in_channels or len(cfg.preprocess.channels or ()) or 1)


def channel_names(cfg: Config) -> list[str]:
    """The name of each input channel (dataset.json ``channel_names``/``modality``), else its kind."""
    channels = cfg.preprocess.channels or [cfg.preprocess.intensity] * n_channels(cfg)
    return [it.name or ("CT" if it.kind == "ct" else it.kind) for it in channels]


def postprocessing(cfg: Config) -> tuple[list[dict[str, Any]], list[str]]:
    """MONAI's stock post-processing for the bundle's settings, and what it cannot express."""
    post = cfg.postprocess
    ids = sorted(int(k) for k in cfg.labels or {} if int(k) != 0)
    skipped = []
    if any(v.model_dump(exclude={"logit_bias"}, exclude_none=True) for v in post.per_label.values()):
        skipped.append("postprocess.per_label")
    if post.crf.enabled:
        skipped.append("postprocess.crf")
    if cfg.infer.tta:
        skipped.append("infer.tta")
    if post.keep_largest:
        if post.components != 1 or post.largest_of != "label":
            skipped.append("postprocess.components/largest_of (one largest component per label exported)")
        if post.largest_ties < 1.0:
            skipped.append("postprocess.largest_ties (exactly the largest component exported)")
    save = {
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
    return [*_to_labels(post, ids), *_cleanup(post, ids), *_to_values(cfg), save], skipped


def _to_values(cfg: Config) -> list[dict[str, Any]]:
    """The network's channels back to the values the training label files held (a 0/255 dataset's
    masks are 0/255; ``medseg.labels``); nothing where they are the same."""
    if cfg.label_values is None:
        return []
    channels = sorted(cfg.label_values)
    return [
        {
            "_target_": "MapLabelValued",
            "keys": "pred",
            "orig_labels": channels,
            "target_labels": [cfg.label_values[c] for c in channels],
            "dtype": "$numpy.uint8",
        }
    ]


def _to_labels(post: PostprocessConfig, ids: list[int]) -> list[dict[str, Any]]:
    """Softmax, the label biases, probabilities back onto the input's grid, argmax."""
    chain: list[dict[str, Any]] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        # probabilities resampled from the model grid onto the input's grid (as medseg.predict does:
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
    biases = label_biases(post)
    if biases:  # log p_k + bias_k, renormalised, in the model grid before resampling (as medseg.predict)
        factors = [math.exp(biases.get(k, 0.0)) for k in range(max(ids, default=0) + 1)]
        scale = f"torch.tensor({factors}, dtype=p.dtype, device=p.device).reshape(-1, 1, 1, 1)"
        renormalised = f"torch.nn.functional.normalize(p * {scale}, p=1.0, dim=0)"
        chain.insert(1, {"_target_": "Lambdad", "keys": "pred", "func": f"$lambda p: {renormalised}"})
    return chain


def _cleanup(post: PostprocessConfig, ids: list[int]) -> list[dict[str, Any]]:
    """Small objects removed, the largest component kept, holes filled: as the bundle's settings ask."""
    connectivity = {6: 1, 18: 2, 26: 3}[post.connectivity]
    chain: list[dict[str, Any]] = []
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
    return chain


def inference_config(cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """``configs/inference.json`` for the bundle's config, and the settings it leaves out."""
    post, skipped = postprocessing(cfg)
    config: dict[str, Any] = {
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
    if n_channels(cfg) > 1:
        config.update(_channel_inputs())
        post[-1]["output_name_formatter"] = (
            "$lambda meta, saver: {'subject': re.sub('_0000(?=[.]nii)', '', str(meta['filename_or_obj'])), "
            "'idx': None}"
        )
    return config, skipped


def _channel_inputs() -> dict[str, Any]:
    """How a multi-channel bundle finds its cases, as ``medseg infer`` does: a 4D NIfTI (x, y, z, C) is
    one case (MONAI's loader moves the last axis to channels), and nnU-Net-named files ``CASE_0000`` ..
    ``CASE_000N`` are one case ``CASE`` (MONAI's loader stacks a list of files as channels)."""
    return {
        "imports": ["$import glob", "$import os", "$import re", "$import numpy", "$import torch"],
        "channel_file": "$re.compile('^(.+)_([0-9]{4})[.]nii([.]gz)?$', re.IGNORECASE)",
        # a lambda so that the comprehensions see its arguments (names of eval's locals they would not)
        "cases": (
            "$lambda files, pattern: [f for f in files if not pattern.match(os.path.basename(f))] + "
            "[sorted(f for f in files if pattern.match(os.path.basename(f)) "
            "and pattern.match(os.path.basename(f)).group(1) == stem) "
            "for stem in sorted({pattern.match(os.path.basename(f)).group(1) "
            "for f in files if pattern.match(os.path.basename(f))})]"
        ),
        "datalist": "$@cases(sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*'))), @channel_file)",
    }


def metadata(bundle: Bundle, skipped: list[str]) -> dict[str, Any]:
    """MONAI's ``configs/metadata.json`` schema fields, with medseg's provenance."""
    import monai

    from medseg import __version__

    cfg = bundle.config
    labels = {str(k): v for k, v in sorted((cfg.labels or {}).items())}
    mask_labels = {str(k): v for k, v in sorted(cfg.stored_labels().items())}
    patch = [int(p) for p in cfg.train.patch_size or ()]
    names = channel_names(cfg)
    kinds = [it.kind for it in cfg.preprocess.channel_intensities()]
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported from a medseg {__version__} bundle"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": __import__("numpy").__version__,
        "required_packages_version": _packages(cfg),
        "name": f"medseg {cfg.model.name}",
        "task": "3D segmentation",
        "description": "Exported from medseg: preprocessing, sliding window, inverse to the input grid.",
        "authors": "medseg",
        "copyright": "see the training data's licence",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if set(kinds) == {"ct"} else "magnitude",
                    "modality": "/".join(dict.fromkeys("CT" if k == "ct" else "MR" for k in kinds)),
                    "num_channels": len(names),
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(c): name for c, name in enumerate(names)}
                    if len(names) > 1
                    else {"0": "image"},
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
            "inputs": _inputs_doc(len(names)),
            "source": bundle.source or str(bundle.path),
            "bundle_hash": bundle_hash(bundle.path),
            "not_exported": skipped,
            # the masks' values where they are not the output channels' (channel_def): the training
            # label files' values, as medseg infer writes them
            **({"mask_labels": mask_labels} if cfg.label_values else {}),
        },
    }


def _inputs_doc(n: int) -> str:
    if n == 1:
        return "one NIfTI per case: NAME.nii.gz -> NAME_seg.nii.gz"
    return (
        f"{n} channels per case, in channel_def order, on one grid: a 4D NIfTI NAME.nii.gz (x, y, z, {n}) or "
        f"nnU-Net-named files NAME_0000.nii.gz .. NAME_{n - 1:04d}.nii.gz -> NAME_seg.nii.gz"
    )


def _packages(cfg: Config) -> dict[str, str]:
    """Packages beyond MONAI and PyTorch the bundle needs: nibabel, and scikit-image for
    MONAI's connected-component transforms when post-processing uses them."""
    from importlib import metadata

    wanted = ["nibabel"]
    post = cfg.postprocess
    if post.keep_largest or post.min_volume_mm3 > 0:
        wanted.append("scikit-image")
    out = {}
    for name in wanted:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = ""
    return out


def _torchscript(network: torch.nn.Module, patch: list[int], channels: int) -> torch.jit.ScriptModule:
    network = network.to("cpu").eval()
    example = torch.zeros((1, channels, *patch), dtype=torch.float32)
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
        scripted = _torchscript(bundle.network, [int(p) for p in cfg.train.patch_size], n_channels(cfg))
        torch.jit.save(scripted, str(staging / "models" / "model.ts"))
        (staging / "docs" / "README.md").write_text(readme(cfg))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def readme(cfg: Config) -> str:
    """``docs/README.md``: how to run the bundle, and the input convention for its channels."""
    n = n_channels(cfg)
    if n == 1:
        inputs = "Each `NAME.nii.gz` in `--dataset_dir` gives `NAME_seg.nii.gz`"
    else:
        names = ", ".join(f"{c}: {name}" for c, name in enumerate(channel_names(cfg)))
        inputs = (
            f"The model takes {n} channels ({names}), on one grid, given per case as either\n\n"
            f"- one 4D NIfTI `NAME.nii.gz` of shape (x, y, z, {n}), channels in that order (MONAI's loader\n"
            "  moves the last axis to channels), or\n"
            f"- nnU-Net-named files `NAME_0000.nii.gz` .. `NAME_{n - 1:04d}.nii.gz`, one per channel (MONAI's\n"
            "  loader stacks them; channels on different grids are refused: resample them first).\n\n"
            "Each case gives `NAME_seg.nii.gz`"
        )
    return f"""\
# medseg model as a MONAI bundle

    python -m monai.bundle run --config_file configs/inference.json \\
        --bundle_root . --dataset_dir /path/to/niftis --output_dir /path/to/masks

{inputs} (uint8 labels, see `configs/metadata.json`) on the input's own grid. The network is
TorchScript (`models/model.ts`): MONAI and PyTorch suffice.
"""
