"""What a resumed run may change: the settings asked for now against those the run started with.

A run continues as it was planned. The settings given again on ``train --resume`` (the
``--config`` file, ``--set``, ``--epochs``, ``--fold``) or on a ``demo`` re-run into the same
``--out`` are compared with the run's own: what the user asked for when the run started
(``TrainState.requested``) and, for a key not asked for then, the planned value the run uses
(``TrainState.config``). Then:

- ``train.epochs`` raised extends the run (lowered shortens it, never below the epochs already
  done): the learning-rate schedule (warm-up, then decay) is re-planned for the new total;
- settings that say only how the run executes (device, loader workers, checkpoint cadence,
  cache) take the new value;
- any other change is refused with a ``ConfigError`` listing ``key: old -> new`` and the hint
  to start a new run folder.

A setting not given now keeps the run's value: a plain ``--resume`` always continues.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from medseg.checkpoint import TrainState
from medseg.config import Config, flatten
from medseg.errors import ConfigError

# how the run executes, not what it computes: a resumed run takes the new value
EXECUTION_KEYS = frozenset(
    {
        "train.device",
        "train.num_workers",
        "train.cache",
        "train.checkpoint_every_minutes",
        "train.checkpoint_every_steps",
        "train.memory_budget_gb",  # sizes the plan, which a resumed run keeps
    }
)
EPOCHS = "train.epochs"


def explicit_settings(cfg: Config) -> dict[str, Any]:
    """The settings given explicitly (config file, ``--set``, flags), as dotted keys with JSON values."""

    def given(model: BaseModel) -> dict[str, Any]:
        dumped = model.model_dump(mode="json")
        out: dict[str, Any] = {}
        for name in model.model_fields_set:
            value = getattr(model, name)
            out[name] = given(value) if isinstance(value, BaseModel) else dumped[name]
        return out

    return flatten(given(cfg))


@dataclass(frozen=True)
class Continuation:
    """How a run continues: its configuration with the accepted changes, and what changed."""

    cfg: Config
    requested: dict[str, Any]  # what the run was asked for, updated: stored in its checkpoints
    epochs: tuple[int, int] | None = None  # (planned before, now) when train.epochs changed
    applied: tuple[tuple[str, Any, Any], ...] = ()  # execution settings changed: key, old, new

    def describe(self) -> list[str]:
        """One line per accepted change, for the log and plan.yaml."""
        lines = [f"{key}: {_show(old)} -> {_show(new)}" for key, old, new in self.applied]
        if self.epochs is not None:
            lines.insert(0, f"{EPOCHS}: {self.epochs[0]} -> {self.epochs[1]}")
        return lines


def continue_run(requested: dict[str, Any], state: TrainState, run_dir: Path) -> Continuation:
    """The configuration a resumed run goes on with; a ``ConfigError`` for a change it cannot take."""
    planned = flatten(state.config)
    asked_before = state.requested
    changes: list[tuple[str, Any, Any]] = []
    for key, new in sorted(requested.items()):
        old = asked_before[key] if key in asked_before else planned.get(key, "(unset)")
        if old != new:
            changes.append((key, old, new))
    refused = [c for c in changes if c[0] != EPOCHS and c[0] not in EXECUTION_KEYS]
    epochs = next(((int(planned[EPOCHS]), int(new)) for key, _, new in changes if key == EPOCHS), None)
    if epochs is not None and epochs[0] == epochs[1]:
        epochs = None  # asked for differently before, but what the run plans already
    problems = [f"{key}: {_show(old)} -> {_show(new)}" for key, old, new in refused]
    if epochs is not None:
        if planned.get("train.time_budget_s") is not None:
            problems.insert(0, f"{EPOCHS}: {epochs[0]} -> {epochs[1]} (a time-budgeted run: its budget plans the epochs)")
        elif epochs[1] < state.epoch:
            problems.insert(0, f"{EPOCHS}: {epochs[0]} -> {epochs[1]} (the checkpoint has done {state.epoch} epochs)")
    if problems:
        raise ConfigError(
            f"{run_dir}: resuming cannot change {'; '.join(problems)}. Only {EPOCHS} may change when a run is resumed "
            "(a longer run); to train with other settings, use a new --out"
        )
    applied = tuple((key, planned.get(key), new) for key, _, new in changes if key in EXECUTION_KEYS)
    tree = state.config
    if epochs is not None or applied:
        updates = {key: new for key, _, new in applied}
        if epochs is not None:
            updates[EPOCHS] = epochs[1]
        tree = _with_updates(state.config, updates)
    cfg = Config.model_validate(tree)
    return Continuation(cfg, {**asked_before, **requested}, epochs, applied)


def _with_updates(tree: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(tree)
    for dotted, value in updates.items():
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def _show(value: Any) -> str:
    return "null" if value is None else str(value)
