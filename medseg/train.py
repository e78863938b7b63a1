"""Training: Dice+CE, validation by sliding window, exact resume, DDP under torchrun, MLflow.

``train(cfg, data_root)`` plans what the config leaves out (``medseg.plan``), caches the
deterministic preprocessing (in memory, or on disk under the run folder), trains with
random augmentation per step, validates on whole volumes (``medseg.validation``), keeps the
best weights as a bundle (``medseg.bundle``) and tracks everything in MLflow.

The pieces: ``medseg.runtime`` says where and in which precision the network runs;
``medseg.checkpoint`` is the checkpoint schema (``TrainState``) and its atomic files;
the ``Trainer`` here owns the loop (one epoch of steps, validation, checkpoints, early
stop) and ``train()`` sets up a run around it (resume, tracking, fingerprint, plan, splits).

Never losing work: a full-state checkpoint is written atomically at each epoch end
(``last.pt``), every ``train.checkpoint_every_minutes`` or ``train.checkpoint_every_steps``
within an epoch (``timed.pt``), on SIGTERM/SIGINT (then the run stops, exit 143/130) and at
the best validation Dice (``best.pt``). ``resume="auto"`` picks the checkpoint furthest
along that loads; a mid-epoch checkpoint replays the epoch's sampling up to its step, so
the resumed run sees the same batches and learning-rate schedule as an uninterrupted one,
in the same MLflow run.

Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel: each rank
caches and samples only its shard, validation cases are split across ranks, metrics are
gathered, and rank 0 alone writes checkpoints, the bundle and the MLflow run.

Run folders are named after what made them: ``runs/<dataset>/<model>/fold_<k>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, PersistentDataset, list_data_collate

from medseg.bundle import save_bundle
from medseg.checkpoint import (
    BEST,
    LAST,
    TIMED,
    TrainState,
    capture_rng,
    drop,
    find_checkpoint,
    has_checkpoint,
    load_state,
    promote,
    restore_rng,
    save_state,
)
from medseg.config import Config, config_tree, dump_config, flatten
from medseg.data import Case, Dataset, Fingerprint, fingerprint, load_dataset, split_cases
from medseg.errors import InputError, MedsegError, StoppedError, TrackingError
from medseg.io import write_text_atomic
from medseg.io.volume import sweep_partials
from medseg.kernels import training_stand_ins
from medseg.labels import channel_labels, channels_to_values, mapping_note
from medseg.locks import exclusive_on_every_rank
from medseg.losses import DiceCE
from medseg.models import build_model, deep_supervision_weights
from medseg.plan import (
    BudgetPlan,
    Deadline,
    lr_factor,
    make_plan,
    plan_for_budget,
    plan_summary,
    resolve_budget,
)
from medseg.progress import TrainingProgress
from medseg.resume import Continuation, continue_run, explicit_settings
from medseg.runtime import (
    Dist,
    autocast,
    continued_precision,
    init_distributed,
    leave_distributed,
    resolve_precision,
    set_memory_format,
    training_channels_last,
)
from medseg.tracking import Tracker, git_commit, package_versions
from medseg.transforms import build_preprocess, build_train_chain
from medseg.validation import FirstCase, summarise, validate

log = logging.getLogger(__name__)

# checkpoint names, kept here for callers of the earlier API
CHECKPOINT, TIMED_CHECKPOINT, BEST_CHECKPOINT = LAST, TIMED, BEST
# the final model goes into the bundle unless the best validated one beat it by more than this: a
# guard against a run that fell apart at its end, not a choice between two models of the same run
# (best leading by 0.010-0.023 on two validation cases: the test cases did not follow)
FINAL_MODEL_TOLERANCE = 0.03
# a label whose validation Dice ends below this was not learned (warned about, never silent)
UNLEARNED_DICE = 0.05
# Steps whose gradients are not finite are skipped, never applied (one such step makes every
# weight NaN, and the run ships a bundle that predicts nothing). In bf16 on a CPU, oneDNN's conv3d
# weight gradient returns NaN from finite inputs on maps 2 voxels along the first axis (torch 2.13;
# benchmarks/results/bf16_conv3d_nan_*.json, bf16_thin_maps_*.json): those convolutions run in fp32
# (``medseg.kernels.fp32_on_thin_maps``), and this is the net for what no probe found. After this
# many skipped steps a bf16 run goes on in fp32.
NONFINITE_BF16_LIMIT = 3
# skipped steps in a row in full precision: the run has diverged; stop with a line that says so
NONFINITE_RUN_LIMIT = 25
# a time-budgeted run's epochs, fitted to its measured epochs, stay under this many times the plan's:
# a guard against an epoch time that measured nothing (``Trainer._fit_epochs_to_budget``). A warm-up
# under six busy processes on 2 cores planned 268 steps of 0.26 s that then ran in 0.004 s: at 20x
# the run stopped at 200 epochs, 61 s into its 90 s budget.
REFIT_MAX = 100


class DivergedError(MedsegError):
    """Training produced non-finite gradients step after step (learning rate too high, or bad labels)."""


@dataclass
class TrainResult:
    run_dir: Path
    bundle: Path
    run_id: str | None
    best_dice: float
    history: list[dict[str, float]] = field(default_factory=list)
    config: Config | None = None
    duration_s: float | None = None  # the whole run, start to bundle tuned and tracked


class TrainingStoppedError(StoppedError):
    """SIGTERM (a scheduler pre-empting the job) or SIGINT stopped training after saving its state."""


# ----------------------------------------------------------------------------- signals


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint at the step's end and stops."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int = signal.SIGTERM

    def set(self, signum: int) -> None:
        self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@contextlib.contextmanager
def stop_signals() -> Iterator[StopFlag]:
    """While training: the first SIGTERM/SIGINT asks for a clean stop; a second Ctrl-C interrupts at once."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame) -> None:
        if flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("signal %d: saving a checkpoint at the end of this step, then stopping", signum)
        flag.set(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _raise_everywhere(error: MedsegError | None, dist: Dist) -> None:
    """Rank 0's error stops every rank (its message travels, not the object: InputError does not pickle)."""
    message = dist.broadcast(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise MedsegError(f"rank 0 stopped: {message}")


# ----------------------------------------------------------------------------- one epoch's statistics


@dataclass
class EpochStats:
    losses: list[float] = field(default_factory=list)
    wait: float = 0.0  # seconds waiting for data
    compute: float = 0.0  # seconds in forward/backward/step
    samples: int = 0

    def partial(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "wait": self.wait, "compute": self.compute, "samples": self.samples}

    @classmethod
    def from_partial(cls, d: dict[str, Any]) -> EpochStats:
        return cls(list(d.get("losses", [])), float(d.get("wait", 0.0)), float(d.get("compute", 0.0)),
                   int(d.get("samples", 0)))


def _epoch_record(epoch: int, stats: EpochStats, lr: float, dist: Dist) -> dict[str, float]:
    gathered = dist.gather((float(np.sum(stats.losses)), len(stats.losses), stats.samples, stats.wait, stats.compute))
    n = sum(s[1] for s in gathered)
    elapsed = max(max(s[3] + s[4] for s in gathered), 1e-9)
    return {
        "epoch": epoch + 1,
        "train_loss": sum(s[0] for s in gathered) / n if n else float("nan"),
        "lr": lr,
        "samples_per_s": sum(s[2] for s in gathered) / elapsed,
        "steps": n / len(gathered),
        "data_wait_fraction": float(np.mean([s[3] / max(s[3] + s[4], 1e-9) for s in gathered])),
    }


def _seconds(s: float) -> str:
    """Seconds for a log line: whole above 10, two decimals below (an epoch of 0.22 s is not "0 s")."""
    return f"{s:.0f}" if s >= 10 else f"{s:.2f}"


def _schedule(cfg: Config):
    """The per-epoch learning-rate multiplier planned for ``train.epochs``: linear warm-up over
    ``lr_warmup_fraction`` of them, then cosine or poly decay to 0 (``medseg.plan.lr_factor``).

    An epoch of the warm-up runs at the ramp's value at its end: at its start the first epoch's
    would be 0.1 % of the lr, and a planned 3 % warm-up over 30 epochs spent the whole first epoch
    there (a budget-planned config retrained with ``--epochs``; under a budget the lr is set per step)."""
    epochs, tr = max(1, cfg.train.epochs), cfg.train
    kind = "cosine" if tr.scheduler == "cosine" else "poly"
    warm_epochs = tr.lr_warmup_fraction * epochs

    def factor(e: int) -> float:
        if e < warm_epochs:
            return min(1.0, (e + 1) / warm_epochs)
        return lr_factor(e, epochs, warmup_fraction=tr.lr_warmup_fraction, kind=kind)

    return factor


def make_loss(cfg: Config) -> torch.nn.Module:
    """Dice + cross-entropy on logits and integer labels; the Dice term as ``train.dice_over`` and
    ``train.dice_background`` say (batch, foreground only: nnU-Net's choice for 3D patches).
    MONAI's ``DiceCELoss``, its gradient written out (``medseg.losses.DiceCE``)."""
    return DiceCE(batch=cfg.train.dice_over == "batch", include_background=cfg.train.dice_background)


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """AdamW (or nnU-Net's SGD), fused where torch has the kernel: the per-parameter update loop
    took 18-20 ms of a 330 ms CPU step of the 16-feature MONAI UNet (97 tensors), the fused
    kernel 4 ms. Where fusing is unsupported (a device or dtype without the kernel) the loop runs."""
    params = list(params)
    if cfg.train.optimizer == "sgd":
        kwargs: dict[str, Any] = dict(
            lr=cfg.train.lr, momentum=0.99, nesterov=True, weight_decay=cfg.train.weight_decay
        )
        cls: Any = torch.optim.SGD  # SGD and AdamW take ``fused``; their base class does not
    else:
        kwargs = dict(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        cls = torch.optim.AdamW
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return cls(params, **kwargs)


def _items(cases) -> list[dict[str, Any]]:
    return [c.item() for c in cases]  # image: one path, or one per channel


# ----------------------------------------------------------------------------- the loop


class Trainer:
    """The training loop of one run: ``run()`` trains from where ``state`` left off to the last epoch."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        train_cases: list,
        val_cases: list,
        *,
        dist: Dist,
        device: torch.device,
        tracker: Tracker,
        meta: dict[str, Any],
        stop: StopFlag,
        state: TrainState | None = None,
        deadline: Deadline | None = None,
        requested: dict[str, Any] | None = None,
        replan_schedule: bool = False,
    ) -> None:
        self.cfg, self.run_dir, self.dist, self.device = cfg, run_dir, dist, device
        self.deadline = deadline  # with a time budget: when to stop training (medseg.plan.Deadline)
        self._planned_epochs = cfg.train.epochs
        self._planned_val_every = cfg.train.val_every
        self._params_fitted: set[str] = set()  # the fitted epochs' MLflow params logged (write-once)
        self.tracker, self.meta, self.stop = tracker, meta, stop
        self.requested = dict(requested or {})  # the settings asked for, kept in every checkpoint
        self.labels = dict(cfg.labels or {})
        self.label_ids = sorted(self.labels)
        self.ckpt_dir, self.bundle_dir = run_dir / "checkpoints", run_dir / "bundle"
        asked = "bf16" if cfg.train.cpu_bf16 and device.type == "cpu" else cfg.train.precision
        if state is not None and state.precision and asked == "auto":  # a resumed run keeps its precision
            chosen = continued_precision(device, state.precision, amp=cfg.train.amp)
        else:
            chosen = resolve_precision(device, asked, amp=cfg.train.amp)
        # one precision for every rank: each measures its own CPU, and DDP needs the same layout
        self.precision = dist.broadcast(chosen)
        self._build_data(train_cases, val_cases)
        self._build_model()
        self.epoch = self.step_in_epoch = self.global_step = self.stale = 0
        self.nonfinite_steps = self.nonfinite_run = 0  # steps skipped for non-finite gradients
        self.best = -1.0
        self.history: list[dict[str, float]] = []
        self._resume: dict[str, Any] | None = None  # this rank's RNG states and partial epoch
        self._clock: tuple[float, float] | None = None  # when run() began, at which epoch (time left)
        if state is not None:
            self._load(state)
            if replan_schedule:
                self._replan_schedule()

    # --- setup

    def _build_data(self, train_cases: list, val_cases: list) -> None:
        from monai.utils import set_determinism

        cfg, dist = self.cfg, self.dist
        started = time.monotonic()
        set_determinism(seed=cfg.seed)
        preprocess = build_preprocess(cfg)
        chain = build_train_chain(cfg)  # flat, so that CacheDataset caches the preprocessing
        self.augment = chain
        self.augment.set_random_state(seed=cfg.seed + dist.rank)
        items = dist.shard(_items(train_cases), even=True)
        if cfg.train.cache == "disk":
            cache_dir = self.run_dir / "cache"
            cache_dir.mkdir(parents=True, exist_ok=True)
            train_ds: Any = PersistentDataset(items, transform=chain, cache_dir=cache_dir)
        else:
            # no copy of the cached case per step: the chain copies each patch out of it (OwnPatches)
            train_ds = CacheDataset(
                items, transform=chain, cache_rate=1.0, num_workers=0, progress=False, copy_cache=False
            )
        self.generator = torch.Generator().manual_seed(cfg.seed + dist.rank)
        sampler = None
        if cfg.train.iterations_per_epoch:  # a fixed number of steps per epoch, drawing through the shard
            n = cfg.train.iterations_per_epoch * int(cfg.train.batch_size or 1)
            sampler = torch.utils.data.RandomSampler(train_ds, num_samples=n, generator=self.generator)
        self.loader = DataLoader(
            train_ds,
            batch_size=cfg.train.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=cfg.train.num_workers,
            collate_fn=list_data_collate,
            generator=self.generator,
        )
        self.val_loader = None
        if val_cases:
            shard = dist.shard(_items(val_cases), even=False)
            val_ds = CacheDataset(shard, transform=preprocess, cache_rate=1.0, num_workers=0, progress=False)
            self.val_loader = DataLoader(val_ds, batch_size=1, num_workers=0)
        if dist.main:
            log.info("data: %d training and %d validation case(s) preprocessed and cached in %.1f s",
                     len(items), len(val_cases), time.monotonic() - started)

    def _build_model(self) -> None:
        cfg, device = self.cfg, self.device
        self.network = build_model(cfg.model, out_channels=max(self.label_ids) + 1).to(device)
        # fp32 where bf16 gradients go NaN, layout-keeping instance norms, PReLU's backward (medseg.kernels)
        log.debug("training stand-ins: %s", training_stand_ins(self.network))
        self.channels_last = self._choose_layout()
        if self.channels_last:
            self.network = set_memory_format(self.network, torch.channels_last_3d)
        self.model: torch.nn.Module = self.network
        if self.dist.active:
            ids = [device.index] if device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.network, device_ids=ids)
        self.loss_fn = make_loss(cfg)
        self.optimizer = make_optimizer(cfg, self.network.parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(cfg))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.ds_weights = deep_supervision_weights(getattr(self.network, "num_aux", 0))

    def unwrap(self) -> None:
        """Drop the DistributedDataParallel wrapper (after training), keeping the network."""
        self.model = self.network

    def _choose_layout(self) -> bool:
        """The memory format of training steps: rank 0 measures (medseg.runtime), every rank follows."""
        cfg = self.cfg
        patch = tuple(int(p) for p in cfg.train.patch_size or ())
        batch = int(cfg.train.batch_size or 1) * int(cfg.augment.samples_per_volume)
        shape = (batch, int(cfg.model.in_channels or 1), *patch)
        use, why = False, ""
        if self.dist.main:
            use, why = training_channels_last(self.network, shape, max(self.label_ids) + 1, self.device,
                                              self.precision, requested=cfg.train.memory_format)
        use, why = self.dist.broadcast((use, why))
        if self.dist.main and self.device.type == "cpu":
            log.info("training memory format: %s", why)
        self.meta["train_memory_format"] = "channels_last_3d" if use else "contiguous"
        return bool(use)

    def _load(self, state: TrainState) -> None:
        self.network.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.scaler.load_state_dict(state.scaler)
        self.epoch, self.step_in_epoch, self.global_step = state.epoch, state.step_in_epoch, state.global_step
        self.best, self.stale, self.history = state.best, state.stale, list(state.history)
        if len(state.ranks) == self.dist.world:
            self._resume = state.ranks[self.dist.rank]
        else:
            log.warning("checkpoint was written by %d processes, this run has %d: random streams restart",
                        len(state.ranks), self.dist.world)
        if self.dist.main:
            log.info("resuming %s at epoch %d step %d", self.run_dir, self.epoch + 1, self.step_in_epoch)
            _sync_history(self.tracker, self.history)

    def _replan_schedule(self) -> None:
        """After ``train.epochs`` changed on resume: the learning rate of the epochs to come follows
        the schedule planned for the new total (the scheduler's multiplier is built from the config)."""
        done = self.scheduler.last_epoch
        before = [group["lr"] for group in self.optimizer.param_groups]
        for group, base, factor in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(done)
        if self.dist.main:
            tr = self.cfg.train
            warm = f"{tr.lr_warmup_fraction:.0%} warm-up, " if tr.lr_warmup_fraction else ""
            log.info("learning-rate schedule re-planned for %d epochs (%s%s decay): epoch %d lr %.3e (was %.3e)",
                     tr.epochs, warm, tr.scheduler, done + 1, self.optimizer.param_groups[0]["lr"], before[0])

    # --- the loop

    def run(self) -> tuple[list[dict[str, float]], float]:
        """Train to ``train.epochs`` (or an early stop); returns the history and the best validation Dice."""
        epochs = self.cfg.train.epochs
        interactive = self.dist.main and sys.stderr.isatty()
        self.bar = TrainingProgress(total_steps=epochs * len(self.loader), enabled=interactive)
        self._last_ckpt = time.monotonic()
        # for the time left in the epoch log lines; a run resumed mid-epoch starts part of the way in
        self._clock = (self._last_ckpt, self.epoch + self.step_in_epoch / max(1, len(self.loader)))
        fresh = self.global_step == 0
        refit = fresh and self.val_loader is not None
        since = 0  # the epochs the next refit averages: those since the last one (the speed now)
        epoch_times: list[float] = []
        try:
            epoch = self.epoch
            while epoch < self.cfg.train.epochs:
                started = time.monotonic()
                stats = self._train_epoch(epoch)
                epoch_times.append(time.monotonic() - started)
                if fresh and epoch == 0:
                    self._fit_epochs_to_budget(epoch_times[-1], done=1)
                epochs = self.cfg.train.epochs
                record = _epoch_record(epoch, stats, self.optimizer.param_groups[0]["lr"], self.dist)
                self.scheduler.step()
                out_of_time = self._out_of_time()
                validated = self._is_val_epoch(epoch) or out_of_time
                improved = validated and self._validate(epoch, record)
                if refit and validated and not out_of_time:
                    # the first validation measured what the plan estimated, and each one after it
                    # the speed since: fit the epochs again (a busy machine that went quiet)
                    recent = epoch_times[since:]
                    self._fit_epochs_to_budget(sum(recent) / len(recent), done=epoch + 1)
                    since = len(epoch_times)
                    epochs = self.cfg.train.epochs
                if self.deadline is not None:
                    record["elapsed_s"] = self.deadline.elapsed()
                self._end_epoch(epoch, record, improved)
                if out_of_time:
                    if self.dist.main and epoch + 1 < epochs:  # not when the last planned epoch ended
                        log.info("time budget: training stopped after epoch %d of %d (%d steps) to finish in time",
                                 epoch + 1, epochs, self.global_step)
                    break
                if validated and self._early_stop():
                    break
                epoch += 1
            if self.val_loader is None and self.dist.main:
                self._save_bundle(epochs, {})
            elif self.dist.main:
                self._prefer_final_model()
                self._warn_unlearned()
        finally:
            self.bar.close()
        self.dist.barrier()
        return self.history, self.best

    def _train_epoch(self, epoch: int) -> EpochStats:
        self.model.train()
        resume, self._resume = self._resume, None
        mid_epoch = resume is not None and self.step_in_epoch > 0
        if resume is not None:
            restore_rng(resume["rng_epoch_start"], self.augment, self.generator)
        epoch_rng = capture_rng(self.augment, self.generator)
        stats = EpochStats.from_partial(resume["partial"]) if mid_epoch and resume else EpochStats()
        batches = iter(self.loader)
        skip = self.step_in_epoch if mid_epoch else 0
        for _ in range(skip):  # replay the epoch's sampling and augmentation up to the checkpoint
            next(batches)
        if mid_epoch and resume is not None:
            restore_rng(resume["rng_now"], self.augment, self.generator)
        t_wait = time.perf_counter()
        for step, batch in enumerate(batches, start=skip):
            t_start = time.perf_counter()
            stats.wait += t_start - t_wait
            loss, n = self._step(batch)
            if loss is not None:  # None: a skipped step (non-finite gradients)
                stats.losses.append(loss)
            stats.samples += n
            self.global_step += 1
            self.step_in_epoch = step + 1
            t_wait = time.perf_counter()
            stats.compute += t_wait - t_start
            self._show_progress(epoch, stats)
            if self._checkpoint_within_epoch(epoch, epoch_rng, stats):
                t_wait = time.perf_counter()
            if self.deadline is not None:
                self.deadline.step_done()
            if self._out_of_time():
                break
        return stats

    def _fit_epochs_to_budget(self, epoch_s: float, *, done: int) -> None:
        """With a budget, after the first epoch and again after each validation: as many epochs as the
        measured epoch (and validation) durations leave room for. The plan's step and
        validation times come from a short warm-up and an estimate; a run faster than those would
        otherwise stop with budget unused (validation took 17 s against the 31 s planned on the
        2-core machine: half a minute of an 11-minute budget), and a slower one be cut before its
        last validation. The count is rounded up: the deadline cuts the last epoch short and
        validates it (rounded down, seed 1's 8.6 epochs of 55 s left became 8 and training ended
        75 s before its deadline, 11 % of the training time).

        More epochs than planned validate less often (``train.val_every`` scaled with them), so the
        plan's number of validations holds: a warm-up slowed by other work on the machine (1.24 s a
        step measured for a network that then ran 0.1 s) planned a tenth of the steps the budget
        held, and the run, refitted to at most 3x the planned epochs, ended at 20 s of its 90. Under
        a budget the learning rate decays with the time used as well as the steps, so more epochs
        than the run can finish still end annealed at the deadline."""
        deadline = self.deadline
        if deadline is None:
            return
        tr = self.cfg.train
        planned, planned_every = self._planned_epochs, self._planned_val_every
        left = max(0.0, deadline.training_left())

        def every(epochs: int) -> int:  # at least the planned number of validations, not many more
            return max(planned_every, planned_every * epochs // planned)

        def fit(val_every: int) -> int:
            per_epoch = epoch_s + deadline.validation_s / max(1, val_every)
            return done + math.ceil(left / max(per_epoch, 1e-6))

        epochs = fit(every(fit(tr.val_every)))
        epochs = int(self.dist.broadcast(max(2, done, min(epochs, REFIT_MAX * planned))))
        val_every = every(epochs)
        if (epochs, val_every) == (tr.epochs, tr.val_every):
            return
        if self.dist.main:
            # after the first epoch no validation has run yet: its time is still the plan's estimate
            log.info("time budget: %d epochs instead of %d%s (an epoch took %s s, a validation %s %s s; "
                     "%.0f s of training left)", epochs, tr.epochs,
                     f", validating every {val_every}" if val_every != tr.val_every else "", _seconds(epoch_s),
                     "is estimated at" if done == 1 else "took", _seconds(deadline.validation_s), left)
            # MLflow params are write-once: the first two fittings have their own keys, later ones
            # are in the log (and the fitted config in every checkpoint)
            suffix = "fitted" if done == 1 else "fitted_after_validation"
            params: dict[str, Any] = {f"train.epochs_{suffix}": epochs}
            if val_every != tr.val_every:
                params[f"train.val_every_{suffix}"] = val_every
            if self._params_fitted.isdisjoint(params):
                self.tracker.log_params(params)
                self._params_fitted.update(params)
        self.cfg = self.cfg.model_copy(
            update={"train": tr.model_copy(update={"epochs": epochs, "val_every": val_every})}
        )
        self.bar.set_total(epochs * len(self.loader))

    def _out_of_time(self) -> bool:
        """With a budget: rank 0's clock says training must stop now to validate and finish in time."""
        if self.deadline is None:
            return False
        return bool(self.dist.broadcast(self.deadline.must_stop_training()))

    def _budget_lr(self) -> None:
        """With a budget, the lr follows the planned steps per step (warm-up, then decay), and the
        share of the training time already used when that is further along."""
        if self.deadline is None:
            return
        cfg = self.cfg.train
        total = int(cfg.epochs) * len(self.loader)
        factor = lr_factor(self.global_step, total, warmup_fraction=cfg.lr_warmup_fraction,
                           kind=cfg.scheduler or "cosine", progress=self.deadline.training_progress())
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * factor

    def _step(self, batch: dict[str, Any]) -> tuple[float | None, int]:
        image, label = batch["image"].to(self.device), batch["label"].to(self.device)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        self._budget_lr()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            logits = self.model(image)
        # the loss in fp32 whatever the autocast dtype (DiceCE casts, in the copy it makes anyway)
        loss = self.ds_weights[0] * self.loss_fn(logits, label)
        for w, aux in zip(self.ds_weights[1:], getattr(self.network, "aux_outputs", []), strict=False):
            loss = loss + w * self.loss_fn(aux, label)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = self._clip_gradients()
        # DDP averaged the gradients before this: every rank sees the same norm and takes the same turn
        if not self.scaler.is_enabled() and not bool(torch.isfinite(norm)):
            self._skip_nonfinite_step(float(loss.detach()))
            return None, int(image.shape[0])
        self.scaler.step(self.optimizer)  # the fp16 grad scaler skips a non-finite step itself
        self.scaler.update()
        self.nonfinite_run = 0
        return float(loss.detach()), int(image.shape[0])

    def _clip_gradients(self) -> torch.Tensor:
        """Scale the gradients down to ``train.grad_clip`` total norm where they exceed it; the norm.

        On a CPU the gradients are multiplied only when the norm is over the limit (torch's
        ``clip_grad_norm_`` multiplies them by a factor clamped to 1 at every step: 1.4 ms of a
        0.17 s step here, where the norm stays under 12 after the first steps)."""
        params = [p for p in self.network.parameters() if p.grad is not None]
        limit = self.cfg.train.grad_clip
        if self.device.type != "cpu":
            return torch.nn.utils.clip_grad_norm_(params, limit)
        norm = torch.nn.utils.get_total_norm([g for g in (p.grad for p in params) if g is not None])
        if bool(torch.isfinite(norm)) and float(norm) > limit:
            torch.nn.utils.clip_grads_with_norm_(params, limit, norm)
        return norm

    def _skip_nonfinite_step(self, loss: float) -> None:
        """Leave the weights as they were; after a few such steps in bf16 go on in fp32; stop when
        full precision keeps producing them."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self.nonfinite_run += 1
        self.meta["skipped_nonfinite_steps"] = self.nonfinite_steps
        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch + 1}"
        if self.precision == "bf16" and self.nonfinite_steps >= NONFINITE_BF16_LIMIT:
            if self.dist.main:
                log.warning(
                    "training: %d steps in bf16 gave non-finite gradients (skipped, the last at %s); "
                    "the rest of this run trains in fp32 (slower; --set train.precision=fp32 from the start)",
                    self.nonfinite_steps, where,
                )
            self.precision = "fp32"
            self.meta["precision_note"] = f"bf16 -> fp32 at {where}: non-finite bf16 gradients"
            self.nonfinite_run = 0
        elif self.nonfinite_run >= NONFINITE_RUN_LIMIT:
            raise DivergedError(
                f"training diverged: {self.nonfinite_run} steps in a row gave non-finite gradients "
                f"({self.precision}, {where}, loss {loss:.4g}); lower train.lr (now {self.cfg.train.lr:g}) "
                "or check the labels"
            )
        elif self.dist.main:
            log.debug("skipped a step with non-finite gradients at %s (%s)", where, self.precision)

    def _show_progress(self, epoch: int, stats: EpochStats) -> None:
        n = len(self.loader)
        dice = next((h["val_dice"] for h in reversed(self.history) if "val_dice" in h), None)
        loss = float(np.mean(stats.losses[-n:])) if stats.losses else float("nan")  # none yet: every step skipped
        self.bar.update(completed=epoch * n + self.step_in_epoch, epoch=epoch + 1,
                        epochs=self.cfg.train.epochs, loss=loss, dice=dice)

    def _checkpoint_within_epoch(self, epoch: int, epoch_rng: dict[str, Any], stats: EpochStats) -> bool:
        """``timed.pt`` when due by time or steps, or on a stop signal (then stop). True when written."""
        every_s = max(0.0, self.cfg.train.checkpoint_every_minutes * 60.0)
        every_steps = self.cfg.train.checkpoint_every_steps
        due = (every_s > 0 and time.monotonic() - self._last_ckpt >= every_s) or bool(
            every_steps and self.global_step % every_steps == 0
        )
        due = due and self.step_in_epoch < len(self.loader)  # the epoch end writes last.pt anyway
        due, stopping = self.dist.broadcast((due, self.stop.is_set()))
        if not (due or stopping):
            return False
        self._save(TIMED, epoch, epoch_rng, stats)
        if stopping:
            self.bar.close()
            raise TrainingStoppedError(
                f"stopped by signal {self.stop.signum} at epoch {epoch + 1} step {self.step_in_epoch}; "
                f"the state is saved in {self.ckpt_dir / TIMED}: continue with --resume",
                signum=self.stop.signum,
            )
        return True

    def _is_val_epoch(self, epoch: int) -> bool:
        done = epoch + 1
        return self.val_loader is not None and (done % self.cfg.train.val_every == 0 or done == self.cfg.train.epochs)

    def _validate(self, epoch: int, record: dict[str, float]) -> bool:
        """Validation metrics into ``record``; a new best writes the bundle. True when improved."""
        started = time.monotonic()
        rows, first = validate(self.network, self.val_loader or [], self.cfg, self.device, self.label_ids,
                               precision=self.precision, keep_first=self.dist.main)
        if self.deadline is not None:
            self.deadline.validation_took(time.monotonic() - started)
        rows = [r for rank_rows in self.dist.gather(rows) for r in rank_rows]
        record.update(summarise(rows, self.labels))
        if record["val_dice"] <= self.best:
            self.stale += 1
            return False
        self.best, self.stale = record["val_dice"], 0
        if self.dist.main:
            per_label = {self.labels[k]: record.get(f"val_dice_{self.labels[k]}") for k in self.label_ids if k}
            self._save_bundle(epoch + 1, per_label)
            if first is not None:
                _overlay(first, self.run_dir / "overlays" / "val_best.png", self.cfg, epoch + 1)
        return True

    def _end_epoch(self, epoch: int, record: dict[str, float], improved: bool) -> None:
        self.history.append(record)
        self.epoch, self.step_in_epoch = epoch + 1, 0
        self._save(LAST, epoch + 1, None, EpochStats())
        if self.dist.main:
            if improved:
                promote(self.ckpt_dir, LAST, BEST)
            drop(self.ckpt_dir, TIMED)  # older than last.pt now
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            val = f" val Dice {record['val_dice']:.4f}" if "val_dice" in record else ""
            log.info("epoch %d/%d loss %.4f%s lr %.2e (%.1f samples/s, data wait %.0f%%%s)", epoch + 1,
                     self.cfg.train.epochs, record["train_loss"], val, record["lr"], record["samples_per_s"],
                     100 * record["data_wait_fraction"], self._time_left(epoch + 1))
        self._last_ckpt = time.monotonic()

    def _time_left(self, done: int) -> str:
        """', about N min left' from this process's epochs so far (validations included), for logs
        that have no progress bar (a batch job's log file); '' after the last epoch."""
        left = self.cfg.train.epochs - done
        if self._clock is None or left <= 0 or done <= self._clock[1]:
            return ""
        started, first = self._clock
        seconds = (time.monotonic() - started) / (done - first) * left
        return f", about {seconds / 60:.0f} min left" if seconds >= 90 else f", about {seconds:.0f} s left"

    def _early_stop(self) -> bool:
        patience = self.cfg.train.early_stopping_patience
        if patience is None or self.stale < patience:
            return False
        if self.dist.main:
            log.info("early stopping: no better validation Dice in %d validations", self.stale)
        return True

    # --- files

    def _save(self, name: str, epoch: int, epoch_rng: dict[str, Any] | None, stats: EpochStats) -> None:
        now = capture_rng(self.augment, self.generator)
        # at an epoch end the next epoch starts from the state now
        mine = {"rng_epoch_start": epoch_rng or now, "rng_now": now, "partial": stats.partial()}
        ranks = self.dist.gather(mine)
        if not self.dist.main:
            return
        state = TrainState(
            model=self.network.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=epoch,
            step_in_epoch=self.step_in_epoch,
            global_step=self.global_step,
            best=self.best,
            stale=self.stale,
            history=self.history,
            run_id=self.tracker.run_id,
            config=self.cfg.model_dump(mode="json"),
            ranks=ranks,
            world_size=self.dist.world,
            requested=self.requested,
            precision=self.precision,
        )
        save_state(state, self.ckpt_dir / name)

    def _prefer_final_model(self) -> None:
        """The bundle holds the final model when its validation Dice is within ``FINAL_MODEL_TOLERANCE``
        of the best one's (nnU-Net ships its final checkpoint too). On a few validation cases the
        "best" is often an early, undertrained model that scored higher by chance: on 11-minute phantom
        runs the best validation came at epoch 4 of 11 (0.866 against the final 0.858 on two cases),
        with the learning rate still at three quarters of its peak. Where the best beat the final by
        0.010-0.023 on two validation cases, seven runs' test cases gave the final model +0.004 on
        average (from -0.008 to +0.030; benchmarks/README.md). ``best.pt`` keeps the best."""
        last = self.history[-1] if self.history else {}
        if "val_dice" not in last or last["val_dice"] >= self.best:
            return  # not validated (stopped), or the final model is the best and already in the bundle
        if last["val_dice"] < self.best - FINAL_MODEL_TOLERANCE:
            log.info("bundle: the best validated model (Dice %.4f), the final one scored %.4f",
                     self.best, last["val_dice"])
            return
        per_label = {self.labels[k]: last.get(f"val_dice_{self.labels[k]}") for k in self.label_ids if k}
        self._save_bundle(int(last["epoch"]), per_label)
        log.info("bundle: the final model (validation Dice %.4f, within %.2f of the best, %.4f)",
                 last["val_dice"], FINAL_MODEL_TOLERANCE, self.best)

    def _warn_unlearned(self) -> None:
        """Say so when the bundle's model scores next to nothing on a label at validation: the
        network has not learned it (a small, low-contrast organ in a short training), and a user
        reading only the mean Dice would not see it. One line per label, the remedies named."""
        from medseg.bundle import METADATA

        path = self.bundle_dir / METADATA
        scores = json.loads(path.read_text()).get("val_dice", {}) if path.is_file() else {}
        for name, dice in scores.items():
            if dice is not None and dice < UNLEARNED_DICE:
                log.warning("label %r scores Dice %.3f on the validation cases: the model has not learned it; "
                            "train longer (--time-budget, train.epochs) or check its labels", name, dice)

    def _save_bundle(self, epoch: int, val_dice: dict[str, Any]) -> None:
        meta = {**self.meta, "best_epoch": epoch, "val_dice": val_dice, "precision": self.precision}
        save_bundle(self.bundle_dir, self.network, self.cfg, meta)


def _sync_history(tracker: Tracker, history: list[dict[str, float]]) -> None:
    """Log the epochs the checkpoint knows and the MLflow run does not (killed between the two)."""
    if not history or tracker.run_id is None:
        return
    logged = tracker.logged_steps("train_loss")
    for record in history:
        if int(record["epoch"]) not in logged:
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))


def _overlay(first: FirstCase, path: Path, cfg: Config, epoch: int) -> None:
    """The first validation case's predicted mask, labelled and coloured by the label files' values
    (as inference's QC pictures)."""
    from medseg.io import Volume
    from medseg.viz import overlay_png

    window = (float(np.percentile(first.image, 1)), float(np.percentile(first.image, 99)))
    mask = channels_to_values(first.prediction.astype(np.uint8), cfg.label_values)
    try:
        overlay_png(Volume(first.image.astype(np.float32), first.affine), mask, path, labels=cfg.stored_labels(),
                    window=window, title=f"validation, epoch {epoch}: predicted mask")
    except Exception as exc:  # a picture must never stop training
        log.warning("validation overlay not written (%s)", exc)


# ----------------------------------------------------------------------------- the run around the loop


def train(
    cfg: Config,
    data_root: str | Path,
    *,
    out_dir: str | Path | None = None,
    resume: bool | str = False,
    split: tuple[list[str], list[str]] | None = None,
) -> TrainResult:
    """Train a model on a dataset folder and write its bundle; see the module docstring.

    ``split``: the training and validation case names (``medseg.folds``); default: the
    split ``train.fold`` / ``train.val_fraction`` give.

    ``resume``: False (a run folder with checkpoints is refused), True/``"auto"`` (the valid
    checkpoint furthest along, or a fresh start when there is none), or a checkpoint path.
    A resumed run keeps its own settings; those given explicitly in ``cfg`` must agree with
    them, except ``train.epochs``, which extends the run (``medseg.resume``).
    """
    dist, device = init_distributed(cfg.train.device)
    try:
        with stop_signals() as stop:
            return _train(cfg, Path(data_root), out_dir, resume, dist, device, stop, split)
    finally:
        if dist.active:
            leave_distributed()


def _default_run_dir(dataset_root: Path, cfg: Config) -> Path:
    fold = "all" if cfg.train.fold is None else str(cfg.train.fold)
    return Path("runs") / dataset_root.resolve().name / cfg.model.name / f"fold_{fold}"


def _run_name(data_root: Path, cfg: Config) -> str:
    fold = cfg.train.fold if cfg.train.fold is not None else "all"
    return f"{data_root.resolve().name}-{cfg.model.name}-fold_{fold}"


def _resume_state(cfg: Config, run_dir: Path, resume: bool | str, dist: Dist) -> TrainState | None:
    """The checkpoint to continue from (rank 0 decides, every rank loads the same file)."""
    found: tuple[Path, TrainState] | None = None
    problem: MedsegError | None = None
    if dist.main:
        try:
            if resume:
                found = find_checkpoint(run_dir, "auto" if resume is True else resume)
                if found is None:
                    log.info("no checkpoint in %s: starting a fresh run", run_dir / "checkpoints")
            elif has_checkpoint(run_dir):
                problem = InputError(
                    run_dir, "holds a previous run; pass --resume to continue it or choose another --out"
                )
        except MedsegError as exc:
            problem = exc
    _raise_everywhere(problem, dist)
    path = dist.broadcast(str(found[0]) if found else None)
    if path is None:
        return None
    state = found[1] if dist.main and found else load_state(Path(path))
    if dist.main:
        log.debug("checkpoint to resume from: %s", path)
    return state


def _start_tracking(cfg: Config, data_root: Path, state: TrainState | None, dist: Dist) -> Tracker:
    """The MLflow run (a resumed run continues its own); an unreachable server stops us before any work."""
    tracker = Tracker(cfg.tracking, enabled=cfg.tracking.enabled and dist.main)
    error = None
    if dist.main:
        try:
            tracker.start(run_name=_run_name(data_root, cfg), run_id=state.run_id if state else None)
        except TrackingError as exc:
            error = exc
    _raise_everywhere(error, dist)
    return tracker


@dataclass
class _Prepared:
    cfg: Config  # planned
    fp: Fingerprint
    train_cases: list
    val_cases: list
    budget: BudgetPlan | None = None


def _prepare(cfg: Config, dataset: Dataset, run_dir: Path, dist: Dist, device: torch.device,
             started: float, *, resumed: bool = False, note: list[str] | None = None,
             chosen: tuple[list[Case], list[Case]] | None = None) -> _Prepared:
    """Fingerprint (cached in the run folder), plan (with a time budget: measured on rank 0), splits;
    rank 0 writes them beside the run (``note``: lines said on top of plan.yaml and plan.txt)."""
    fp_path = run_dir / "fingerprint.json"
    fp: Fingerprint | None = None
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if fp_path.exists():
            fp = Fingerprint.load(fp_path)
        else:
            fp = fingerprint(dataset, seed=cfg.seed, resample_channels=cfg.preprocess.resample_channels)
            write_text_atomic(fp_path, fp.to_json())
    fp = dist.broadcast(fp)
    budget: BudgetPlan | None = None
    no_budget = ""  # on a CPU without a budget, why (the plan's summary says it)
    if resumed:  # the run keeps its own plan (steps, schedule); its deadline counts the time it spent
        cfg = make_plan(cfg, fp)
    elif dist.main:
        out_channels = max(cfg.labels or {0: ""}) + 1
        why = resolve_budget(cfg, device.type)[1]  # of the user's config: the plan fills in the patch
        cfg, budget = plan_for_budget(cfg, fp, device=device.type, out_channels=out_channels,
                                      elapsed_s=time.monotonic() - started)
        no_budget = why if budget is None and device.type == "cpu" else ""
    cfg, budget = dist.broadcast((cfg, budget))
    if chosen is not None:
        train_cases, val_cases = chosen
    else:
        train_cases, val_cases = split_cases(dataset.training, seed=cfg.seed, val_fraction=cfg.train.val_fraction,
                                             fold=cfg.train.fold, num_folds=cfg.train.num_folds)
    if dist.main:
        if mapped := mapping_note(cfg):
            log.info("%s", mapped)
        summary = plan_summary(cfg, fp) + ("\n" + budget.summary() if budget else "")
        if no_budget:  # on a CPU: why nothing was planned for its speed (a patch given)
            summary += f"\n  budget     {no_budget}"
        log.info("%s", summary)
        note = [*(_resume_notes(run_dir / "plan.yaml") if resumed else []), *(note or [])]
        lines = [*note, *(budget.summary().splitlines() if budget else [])]
        comment = "".join(f"# {line}\n" for line in lines)
        write_text_atomic(run_dir / "plan.yaml", comment + dump_config(cfg))
        write_text_atomic(run_dir / "plan.txt", "".join(f"{line}\n" for line in note) + summary + "\n")
        splits = {"fold": cfg.train.fold, "num_folds": cfg.train.num_folds, "seed": cfg.seed,
                  "train": [c.name for c in train_cases], "val": [c.name for c in val_cases]}
        write_text_atomic(run_dir / "splits.json", json.dumps(splits, indent=2))
    return _Prepared(cfg, fp, train_cases, val_cases, budget)


def _resume_notes(plan_yaml: Path) -> list[str]:
    """The ``# resumed at ...`` lines an earlier resume wrote on top of plan.yaml (kept on rewrite)."""
    if not plan_yaml.is_file():
        return []
    return [line[2:] for line in plan_yaml.read_text().splitlines() if line.startswith("# resumed at ")]


def _cases_by_name(dataset: Dataset, split: tuple[list[str], list[str]]) -> tuple[list[Case], list[Case]]:
    """The dataset's training cases named by ``split`` (training names, validation names)."""
    by_name = {c.name: c for c in dataset.training}
    unknown = sorted({n for names in split for n in names} - set(by_name))
    if unknown:
        raise InputError(dataset.root, f"the split names {len(unknown)} case(s) not in the dataset, e.g. {unknown[0]!r}")
    return [by_name[n] for n in split[0]], [by_name[n] for n in split[1]]


def _saved_split(dataset: Dataset, path: Path) -> tuple[list[Case], list[Case]] | None:
    """The training and validation cases a run recorded in its splits.json (None without one)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        split = (list(saved["train"]), list(saved["val"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"the run's split does not read ({exc}); use a new --out") from exc
    return _cases_by_name(dataset, split)


def _log_run_params(tracker: Tracker, prep: _Prepared, run_dir: Path, device: torch.device, dist: Dist) -> None:
    commit = git_commit()
    tracker.log_params(
        {
            **flatten(config_tree(prep.cfg)),
            "fingerprint_hash": prep.fp.hash,
            "n_train": len(prep.train_cases),
            "n_val": len(prep.val_cases),
            "device": device.type,
            "world_size": dist.world,
            "train_cases_per_rank": len(dist.shard(prep.train_cases, even=True)),
            **({"git_commit": commit} if commit else {}),
            **{f"version.{k}": v for k, v in package_versions().items()},
            **(prep.budget.params() if prep.budget else {}),
        }
    )
    for name in ("plan.yaml", "splits.json", "fingerprint.json"):
        tracker.log_artifact(run_dir / name)


def _train(
    cfg: Config, data_root: Path, out_dir, resume: bool | str, dist: Dist, device: torch.device, stop: StopFlag,
    split: tuple[list[str], list[str]] | None = None,
) -> TrainResult:
    started = time.monotonic()
    requested = explicit_settings(cfg)  # what the user asked for, before anything is filled in
    dataset = load_dataset(data_root, allow_outside_root=cfg.data.allow_outside_root)
    cfg = channel_labels(cfg, dataset.labels)  # label values not 0..K-1 train on channels 0..K-1
    chosen = _cases_by_name(dataset, split) if split is not None else None
    run_dir = Path(out_dir) if out_dir else _default_run_dir(data_root, cfg)
    # one run per folder: a second one is refused (naming the holder) on every rank before it touches anything
    with exclusive_on_every_rank(run_dir, dist, what="training run"):
        if dist.main:
            sweep_partials(run_dir)  # temp files of writes a killed run left behind
        return _train_locked(cfg, requested, dataset, run_dir, resume, dist, device, stop, started, chosen)


def _train_locked(
    cfg: Config, requested: dict[str, Any], dataset: Dataset, run_dir: Path, resume: bool | str, dist: Dist,
    device: torch.device, stop: StopFlag, started: float, chosen: tuple[list[Case], list[Case]] | None = None,
) -> TrainResult:
    data_root = dataset.root
    state = _resume_state(cfg, run_dir, resume, dist)
    going_on: Continuation | None = None
    if state is not None and state.config:
        # the run continues as it was planned (spacing, patch, schedule); only a longer run is accepted
        going_on = continue_run(requested, state, run_dir)
        cfg, requested = going_on.cfg, going_on.requested
        if chosen is None:  # the cases the run has trained on so far, whatever the dataset order now
            chosen = _saved_split(dataset, run_dir / "splits.json")
        if dist.main:
            log.info("resuming from %s with the run's own configuration", run_dir / "checkpoints")
    tracker = _start_tracking(cfg, data_root, state, dist)
    status, best = "FAILED", -1.0
    history: list[dict[str, float]] = []
    try:
        changes = going_on.describe() if going_on is not None else []
        note = [f"resumed at epoch {state.epoch} with: {line}" for line in changes] if state else []
        prep = _prepare(cfg, dataset, run_dir, dist, device, started, resumed=state is not None, note=note,
                        chosen=chosen)
        cfg = prep.cfg
        deadline = Deadline.for_run(cfg, prep.budget, started=started, history=state.history if state else [])
        if state is None:
            _log_run_params(tracker, prep, run_dir, device, dist)
        elif changes and dist.main:
            for line in note:
                log.info("%s", line)
            tracker.log_params({f"resumed_at_step_{state.global_step}.{k}": v for k, _, v in
                                (line.partition(": ") for line in changes)})
        fp = prep.fp.to_dict()
        meta = {"fingerprint_hash": prep.fp.hash, "dataset": dataset.root.resolve().name,
                "train_cases": len(prep.train_cases), "label_volumes_ml": fp.get("label_volumes_ml", {}),
                "label_components_max": fp.get("label_components_max", {})}
        if stop.is_set():
            raise TrainingStoppedError("stopped by a signal before training began", signum=stop.signum)
        trainer = Trainer(cfg, run_dir, prep.train_cases, prep.val_cases, dist=dist, device=device,
                          tracker=tracker, meta=meta, stop=stop, state=state, deadline=deadline,
                          requested=requested, replan_schedule=bool(going_on and going_on.epochs))
        try:
            history, best = trainer.run()
        finally:
            trainer.unwrap()  # the DDP wrapper must be gone before the process group (leave_distributed)
        if dist.main and cfg.postprocess.tune_on_validation and prep.val_cases:
            _tune_postprocessing(run_dir, prep.val_cases, device, deadline, tracker)
        status = "FINISHED"
    except (KeyboardInterrupt, StoppedError):
        status = "KILLED"
        raise
    finally:
        if dist.main:
            _finish(tracker, run_dir, history, cfg, status)
    return TrainResult(run_dir=run_dir, bundle=run_dir / "bundle", run_id=tracker.run_id, best_dice=best,
                       history=history, config=cfg, duration_s=time.monotonic() - started)


def _tune_postprocessing(run_dir: Path, val_cases: list, device: torch.device, deadline: Deadline | None,
                         tracker: Tracker) -> None:
    """Post-processing (and CRF) chosen on the validation cases, stored in the bundle (medseg.tuning).
    Under a time budget the CRF is tried only when the time left allows it."""
    from medseg.tuning import tune_bundle

    if not (run_dir / "bundle").is_dir():
        return
    # tuning predicts the validation cases once more: about one validation's time (CRF: more)
    if deadline is not None and deadline.remaining() < deadline.validation_s + 0.25 * deadline.final_s:
        log.info("time budget: no time left to tune the post-processing; the bundle keeps its configured steps")
        return
    try_crf = deadline is None or deadline.remaining() > deadline.validation_s + 0.5 * deadline.final_s
    try:
        report = tune_bundle(run_dir / "bundle", val_cases, device=device, try_crf=try_crf,
                             time_left=None if deadline is None else deadline.remaining())
    except Exception as exc:  # tuning must never lose a trained model
        log.warning("post-processing not tuned (%s: %s); the bundle keeps its configured steps",
                    type(exc).__name__, exc)
        return
    if report is None:
        return
    write_text_atomic(run_dir / "postprocess_tuning.md", report.table() + "\n")
    tracker.log_artifact(run_dir / "postprocess_tuning.md")
    tracker.log_metrics({f"val_pp_dice_{report.value(k)}": v for k, v in report.final_dice.items()}, step=0)
    kept = report.kept_summary() or "none"
    log.info("post-processing chosen on validation: %s", kept)


def _finish(tracker: Tracker, run_dir: Path, history, cfg: Config, status: str) -> None:
    bundle_dir = run_dir / "bundle"
    if status == "FINISHED":
        from medseg.viz import training_curves_png

        if history:
            tracker.log_artifact(training_curves_png(history, run_dir / "curves.png"))
        tracker.log_artifact(run_dir / "plan.txt")
        if (run_dir / "overlays").is_dir():
            tracker.log_artifact(run_dir / "overlays", "overlays")
        if bundle_dir.exists():
            tracker.log_artifact(bundle_dir, "bundle")
            tracker.log_bundle_model(bundle_dir)  # the whole pipeline as a pyfunc; registered/aliased per config
    tracker.end(status)
