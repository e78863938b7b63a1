"""Training: Dice+CE, validation by sliding window, exact resume, DDP under torchrun, MLflow.

``train(cfg, data_root)`` plans what the config leaves out (``medseg.plan``), caches
the deterministic preprocessing (in memory, or on disk under the run folder), trains
with random augmentation per step, validates on whole volumes with
``sliding_window_inference`` (Dice, HD95 in mm and surface Dice per label), keeps the
best weights as a bundle (``medseg.bundle``) and tracks everything in MLflow.

Never losing work: a full-state checkpoint (model, optimiser, scheduler, grad scaler,
the torch/numpy/python RNGs, every random transform's state, the loader generator,
epoch, step, history and the MLflow run id) is written atomically at each epoch end
(``checkpoints/last.pt``), every ``train.checkpoint_every_minutes`` within an epoch
(``checkpoints/timed.pt``) and at the best validation Dice (``checkpoints/best.pt``).
``resume="auto"`` picks the checkpoint furthest along that loads; a mid-epoch
checkpoint replays the epoch's sampling up to its step, so the resumed run sees the
same batches and learning-rate schedule as an uninterrupted one, in the same MLflow run.

Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel (NCCL on
GPUs, Gloo on CPU): each rank caches and samples only its shard of the training cases,
validation cases are split across ranks, metrics are gathered, and rank 0 alone writes
checkpoints, the bundle and the MLflow run.

Run folders are named after what made them: ``runs/<dataset>/<model>/fold_<k>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, PersistentDataset, list_data_collate
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import Compose, Randomizable
from monai.transforms.transform import Transform

from medseg.bundle import save_bundle
from medseg.config import Config, dump_config, flatten
from medseg.data import fingerprint, load_dataset, split_cases
from medseg.errors import InputError, MedsegError, TrackingError
from medseg.io import atomic_path, write_text_atomic
from medseg.metrics import dice_per_label
from medseg.models import build_model, deep_supervision_weights
from medseg.plan import make_plan, plan_summary
from medseg.progress import TrainingProgress
from medseg.tracking import Tracker, git_commit, package_versions
from medseg.transforms import build_augment, build_preprocess, build_sampling_prep

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"  # epoch end
TIMED_CHECKPOINT = "timed.pt"  # by time, within an epoch
BEST_CHECKPOINT = "best.pt"  # best validation Dice


@dataclass
class TrainResult:
    run_dir: Path
    bundle: Path
    run_id: str | None
    best_dice: float
    history: list[dict[str, float]] = field(default_factory=list)
    config: Config | None = None


def resolve_device(requested: str | None) -> torch.device:
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(None, f"device {requested!r} requested but CUDA is not available")
    return torch.device(requested)


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """Where this process stands under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def _init_distributed(requested_device: str | None) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(requested_device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank), device


# ----------------------------------------------------------------------------- RNG state


def _np_state_to_tensors(state: tuple) -> dict[str, Any]:
    return {
        "keys": torch.as_tensor(np.asarray(state[1]).astype(np.int64)),
        "pos": int(state[2]),
        "has_gauss": int(state[3]),
        "gauss": float(state[4]),
    }


def _np_state_from_tensors(d: dict[str, Any]) -> tuple:
    return ("MT19937", d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"])


def _random_transforms(root: Any) -> list[Randomizable]:
    """Every Randomizable inside a transform chain (dict transforms hold array ones with their own RNG)."""
    found: list[Randomizable] = []
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            found.append(obj)
        children = vars(obj).values() if isinstance(obj, (Transform, Compose)) else ()
        for child in children:
            if isinstance(child, (Transform, Compose)):
                walk(child)
            elif isinstance(child, (list, tuple)):
                for item in child:
                    if isinstance(item, (Transform, Compose)):
                        walk(item)

    walk(root)
    return found


def _capture_rng(transforms: Any, generator: torch.Generator | None) -> dict[str, Any]:
    """Global RNGs, every random transform's RNG and the loader generator."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _np_state_to_tensors(np.random.get_state()),
        "python": list(random.getstate()[1]),
        "transforms": [_np_state_to_tensors(t.R.get_state()) for t in _random_transforms(transforms)],
    }
    if generator is not None:
        state["loader"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], transforms: Any, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_np_state_from_tensors(state["numpy"]))
    random.setstate((3, tuple(state["python"]), None))
    rts = _random_transforms(transforms)
    if len(rts) != len(state["transforms"]):
        log.warning(
            "checkpoint holds %d random transform states, the chain has %d (augmentation changed?); "
            "augmentation will not replay exactly",
            len(state["transforms"]),
            len(rts),
        )
    else:
        for t, s in zip(rts, state["transforms"], strict=True):
            t.R.set_state(_np_state_from_tensors(s))
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint's state, or None (with a warning) when it is corrupt or partial."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("skipping checkpoint %s: it does not load (%s: %s)", path, type(exc).__name__, exc)
        return None
    if not isinstance(state, dict) or not {"model", "epoch", "global_step"} <= set(state):
        log.warning("skipping checkpoint %s: not a medseg training checkpoint", path)
        return None
    return state


def find_checkpoint(run_dir: Path, resume: bool | str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from: an explicit file, or (``auto``) the valid one furthest along."""
    if isinstance(resume, str) and resume not in ("auto", ""):
        path = Path(resume)
        if path.is_dir():
            return find_checkpoint(path, "auto")
        if not path.is_file():
            raise InputError(path, "checkpoint to resume from does not exist")
        state = _load_checkpoint(path)
        if state is None:
            raise InputError(path, "checkpoint is corrupt or incomplete; try --resume auto")
        return path, state
    folder = run_dir / "checkpoints"
    candidates = [folder / CHECKPOINT, folder / TIMED_CHECKPOINT]
    loaded = [(p, s) for p in candidates if p.is_file() for s in [_load_checkpoint(p)] if s is not None]
    if not loaded:
        if any(p.is_file() for p in candidates):
            raise InputError(folder, "no checkpoint there loads (all corrupt or incomplete)")
        return None
    return max(loaded, key=lambda ps: int(ps[1]["global_step"]))


def _run_name(data_root: Path, cfg: Config) -> str:
    fold = cfg.train.fold if cfg.train.fold is not None else "all"
    return f"{data_root.resolve().name}-{cfg.model.name}-fold_{fold}"


def _default_run_dir(dataset_root: Path, cfg: Config) -> Path:
    fold = "all" if cfg.train.fold is None else str(cfg.train.fold)
    return Path("runs") / dataset_root.resolve().name / cfg.model.name / f"fold_{fold}"


# ----------------------------------------------------------------------------- validation


def _case_metrics(
    pred: np.ndarray, ref: np.ndarray, label_ids: list[int], spacing: tuple[float, ...], cfg: Config
) -> dict[str, float]:
    out = {f"dice_{k}": v for k, v in dice_per_label(pred, ref, label_ids).items()}
    if not cfg.train.val_surface_metrics:
        return out
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    n = max(label_ids) + 1
    p1 = torch.nn.functional.one_hot(torch.as_tensor(pred), n).movedim(-1, 0)[None]
    r1 = torch.nn.functional.one_hot(torch.as_tensor(ref), n).movedim(-1, 0)[None]
    with contextlib.suppress(Exception), np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p1, r1, percentile=95, spacing=list(spacing))[0]
        nsd = compute_surface_dice(
            p1.float(), r1.float(), [cfg.train.surface_dice_tolerance_mm] * (n - 1), spacing=list(spacing)
        )[0]
        for k in label_ids:
            if k and k < n:
                if math.isfinite(float(hd[k - 1])):
                    out[f"hd95_{k}"] = float(hd[k - 1])
                if math.isfinite(float(nsd[k - 1])):
                    out[f"nsd_{k}"] = float(nsd[k - 1])
    return out


def validate(
    network: torch.nn.Module,
    loader: DataLoader,
    cfg: Config,
    device: torch.device,
    label_ids: list[int],
    *,
    autocast: dict[str, Any] | None = None,
    keep_first: bool = False,
) -> tuple[list[dict[str, float]], tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """Per-case metrics over whole validation volumes (sliding window, model grid).

    Returns the list of per-case metric dicts (``dice_<k>``, ``hd95_<k>`` mm, ``nsd_<k>``)
    and, with ``keep_first``, (image, prediction, affine) of the first case for an overlay.
    """
    network.eval()
    roi = tuple(int(p) for p in cfg.train.patch_size)
    rows: list[dict[str, float]] = []
    first = None
    with torch.no_grad(), torch.autocast(**(autocast or {"device_type": device.type, "enabled": False})):
        for batch in loader:
            image = batch["image"].to(device)
            logits = sliding_window_inference(
                image,
                roi_size=roi,
                sw_batch_size=cfg.infer.sw_batch_size,
                predictor=network,
                overlap=cfg.infer.overlap,
                mode=cfg.infer.blend_mode,
            )
            pred = torch.as_tensor(logits).float().argmax(dim=1).cpu().numpy()
            ref = batch["label"][:, 0].cpu().numpy().round().astype(np.int64)
            affine = batch["image"].affine
            affine = np.asarray(affine[0] if affine.ndim == 3 else affine, dtype=float)
            spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
            for p, r in zip(pred, ref, strict=True):
                rows.append(_case_metrics(p, r, label_ids, spacing, cfg))
            if keep_first and first is None:
                first = (image[0, 0].float().cpu().numpy(), pred[0], affine)
    network.train()
    return rows, first


def _summarise_val(rows: list[dict[str, float]], labels: dict[int, str]) -> dict[str, float]:
    record: dict[str, float] = {}
    for kind in ("dice", "hd95", "nsd"):
        for k, name in labels.items():
            values = [r[f"{kind}_{k}"] for r in rows if f"{kind}_{k}" in r]
            if k and values:
                record[f"val_{kind}_{name}"] = float(np.mean(values))
    dices = [v for key, v in record.items() if key.startswith("val_dice_")]
    record["val_dice"] = float(np.mean(dices)) if dices else 0.0
    return record


# ----------------------------------------------------------------------------- training


def _schedule(cfg: Config):
    epochs = max(1, cfg.train.epochs)
    if cfg.train.scheduler == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))
    return lambda e: max(0.0, 1 - e / epochs) ** 0.9


def _make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.train.lr, momentum=0.99, nesterov=True, weight_decay=cfg.train.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def _autocast_args(cfg: Config, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda" and cfg.train.amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"device_type": "cuda", "dtype": dtype, "enabled": True}
    if device.type == "cpu" and cfg.train.cpu_bf16:
        if not _cpu_has_native_bf16():
            log.warning(
                "train.cpu_bf16: this CPU has no native bf16 (AVX512-BF16/AMX); bf16 is emulated and "
                "was 35x slower than fp32 on an AVX2 machine. Consider train.cpu_bf16=false."
            )
        return {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": True}
    return {"device_type": device.type, "enabled": False}


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers, present in torch 2.x
        return True


def _items(cases) -> list[dict[str, str]]:
    return [{"image": str(c.image), "label": str(c.label)} for c in cases]


def _shard(items: list, dist: Dist, *, even: bool) -> list:
    """This rank's share of ``items``; ``even`` repeats a few so every rank has as many (DDP needs it)."""
    if not dist.active:
        return items
    if even and len(items) % dist.world:
        items = items + items[: dist.world - len(items) % dist.world]
    return items[dist.rank :: dist.world]


def train(
    cfg: Config,
    data_root: str | Path,
    *,
    out_dir: str | Path | None = None,
    resume: bool | str = False,
) -> TrainResult:
    """Train a model on a Decathlon dataset folder and write its bundle; see the module docstring.

    ``resume``: False (a run folder with checkpoints is refused), True/``"auto"`` (the valid
    checkpoint furthest along, or a fresh start when there is none), or a checkpoint path.
    """
    dist, device = _init_distributed(cfg.train.device)
    try:
        return _train(cfg, Path(data_root), out_dir, resume, dist, device)
    finally:
        if dist.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(
    cfg: Config, data_root: Path, out_dir, resume: bool | str, dist: Dist, device: torch.device
) -> TrainResult:
    dataset = load_dataset(data_root)
    labels = cfg.labels or dataset.labels
    cfg = cfg.model_copy(update={"labels": labels}, deep=True)
    run_dir = Path(out_dir) if out_dir else _default_run_dir(data_root, cfg)
    ckpt_dir = run_dir / "checkpoints"

    # --- what to resume (rank 0 decides, every rank loads the same file)
    found = None
    problem = None
    if dist.main:
        try:
            if resume:
                found = find_checkpoint(run_dir, "auto" if resume is True else resume)
                if found is None:
                    log.info("no checkpoint in %s: starting a fresh run", ckpt_dir)
            elif (ckpt_dir / CHECKPOINT).exists() or (ckpt_dir / TIMED_CHECKPOINT).exists():
                problem = InputError(
                    run_dir, "holds a previous run; pass --resume to continue it or choose another --out"
                )
        except MedsegError as exc:
            problem = exc
    _raise_everywhere(problem, dist)
    ckpt_path = dist.broadcast(str(found[0]) if found else None)
    state = (found[1] if dist.main else _load_checkpoint(Path(ckpt_path))) if ckpt_path else None
    if state is not None and "config" in state:
        # the run continues as it was planned (spacing, patch, epochs, schedule), whatever is passed now
        cfg = Config.model_validate(json.loads(state["config"]))
        if dist.main:
            log.info("resuming from %s with the run's own configuration", ckpt_path)

    # --- tracking first: an unreachable server stops us before any work
    tracker = Tracker(cfg.tracking, enabled=cfg.tracking.enabled and dist.main)
    error = None
    if dist.main:
        try:
            tracker.start(run_name=_run_name(data_root, cfg), run_id=state.get("run_id") if state else None)
        except TrackingError as exc:
            error = exc
    _raise_everywhere(error, dist)

    status = "FAILED"
    history: list[dict[str, float]] = []
    best = -1.0
    bundle_dir = run_dir / "bundle"
    try:
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
        fp_path = run_dir / "fingerprint.json"
        fp = None
        if dist.main:
            if fp_path.exists():
                fp = json.loads(fp_path.read_text())
            else:
                fp = fingerprint(dataset, seed=cfg.seed)
                write_text_atomic(fp_path, json.dumps(fp, indent=2))
        fp = dist.broadcast(fp)
        cfg = make_plan(cfg, fp)
        label_ids = sorted(labels)
        train_cases, val_cases = split_cases(
            dataset.training,
            seed=cfg.seed,
            val_fraction=cfg.train.val_fraction,
            fold=cfg.train.fold,
            num_folds=cfg.train.num_folds,
        )
        if dist.main:
            log.info("%s", plan_summary(cfg, fp))
            write_text_atomic(run_dir / "plan.yaml", dump_config(cfg))
            write_text_atomic(run_dir / "plan.txt", plan_summary(cfg, fp) + "\n")
            write_text_atomic(
                run_dir / "splits.json",
                json.dumps(
                    {
                        "fold": cfg.train.fold,
                        "num_folds": cfg.train.num_folds,
                        "seed": cfg.seed,
                        "train": [c.name for c in train_cases],
                        "val": [c.name for c in val_cases],
                    },
                    indent=2,
                ),
            )
        if state is None:
            commit = git_commit()
            tracker.log_params(
                {
                    **flatten(cfg.model_dump(mode="json")),
                    "fingerprint_hash": fp["hash"],
                    "n_train": len(train_cases),
                    "n_val": len(val_cases),
                    "device": device.type,
                    "world_size": dist.world,
                    "train_cases_per_rank": len(_shard(train_cases, dist, even=True)),
                    **({"git_commit": commit} if commit else {}),
                    **{f"version.{k}": v for k, v in package_versions().items()},
                }
            )
            tracker.log_artifact(run_dir / "plan.yaml")
            tracker.log_artifact(run_dir / "splits.json")
            tracker.log_artifact(fp_path)
        with _stop_on_sigterm() as stop_requested:
            result = _loop(
                cfg,
                run_dir,
                dataset,
                train_cases,
                val_cases,
                label_ids,
                state,
                tracker,
                dist,
                device,
                fp,
                stop_requested,
            )
        history, best = result
        status = "FINISHED"
    except (KeyboardInterrupt, TrainingStoppedError):
        status = "KILLED"
        raise
    finally:
        if dist.main:
            _finish(tracker, run_dir, bundle_dir, history, cfg, status)
    return TrainResult(
        run_dir=run_dir, bundle=bundle_dir, run_id=tracker.run_id, best_dice=best, history=history, config=cfg
    )


class TrainingStoppedError(MedsegError):
    """SIGTERM (a scheduler pre-empting the job) stopped training after saving its state."""


@contextlib.contextmanager
def _stop_on_sigterm():
    """While training: SIGTERM sets an event; the loop saves a checkpoint at the step's end and stops."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum, frame) -> None:
        log.warning("signal %d: saving a checkpoint at the end of this step, then stopping", signum)
        event.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_everywhere(error: MedsegError | None, dist: Dist) -> None:
    """Rank 0's error stops every rank (its message travels, not the object: InputError does not pickle)."""
    message = dist.broadcast(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise MedsegError(f"rank 0 stopped: {message}")


def _loop(
    cfg: Config,
    run_dir: Path,
    dataset,
    train_cases,
    val_cases,
    label_ids: list[int],
    state: dict[str, Any] | None,
    tracker: Tracker,
    dist: Dist,
    device: torch.device,
    fp: dict[str, Any],
    stop_requested: threading.Event,
) -> tuple[list[dict[str, float]], float]:
    labels = cfg.labels or {}
    ckpt_dir = run_dir / "checkpoints"
    bundle_dir = run_dir / "bundle"
    from monai.utils import set_determinism

    set_determinism(seed=cfg.seed)
    preprocess = build_preprocess(cfg)
    augment = build_augment(cfg, precomputed=True)
    augment.set_random_state(seed=cfg.seed + dist.rank)
    chain = Compose([preprocess, build_sampling_prep(cfg), augment])
    train_items = _shard(_items(train_cases), dist, even=True)
    if cfg.train.cache == "disk":
        cache_dir = run_dir / "cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
        train_ds: Any = PersistentDataset(train_items, transform=chain, cache_dir=cache_dir)
    else:
        train_ds = CacheDataset(train_items, transform=chain, cache_rate=1.0, num_workers=0, progress=False)
    generator = torch.Generator().manual_seed(cfg.seed + dist.rank)
    sampler = None
    if cfg.train.iterations_per_epoch:
        # a fixed number of steps per epoch (each rank), drawing through its shard as often as needed
        sampler = torch.utils.data.RandomSampler(
            train_ds, num_samples=cfg.train.iterations_per_epoch * cfg.train.batch_size, generator=generator
        )
    loader = DataLoader(
        train_ds,
        batch_size=cfg.train.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=cfg.train.num_workers,
        collate_fn=list_data_collate,
        generator=generator,
    )
    val_loader = None
    val_shard = _shard(_items(val_cases), dist, even=False)
    if val_cases:
        val_ds = CacheDataset(val_shard, transform=preprocess, cache_rate=1.0, num_workers=0, progress=False)
        val_loader = DataLoader(val_ds, batch_size=1, num_workers=0)

    autocast = _autocast_args(cfg, device)
    network = build_model(cfg.model, out_channels=max(label_ids) + 1).to(device)
    channels_last = device.type == "cpu" and cfg.train.cpu_bf16
    if channels_last:
        network = network.to(memory_format=torch.channels_last_3d)
    model: torch.nn.Module = network
    if dist.active:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = _make_optimizer(cfg, network.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    use_scaler = autocast.get("enabled") and autocast.get("dtype") == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=bool(use_scaler))
    epochs = cfg.train.epochs
    ds_weights = deep_supervision_weights(getattr(network, "num_aux", 0))

    start_epoch, step_in_epoch, global_step, best, history = 0, 0, 0, -1.0, []
    stale = 0
    partial: dict[str, Any] = {}
    rng_epoch_start = rng_now = None
    if state is not None:
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        global_step, best, stale = int(state["global_step"]), float(state["best"]), int(state.get("stale", 0))
        history = json.loads(state["history"])
        ranks = state["ranks"]
        if len(ranks) == dist.world:
            mine = ranks[dist.rank]
            rng_epoch_start, rng_now, partial = mine["rng_epoch_start"], mine["rng_now"], mine["partial"]
        else:
            log.warning(
                "checkpoint was written by %d processes, this run has %d: random streams restart",
                len(ranks),
                dist.world,
            )
        if dist.main:
            log.info("resuming %s at epoch %d step %d", run_dir, start_epoch + 1, step_in_epoch)
            _sync_history(tracker, history)

    meta = {
        "fingerprint_hash": fp["hash"],
        "dataset": dataset.root.resolve().name,
        "train_cases": len(train_cases),
        "label_volumes_ml": fp.get("label_volumes_ml", {}),
    }
    every_s = max(0.0, cfg.train.checkpoint_every_minutes * 60.0)
    last_ckpt = time.monotonic()

    def save(kind: str, epoch: int, step: int, epoch_rng, acc) -> None:
        now = _capture_rng(augment, generator)
        # at an epoch end the next epoch starts from the state now
        per_rank = dist.gather({"rng_epoch_start": epoch_rng or now, "rng_now": now, "partial": acc})
        if not dist.main:
            return
        ckpt = {
            "model": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step,
            "global_step": global_step,
            "best": best,
            "stale": stale,
            "history": json.dumps(history),
            "run_id": tracker.run_id,
            "config": json.dumps(cfg.model_dump(mode="json")),
            "ranks": per_rank,
            "world_size": dist.world,
            "saved_at": time.time(),
        }
        with atomic_path(ckpt_dir / kind) as tmp:
            torch.save(ckpt, tmp)

    import sys

    interactive = dist.main and sys.stderr.isatty()
    bar = TrainingProgress(total_steps=epochs * len(loader), enabled=interactive)
    stop = False
    for epoch in range(start_epoch, epochs):
        model.train()
        resumed_mid_epoch = rng_epoch_start is not None and step_in_epoch > 0
        if rng_epoch_start is not None:
            _restore_rng(rng_epoch_start, augment, generator)
        epoch_rng = _capture_rng(augment, generator)
        losses: list[float] = list(partial.get("losses", [])) if resumed_mid_epoch else []
        wait = float(partial.get("wait", 0.0)) if resumed_mid_epoch else 0.0
        compute = float(partial.get("compute", 0.0)) if resumed_mid_epoch else 0.0
        samples = int(partial.get("samples", 0)) if resumed_mid_epoch else 0
        batches = iter(loader)
        skip = step_in_epoch if resumed_mid_epoch else 0
        for _ in range(skip):  # replay the epoch's sampling and augmentation up to the checkpoint
            next(batches)
        if resumed_mid_epoch and rng_now is not None:
            _restore_rng(rng_now, augment, generator)
        rng_epoch_start = rng_now = None
        step_in_epoch = 0
        n_batches = len(loader)
        t_wait = time.perf_counter()
        for step, batch in enumerate(batches, start=skip):
            t_start = time.perf_counter()
            wait += t_start - t_wait
            image, label = batch["image"].to(device), batch["label"].to(device)
            if channels_last:
                image = image.contiguous(memory_format=torch.channels_last_3d)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(**autocast):
                logits = model(image)
            # the loss in fp32, whatever the autocast dtype
            loss = ds_weights[0] * loss_fn(logits.float(), label)
            for w, aux in zip(ds_weights[1:], getattr(network, "aux_outputs", []), strict=False):
                loss = loss + w * loss_fn(aux.float(), label)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            samples += image.shape[0]
            global_step += 1
            t_wait = time.perf_counter()
            compute += t_wait - t_start
            if interactive:
                dice = next((h["val_dice"] for h in reversed(history) if "val_dice" in h), None)
                bar.update(
                    completed=epoch * n_batches + step + 1,
                    epoch=epoch + 1,
                    epochs=epochs,
                    loss=float(np.mean(losses[-n_batches:])),
                    dice=dice,
                )
            due = every_s > 0 and time.monotonic() - last_ckpt >= every_s and step + 1 < n_batches
            due, stopping = dist.broadcast((due, stop_requested.is_set()))
            if due or stopping:
                save(
                    TIMED_CHECKPOINT,
                    epoch,
                    step + 1,
                    epoch_rng,
                    {"losses": losses, "wait": wait, "compute": compute, "samples": samples},
                )
                last_ckpt = time.monotonic()
                t_wait = time.perf_counter()
            if stopping:
                bar.close()
                raise TrainingStoppedError(
                    f"stopped by a signal at epoch {epoch + 1} step {step + 1}; the state is saved in "
                    f"{ckpt_dir / TIMED_CHECKPOINT}: continue with --resume"
                )
        record = _epoch_record(epoch, losses, samples, wait, compute, optimizer, dist)  # lr of this epoch
        scheduler.step()
        is_val_epoch = val_loader is not None and (
            (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == epochs
        )
        if is_val_epoch:
            rows, first = validate(
                network, val_loader, cfg, device, label_ids, autocast=autocast, keep_first=dist.main
            )
            rows = [r for rank_rows in dist.gather(rows) for r in rank_rows]
            record.update(_summarise_val(rows, labels))
            if record["val_dice"] > best:
                best, stale = record["val_dice"], 0
                if dist.main:
                    per_label = {labels[k]: record.get(f"val_dice_{labels[k]}") for k in label_ids if k}
                    save_bundle(
                        bundle_dir, network, cfg, {**meta, "best_epoch": epoch + 1, "val_dice": per_label}
                    )
                    if first is not None:
                        _overlay(first, run_dir / "overlays" / "val_best.png", labels, epoch + 1)
                best_pending = True
            else:
                stale += 1
                best_pending = False
        else:
            best_pending = False
        history.append(record)
        save(CHECKPOINT, epoch + 1, 0, None, {})
        if best_pending and dist.main:
            import shutil

            shutil.copyfile(ckpt_dir / CHECKPOINT, ckpt_dir / f".{BEST_CHECKPOINT}.partial")
            os.replace(ckpt_dir / f".{BEST_CHECKPOINT}.partial", ckpt_dir / BEST_CHECKPOINT)
        last_ckpt = time.monotonic()
        with contextlib.suppress(FileNotFoundError):
            if dist.main:
                (ckpt_dir / TIMED_CHECKPOINT).unlink()  # older than last.pt now
        if dist.main:
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            log.info(
                "epoch %d/%d loss %.4f%s lr %.2e (%.1f samples/s, data wait %.0f%%)",
                epoch + 1,
                epochs,
                record["train_loss"],
                f" val Dice {record['val_dice']:.4f}" if "val_dice" in record else "",
                record["lr"],
                record["samples_per_s"],
                100 * record["data_wait_fraction"],
            )
        patience = cfg.train.early_stopping_patience
        if patience is not None and is_val_epoch and stale >= patience:
            if dist.main:
                log.info("early stopping: no better validation Dice in %d validations", stale)
            stop = True
        if stop:
            break
    if val_loader is None and dist.main:
        save_bundle(bundle_dir, network, cfg, {**meta, "best_epoch": epochs, "val_dice": {}})
    bar.close()
    dist.barrier()
    return history, best


def _epoch_record(epoch, losses, samples, wait, compute, optimizer, dist: Dist) -> dict[str, float]:
    stats = dist.gather((float(np.sum(losses)), len(losses), samples, wait, compute))
    loss_sum = sum(s[0] for s in stats)
    n = sum(s[1] for s in stats)
    total_samples = sum(s[2] for s in stats)
    elapsed = max(max(s[3] + s[4] for s in stats), 1e-9)
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / n if n else float("nan"),
        "lr": optimizer.param_groups[0]["lr"],
        "samples_per_s": total_samples / elapsed,
        "steps": n / len(stats),
        "data_wait_fraction": float(np.mean([s[3] / max(s[3] + s[4], 1e-9) for s in stats])),
    }


def _sync_history(tracker: Tracker, history: list[dict[str, float]]) -> None:
    """Log the epochs the checkpoint knows and the MLflow run does not (killed between the two)."""
    if not history or tracker.run_id is None:
        return
    logged = tracker.logged_steps("train_loss")
    for record in history:
        if int(record["epoch"]) not in logged:
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))


def _overlay(first, path: Path, labels: dict[int, str], epoch: int) -> None:
    from medseg.io import Volume
    from medseg.viz import overlay_png

    image, pred, affine = first
    window = (float(np.percentile(image, 1)), float(np.percentile(image, 99)))
    try:
        overlay_png(
            Volume(image.astype(np.float32), affine),
            pred.astype(np.uint8),
            path,
            labels=labels,
            window=window,
            title=f"validation, epoch {epoch}: predicted mask",
        )
    except Exception as exc:  # a picture must never stop training
        log.warning("validation overlay not written (%s)", exc)


def _finish(tracker: Tracker, run_dir: Path, bundle_dir: Path, history, cfg: Config, status: str) -> None:
    if status == "FINISHED":
        from medseg.viz import training_curves_png

        if history:
            tracker.log_artifact(training_curves_png(history, run_dir / "curves.png"))
        tracker.log_artifact(run_dir / "plan.txt")
        overlays = run_dir / "overlays"
        if overlays.is_dir():
            tracker.log_artifact(overlays, "overlays")
        if bundle_dir.exists():
            tracker.log_artifact(bundle_dir, "bundle")
            if tracker.enabled and cfg.tracking.log_model:
                from medseg.bundle import load_bundle

                patch = [1, 1, *[int(p) for p in cfg.train.patch_size]]
                tracker.log_model(load_bundle(bundle_dir).network, np.zeros(patch, dtype=np.float32))
    tracker.end("FINISHED" if status == "FINISHED" else ("KILLED" if status == "KILLED" else "FAILED"))
