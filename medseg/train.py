"""Training: Dice+CE, validation by sliding window, full-state checkpoints, resume, MLflow.

``train(cfg, data_root)`` plans what the config leaves out (``medseg.plan``), caches
the deterministic preprocessing, trains with random augmentation per step,
validates on whole volumes with ``sliding_window_inference``, keeps the best
weights as a bundle (``medseg.bundle``) and tracks everything in MLflow.
Run folders are named after what made them: ``runs/<dataset>/<model>/fold_<k>``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, list_data_collate
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import Compose
from monai.utils import set_determinism

from medseg.bundle import save_bundle, versions
from medseg.config import Config, dump_config, flatten
from medseg.data import fingerprint, load_dataset, split_cases
from medseg.errors import InputError
from medseg.io import atomic_path, write_text_atomic
from medseg.metrics import dice_per_label
from medseg.models import build_model
from medseg.plan import make_plan
from medseg.progress import track
from medseg.tracking import Tracker
from medseg.transforms import build_augment, build_preprocess

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"


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


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.as_tensor(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": random.getstate()[1],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0)
    )
    random.setstate((3, tuple(state["python"]), None))


def _default_run_dir(dataset_root: Path, cfg: Config) -> Path:
    fold = "all" if cfg.train.fold is None else str(cfg.train.fold)
    return Path("runs") / dataset_root.resolve().name / cfg.model.name / f"fold_{fold}"


def validate(
    network: torch.nn.Module, loader: DataLoader, cfg: Config, device: torch.device, label_ids: list[int]
) -> dict[int, float]:
    """Mean Dice per label over whole validation volumes (sliding window, model grid)."""
    network.eval()
    scores: dict[int, list[float]] = {k: [] for k in label_ids if k}
    roi = tuple(int(p) for p in cfg.train.patch_size)
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda" and cfg.train.amp):
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
            pred = torch.as_tensor(logits).argmax(dim=1).cpu().numpy()
            ref = batch["label"][:, 0].cpu().numpy().round().astype(np.int64)
            for p, r in zip(pred, ref, strict=True):
                for k, v in dice_per_label(p, r, label_ids).items():
                    scores[k].append(v)
    network.train()
    return {k: float(np.mean(v)) for k, v in scores.items() if v}


def train(
    cfg: Config,
    data_root: str | Path,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train a model on a Decathlon dataset folder and write its bundle; see the module docstring."""
    data_root = Path(data_root)
    dataset = load_dataset(data_root)
    labels = cfg.labels or dataset.labels
    cfg = cfg.model_copy(update={"labels": labels}, deep=True)
    run_dir = Path(out_dir) if out_dir else _default_run_dir(data_root, cfg)
    ckpt_path = run_dir / "checkpoints" / CHECKPOINT
    if run_dir.exists() and ckpt_path.exists() and not resume:
        raise InputError(
            run_dir, "holds a previous run; pass --resume to continue it or choose another --out"
        )
    if resume and not ckpt_path.exists():
        raise InputError(ckpt_path, "no checkpoint to resume from")
    run_dir.mkdir(parents=True, exist_ok=True)
    set_determinism(seed=cfg.seed)

    fp_path = run_dir / "fingerprint.json"
    if fp_path.exists():
        fp = json.loads(fp_path.read_text())
    else:
        fp = fingerprint(dataset, seed=cfg.seed)
        write_text_atomic(fp_path, json.dumps(fp, indent=2))
    cfg = make_plan(cfg, fp)
    write_text_atomic(run_dir / "plan.yaml", dump_config(cfg))
    label_ids = sorted(labels)

    train_cases, val_cases = split_cases(
        dataset.training,
        seed=cfg.seed,
        val_fraction=cfg.train.val_fraction,
        fold=cfg.train.fold,
        num_folds=cfg.train.num_folds,
    )
    write_text_atomic(
        run_dir / "splits.json",
        json.dumps({"train": [c.name for c in train_cases], "val": [c.name for c in val_cases]}, indent=2),
    )
    device = resolve_device(cfg.train.device)
    use_amp = device.type == "cuda" and cfg.train.amp

    tracker = Tracker(cfg.tracking)
    state: dict[str, Any] | None = None
    if resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    tracker.start(
        run_name=f"{data_root.resolve().name}-{cfg.model.name}-fold_{cfg.train.fold if cfg.train.fold is not None else 'all'}",
        run_id=state.get("run_id") if state else None,
    )
    if state is None:
        tracker.log_params(
            {
                **flatten(cfg.model_dump(mode="json")),
                "fingerprint_hash": fp["hash"],
                "n_train": len(train_cases),
                "n_val": len(val_cases),
                "device": device.type,
                **{f"version.{k}": v for k, v in versions().items()},
            }
        )
        tracker.log_artifact(run_dir / "plan.yaml")
        tracker.log_artifact(fp_path)

    preprocess = build_preprocess(cfg)
    to_items = lambda cases: [{"image": str(c.image), "label": str(c.label)} for c in cases]
    augment = build_augment(cfg)
    augment.set_random_state(seed=cfg.seed)
    train_ds = CacheDataset(
        to_items(train_cases),
        transform=Compose([preprocess, augment]),
        cache_rate=1.0,
        num_workers=0,
        progress=False,
    )
    loader = DataLoader(
        train_ds,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        num_workers=cfg.train.num_workers,
        collate_fn=list_data_collate,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_loader = None
    if val_cases:
        val_ds = CacheDataset(
            to_items(val_cases), transform=preprocess, cache_rate=1.0, num_workers=0, progress=False
        )
        val_loader = DataLoader(val_ds, batch_size=1, num_workers=0)

    network = build_model(cfg.model, out_channels=max(label_ids) + 1).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            network.parameters(),
            lr=cfg.train.lr,
            momentum=0.99,
            nesterov=True,
            weight_decay=cfg.train.weight_decay,
        )
    else:
        optimizer = torch.optim.AdamW(
            network.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
    epochs = cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 - e / max(1, epochs)) ** 0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    start_epoch, best, history = 0, -1.0, []
    if state is not None:
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best = int(state["epoch"]), float(state["best"])
        history = json.loads(state["history"])
        _set_rng_state(state["rng"])
        log.info("resuming %s at epoch %d", run_dir, start_epoch)

    bundle_dir = run_dir / "bundle"
    meta = {
        "fingerprint_hash": fp["hash"],
        "dataset": data_root.resolve().name,
        "train_cases": len(train_cases),
    }
    status = "FAILED"
    try:
        for epoch in range(start_epoch, epochs):
            network.train()
            losses, wait, compute, samples = [], 0.0, 0.0, 0
            t_wait = time.perf_counter()
            for batch in track(loader, f"epoch {epoch + 1}/{epochs}"):
                t_start = time.perf_counter()
                wait += t_start - t_wait
                image, label = batch["image"].to(device), batch["label"].to(device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, enabled=use_amp):
                    logits = network(image)
                loss = loss_fn(logits.float(), label)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
                samples += image.shape[0]
                t_wait = time.perf_counter()
                compute += t_wait - t_start
            scheduler.step()
            record: dict[str, float] = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": samples / max(wait + compute, 1e-9),
                "data_wait_fraction": wait / max(wait + compute, 1e-9),
            }
            is_val_epoch = val_loader is not None and (
                (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == epochs
            )
            if is_val_epoch:
                per_label = validate(network, val_loader, cfg, device, label_ids)
                record["val_dice"] = float(np.mean(list(per_label.values()))) if per_label else 0.0
                for k, v in per_label.items():
                    record[f"val_dice_{labels[k]}"] = v
                if record["val_dice"] > best:
                    best = record["val_dice"]
                    save_bundle(
                        bundle_dir, network, cfg, {**meta, "best_epoch": epoch + 1, "val_dice": per_label}
                    )
            history.append(record)
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            log.info(
                "epoch %d/%d loss %.4f%s (%.1f samples/s, data wait %.0f%%)",
                epoch + 1,
                epochs,
                record["train_loss"],
                f" val Dice {record['val_dice']:.4f}" if "val_dice" in record else "",
                record["samples_per_s"],
                100 * record["data_wait_fraction"],
            )
            _save_checkpoint(
                ckpt_path, network, optimizer, scheduler, scaler, epoch + 1, best, history, tracker.run_id
            )
        if val_loader is None:
            save_bundle(bundle_dir, network, cfg, {**meta, "best_epoch": epochs, "val_dice": {}})
        status = "FINISHED"
    finally:
        _finish(tracker, run_dir, bundle_dir, history, cfg, status)
    return TrainResult(
        run_dir=run_dir, bundle=bundle_dir, run_id=tracker.run_id, best_dice=best, history=history, config=cfg
    )


def _save_checkpoint(path, network, optimizer, scheduler, scaler, epoch, best, history, run_id) -> None:
    state = {
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best": best,
        "history": json.dumps(history),
        "run_id": run_id,
        "rng": _rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _finish(tracker: Tracker, run_dir: Path, bundle_dir: Path, history, cfg: Config, status: str) -> None:
    if status == "FINISHED":
        from medseg.viz import training_curves_png

        if history:
            tracker.log_artifact(training_curves_png(history, run_dir / "curves.png"))
        if bundle_dir.exists():
            tracker.log_artifact(bundle_dir, "bundle")
            from medseg.bundle import load_bundle

            patch = [1, 1, *[int(p) for p in cfg.train.patch_size]]
            tracker.log_model(load_bundle(bundle_dir).network, np.zeros(patch, dtype=np.float32))
    tracker.end("FINISHED" if status == "FINISHED" else "FAILED")
