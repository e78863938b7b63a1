"""Settings on --resume: more epochs extend the run (schedule re-planned), any other change is refused."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.checkpoint import LAST, TrainState, load_state
from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.resume import continue_run, explicit_settings
from tests.helpers import TINY_ARGS, TINY_OVERRIDES

FAST = [
    *TINY_ARGS,
    *("--set", "train.val_surface_metrics=false"),
    *("--set", "tracking.log_model=false"),
    *("--set", "postprocess.tune_on_validation=false"),
]


def _state(cfg_overrides: list[str], *, epoch: int, requested: dict | None = None) -> TrainState:
    planned = load_config(None, cfg_overrides).model_dump(mode="json")
    return TrainState(model={}, optimizer={}, scheduler={}, scaler={}, epoch=epoch, step_in_epoch=0,
                      global_step=epoch * 3, best=-1.0, stale=0, history=[], run_id=None, config=planned,
                      ranks=[], requested=requested if requested is not None else {})


def _asked(*overrides: str) -> dict:
    return explicit_settings(load_config(None, list(overrides)))


def test_plain_resume_keeps_the_run_settings(tmp_path):
    state = _state([*TINY_OVERRIDES, "train.epochs=4", "train.lr=0.01"], epoch=2,
                   requested=_asked(*TINY_OVERRIDES, "train.epochs=4", "train.lr=0.01"))
    going_on = continue_run({}, state, tmp_path)
    assert going_on.cfg.train.lr == 0.01
    assert going_on.cfg.train.epochs == 4
    assert going_on.epochs is None
    assert going_on.describe() == []
    # the same command again: nothing changes either
    again = continue_run(_asked(*TINY_OVERRIDES, "train.epochs=4", "train.lr=0.01"), state, tmp_path)
    assert again.describe() == []


def test_changed_settings_are_listed_and_refused(tmp_path):
    state = _state([*TINY_OVERRIDES, "train.epochs=4"], epoch=2, requested=_asked("train.epochs=4"))
    with pytest.raises(ConfigError) as err:
        continue_run(_asked("train.epochs=6", "train.lr=0.01", "model.depth=3"), state, tmp_path)
    message = str(err.value)
    assert "train.lr: 0.002 -> 0.01" in message
    assert "model.depth: 2 -> 3" in message
    assert "new --out" in message
    assert "train.epochs: 4 -> 6" not in message  # more epochs alone would have been accepted
    assert "\n" not in message


def test_epochs_below_the_checkpoint_are_refused_and_above_extend(tmp_path):
    state = _state([*TINY_OVERRIDES, "train.epochs=4"], epoch=3)
    with pytest.raises(ConfigError, match=r"train.epochs: 4 -> 2 \(the checkpoint has done 3 epochs\)"):
        continue_run(_asked("train.epochs=2"), state, tmp_path)
    going_on = continue_run(_asked("train.epochs=9", "train.num_workers=1"), state, tmp_path)
    assert going_on.epochs == (4, 9)
    assert going_on.cfg.train.epochs == 9
    assert going_on.cfg.train.num_workers == 1
    assert going_on.describe() == ["train.epochs: 4 -> 9", "train.num_workers: 0 -> 1"]
    assert going_on.requested["train.epochs"] == 9  # what later resumes compare with


def test_time_budgeted_run_refuses_more_epochs(tmp_path):
    state = _state([*TINY_OVERRIDES, "train.epochs=20", "train.time_budget_s=600"], epoch=3)
    with pytest.raises(ConfigError, match="time-budgeted"):
        continue_run(_asked("train.epochs=40"), state, tmp_path)


@pytest.mark.slow
def test_resume_with_more_epochs_extends_the_run(tiny_dataset, tmp_path, capsys):
    from medseg.cli import main

    args = ["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), *FAST]
    assert main([*args, "--epochs", "2"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / LAST
    assert load_state(ckpt).epoch == 2

    # a changed lr is refused, naming the key, in one line with exit 2; so are fewer epochs than done
    capsys.readouterr()
    assert main([*args, "--resume", "--epochs", "2", "--set", "train.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "train.lr: 0.002 -> 0.01" in err
    assert "new --out" in err
    assert main([*args, "--resume", "--epochs", "1"]) == 2
    assert "train.epochs: 2 -> 1" in capsys.readouterr().err
    assert load_state(ckpt).epoch == 2, "a refused resume must not touch the run"

    assert main([*args, "--resume", "--epochs", "3"]) == 0
    state = load_state(ckpt)
    assert state.epoch == 3
    assert len(state.history) == 3
    assert state.config["train"]["epochs"] == 3
    assert state.requested["train.epochs"] == 3
    # the third epoch's lr follows cosine decay planned over 3 epochs (over 2 it would have been 0)
    lr = state.config["train"]["lr"]
    assert [h["lr"] for h in state.history] == pytest.approx(
        [lr, lr * 0.5 * (1 + math.cos(math.pi / 2)), lr * 0.5 * (1 + math.cos(2 * math.pi / 3))]
    )
    plan = (tmp_path / "run" / "plan.yaml").read_text()
    assert "# resumed at epoch 2 with: train.epochs: 2 -> 3" in plan
    assert "epochs: 3" in plan

    import mlflow

    run = mlflow.MlflowClient().get_run(state.run_id)
    assert run.data.params[f"resumed_at_step_{2 * state.history[0]['steps']:.0f}.train.epochs"] == "2 -> 3"
    assert run.data.params["train.epochs"] == "2"  # the run's start, as it was
    assert torch.load(ckpt, weights_only=True)["epoch"] == 3
