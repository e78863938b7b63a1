"""Training checkpoints: the ``TrainState`` schema, RNG capture, and atomic save/load/find/promote.

A checkpoint is exactly a ``TrainState``: model, optimiser, scheduler and grad-scaler
state, where the run is (epoch, step in the epoch, global step), the best validation
Dice and validations since, the epoch history, the MLflow run id, the run's own
configuration and the settings the user asked for, and for each rank the RNG states (torch, numpy, python, every random
transform of the augmentation chain, the loader generator) at the epoch start and now,
plus the partial epoch statistics. What a checkpoint holds does not depend on when it is
written: the trainer builds one ``TrainState`` and hands it here.

Files (``run/checkpoints/``): ``last.pt`` at each epoch end, ``timed.pt`` within an
epoch (by time, by step count, or on a stop signal) and ``best.pt`` at the best
validation Dice. Every write is atomic; a checkpoint that does not load is skipped
with a warning; ``find_checkpoint`` picks the valid one furthest along.
Loading uses ``torch.load(weights_only=True)``: a checkpoint is never executed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, Randomizable
from monai.transforms.transform import Transform

from medseg.errors import InputError
from medseg.io import atomic_path

log = logging.getLogger(__name__)

LAST = "last.pt"  # epoch end
TIMED = "timed.pt"  # within an epoch (time, steps, signal)
BEST = "best.pt"  # best validation Dice


@dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped (the checkpoint schema)."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    epoch: int  # epochs completed (the next epoch to run)
    step_in_epoch: int  # steps done in epoch ``epoch`` (0 at an epoch end)
    global_step: int
    best: float
    stale: int  # validations without improvement
    history: list[dict[str, float]]
    run_id: str | None
    config: dict[str, Any]  # the run's own configuration (model_dump(mode="json"))
    ranks: list[dict[str, Any]]  # per rank: rng_epoch_start, rng_now, partial epoch statistics
    world_size: int = 1
    saved_at: float = field(default_factory=time.time)
    # the settings the user gave (dotted keys): what a resume is compared with (medseg.resume)
    requested: dict[str, Any] = field(default_factory=dict)
    precision: str = ""  # the precision the run trains in (fp32/bf16/fp16): a resume keeps it

    def to_checkpoint(self) -> dict[str, Any]:
        out = asdict(self)
        # JSON strings for plain-data trees: weights_only loading accepts them as they are
        out["history"] = json.dumps(self.history)
        out["config"] = json.dumps(self.config)
        out["requested"] = json.dumps(self.requested)
        return out

    @classmethod
    def from_checkpoint(cls, raw: dict[str, Any]) -> TrainState:
        return cls(
            model=raw["model"],
            optimizer=raw["optimizer"],
            scheduler=raw["scheduler"],
            scaler=raw["scaler"],
            epoch=int(raw["epoch"]),
            step_in_epoch=int(raw["step_in_epoch"]),
            global_step=int(raw["global_step"]),
            best=float(raw["best"]),
            stale=int(raw.get("stale", 0)),
            history=json.loads(raw["history"]),
            run_id=raw.get("run_id"),
            config=json.loads(raw["config"]) if "config" in raw else {},
            ranks=list(raw.get("ranks", [])),
            world_size=int(raw.get("world_size", 1)),
            saved_at=float(raw.get("saved_at", 0.0)),
            requested=json.loads(raw["requested"]) if "requested" in raw else {},
            precision=str(raw.get("precision", "")),
        )


def save_state(state: TrainState, path: Path) -> None:
    """Write ``state`` atomically (a reader sees the old file or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state.to_checkpoint(), tmp)


def load_state(path: Path) -> TrainState | None:
    """A checkpoint's state, or None (with a warning) when it is corrupt, partial or not medseg's."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("skipping checkpoint %s: it does not load (%s: %s)", path, type(exc).__name__, exc)
        return None
    if not isinstance(raw, dict) or not {"model", "epoch", "global_step", "history"} <= set(raw):
        log.warning("skipping checkpoint %s: not a medseg training checkpoint", path)
        return None
    try:
        return TrainState.from_checkpoint(raw)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("skipping checkpoint %s: incomplete (%s)", path, exc)
        return None


def find_checkpoint(run_dir: Path, resume: bool | str) -> tuple[Path, TrainState] | None:
    """The checkpoint to resume from: an explicit file, or (``auto``) the valid one furthest along."""
    if isinstance(resume, str) and resume not in ("auto", ""):
        path = Path(resume)
        if path.is_dir():
            return find_checkpoint(path, "auto")
        if not path.is_file():
            raise InputError(path, "checkpoint to resume from does not exist")
        state = load_state(path)
        if state is None:
            raise InputError(path, "checkpoint is corrupt or incomplete; try --resume auto")
        return path, state
    folder = run_dir / "checkpoints"
    candidates = [folder / LAST, folder / TIMED]
    loaded = [(p, s) for p in candidates if p.is_file() for s in [load_state(p)] if s is not None]
    if not loaded:
        if any(p.is_file() for p in candidates):
            raise InputError(folder, "no checkpoint there loads (all corrupt or incomplete)")
        return None
    return max(loaded, key=lambda ps: ps[1].global_step)


def has_checkpoint(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return (folder / LAST).exists() or (folder / TIMED).exists()


def promote(folder: Path, source: str = LAST, target: str = BEST) -> None:
    """Copy ``source`` to ``target`` atomically (best.pt follows last.pt as one unit)."""
    with atomic_path(folder / target) as tmp:
        tmp.write_bytes((folder / source).read_bytes())


def drop(folder: Path, name: str = TIMED) -> None:
    with contextlib.suppress(FileNotFoundError):
        (folder / name).unlink()


# ----------------------------------------------------------------------------- RNG state


def _np_state_to_tensors(state: Any) -> dict[str, Any]:
    return {
        "keys": torch.as_tensor(np.asarray(state[1]).astype(np.int64)),
        "pos": int(state[2]),
        "has_gauss": int(state[3]),
        "gauss": float(state[4]),
    }


def _np_state_from_tensors(d: dict[str, Any]) -> tuple:
    return ("MT19937", d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"])


def random_transforms(root: Any) -> list[Randomizable]:
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
            items = child if isinstance(child, (list, tuple)) else (child,)
            for item in items:
                if isinstance(item, (Transform, Compose)):
                    walk(item)

    walk(root)
    return found


def capture_rng(transforms: Any, generator: torch.Generator | None) -> dict[str, Any]:
    """Global RNGs, every random transform's RNG and the loader generator."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _np_state_to_tensors(np.random.get_state()),
        "python": list(random.getstate()[1]),
        "transforms": [_np_state_to_tensors(t.R.get_state()) for t in random_transforms(transforms)],
    }
    if generator is not None:
        state["loader"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], transforms: Any, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_np_state_from_tensors(state["numpy"]))
    random.setstate((3, tuple(state["python"]), None))
    rts = random_transforms(transforms)
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
