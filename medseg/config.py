"""Configuration: pydantic models read from YAML, validated once, unknown keys refused.

``load_config(path, overrides)`` returns a :class:`Config`; overrides are
``a.b=c`` strings whose values are parsed as YAML (``train.epochs=5``,
``preprocess.spacing=[1.5,1.5,2.5]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medseg.errors import ConfigError

Triple = tuple[float, float, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IntensityConfig(_Strict):
    """How image intensities are normalised before the network sees them.

    ``ct``: clip to ``window`` (HU), then z-score with ``mean``/``std`` (dataset
    foreground statistics, filled in by the plan when left empty).
    ``mr``/``zscore``: per-image z-score over non-zero voxels. ``none``: as stored.
    """

    kind: Literal["ct", "mr", "zscore", "none"] = "ct"
    window: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None


class PreprocessConfig(_Strict):
    orientation: str = "RAS"
    spacing: Triple | None = None  # mm; None = planned from the dataset fingerprint
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)
    crop_foreground: bool = True
    foreground_threshold: float | None = None  # raw intensity above which a voxel is "body"


class AugmentConfig(_Strict):
    """Random augmentation, applied per training step; each transform has its own probability.

    The defaults follow nnU-Net's set, scaled for speed on CPUs; set a probability to 0 to
    switch a transform off. ``bias_field_prob`` None = on (0.15) for MR, off for CT.
    """

    crop: Literal["pos_neg", "label_classes"] = "pos_neg"  # foreground-biased patch sampling
    pos_neg_ratio: float = 2.0  # pos_neg: patches centred on foreground per background patch
    samples_per_volume: int = 2
    elastic_prob: float = 0.1
    elastic_sigma: tuple[float, float] = (5.0, 7.0)  # voxels, smoothing of the displacement field
    elastic_magnitude: tuple[float, float] = (50.0, 150.0)
    rotate_prob: float = 0.2
    rotate_range_deg: float = 15.0
    scale_prob: float = 0.2
    scale_range: float = 0.15
    zoom_prob: float = 0.15
    zoom_range: tuple[float, float] = (0.85, 1.2)
    flip_prob: float = 0.5  # per axis
    noise_prob: float = 0.15
    noise_std: float = 0.05
    blur_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # voxels
    intensity_scale_prob: float = 0.3
    intensity_scale: float = 0.1
    intensity_shift_prob: float = 0.3
    intensity_shift: float = 0.1
    contrast_prob: float = 0.15
    gamma_range: tuple[float, float] = (0.7, 1.5)
    bias_field_prob: float | None = None
    bias_field_coeff: tuple[float, float] = (0.0, 0.1)
    low_res_prob: float = 0.1
    low_res_zoom: tuple[float, float] = (0.5, 1.0)


class ModelConfig(_Strict):
    name: str = "classic_unet"  # classic_unet, monai_unet, basic_unet, dynunet
    spatial_dims: Literal[2, 3] = 3
    features: int = 16
    depth: int = 4  # number of 2x2 max-pool steps
    norm: Literal["none", "batch", "instance"] = "instance"
    dropout: float = 0.0
    deep_supervision: bool = True  # dynunet only: auxiliary losses at coarser decoder levels


class TrainConfig(_Strict):
    epochs: int = 50
    iterations_per_epoch: int | None = None  # None = one pass over the training cases
    batch_size: int | None = None  # None = planned (2, or what fits the memory)
    patch_size: Triple | None = None  # voxels; None = planned
    optimizer: Literal["adamw", "sgd"] = "adamw"
    scheduler: Literal["poly", "cosine"] | None = None  # None: poly for sgd, cosine for adamw
    lr: float = 2e-3
    weight_decay: float = 1e-5
    grad_clip: float = 12.0
    val_every: int = 5
    val_fraction: float = 0.2
    val_surface_metrics: bool = True  # HD95 (mm) and surface Dice per label at validation
    surface_dice_tolerance_mm: float = 2.0
    early_stopping_patience: int | None = None  # validations without improvement before stopping
    fold: int | None = None
    num_folds: int = 5
    amp: bool = True  # only takes effect on CUDA (bf16 where supported, else fp16 + grad scaler)
    cpu_bf16: bool = False  # bf16 autocast + channels-last 3D on CPU; only CPUs with AVX512-BF16/AMX gain
    device: str | None = None  # None = cuda when present, else cpu
    num_workers: int = 0
    cache: Literal["memory", "disk"] = "memory"  # disk = PersistentDataset under the run folder
    checkpoint_every_minutes: float = 10.0
    memory_budget_gb: float | None = None  # for the plan's patch/batch size; None = detected


class InferConfig(_Strict):
    """Sliding-window inference settings (saved in the bundle; ``infer`` flags override them)."""

    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(2, ge=1)
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    tta: bool = False
    # Windows run on the inference device; the full-volume accumulation stays on the CPU
    # when the model grid holds more voxels than this (MONAI's sw_device/device split), so a
    # 512x512x1000 CT does not run out of GPU memory.
    accumulate_on_cpu_voxels: int = Field(256**3, ge=0)
    # CPU only, opt-in: bfloat16 autocast with channels-last 3D for the network forward.
    cpu_bf16: bool = False
    # Network runtime: auto = the fastest backend/precision that passed parity with torch fp32 in a short
    # micro-benchmark on this machine (cached per machine and bundle); see medseg.backends.
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class LabelPostprocess(_Strict):
    """Per-label override of the global post-processing steps (unset fields inherit)."""

    keep_largest: bool | None = None
    components: int | None = Field(None, ge=1)
    min_volume_mm3: float | None = Field(None, ge=0.0)
    fill_holes: bool | None = None


class CRFConfig(_Strict):
    """Mean-field dense CRF over the softmax, in the model grid (see medseg.crf)."""

    enabled: bool = False
    iterations: int = Field(5, ge=1)
    smooth_sigma_mm: float = Field(3.0, gt=0.0)  # Gaussian smoothness kernel
    smooth_weight: float = Field(1.0, ge=0.0)
    bilateral_sigma_mm: float = Field(5.0, gt=0.0)  # bilateral appearance kernel, spatial part
    bilateral_intensity_sigma: float = Field(0.5, gt=0.0)  # in the normalised image's units
    bilateral_weight: float = Field(4.0, ge=0.0)


class PostprocessConfig(_Strict):
    """Connected components, hole filling and small-object removal, per label.

    ``keep_largest`` keeps the ``components`` largest components of each label
    (``largest_of: label``) or of the whole foreground (``largest_of: foreground``,
    which keeps a structure made of several labels together). ``per_label`` overrides
    any step for one label, e.g. ``{2: {components: 2}}`` for a label holding both
    kidneys, or ``{2: {keep_largest: false}}``.
    """

    keep_largest: bool = False  # off by default: paired organs (kidneys, lungs) have two components
    components: int = Field(1, ge=1)
    largest_of: Literal["label", "foreground"] = "label"
    min_volume_mm3: float = Field(0.0, ge=0.0)
    fill_holes: bool = False
    connectivity: Literal[6, 18, 26] = 26
    per_label: dict[int, LabelPostprocess] = Field(default_factory=dict)
    crf: CRFConfig = Field(default_factory=CRFConfig)


class TrackingConfig(_Strict):
    enabled: bool = True
    uri: str | None = None  # None = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "medseg"
    run_name: str | None = None
    log_model: bool = True
    registered_model_name: str | None = None
    http_timeout_s: int = 20  # per HTTP call to a tracking server (MLflow's default is 120)
    http_retries: int = 2  # MLflow's default is 7, which blocked minutes against a dead server


class Config(_Strict):
    seed: int = 0
    labels: dict[int, str] | None = None  # None = taken from dataset.json
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("labels")
    @classmethod
    def _background_is_zero(cls, v: dict[int, str] | None) -> dict[int, str] | None:
        if v is not None and 0 not in v:
            raise ValueError("labels must include 0 (background)")
        return v


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a plain config tree."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
        _set_dotted(tree, key.strip(), value)
    return tree


def config_from_dict(tree: dict[str, Any], *, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: config file not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        tree = loaded or {}
    tree = apply_overrides(tree, overrides)
    return config_from_dict(tree, source=source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested mapping to dotted keys (for MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
