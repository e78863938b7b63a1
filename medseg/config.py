"""Configuration: pydantic models read from YAML, validated once, unknown keys refused.

``load_config(path, overrides)`` returns a :class:`Config`; overrides are
``a.b=c`` strings whose values are parsed as YAML (``train.epochs=5``,
``preprocess.spacing=[1.5,1.5,2.5]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.errors import ConfigError

Triple = tuple[float, float, float]
# Range-checked building blocks: a bad value is refused at load, naming the field, before any work.
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
PositiveTriple = tuple[PositiveFloat, PositiveFloat, PositiveFloat]
PatchTriple = tuple[
    Annotated[float, Field(ge=1.0, le=4096.0)],
    Annotated[float, Field(ge=1.0, le=4096.0)],
    Annotated[float, Field(ge=1.0, le=4096.0)],
]
PositivePair = tuple[PositiveFloat, PositiveFloat]
NonNegativePair = tuple[NonNegativeFloat, NonNegativeFloat]


def _ordered(pair: tuple[float, float] | None) -> tuple[float, float] | None:
    if pair is not None and pair[0] > pair[1]:
        raise ValueError(f"expected (low, high) with low <= high, got {tuple(pair)}")
    return pair


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """How a dataset folder is read (``dataset.json`` entries)."""

    allow_outside_root: bool = False  # accept entries that lead outside the dataset folder


class IntensityConfig(_Strict):
    """How image intensities are normalised before the network sees them.

    ``ct``: clip to ``window`` (HU), then z-score with ``mean``/``std`` (dataset
    foreground statistics, filled in by the plan when left empty).
    ``mr``/``zscore``: per-image z-score over non-zero voxels. ``none``: as stored.
    """

    kind: Literal["ct", "mr", "zscore", "none"] = "ct"
    name: str | None = None  # the channel's name in dataset.json (e.g. "FLAIR"), for multi-channel plans
    window: tuple[float, float] | None = None
    mean: float | None = None
    std: PositiveFloat | None = None

    @field_validator("window")
    @classmethod
    def _window_ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"expected (low, high) HU with low < high, got {tuple(v)}")
        return v


class PreprocessConfig(_Strict):
    orientation: str = "RAS"
    spacing: PositiveTriple | None = None  # mm; None = planned from the dataset fingerprint
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)
    # multi-channel inputs: one normalisation per channel, in channel order (planned from the
    # dataset's channel names); None = one channel, normalised by ``intensity``
    channels: list[IntensityConfig] | None = None
    # channels of a case on different grids: resample them onto the first channel's (linear)
    # instead of refusing the case
    resample_channels: bool = False
    crop_foreground: bool = True
    foreground_threshold: float | None = None  # raw intensity above which a voxel is "body"

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str) -> str:
        code = v.upper()
        axes = [next((i for i, pair in enumerate(("LR", "AP", "SI")) if c in pair), -1) for c in code]
        if sorted(axes) != [0, 1, 2]:
            raise ValueError(f"expected three axis codes, one of L/R, A/P and S/I each (e.g. RAS), got {v!r}")
        return code

    def channel_intensities(self) -> list[IntensityConfig]:
        """The normalisation of each input channel: ``channels``, or ``intensity`` for the one channel."""
        return list(self.channels or [self.intensity])


class AugmentConfig(_Strict):
    """Random augmentation, applied per training step; each transform has its own probability.

    The defaults follow nnU-Net's set, scaled for speed on CPUs; set a probability to 0 to
    switch a transform off. ``bias_field_prob`` None = on (0.15) for MR, off for CT.
    """

    # patch sampling: "auto" = label_classes when the labels have more than one foreground class
    # (each foreground class equally often, as nnU-Net forces patches onto a class chosen
    # uniformly among those present, so a small organ beside a large one is learned), else pos_neg
    crop: Literal["auto", "pos_neg", "label_classes"] = "auto"
    pos_neg_ratio: PositiveFloat = 2.0  # patches centred on foreground per background patch (both samplers)
    samples_per_volume: int = Field(2, ge=1, le=64)
    # off by default, as in nnU-Net v2's default training: the deformation grid cost 60 % of the
    # augmentation time per step here (28 of 44 ms per case); set a probability to use it
    elastic_prob: Probability = 0.0
    elastic_sigma: PositivePair = (5.0, 7.0)  # voxels, smoothing of the displacement field
    elastic_magnitude: NonNegativePair = (50.0, 150.0)
    rotate_prob: Probability = 0.2
    rotate_range_deg: float = Field(15.0, ge=0.0, le=180.0)
    scale_prob: Probability = 0.2
    scale_range: float = Field(0.15, ge=0.0, lt=1.0)
    zoom_prob: Probability = 0.15
    zoom_range: PositivePair = (0.85, 1.2)
    flip_prob: Probability = 0.5  # per axis
    noise_prob: Probability = 0.15
    noise_std: NonNegativeFloat = 0.05
    blur_prob: Probability = 0.1
    blur_sigma: NonNegativePair = (0.5, 1.0)  # voxels
    intensity_scale_prob: Probability = 0.3
    intensity_scale: float = Field(0.1, ge=0.0, lt=1.0)
    intensity_shift_prob: Probability = 0.3
    intensity_shift: NonNegativeFloat = 0.1
    contrast_prob: Probability = 0.15
    # per organ: shift the intensity inside one foreground label by its own random offset
    # (normalised units, 0.3 = about 19 HU on a CT set with a foreground std of 64 HU), as
    # contrast timing and fat content move one organ's HU and not its neighbours'; each label
    # present in the patch is drawn with this probability (benchmarks/README.md: an organ brighter
    # than every training case's was the largest source of error on unseen phantoms)
    label_intensity_prob: Probability = 0.3
    label_intensity_shift: NonNegativeFloat = 0.3
    gamma_range: PositivePair = (0.7, 1.5)
    bias_field_prob: Probability | None = None
    bias_field_coeff: NonNegativePair = (0.0, 0.1)
    low_res_prob: Probability = 0.1
    low_res_zoom: tuple[Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]] = (
        0.5,
        1.0,
    )

    @field_validator(
        "elastic_sigma",
        "elastic_magnitude",
        "zoom_range",
        "blur_sigma",
        "gamma_range",
        "bias_field_coeff",
        "low_res_zoom",
    )
    @classmethod
    def _pairs_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _ordered(v)  # type: ignore[return-value]


ACT_NETWORKS = ("classic_unet", "monai_unet")  # the networks whose activation ``model.act`` sets


class ModelConfig(_Strict):
    # dynunet, monai_unet, classic_unet, basic_unet. MONAI's DynUNet (nnU-Net's architecture: two
    # convolutions per level at every resolution, deep supervision) by default: on three unseen
    # phantom draws in 11 CPU minutes it scored 0.944 / 0.949 / 0.939 where MONAI's UNet scored
    # 0.941 / 0.940 / 0.928, at half the width (the budget plan measures both widths). MONAI's UNet
    # (residual units, strided convolutions from the first layer) takes a step about 2x faster; the
    # budget plan takes it, with no network named, for more output channels than half the width
    # (ten organs: medseg.plan.MANY_CLASSES_MODEL; benchmarks/README.md)
    name: str = "dynunet"
    spatial_dims: Literal[2, 3] = 3
    features: int = Field(16, ge=1, le=512)
    depth: int = Field(4, ge=1, le=7)  # number of 2x2 max-pool steps
    norm: Literal["none", "batch", "instance"] = "instance"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    deep_supervision: bool = True  # dynunet only: auxiliary losses at coarser decoder levels
    # classic_unet and monai_unet: the activation; auto = the network's own (the paper's ReLU, MONAI's PReLU).
    # leakyrelu (0.01, nnU-Net's): no more accurate, and no faster since the trainer's PReLU backward
    # (medseg.kernels.QuickPReLU; benchmarks/README.md)
    act: Literal["auto", "leakyrelu", "prelu", "relu"] = "auto"
    # image channels; None = planned from the dataset (1 when unplanned)
    in_channels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _act_for_this_network(self) -> ModelConfig:
        if problem := self.act_problem():
            raise ValueError(f"act: {problem}")
        return self

    def act_problem(self) -> str | None:
        """Why ``act`` cannot be built for this network (checked with the config and again by
        ``medseg.models.build_model``, which also sees copies made without validation), or None."""
        if self.act == "auto" or self.name in ACT_NETWORKS:
            return None
        return f"{self.name} has its own activation; model.act is for {' and '.join(ACT_NETWORKS)}"


class TrainConfig(_Strict):
    epochs: int = Field(50, ge=1)
    iterations_per_epoch: int | None = Field(None, ge=1)  # None = one pass over the training cases
    batch_size: int | None = Field(None, ge=1, le=4096)  # None = planned (2, or what fits the memory)
    patch_size: PatchTriple | None = None  # voxels; None = planned
    optimizer: Literal["adamw", "sgd"] = "adamw"
    scheduler: Literal["poly", "cosine"] | None = None  # None: poly for sgd, cosine for adamw
    lr: float = Field(2e-3, gt=0.0, le=10.0)
    weight_decay: NonNegativeFloat = 1e-5
    grad_clip: PositiveFloat = 12.0
    # the Dice term of Dice+CE, as nnU-Net computes it: over the whole batch (a class absent from one
    # patch is not a zero Dice that punishes every faint probability of it) and over the foreground
    # classes only; "sample" and dice_background=True are MONAI's DiceCELoss defaults
    dice_over: Literal["batch", "sample"] = "batch"
    dice_background: bool = False
    val_every: int = Field(5, ge=1)
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    val_surface_metrics: bool = True  # HD95 (mm) and surface Dice per label at validation
    surface_dice_tolerance_mm: NonNegativeFloat = 2.0
    early_stopping_patience: int | None = Field(None, ge=1)  # validations without improvement before stopping
    fold: int | None = Field(None, ge=0)
    num_folds: int = Field(5, ge=2)
    amp: bool = (
        True  # mixed precision where it pays: CUDA (bf16, else fp16 + grad scaler); CPU by measurement
    )
    # auto: CUDA bf16/fp16; CPU bf16 only where measured >= 1.2x faster than fp32 here (medseg.runtime)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    cpu_bf16: bool = False  # force bf16 autocast on CPU (same as precision=bf16 on CPU)
    # memory layout of training steps on CPU: auto = channels-last 3D where a short measurement of this
    # network, patch and precision on this machine finds it faster; CUDA trains contiguous
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    device: str | None = Field(None, pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # None = cuda when present
    num_workers: int = Field(0, ge=0, le=256)
    cache: Literal["memory", "disk"] = "memory"  # disk = PersistentDataset under the run folder
    checkpoint_every_minutes: PositiveFloat = 10.0
    checkpoint_every_steps: int | None = Field(None, ge=1)  # also a mid-epoch checkpoint every N steps
    memory_budget_gb: PositiveFloat | None = None  # for the plan's patch/batch size; None = detected
    # wall-clock budget for the whole run (seconds; the CLI takes 15m, 8h): a measured warm-up
    # picks patch, batch, width and steps to end within it (medseg.plan.plan_for_budget).
    # None: fingerprint rules; on CPU with epochs and patch left unset, CPU_DEFAULT_BUDGET_S.
    time_budget_s: float | None = Field(None, gt=0.0)
    lr_warmup_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # of the steps: linear warm-up of the lr

    @model_validator(mode="after")
    def _fold_in_range(self) -> TrainConfig:
        if self.fold is not None and self.fold >= self.num_folds:
            raise ValueError(f"fold {self.fold} is out of range: expected 0..{self.num_folds - 1}")
        if self.patch_size is not None and any(p != int(p) for p in self.patch_size):
            raise ValueError(f"patch_size must be whole voxels, got {tuple(self.patch_size)}")
        return self


class InferConfig(_Strict):
    """Sliding-window inference settings (saved in the bundle; ``infer`` flags override them)."""

    # Windows overlap by half, as nnU-Net's: on unseen phantoms (benchmarks/accuracy.py) 0.5 against
    # 0.25 raised the mean Dice 0.943 -> 0.950 and the worst low-contrast organ 0.80 -> 0.86, for
    # about 3x the windows (a window's borders see less context and are blended with less weight).
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(2, ge=1)
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    tta: bool = False
    # TTA passes: 2 = the scan and its mirror in all three axes; 8 = every combination of axis flips.
    # On unseen phantoms the 2 passes gave three quarters of the 8's gain (fatty organ 0.924 -> 0.932
    # against 0.935) for a quarter of their time; validation tuning chooses (medseg.tuning).
    tta_flips: Literal[2, 8] = 8
    # Windows run on the inference device; the full-volume accumulation stays on the CPU
    # when the model grid holds more voxels than this (MONAI's sw_device/device split), so a
    # 512x512x1000 CT does not run out of GPU memory.
    accumulate_on_cpu_voxels: int = Field(256**3, ge=0)
    # CPU only, opt-in: bfloat16 autocast with channels-last 3D for the network forward.
    cpu_bf16: bool = False
    # Network runtime: auto = the fastest backend/precision that passed parity with torch fp32 in a short
    # micro-benchmark on this machine (cached per machine and bundle); see medseg.backends.
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # fp16: CUDA only


class LabelPostprocess(_Strict):
    """Per-label override of the global post-processing steps (unset fields inherit)."""

    keep_largest: bool | None = None
    components: int | None = Field(None, ge=1)
    min_volume_mm3: float | None = Field(None, ge=0.0)
    fill_holes: bool | None = None
    # added to the label's log-probability before the argmax (0 = none; chosen on validation by
    # medseg.tuning): a low-contrast organ that the network under-segments gets its rim back
    logit_bias: float = Field(0.0, ge=-10.0, le=10.0)


class CRFConfig(_Strict):
    """Mean-field dense CRF over the softmax, in the model grid (see medseg.crf)."""

    enabled: bool = False
    iterations: int = Field(5, ge=1)
    smooth_sigma_mm: float = Field(3.0, gt=0.0)  # Gaussian smoothness kernel
    smooth_weight: float = Field(1.0, ge=0.0)
    bilateral_sigma_mm: float = Field(5.0, gt=0.0)  # bilateral appearance kernel, spatial part
    bilateral_intensity_sigma: float = Field(0.5, gt=0.0)  # in the normalised image's units
    bilateral_weight: float = Field(4.0, ge=0.0)
    # labels the CRF leaves as the network found them: every voxel either calls one of them keeps the
    # network's label (the tuning sets this for a label the CRF lowered on validation while it raised
    # the others: on seed 3's phantoms all-or-nothing lost 0.0185 of test Dice, see benchmarks/README);
    # keyed as ``PostprocessConfig.per_label``
    skip_labels: list[int] = Field(default_factory=list)


class PostprocessConfig(_Strict):
    """Connected components, hole filling and small-object removal, per label.

    ``keep_largest`` keeps the ``components`` largest components of each label
    (``largest_of: label``) or of the whole foreground (``largest_of: foreground``,
    which keeps a structure made of several labels together). ``per_label`` overrides
    any step for one label, e.g. ``{2: {components: 2}}`` for a label holding both
    kidneys, or ``{2: {keep_largest: false}}``. Labels are keyed as ``Config.labels``: by the value
    the label files hold in a training config; by network channel in a bundle whose label values
    were mapped onto channels (``Config.label_values``), where the training translated them.
    """

    keep_largest: bool = False  # off by default: paired organs (kidneys, lungs) have two components
    components: int = Field(1, ge=1)
    # keep-largest also keeps a component at least this share of the size of the last one it keeps:
    # between two blobs of about the same size the size is a guess, and the wrong guess removes the
    # whole organ (seed 8's phantoms: a fatty organ at Dice 0 because a false-positive blob beside it
    # was 3 % larger). 1.0 keeps exactly ``components`` (unless sizes tie), as nnU-Net and MONAI do.
    largest_ties: float = Field(0.8, gt=0.0, le=1.0)
    largest_of: Literal["label", "foreground"] = "label"
    min_volume_mm3: float = Field(0.0, ge=0.0)
    fill_holes: bool = False
    connectivity: Literal[6, 18, 26] = 26
    per_label: dict[int, LabelPostprocess] = Field(default_factory=dict)
    crf: CRFConfig = Field(default_factory=CRFConfig)
    # at the end of training: choose the steps and the CRF per label on the validation cases,
    # each kept only when it raises Dice and does not worsen HD95 (medseg.tuning)
    tune_on_validation: bool = True


class TrackingConfig(_Strict):
    enabled: bool = True
    uri: str | None = None  # None = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "medseg"
    run_name: str | None = None
    log_model: bool = True
    registered_model_name: str | None = None  # the logged model gets a new version of this registered model
    alias: str | None = None  # and this alias (e.g. "champion") points at that version
    http_timeout_s: int = Field(20, ge=1)  # per HTTP call to a tracking server (MLflow's default is 120)
    http_retries: int = Field(
        2, ge=0, le=20
    )  # MLflow's default is 7, which blocked minutes against a dead server


class Config(_Strict):
    seed: int = Field(0, ge=0, lt=2**32)  # numpy seeds are unsigned 32-bit
    # label names; None = dataset.json's. Given (here or in dataset.json) by the value the label files
    # hold; training keys them by network output channel, 0..K-1: values that are not 0..K-1 (a binary
    # mask stored as 0/255, a set such as 0, 1, 2, 5) are mapped onto the channels in value order
    # (medseg.labels.channel_labels), and ``label_values`` maps them back
    labels: dict[Annotated[int, Field(ge=0, le=255)], str] | None = None
    # channel -> the value the label files hold, for labels that are not 0..K-1: references are read
    # onto channels and masks written with the values (medseg.labels). None: channel k is value k.
    # ``labels``, ``postprocess.per_label`` and ``postprocess.crf.skip_labels`` are keyed by channel;
    # masks, label tables, sidecars, DICOM outputs, QC reports and evaluation name the values.
    label_values: dict[Annotated[int, Field(ge=0, le=255)], Annotated[int, Field(ge=0, le=255)]] | None = None
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    @model_validator(mode="after")
    def _channels_agree(self) -> Config:
        channels, declared = self.preprocess.channels, self.model.in_channels
        if channels is not None and declared is not None and len(channels) != declared:
            raise ValueError(
                f"model.in_channels is {declared} but preprocess.channels lists {len(channels)} channels"
            )
        return self

    @field_validator("labels")
    @classmethod
    def _background_is_zero(cls, v: dict[int, str] | None) -> dict[int, str] | None:
        if v is not None and 0 not in v:
            raise ValueError("labels must include 0 (background)")
        return v

    @model_validator(mode="after")
    def _label_values_cover_the_channels(self) -> Config:
        values = self.label_values
        if values is None:
            return self
        channels = sorted(self.labels or {})
        if sorted(values) != channels or channels != list(range(len(channels))):
            raise ValueError(
                f"label_values: expected one value per channel of labels 0..{len(channels) - 1}, "
                f"got channels {sorted(values)}"
            )
        if values[0] != 0 or len(set(values.values())) != len(values):
            raise ValueError(
                f"label_values: channel 0 must be value 0 and no two channels may share a value, got {values}"
            )
        return self

    def stored_labels(self) -> dict[int, str]:
        """The label names by the value the label files and written masks hold (``labels`` names
        the network's channels; the two are the same unless ``label_values`` says otherwise)."""
        values = self.label_values or {}
        return {values.get(k, k): name for k, name in (self.labels or {}).items()}

    @model_validator(mode="after")
    def _patch_fits_the_network(self) -> Config:
        patch = self.train.patch_size
        if patch is None:
            return self
        # as medseg.models.divisor_of (not imported: it pulls in torch)
        divisor = 16 if self.model.name == "basic_unet" else 2**self.model.depth
        if any(int(p) % divisor for p in patch):
            raise ValueError(
                f"train.patch_size {tuple(int(p) for p in patch)} must be a multiple of {divisor} "
                f"for model {self.model.name} with depth {self.model.depth} in every axis; "
                "choose another patch size or a smaller model.depth"
            )
        return self


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
    """Validate a plain config tree; every problem (unknown key, value out of range) in one ConfigError."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(_describe_error(err) for err in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc


def _describe_error(err: Any) -> str:
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] not in ("value_error", "extra_forbidden", "missing") and not isinstance(
        err["input"], dict
    ):
        msg = f"{msg} (got {err['input']!r})"
    return f"{where}: {msg}" if where else msg


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
    if overrides:
        source = "--set" if path is None else f"{source} with --set"
    tree = apply_overrides(tree, overrides)
    return config_from_dict(tree, source=source)


def config_tree(cfg: Config) -> dict[str, Any]:
    """The config as plain JSON types; ``label_values`` only where it is set, so that the config of
    labels 0..K-1 (a bundle's config.yaml, MLflow's params) reads as it did before the field existed."""
    return cfg.model_dump(mode="json", exclude={"label_values"} if cfg.label_values is None else None)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_tree(cfg), sort_keys=False)


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
