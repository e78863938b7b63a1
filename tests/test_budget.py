"""Time budget: duration parsing, the candidate choice, the lr schedule, and a real run that ends in time."""

from __future__ import annotations

import json
import logging

import pytest

from medseg.config import Config
from medseg.data import Fingerprint
from medseg.errors import ConfigError
from medseg.plan import (
    CPU_DEFAULT_BUDGET_S,
    MAX_CONTEXT_COARSENING,
    MIN_STEPS,
    Candidate,
    _fit_to_budget,
    candidate_patches,
    choose_candidate,
    context_spacing,
    lr_factor,
    make_plan,
    parse_duration,
    plan_for_budget,
    resolve_budget,
)

FP = Fingerprint.model_validate(
    {
        "n_cases": 10,
        "modality": "CT",
        "labels": {"0": "background", "1": "organ"},
        "hash": "0" * 16,
        "spacing_median": [1.0, 1.0, 2.5],
        "spacing_min": [0.8, 0.8, 2.0],
        "spacing_max": [1.2, 1.2, 5.0],
        "spacing_p10": [0.9, 0.9, 2.0],
        "extent_mm_median": [200.0, 160.0, 120.0],
        "foreground_intensity": {"mean": 80.0, "std": 40.0, "p00_5": -50.0, "p99_5": 250.0},
        "label_voxels": {"0": 90000, "1": 10000},
    }
)


def _monai_unet_in_600_s() -> Config:
    """A 10-minute budget for MONAI's UNet at width 16: one network, so the warm-up measures sizes only."""
    return Config.model_validate(
        {"train": {"time_budget_s": 600, "memory_budget_gb": 4}, "model": {"name": "monai_unet", "features": 16}}
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1.5h", 5400), ("1h30m", 5400), (60, 60)]
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "fast", "15 minutes", "0m", "-5m"])
def test_parse_duration_refuses_what_it_cannot_read(text):
    with pytest.raises(ConfigError, match="time budget"):
        parse_duration(text)


def test_budget_given_default_on_cpu_and_none_when_the_user_chose_epochs():
    assert resolve_budget(Config.model_validate({"train": {"time_budget_s": 300}}), "cuda")[0] == 300
    budget, why = resolve_budget(Config(), "cpu")
    assert budget == CPU_DEFAULT_BUDGET_S
    assert "default" in why
    assert resolve_budget(Config.model_validate({"train": {"epochs": 3}}), "cpu")[0] is None
    # on a CPU the reason says what was given and what was planned for the CPU's speed
    assert resolve_budget(Config.model_validate({"train": {"epochs": 3}}), "cpu")[1].startswith(
        "none (epochs given): patch, batch and width measured on this CPU as for a 15-min budget")
    assert resolve_budget(Config.model_validate({"train": {"patch_size": [32, 32, 16]}}), "cpu")[1].startswith(
        "none (patch_size given): the given patch, not planned by this CPU's speed")
    assert resolve_budget(Config.model_validate({"train": {"epochs": 3}}), "cuda")[1] == "none: fingerprint plan"
    assert resolve_budget(Config(), "cuda")[0] is None


def test_candidate_patches_shrink_from_the_fingerprint_patch_and_stay_divisible():
    patches = candidate_patches((160.0, 128.0, 48.0), 16)
    assert patches[-1] == (160, 128, 48)
    assert all(p % 16 == 0 for patch in patches for p in patch)
    volumes = [a * b * c for a, b, c in patches]
    assert volumes == sorted(volumes)
    assert len(set(patches)) == len(patches) >= 3


def test_choice_takes_the_largest_patch_that_still_gets_enough_steps():
    small = Candidate((32, 32, 16), 2, 16, 0.1)
    mid = Candidate((64, 64, 32), 2, 16, 0.5)
    big = Candidate((128, 128, 48), 2, 16, 3.0)
    chosen, why = choose_candidate([small, mid, big], train_s=600, min_steps=1000)
    assert chosen == mid
    assert "largest patch" in why
    chosen, _ = choose_candidate([small, mid, big], train_s=36000, min_steps=1000)
    assert chosen == big  # ten hours: context wins
    chosen, why = choose_candidate([mid, big], train_s=60, min_steps=1000)
    assert chosen == mid
    assert "no candidate" in why


def test_lr_warms_up_then_decays_to_zero_and_time_progress_wins_when_further():
    kw = {"warmup_fraction": 0.1, "kind": "cosine"}
    assert lr_factor(0, 100, **kw) < 0.05
    assert lr_factor(10, 100, **kw) == pytest.approx(1.0)
    assert lr_factor(55, 100, **kw) == pytest.approx(0.5, abs=0.01)
    assert lr_factor(100, 100, **kw) == pytest.approx(0.0, abs=1e-9)
    # a run slower than planned: at step 20 of 100 but 90 % of the time gone
    assert lr_factor(20, 100, progress=0.9, **kw) < 0.05


def test_a_warm_up_shorter_than_an_epoch_does_not_spend_the_first_epoch_at_no_lr():
    from medseg.train import _schedule

    # a budget-planned config (3 % warm-up) retrained with --epochs 30: the first epoch at the full lr
    per_epoch = _schedule(Config.model_validate({"train": {"epochs": 30, "lr_warmup_fraction": 0.03, "scheduler": "cosine"}}))
    assert per_epoch(0) == pytest.approx(1.0)
    assert per_epoch(15) == pytest.approx(lr_factor(15, 30, warmup_fraction=0.03, kind="cosine"))
    # a warm-up of several epochs still ramps: 10 % of 40 epochs is 4
    ramp = _schedule(Config.model_validate({"train": {"epochs": 40, "lr_warmup_fraction": 0.1}}))
    assert [ramp(e) for e in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert ramp(39) < 0.05


def _timed(dynunet_slower: float, scale: float = 1e-6):
    """A fake step timer: time grows with the patch, the batch and the width; DynUNet this much slower."""
    calls: list[tuple[str | None, int, tuple[int, int, int]]] = []

    def measure(cfg, patch, batch, features, *, out_channels, device, time_limit_s=None, model_name=None):
        calls.append((model_name, features, patch))
        slower = dynunet_slower if model_name == "dynunet" else 1.0
        return scale * patch[0] * patch[1] * patch[2] * batch * features / 16 * slower

    return measure, calls


def test_epochs_on_a_cpu_train_a_patch_measured_for_its_speed_for_the_epochs_given():
    """``--epochs`` without a budget or patch on a CPU: the patch, batch and width the default budget
    would measure, the user's epochs at a tenth of that budget's steps each, no deadline; a GPU and a
    given patch keep the fingerprint plan."""
    calls = []

    def fake_measure(cfg, patch, batch, features, *, out_channels, device, time_limit_s=None, model_name=None):
        calls.append(patch)
        return 1e-6 * patch[0] * patch[1] * patch[2] * batch * features / 16

    cfg = Config.model_validate({"train": {"epochs": 7, "memory_budget_gb": 4}})
    fingerprint_patch = make_plan(cfg, FP).train.patch_size
    planned, plan = plan_for_budget(cfg, FP, device="cpu", out_channels=4, measure=fake_measure)
    assert plan is not None
    assert plan.for_epochs
    assert calls
    tr = planned.train
    assert tr.epochs == 7  # the user's epochs
    assert tr.time_budget_s is None  # no deadline
    assert tuple(int(p) for p in tr.patch_size) == plan.chosen.patch != tuple(int(p) for p in fingerprint_patch)
    assert tr.iterations_per_epoch == plan.iterations_per_epoch > 1
    # an epoch: a tenth of the steps the default budget plans (the same measurements: the same choice)
    default = plan_for_budget(Config.model_validate({"train": {"memory_budget_gb": 4}}), FP, device="cpu",
                              out_channels=4, measure=fake_measure)[1]
    assert default is not None
    assert default.chosen == plan.chosen
    assert tr.iterations_per_epoch == pytest.approx(default.steps / 10, rel=0.01)
    assert tr.val_every == 2  # 5 validations over 7 epochs, at most
    assert "budget.seconds" not in plan.params()
    assert plan.summary().startswith("  budget     none (epochs given): patch, batch and width measured")
    assert f": 7 epochs of {tr.iterations_per_epoch} steps of" in plan.summary()
    assert plan.steps == 7 * tr.iterations_per_epoch
    # iterations and validation cadence the user gave are kept
    own = Config.model_validate({"train": {"epochs": 3, "iterations_per_epoch": 5, "val_every": 1}})
    planned, _ = plan_for_budget(own, FP, device="cpu", out_channels=4, measure=fake_measure)
    assert (planned.train.epochs, planned.train.iterations_per_epoch, planned.train.val_every) == (3, 5, 1)
    # a GPU, or a patch given, is not measured
    calls.clear()
    assert plan_for_budget(cfg, FP, device="cuda", out_channels=4, measure=fake_measure)[1] is None
    patch = Config.model_validate({"train": {"epochs": 7, "patch_size": [32, 32, 16]}})
    assert plan_for_budget(patch, FP, device="cpu", out_channels=4, measure=fake_measure)[1] is None
    assert not calls


def test_with_more_classes_than_half_the_default_width_the_plan_takes_monai_unet():
    """DynUNet (the default) at half width, 8 features, missed four of ten organs in 90 s where
    MONAI's UNet at 16 learned all ten (benchmarks/README.md)."""
    cfg = Config.model_validate({"train": {"time_budget_s": 600, "memory_budget_gb": 4}})
    measure, calls = _timed(dynunet_slower=2.0)
    planned, plan = plan_for_budget(cfg, FP, device="cpu", out_channels=11, measure=measure)
    assert plan is not None
    assert {(c[0], c[1]) for c in calls} == {("monai_unet", 16)}
    assert (planned.model.name, planned.model.features) == ("monai_unet", 16)
    # up to 8 output channels: DynUNet at both widths
    calls.clear()
    planned, _ = plan_for_budget(cfg, FP, device="cpu", out_channels=8, measure=measure)
    assert {(c[0], c[1]) for c in calls} == {("dynunet", 16), ("dynunet", 8)}
    assert planned.model.name == "dynunet"
    # a network the user named is kept, however many classes, at a width no narrower than them
    calls.clear()
    named = Config.model_validate(
        {"train": {"time_budget_s": 600, "memory_budget_gb": 4}, "model": {"name": "dynunet"}}
    )
    planned, _ = plan_for_budget(named, FP, device="cpu", out_channels=11, measure=measure)
    assert {(c[0], c[1]) for c in calls} == {("dynunet", 16)}
    assert (planned.model.name, planned.model.features) == ("dynunet", 16)


def test_a_warm_up_that_shared_the_machine_says_so(caplog):
    """A warm-up whose process got little CPU time (here: measurements that wait instead of compute, as
    a process does behind busy neighbours) plans from slow step times; the plan says so, in its reason
    and as a warning, so a small patch is not taken for this machine's best."""
    import time

    def waiting_measure(cfg, patch, batch, features, *, out_channels, device, time_limit_s=None, model_name=None):
        time.sleep(0.15)  # wall time, no CPU
        return 1e-6 * patch[0] * patch[1] * patch[2] * batch * features / 16

    caplog.set_level(logging.WARNING, logger="medseg.plan")
    cfg = Config.model_validate({"train": {"time_budget_s": 600, "memory_budget_gb": 4}})
    _, plan = plan_for_budget(cfg, FP, device="cpu", out_channels=4, measure=waiting_measure)
    assert plan is not None
    assert "CPUs; other work was running)" in plan.why
    assert "the warm-up got" in caplog.text
    # measurements that take no time cannot tell: nothing is said
    _, quick = plan_for_budget(cfg, FP, device="cpu", out_channels=4, measure=lambda *a, **k: 1e-3)
    assert quick is not None
    assert "other work was running" not in quick.why


def test_plan_for_budget_measures_and_plans_steps_within_the_budget():
    calls = []

    def fake_measure(
        cfg, patch, batch, features, *, out_channels, device, time_limit_s=None, model_name=None
    ):
        calls.append((patch, features, batch, model_name))
        speed = 2.0 if model_name == "monai_unet" else 1.0
        return 1e-6 * patch[0] * patch[1] * patch[2] * batch * features / 16 / speed  # bigger = slower

    cfg = Config.model_validate({"train": {"time_budget_s": 600, "memory_budget_gb": 4}})
    planned, plan = plan_for_budget(cfg, FP, device="cpu", out_channels=4, measure=fake_measure)
    assert plan is not None
    assert calls
    tr = planned.train
    assert tuple(int(p) for p in tr.patch_size) == plan.chosen.patch
    assert plan.steps * plan.chosen.step_s <= 600
    assert tr.epochs * tr.iterations_per_epoch >= plan.steps
    assert plan.steps >= MIN_STEPS or "no candidate" in plan.why
    assert "budget" in plan.summary()
    assert plan.params()["budget.steps"] == plan.steps
    # a step holds batch (2 cases) x samples_per_volume (2 crops) patches: that is what is measured
    assert {c[2] for c in calls} == {4}
    assert all(c.batch == 2 for c in plan.measured)
    # no network named: the default, DynUNet, at its width and at half of it (benchmarks/README.md)
    assert {(c[3], c[1]) for c in calls} == {("dynunet", 16), ("dynunet", 8)}
    assert (planned.model.name, planned.model.features) == (plan.chosen.model, plan.chosen.features)
    assert planned.model.name == "dynunet"
    # a width the user gave is the only one measured
    calls.clear()
    wide = Config.model_validate({"train": {"time_budget_s": 600}, "model": {"features": 16}})
    plan_for_budget(wide, FP, device="cpu", out_channels=4, measure=fake_measure)
    assert {(c[3], c[1]) for c in calls if c[3] == "dynunet"} == {("dynunet", 16)}
    # the user's network is kept, and measured at half width too when its width is not given
    calls.clear()
    given = Config.model_validate({"train": {"time_budget_s": 600}, "model": {"name": "classic_unet"}})
    planned, _ = plan_for_budget(given, FP, device="cpu", out_channels=4, measure=fake_measure)
    assert {c[3] for c in calls} == {"classic_unet"}
    assert {c[1] for c in calls} == {16, 8}
    assert planned.model.name == "classic_unet"
    # the user's patch is kept: only it is measured
    calls.clear()
    fixed = Config.model_validate({"train": {"time_budget_s": 600, "patch_size": [32, 32, 16]}})
    planned, plan = plan_for_budget(fixed, FP, device="cpu", out_channels=4, measure=fake_measure)
    assert {c[0] for c in calls} == {(32, 32, 16)}
    assert planned.train.patch_size == (32.0, 32.0, 16.0)


def test_warm_up_measures_the_fastest_network_first_at_each_larger_patch():
    """The warm-up's time cap cuts what is measured last at a size: that must be the slow networks."""
    calls = []

    def step_s(patch, features, model_name):
        speed = 2.0 if model_name == "monai_unet" else 1.0
        return 1e-7 * patch[0] * patch[1] * patch[2] * features / speed

    def fake_measure(
        cfg, patch, batch, features, *, out_channels, device, time_limit_s=None, model_name=None
    ):
        calls.append((patch, model_name, features))
        return step_s(patch, features, model_name)

    cfg = Config.model_validate(
        {"train": {"time_budget_s": 3600, "memory_budget_gb": 4}, "model": {"name": "classic_unet"}}
    )
    plan_for_budget(cfg, FP, device="cpu", out_channels=4, measure=fake_measure)
    sizes = list(dict.fromkeys(c[0] for c in calls))
    assert len(sizes) >= 2
    first = [c for c in calls if c[0] == sizes[0]]
    assert first[0][2] == 16  # nothing measured yet: the configured width first
    for size in sizes[1:]:
        at_size = [c for c in calls if c[0] == size]
        steps = [step_s(size, f, m) for _, m, f in at_size]
        assert steps == sorted(steps), f"{size}: measured {at_size}, not fastest first"


def test_the_warm_up_measures_the_path_between_two_candidate_sizes_for_the_largest_that_qualifies():
    """Candidate sizes lie about 2x apart in voxels; the largest patch that leaves MIN_STEPS may lie
    between two of them (seed 6: 64x64x16 left 2442 steps, the next size 1052; 64x64x32 unmeasured)."""
    import numpy as np

    from medseg.models import divisor_of
    from medseg.plan import MAX_SIZES_BETWEEN, _shrink_path

    def step_s(patch):
        return 1e-6 * float(np.prod(patch))

    calls = []

    def fake_measure(cfg, patch, batch, features, *, out_channels, device, time_limit_s=None, model_name=None):
        calls.append(patch)
        return step_s(patch)

    cfg = _monai_unet_in_600_s()
    planned0 = make_plan(cfg, FP)
    divisor = divisor_of(planned0.model)
    candidates = candidate_patches(planned0.train.patch_size, divisor, spacing=planned0.preprocess.spacing)
    _, plan = plan_for_budget(cfg, FP, device="cpu", out_channels=4, measure=fake_measure)
    assert plan is not None
    path = [tuple(int(v) for v in p) for p in _shrink_path(np.asarray(planned0.train.patch_size), divisor,
                                                            planned0.preprocess.spacing)]
    assert plan.chosen.patch in path
    assert plan.chosen.patch not in candidates  # found between two of them
    best_candidate = max((p for p in candidates if plan.train_s / step_s(p) >= MIN_STEPS), key=np.prod)
    assert np.prod(plan.chosen.patch) > np.prod(best_candidate)
    # the next size up the path leaves too few steps (2 %: the validation estimate moves with the patch)
    above = path[path.index(plan.chosen.patch) - 1]
    assert plan.train_s / step_s(above) < 1.02 * MIN_STEPS
    assert "measured between the candidate sizes" in plan.why
    assert len([c for c in calls if c not in candidates]) <= MAX_SIZES_BETWEEN
    assert plan.steps >= MIN_STEPS


@pytest.mark.parametrize(("seconds_each", "kept"), [(30.0, True), (75.0, False)])
def test_a_size_that_qualified_is_kept_when_measuring_the_sizes_above_it_took_its_margin(
    monkeypatch, seconds_each, kept
):
    """Seed 13: 80x80x32 left 1500 steps, the three sizes measured above it cost the seconds that made it
    qualify, and the plan fell to a patch half its size on a coarser grid (0.872 against 0.905 pinned)."""
    import time

    import numpy as np

    from medseg.models import divisor_of
    from medseg.plan import KEEP_FRACTION

    cfg = _monai_unet_in_600_s()
    planned0 = make_plan(cfg, FP)
    candidates = candidate_patches(planned0.train.patch_size, divisor_of(planned0.model),
                                   spacing=planned0.preprocess.spacing)
    clock = [0.0]
    between = []

    def fake_measure(cfg, patch, batch, features, *, out_channels, device, time_limit_s=None, model_name=None):
        if tuple(patch) in candidates:
            return 1.35e-6 * float(np.prod(patch))  # 80x80x32 leaves 1500 steps with a few % to spare
        between.append(tuple(patch))
        clock[0] += seconds_each  # a size between two candidates: slow, and its measurement takes time
        return 10.0

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    _, plan = plan_for_budget(cfg, FP, device="cpu", out_channels=4, measure=fake_measure)
    assert plan is not None
    assert between  # the sizes above 80x80x32 were measured ...
    assert all(np.prod(p) > 80 * 80 * 32 for p in between)
    by_patch = {c.patch: c for c in plan.measured}
    steps_80 = plan.train_s / by_patch[(80, 80, 32)].step_s
    if kept:  # ... and their time leaves it under MIN_STEPS, but within KEEP_FRACTION of it: kept
        assert plan.chosen.patch == (80, 80, 32)
        assert KEEP_FRACTION * MIN_STEPS <= plan.steps < MIN_STEPS
        assert "80x80x32 kept" in plan.why
    else:  # ... and they took more than that: the plan takes the smaller size that still qualifies
        assert steps_80 < KEEP_FRACTION * MIN_STEPS
        assert plan.chosen.patch == (64, 64, 32)
        assert plan.steps >= MIN_STEPS
        assert "kept" not in plan.why


@pytest.mark.parametrize("second_s_factor", [1.0, 1.8])
def test_the_size_above_the_choice_is_measured_again_when_it_missed_by_little(second_s_factor):
    """Seed 14: 80x80x32 measured 0.475 s a step (2.05x 80x80x16, where three runs that day measured
    1.54-1.56x) and the plan fell to 80x80x16 on a coarser grid. One burst only adds time: the size just
    above the choice is measured again when it missed MIN_STEPS by less than RECHECK_FRACTION."""
    import numpy as np

    from medseg.plan import RECHECK_FRACTION

    cfg = _monai_unet_in_600_s()
    calls = []

    def fake_measure(cfg, patch, batch, features, *, out_channels, device, time_limit_s=None, model_name=None):
        calls.append(tuple(patch))
        step = 1e-6 * float(np.prod(patch))  # 80x80x32 leaves about 1860 steps
        if tuple(patch) == (80, 80, 32):  # a burst on its first timing; the second as fast, or not
            step *= 1.8 if calls.count((80, 80, 32)) == 1 else second_s_factor
        elif np.prod(patch) > 80 * 80 * 32:
            step *= 2.0  # the sizes above it leave too few steps
        return step

    _, plan = plan_for_budget(cfg, FP, device="cpu", out_channels=4, measure=fake_measure)
    assert plan is not None
    assert calls.count((80, 80, 32)) == 2  # measured again: it had missed by less than RECHECK_FRACTION
    first_steps = plan.train_s / (1.8 * 1.15e-6 * 80 * 80 * 32)  # 1.15: the CPU's data overhead
    assert RECHECK_FRACTION * MIN_STEPS <= first_steps < MIN_STEPS
    entries = [c for c in plan.measured if c.patch == (80, 80, 32)]
    assert len(entries) == 1  # one entry per size: the faster timing
    assert "80x80x32 measured twice" in plan.why
    if second_s_factor == 1.0:
        assert plan.chosen.patch == (80, 80, 32)
        assert plan.steps >= MIN_STEPS
    else:  # slow both times: the plan stays below it
        assert np.prod(plan.chosen.patch) < 80 * 80 * 32
        assert entries[0].step_s == pytest.approx(1.8 * 1.15e-6 * 80 * 80 * 32)


def test_a_budget_patch_that_sees_little_of_the_image_gets_a_coarser_grid():
    # the seed-1 phantoms: 0.8 mm in-plane, 11 minutes bought 64x64x32, 5.8 % of the median image
    extent = (164.6, 135.4, 117.6)
    grid, why = context_spacing((0.806, 0.806, 1.786), extent, (64, 64, 32))
    assert grid[2] == 1.786  # the fine axes first
    assert grid[0] == grid[1]
    assert 1.4 < grid[0] < 1.786
    assert "5.8 %" in why
    assert "now 20.0 %" in why
    assert "x, y" in why
    # enough context already (the real CT at 3 mm: the patch sees 35 % of it): unchanged, nothing said
    assert context_spacing((3.0, 3.0, 3.0), (366.0, 303.0, 90.0), (64, 64, 32)) == ((3.0, 3.0, 3.0), "")
    # isotropic data: every axis by one factor, to the share
    grid, why = context_spacing((1.0, 1.0, 1.0), (300.0, 300.0, 300.0), (64, 64, 64))
    assert grid[0] == grid[1] == grid[2]
    assert 2.5 < grid[0] < MAX_CONTEXT_COARSENING
    assert "now 20.0 %" in why
    # anisotropic data: the fine axes up to the coarsest, then every axis, the finest at most
    # MAX_CONTEXT_COARSENING coarser (a thin-slice CT seen through a small patch)
    grid, why = context_spacing((0.5, 0.5, 0.6), (300.0, 300.0, 200.0), (32, 32, 32))
    assert grid == (0.5 * MAX_CONTEXT_COARSENING,) * 3
    assert f"held at {MAX_CONTEXT_COARSENING:g}x" in why
    # thick slices: the fine axes only, never coarser than the slices
    grid, why = context_spacing((0.7, 0.7, 5.0), (350.0, 350.0, 300.0), (128, 128, 32))
    assert grid[2] == 5.0
    assert 0.7 < grid[0] == grid[1] < 5.0
    assert "on x, y (to" in why
    # a small structure holds the grid: 0.5 ml is 9.8 mm across, 16 voxels need 0.61 mm
    grid, why = context_spacing((0.806, 0.806, 1.786), extent, (64, 64, 32), {"1": (0.5, 2.0)})
    assert grid == (0.806, 0.806, 1.786)
    assert why == ""
    grid, why = context_spacing((0.806, 0.806, 1.786), extent, (64, 64, 32), {"1": (2.0, 4.0)})
    assert 0.806 < grid[0] < 1.0
    assert "smallest label" in why


def test_a_coarse_axis_planned_finer_than_the_median_goes_back_to_it_before_the_fine_axes_coarsen():
    # the seed-3 phantoms: median 0.965 x 0.965 x 2.901 mm, the plan took z at its 10th percentile
    # (2.056 mm) and 11 minutes bought 64x64x16, 5 % of the median image
    plan, extent, patch = (0.965, 0.965, 2.056), (190.0, 150.0, 110.0), (64, 64, 16)
    grid, why = context_spacing(plan, extent, patch, None, (0.965, 0.965, 2.901))
    assert grid[2] == 2.901
    assert 0.965 * 1.5 < grid[0] == grid[1] < 2.901
    assert "z back to the median 2.901 mm, then 1.88x on x, y (to 1.816 mm)" in why
    # without the median (an old fingerprint) the coarse axis is not taken back to it: the fine axes
    # coarsen up to it, then every axis together
    grid, why = context_spacing(plan, extent, patch)
    assert grid[0] == grid[1] == grid[2] > 2.056
    assert "back to the median" not in why
    assert "on x, y, z" in why
    # the coarse axis goes back by at most MAX_CONTEXT_COARSENING
    grid, _ = context_spacing(plan, extent, patch, None, (0.965, 0.965, 9.0))
    assert grid[2] == round(2.056 * MAX_CONTEXT_COARSENING, 3)
    # enough context: nothing changes, even below the median
    assert context_spacing(plan, (60.0, 60.0, 30.0), patch, None, (0.965, 0.965, 2.901)) == (plan, "")
    # the median alone, when the fine axes would gain too little (a small label holds them)
    grid, why = context_spacing(plan, extent, patch, {"1": (0.5, 2.0)}, (0.965, 0.965, 2.901))
    assert grid == (0.965, 0.965, 2.901)
    assert why.startswith("grid coarsened z back to the median 2.901 mm (")


def test_the_budget_plan_applies_the_coarser_grid_unless_the_user_chose_grid_or_patch():
    def fake_measure(cfg, patch, batch, features, *, out_channels, device, time_limit_s=None, model_name=None):
        return 1e-7 * patch[0] * patch[1] * patch[2] * features  # slow: a small patch is chosen

    big = FP.model_copy(update={"extent_mm_median": (400.0, 400.0, 300.0)})
    cfg = Config.model_validate({"train": {"time_budget_s": 600, "memory_budget_gb": 4}})
    planned, plan = plan_for_budget(cfg, big, device="cpu", out_channels=2, measure=fake_measure)
    assert plan is not None
    assert plan.spacing is not None
    assert planned.preprocess.spacing == plan.spacing
    assert planned.preprocess.spacing[0] > 1.0
    assert "grid coarsened" in plan.why
    # the validations' share of the budget is estimated on the grid they will run on: the same
    # patch on the planned (finer) grid needs more windows and more seconds
    fine_cfg = make_plan(cfg, big)
    one = [plan.chosen]
    on_fine = _fit_to_budget(fine_cfg, big, one, 600.0, 4)
    on_grid = _fit_to_budget(fine_cfg, big, one, 600.0, 4, grid=lambda patch: plan.spacing)
    assert on_grid[0] == on_fine[0] == plan.chosen
    assert on_grid[1] / on_grid[4] < 0.8 * on_fine[1] / on_fine[4]  # seconds per validation
    assert on_grid[4] >= on_fine[4]  # as many validations or more
    for given in ({"preprocess": {"spacing": [1.0, 1.0, 2.5]}}, {"train": {"patch_size": [32, 32, 16]}}):
        user = Config.model_validate({**given, "train": {"time_budget_s": 600, **given.get("train", {})}})
        planned, plan = plan_for_budget(user, big, device="cpu", out_channels=2, measure=fake_measure)
        assert plan is not None
        assert plan.spacing is None
        assert planned.preprocess.spacing[0] == 1.0


@pytest.mark.slow
def test_training_ends_within_its_time_budget(tmp_path):
    """A real run on a tiny dataset with a 90 s budget: its own recorded duration is within 10 %."""
    from medseg.config import load_config
    from medseg.synthetic import make_dataset
    from medseg.train import train

    data = tmp_path / "data"
    make_dataset(data, cases=5, size=24, seed=1, test_fraction=0.2)
    cfg = load_config(
        None,
        [
            "train.time_budget_s=90",
            "model.features=4",
            "model.depth=2",
            "preprocess.spacing=[3,3,4]",
            "tracking.enabled=false",
            "train.val_surface_metrics=false",
        ],
    )
    result = train(cfg, data, out_dir=tmp_path / "run")
    elapsed = result.duration_s
    timeline = [(h["epoch"], round(h["elapsed_s"], 1), h.get("val_dice")) for h in result.history]
    timeline.append(("end", round(elapsed, 1), result.best_dice))
    why = f"{timeline}\n{(result.run_dir / 'plan.txt').read_text()}"
    assert elapsed <= 90 * 1.1, why
    assert elapsed >= 90 * 0.5, why  # it used the budget rather than stopping early
    assert "budget" in (result.run_dir / "plan.txt").read_text()
    planned = json.loads(json.dumps(result.config.model_dump(mode="json")))
    assert planned["train"]["time_budget_s"] == 90


def test_cli_refuses_an_unreadable_budget_in_one_line(tmp_path, tiny_dataset):
    from tests.conftest import run_cli

    proc = run_cli("train", "--data", str(tiny_dataset), "--time-budget", "soon", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "time budget 'soon'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_bare_number_under_a_minute_is_said_to_be_seconds(caplog):
    """``--time-budget 11`` is 11 seconds, as documented; meant as minutes it would ship a model that
    learned nothing, so the CLI says what it read. A unit, or a bare number of a minute or more, is quiet."""
    import logging

    from medseg.cli import _time_budget_override

    with caplog.at_level(logging.WARNING, logger="medseg"):
        assert _time_budget_override("11") == "train.time_budget_s=11.0"
    assert [r.getMessage() for r in caplog.records] == [
        "--time-budget 11 is 11 seconds (a number without a unit is seconds): for minutes write 11m"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medseg"):
        assert _time_budget_override("11m") == "train.time_budget_s=660.0"
        assert _time_budget_override("30s") == "train.time_budget_s=30.0"
        assert _time_budget_override("90") == "train.time_budget_s=90.0"
    assert not caplog.records


def _refitting_trainer(elapsed_and_validation_s: tuple[float, float], logged: list[dict]):
    """What ``Trainer._fit_epochs_to_budget`` reads of a trainer: the plan's 10 epochs validated every 3,
    a 600 s budget, its seconds elapsed and a validation's, MLflow params into ``logged``."""
    import time
    from types import SimpleNamespace

    from medseg.config import Config
    from medseg.plan import Deadline

    elapsed, validation_s = elapsed_and_validation_s
    cfg = Config.model_validate({"train": {"time_budget_s": 600, "epochs": 10, "val_every": 3}})
    return SimpleNamespace(
        cfg=cfg, deadline=Deadline(600.0, time.monotonic() - elapsed, final_s=30.0, validation_s=validation_s),
        _planned_epochs=10, _planned_val_every=3, _params_fitted=set(),
        dist=SimpleNamespace(broadcast=lambda x: x, main=True),
        tracker=SimpleNamespace(log_params=logged.append), bar=SimpleNamespace(set_total=lambda n: None),
        loader=[None] * 4,
    )


def test_epochs_are_fitted_again_after_the_first_validation(caplog):
    """After the first validation the measured epoch and validation times refit the epochs: a
    validation shorter than the plan's estimate leaves room for more epochs, a slow run gets fewer,
    never fewer than those already done."""
    from medseg.train import Trainer

    caplog.set_level(logging.INFO, logger="medseg.train")
    logged: list[dict] = []

    def fitted(epoch_s: float, validation_s: float, done: int, elapsed: float) -> int:
        trainer = _refitting_trainer((elapsed, validation_s), logged)
        Trainer._fit_epochs_to_budget(trainer, epoch_s, done=done)
        return trainer.cfg.train.epochs

    # 3 epochs of 50 s and a validation of 10 s done at 160 s: 410 s left before the final 30 s
    # and the last validation, 53.3 s per epoch with its share of validations: 7.7 epochs -> 3 + 8
    # (rounded up: the deadline cuts the last one short and validates it; down left 36 s unused)
    assert fitted(50.0, 10.0, done=3, elapsed=160.0) == 11
    assert fitted(50.0, 10.0, done=3, elapsed=100.0) == 12  # further ahead of the clock: one more
    assert fitted(50.0, 10.0, done=3, elapsed=560.0) == 3  # out of time: no epoch beyond those done
    # MLflow params are write-once: the fitting after the first validation logs its own key
    assert {"train.epochs_fitted_after_validation"} == {k for d in logged for k in d}
    assert "a validation took 10 s" in caplog.text  # measured by then
    caplog.clear()
    assert fitted(50.0, 10.0, done=1, elapsed=20.0) == 12  # after the first epoch: 10.5 -> 1 + 11
    assert "train.epochs_fitted" in logged[-1]
    assert "a validation is estimated at 10 s" in caplog.text  # none has run yet: the plan's figure


def test_a_slow_warm_up_still_gets_the_whole_budget(caplog):
    """A warm-up slowed by other work plans a tenth of the steps the machine runs: the epochs are
    fitted to the run's own speed (not capped at 3x the plan's, which ended such a run at 20 s of its
    90) and validate less often, so the plan's number of validations holds; an epoch that measured
    nothing is held at ``REFIT_MAX`` times the plan's."""
    from medseg.train import REFIT_MAX, Trainer

    caplog.set_level(logging.INFO, logger="medseg.train")
    logged: list[dict] = []

    def fitted(epoch_s: float, validation_s: float, done: int, elapsed: float) -> tuple[int, int]:
        trainer = _refitting_trainer((elapsed, validation_s), logged)
        Trainer._fit_epochs_to_budget(trainer, epoch_s, done=done)
        return trainer.cfg.train.epochs, trainer.cfg.train.val_every

    # 3 epochs of 5 s done at 10 s: 559 s left before the final 30 s and the last validation;
    # about 111 epochs of 5 s with a 1 s validation every 33 of them: 3.4 validations, as the plan's
    # 10 epochs validated every 3
    epochs, every = fitted(5.0, 1.0, done=3, elapsed=10.0)
    assert epochs > 100
    assert every == 3 * epochs // 10
    assert epochs * 5.0 + (epochs / every) * 1.0 <= 559 + 3 * 5.0 + 5.0 + 1.0  # fits, to an epoch
    assert logged[-1] == {"train.epochs_fitted_after_validation": epochs,
                          "train.val_every_fitted_after_validation": every}
    assert f"validating every {every}" in caplog.text
    assert fitted(1e-4, 1.0, done=3, elapsed=10.0)[0] == REFIT_MAX * 10  # a bogus epoch time: held
    assert fitted(50.0, 10.0, done=3, elapsed=160.0) == (11, 3)  # about as planned: validations unchanged
    # refitted after every validation, to the speed since the last one; MLflow params are write-once,
    # so a third fitting is in the log and the checkpoints' config, not in the params
    trainer = _refitting_trainer((10.0, 1.0), logged)
    logged.clear()
    for epoch_s, done in ((5.0, 3), (4.0, 30), (2.0, 60)):
        Trainer._fit_epochs_to_budget(trainer, epoch_s, done=done)
    assert len(logged) == 1
    assert trainer.cfg.train.epochs > epochs  # faster epochs since: more of them
    # and a machine that turned slow again: fewer epochs, validated as often as planned
    Trainer._fit_epochs_to_budget(trainer, 100.0, done=3)
    assert (trainer.cfg.train.epochs, trainer.cfg.train.val_every) == (9, 3)
