"""Training options end to end at tiny sizes: DynUNet with deep supervision, SGD + poly, CPU bf16,
class-balanced crop, disk cache, k-fold splits, early stopping."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from medseg.config import Config, load_config
from medseg.data import load_dataset, split_cases
from medseg.train import train
from tests.helpers import TINY_OVERRIDES


def _cfg(**sections) -> Config:
    overrides = [*TINY_OVERRIDES, "train.val_surface_metrics=false", "tracking.enabled=false"]
    overrides += [f"{name}.{key}={json.dumps(value)}" for name, values in sections.items() for key, value in values.items()]
    return load_config(None, overrides)


@pytest.mark.slow
def test_dynunet_sgd_bf16_fold_early_stopping(tiny_dataset, tmp_path):
    cfg = _cfg(
        model={"name": "dynunet", "deep_supervision": True},
        train={
            "epochs": 3,
            "optimizer": "sgd",
            "lr": 0.01,
            "cpu_bf16": True,
            "cache": "disk",
            "fold": 1,
            "num_folds": 3,
            "early_stopping_patience": 1,
            "iterations_per_epoch": 3,
        },
        augment={"crop": "label_classes"},
    )
    result = train(cfg, tiny_dataset, out_dir=tmp_path / "run")
    assert result.config.train.scheduler == "poly"
    assert (tmp_path / "run" / "bundle" / "model.safetensors").is_file()
    assert any((tmp_path / "run" / "cache").iterdir()), "disk cache under the run folder"
    # the k-fold split is written to the run and is the one split_cases gives
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    _, val = split_cases(load_dataset(tiny_dataset).training, seed=0, fold=1, num_folds=3)
    assert splits["fold"] == 1
    assert splits["val"] == [c.name for c in val]
    # 3 steps of batch 2 per epoch (the shard has 2 cases), one patch per case
    assert [h["steps"] for h in result.history] == [3] * len(result.history)
    # poly decay per epoch: lr_e = lr * (1 - e / epochs) ** 0.9
    lrs = [h["lr"] for h in result.history]
    assert lrs[:2] == pytest.approx([0.01, 0.01 * (2 / 3) ** 0.9])
    from medseg.bundle import load_bundle

    bundle = load_bundle(result.bundle)
    assert type(bundle.network).__name__ == "DeepSupervisionUNet"
    out = bundle.network(torch.zeros(1, 1, 16, 16, 16))
    assert out.shape == (1, 4, 16, 16, 16)  # eval mode: the main head only


def test_deep_supervision_heads_in_training_mode():
    from medseg.config import ModelConfig
    from medseg.models import build_model, deep_supervision_weights

    net = build_model(ModelConfig(name="dynunet", features=4, depth=3), out_channels=3)
    net.train()
    y = net(torch.zeros(2, 1, 16, 16, 16))
    assert y.shape == (2, 3, 16, 16, 16)
    assert len(net.aux_outputs) == 2
    assert all(a.shape == y.shape for a in net.aux_outputs)
    assert sum(deep_supervision_weights(2)) == pytest.approx(1.0)
    net.eval()
    net(torch.zeros(1, 1, 16, 16, 16))
    assert net.aux_outputs == []


@pytest.mark.slow
def test_early_stopping_stops_on_a_plateau(tiny_dataset, tmp_path):
    """A learning rate too small to move the weights: the validation Dice stays put, training stops."""
    cfg = _cfg(train={"epochs": 6, "lr": 1e-12, "early_stopping_patience": 2, "iterations_per_epoch": 1})
    result = train(cfg, tiny_dataset, out_dir=tmp_path / "run")
    dices = [h["val_dice"] for h in result.history]
    assert len(set(dices)) == 1, f"not a plateau: {dices}"
    # the first validation sets the best, the next two are no better: stop after epoch 3 of 6
    assert len(result.history) == 3


def test_each_epoch_line_says_the_time_left_for_logs_without_a_progress_bar(tiny_dataset, tmp_path, caplog):
    """A batch job's log file has no progress bar: each epoch's line but the last says how long is left."""
    import logging
    import re

    cfg = _cfg(train={"epochs": 3, "iterations_per_epoch": 1, "val_every": 3})
    with caplog.at_level(logging.INFO, logger="medseg.train"):
        train(cfg, tiny_dataset, out_dir=tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all(re.search(r", about \d+ (s|min) left\)$", line) for line in lines[:2]), lines
    assert "left" not in lines[2]


def test_training_layout_is_measured_on_a_copy_and_cached(tmp_path, monkeypatch):
    """fp32 on CPU: channels-last or not is measured on this machine for this network and shape
    (on a copy: the network's own weights and layout are untouched), then read from the cache."""
    import medseg.runtime as rt
    from medseg.config import ModelConfig
    from medseg.models import build_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    net = build_model(ModelConfig(name="monai_unet", features=4, depth=2), out_channels=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cpu = torch.device("cpu")
    use, why = rt.training_channels_last(net, (2, 1, 16, 16, 16), 3, cpu, "fp32")
    assert "measured at" in why
    assert ("channels-last 3D" in why) == use
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None and p.is_contiguous() for p in net.parameters())
    cached = json.loads(next((tmp_path / "cache" / "medseg").glob("train-layout-*.json")).read_text())
    (ratio,) = cached["entries"].values()
    assert 0.1 < ratio < 10.0
    again, why_again = rt.training_channels_last(net, (2, 1, 16, 16, 16), 3, cpu, "fp32")
    assert again == use
    assert "cached at" in why_again
    # another shape or precision is another measurement; a setting, CUDA and 2D are not measured
    assert "measured" in rt.training_channels_last(net, (1, 1, 16, 16, 16), 3, cpu, "fp32")[1]
    use_bf16, why_bf16 = rt.training_channels_last(net, (2, 1, 16, 16, 16), 3, cpu, "bf16")
    assert "measured at" in why_bf16
    assert why_bf16.endswith(", bf16)")
    assert ("channels-last 3D" in why_bf16) == use_bf16
    assert len(json.loads(next((tmp_path / "cache" / "medseg").glob("train-layout-*.json")).read_text())["entries"]) == 3
    assert rt.training_channels_last(net, (2, 1, 16, 16, 16), 3, cpu, "fp32", requested="contiguous")[0] is False
    assert rt.training_channels_last(net, (2, 1, 16, 16), 3, cpu, "fp32")[0] is False
    assert rt.training_channels_last(net, (2, 1, 16, 16, 16), 3, torch.device("cuda"), "fp32")[0] is False


@pytest.mark.parametrize(("step_s", "steps"), [(0.5, 10), (3.0, 8), (12.0, 4)])
def test_the_layout_measurement_takes_fewer_steps_the_slower_a_step_is(monkeypatch, step_s, steps):
    """Quick steps: two untimed pairs, then three timed; a first pair of 2 s or more is warm-up enough;
    one of 20 s or more leaves a single timed pair (a 192x160x48 x 3 patch took 181 s to measure)."""
    import copy
    import time

    import medseg.runtime as rt
    from medseg.config import ModelConfig
    from medseg.models import build_model

    now = [0.0]

    def clock() -> float:  # a step reads step_s: its start and end are two readings apart by that
        now[0] += step_s
        return now[0]

    forwards = []
    real_deepcopy = copy.deepcopy

    def copy_that_counts(obj, *args, **kwargs):  # the measurement steps a copy of the network
        clone = real_deepcopy(obj, *args, **kwargs)
        if isinstance(obj, torch.nn.Module):
            clone.register_forward_hook(lambda *_: forwards.append(1))
        return clone

    net = build_model(ModelConfig(name="monai_unet", features=4, depth=2), out_channels=3)
    monkeypatch.setattr(copy, "deepcopy", copy_that_counts)
    monkeypatch.setattr(time, "perf_counter", clock)
    ratio = rt.measure_channels_last_speedup(net, (1, 1, 16, 16, 16), 3)
    monkeypatch.undo()
    assert ratio == pytest.approx(1.0)
    assert len(forwards) == steps


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_training_follows_the_memory_format_setting(tiny_dataset, tmp_path, layout):
    """``train.memory_format`` pins the layout: the run trains in it and the bundle says which."""
    from medseg.bundle import load_bundle

    cfg = _cfg(train={"epochs": 1, "iterations_per_epoch": 2, "memory_format": layout})
    result = train(cfg, tiny_dataset, out_dir=tmp_path / "run")
    assert result.history[-1]["train_loss"] > 0
    meta = load_bundle(result.bundle).metadata
    assert meta["train_memory_format"] == {"channels_last": "channels_last_3d", "contiguous": "contiguous"}[layout]


def test_budget_planner_times_steps_in_the_layout_training_will_use(tmp_path, monkeypatch):
    """The planner's warm-up asks the trainer's layout choice (on a CPU in fp32 both layouts measured)
    and times its step in that layout; the ratio it measured is what the trainer then reads."""
    import medseg.runtime as rt
    from medseg.config import Config
    from medseg.models import build_model
    from medseg.plan import measure_step_seconds

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = Config.model_validate({"model": {"name": "monai_unet", "features": 4, "depth": 2},
                                 "train": {"precision": "fp32"}})
    seconds = measure_step_seconds(cfg, (16, 16, 16), 2, 4, out_channels=3, device="cpu")
    assert 0.0 < seconds < 30.0
    layout_file = next((tmp_path / "cache" / "medseg").glob("train-layout-*.json"))
    (ratio,) = json.loads(layout_file.read_text())["entries"].values()
    assert 0.1 < ratio < 10.0
    net = build_model(cfg.model, out_channels=3)
    use, why = rt.training_channels_last(net, (2, 1, 16, 16, 16), 3, torch.device("cpu"), "fp32")
    assert "cached at" in why  # the trainer's network and shape are the planner's: no second measurement
    assert use == (ratio >= rt.LAYOUT_MIN_SPEEDUP)
    # a pinned layout is the only one timed, and nothing is cached for it
    pinned = cfg.model_copy(update={"train": cfg.train.model_copy(update={"memory_format": "contiguous"})})
    layout_file.unlink()
    assert measure_step_seconds(pinned, (16, 16, 16), 2, 4, out_channels=3, device="cpu") > 0.0
    assert not list((tmp_path / "cache" / "medseg").glob("train-layout-*.json"))


def test_the_budget_warm_up_times_bf16_channels_last_without_measuring_both_layouts(tmp_path, monkeypatch):
    """The A/B layout measurement per candidate size doubled an 11-minute run's warm-up in bf16
    (19 -> 48 s); the planner times bf16 channels-last and leaves the A/B to the trainer."""
    import medseg.runtime as rt
    from medseg.config import Config
    from medseg.plan import measure_step_seconds

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    measured = []
    monkeypatch.setattr(rt, "measure_channels_last_speedup", lambda *a, **k: measured.append(k) or 1.0)
    bf16 = Config.model_validate({"model": {"name": "monai_unet", "features": 4, "depth": 2},
                                  "train": {"precision": "bf16"}})
    assert measure_step_seconds(bf16, (16, 16, 16), 2, 4, out_channels=3, device="cpu") > 0.0
    assert measured == []
    fp32 = bf16.model_copy(update={"train": bf16.train.model_copy(update={"precision": "fp32"})})
    measure_step_seconds(fp32, (16, 16, 16), 2, 4, out_channels=3, device="cpu")
    assert measured == [{"precision": "fp32"}]


def test_the_warm_up_times_a_multi_channel_network_on_input_of_that_many_channels():
    """A two-channel dataset (T1 + T2) with --time-budget: the warm-up fed the 2-channel network
    one channel and training ended in a RuntimeError from the first convolution."""
    from medseg.config import Config
    from medseg.plan import measure_step_seconds

    cfg = Config.model_validate({"model": {"name": "monai_unet", "features": 4, "depth": 2, "in_channels": 2},
                                 "train": {"precision": "fp32", "memory_format": "contiguous"}})
    assert measure_step_seconds(cfg, (16, 16, 16), 2, 4, out_channels=3, device="cpu") > 0.0


def test_the_warm_up_takes_the_fastest_timed_step_so_a_burst_of_other_work_does_not_move_the_plan(monkeypatch):
    """One untimed step, then three timed ones: a step slowed by other work on a shared machine
    (here the second, 5 s) does not count; the mean of two would have said 2.6 s."""
    import time

    from medseg.config import Config
    from medseg.plan import measure_step_seconds

    durations = iter([1.0, 0.2, 5.0, 0.25])  # the untimed first step, then the three timed
    calls, now = [0], [100.0]

    def clock() -> float:  # start and end of each step, in turn
        calls[0] += 1
        if calls[0] % 2 == 0:
            now[0] += next(durations)
        return now[0]

    cfg = Config.model_validate({"model": {"name": "monai_unet", "features": 4, "depth": 2},
                                 "train": {"precision": "fp32", "memory_format": "contiguous"}})
    monkeypatch.setattr(time, "perf_counter", clock)
    seconds = measure_step_seconds(cfg, (16, 16, 16), 2, 4, out_channels=3, device="cpu")
    monkeypatch.undo()
    assert seconds == pytest.approx(0.2)
    assert calls[0] == 8, "four steps, each timed from its start to its end"


def test_the_bundle_holds_the_final_model_unless_the_best_was_clearly_better():
    """nnU-Net ships its final checkpoint: on two validation cases an early 'best' is often chance.
    The final model replaces it in the bundle when within FINAL_MODEL_TOLERANCE of the best."""

    from medseg.train import FINAL_MODEL_TOLERANCE, Trainer

    def bundle_after(history: list[dict], best: float) -> list[int]:
        saved: list[int] = []
        trainer = SimpleNamespace(history=history, best=best, labels={0: "background", 1: "liver"},
                                  label_ids=[0, 1], _save_bundle=lambda epoch, per_label: saved.append(epoch))
        Trainer._prefer_final_model(trainer)
        return saved

    early_best = {"epoch": 4, "val_dice": 0.866, "val_dice_liver": 0.866}
    assert bundle_after([early_best, {"epoch": 11, "val_dice": 0.858, "val_dice_liver": 0.858}], 0.866) == [11]
    clearly_worse = 0.866 - FINAL_MODEL_TOLERANCE - 0.001
    assert bundle_after([early_best, {"epoch": 11, "val_dice": clearly_worse}], 0.866) == []
    assert bundle_after([{"epoch": 11, "val_dice": 0.9}], 0.9) == []  # the final is the best: written already
    assert bundle_after([early_best, {"epoch": 5, "train_loss": 0.5}], 0.866) == []  # last epoch not validated


def test_a_label_the_model_has_not_learned_is_warned_about(tmp_path, caplog):
    """A tiny organ can stay unlearned in a short training (the demo's spleen on one seed) while the
    mean Dice looks like a result: the label is named in a warning, the learned ones are not."""
    import logging

    from medseg.train import UNLEARNED_DICE, Trainer

    (tmp_path / "metadata.json").write_text(json.dumps(
        {"val_dice": {"liver": 0.94, "kidney": UNLEARNED_DICE, "spleen": 0.0, "pancreas": None}}))
    with caplog.at_level(logging.WARNING, logger="medseg.train"):
        Trainer._warn_unlearned(SimpleNamespace(bundle_dir=tmp_path))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert "'spleen' scores Dice 0.000" in warned[0]
    assert "has not learned it" in warned[0]
    caplog.clear()
    Trainer._warn_unlearned(SimpleNamespace(bundle_dir=tmp_path / "none"))  # no bundle written: nothing to say
    assert not caplog.records


def test_the_dice_term_is_over_the_batch_and_the_foreground_unless_configured_otherwise():
    """A class absent from one patch but present in another: per sample, every faint probability of
    it in the patch without it is a Dice of ~0 for that patch (MONAI's default); over the batch it
    costs only what it takes from the Dice of the class where it is."""
    from medseg.train import make_loss

    label = torch.zeros((2, 1, 8, 8, 8))
    label[:, :, 2:6, 2:6, 2:6] = 1
    label[1, :, 4:8, 4:8, 0:2] = 2  # class 2 only in the second patch
    logits = 8.0 * torch.nn.functional.one_hot(label[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float()
    logits[0, 2] = 3.0  # the first patch: a faint probability of class 2 everywhere (~0.007)
    by_batch = make_loss(_cfg())
    per_sample = make_loss(_cfg(train={"dice_over": "sample", "dice_background": True}))
    assert by_batch.dice.batch
    assert not by_batch.dice.include_background
    assert not per_sample.dice.batch
    assert per_sample.dice.include_background
    assert float(by_batch(logits, label)) < 0.5 * float(per_sample(logits, label))


def _nan_loss_at(monkeypatch, steps) -> None:
    """The training loss is NaN at these (1-based) steps, every term of it (deep supervision adds
    one per auxiliary head): its gradients are then NaN everywhere, as a bf16 convolution's weight
    gradient came out at a 2 x 2 x 1 bottleneck."""
    import medseg.train as mt

    real, real_step, step = mt.make_loss, mt.Trainer._step, [0]

    def counted(self, batch):
        step[0] += 1
        return real_step(self, batch)

    def make(cfg):
        loss_fn = real(cfg)

        def loss(logits, label):
            value = loss_fn(logits, label)
            return value * float("nan") if step[0] in steps else value

        return loss

    monkeypatch.setattr(mt, "make_loss", make)
    monkeypatch.setattr(mt.Trainer, "_step", counted)


def _weights_finite(bundle) -> bool:
    from medseg.bundle import load_bundle

    return all(bool(torch.isfinite(p).all()) for p in load_bundle(bundle).network.state_dict().values())


def test_a_step_with_non_finite_gradients_is_skipped_and_the_weights_stay_finite(tiny_dataset, tmp_path, monkeypatch):
    """Applied, one such step made every weight NaN: the run went on with loss nan, validated Dice 0
    and shipped a bundle that predicts nothing, exit 0."""
    _nan_loss_at(monkeypatch, {2, 3})
    cfg = _cfg(train={"epochs": 2, "iterations_per_epoch": 4, "precision": "fp32",
                      "val_every": 2}, postprocess={"tune_on_validation": False})
    result = train(cfg, tiny_dataset, out_dir=tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in result.history)
    assert _weights_finite(result.bundle)
    meta = json.loads((result.bundle / "metadata.json").read_text())
    assert meta["skipped_nonfinite_steps"] == 2
    assert meta["precision"] == "fp32"


def test_bf16_training_goes_on_in_fp32_after_a_few_non_finite_steps(tiny_dataset, tmp_path, monkeypatch, caplog):
    from medseg.train import NONFINITE_BF16_LIMIT

    _nan_loss_at(monkeypatch, set(range(1, NONFINITE_BF16_LIMIT + 1)))
    cfg = _cfg(train={"epochs": 1, "iterations_per_epoch": NONFINITE_BF16_LIMIT + 2, "precision": "bf16"},
               postprocess={"tune_on_validation": False})
    with caplog.at_level("WARNING", logger="medseg"):
        result = train(cfg, tiny_dataset, out_dir=tmp_path / "run")
    meta = json.loads((result.bundle / "metadata.json").read_text())
    assert meta["precision"] == "fp32"
    assert "non-finite bf16 gradients" in meta["precision_note"]
    assert any("trains in fp32" in r.getMessage() for r in caplog.records)
    assert _weights_finite(result.bundle)
    assert result.history[-1]["train_loss"] > 0  # the two steps after the switch trained


def test_a_run_whose_gradients_stay_non_finite_stops_with_one_line(tiny_dataset, tmp_path, monkeypatch):
    from medseg.train import NONFINITE_RUN_LIMIT, DivergedError

    _nan_loss_at(monkeypatch, set(range(1, 1000)))
    cfg = _cfg(train={"epochs": 1, "iterations_per_epoch": NONFINITE_RUN_LIMIT + 5, "precision": "fp32"})
    with pytest.raises(DivergedError, match=rf"diverged: {NONFINITE_RUN_LIMIT} steps in a row .* lower train\.lr"):
        train(cfg, tiny_dataset, out_dir=tmp_path / "run")


def test_training_and_the_budget_warm_up_guard_the_network(tiny_dataset, tmp_path, monkeypatch):
    import medseg.kernels
    from medseg.plan import measure_step_seconds

    guarded: list[int] = []
    real = medseg.kernels.fp32_on_thin_maps

    def spy(network):
        guarded.append(real(network))
        return guarded[-1]

    monkeypatch.setattr(medseg.kernels, "fp32_on_thin_maps", spy)  # what training_stand_ins calls
    cfg = _cfg(train={"epochs": 1, "iterations_per_epoch": 1, "precision": "fp32"},
               postprocess={"tune_on_validation": False})
    train(cfg, tiny_dataset, out_dir=tmp_path / "run")
    assert len(guarded) == 1
    assert guarded[0] > 0
    planned = cfg.model_copy(update={"model": cfg.model.model_copy(update={"in_channels": 1})})
    measure_step_seconds(planned, (16, 16, 16), 1, 4, out_channels=2, device="cpu")
    assert len(guarded) == 2
    assert guarded[1] > 0


def test_gradients_are_clipped_to_the_limit_only_when_over_it():
    from medseg.train import Trainer

    net = torch.nn.Linear(4, 3)
    holder = SimpleNamespace(network=net, device=torch.device("cpu"),
                             cfg=SimpleNamespace(train=SimpleNamespace(grad_clip=1.0)))
    for scale, clipped in ((0.1, False), (10.0, True)):
        for p in net.parameters():
            p.grad = torch.full_like(p, scale)
        before = torch.cat([p.grad.flatten() for p in net.parameters()])
        norm = Trainer._clip_gradients(holder)
        after = torch.cat([p.grad.flatten() for p in net.parameters()])
        assert float(norm) == pytest.approx(float(before.norm()))
        if clipped:
            assert float(after.norm()) == pytest.approx(1.0, rel=1e-4)
        else:
            assert torch.equal(after, before)
