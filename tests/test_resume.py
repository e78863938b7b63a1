"""Never lose work: SIGKILL a training process after its first checkpoint, resume it, compare."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from medseg.checkpoint import LAST as CHECKPOINT
from medseg.checkpoint import TIMED as TIMED_CHECKPOINT
from medseg.checkpoint import TrainState, find_checkpoint, save_state
from medseg.errors import InputError
from tests.helpers import REPO, TINY_ARGS, run_cli

EPOCHS = 4
TINY = [
    "--epochs",
    str(EPOCHS),
    *TINY_ARGS,
    *("--set", "train.val_every=2"),
    *("--set", "train.val_surface_metrics=false"),
    *("--set", "augment.samples_per_volume=2"),
    *("--set", "tracking.log_model=false"),
    # a mid-epoch checkpoint after every step, so the kill lands mid-epoch
    *("--set", "train.checkpoint_every_steps=1"),
]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tiny_dataset, tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medseg", "train", "--data", str(tiny_dataset), "--out", "killed", *TINY],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 240
    while not ((ckpt_dir / TIMED_CHECKPOINT).exists() or (ckpt_dir / CHECKPOINT).exists()):
        assert proc.poll() is None, f"training ended before its first checkpoint:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)  # freeze it where it is, then kill: no step can slip past the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "bundle").exists(), "the run finished before it was killed"
    first = sorted(p.name for p in ckpt_dir.iterdir())

    # without --resume the folder is refused; with it the run goes on (a fresh process, as after a crash)
    from medseg.cli import main

    args = ["train", "--data", str(tiny_dataset), *TINY]
    assert main([*args, "--out", str(tmp_path / "killed")]) == 2
    assert "--resume" in capsys.readouterr().err
    began = find_checkpoint(tmp_path / "killed", "auto")[1].precision
    assert began in ("fp32", "bf16")
    resumed = run_cli(*args, "--out", "killed", "--resume", cwd=tmp_path, check=True)
    assert "resuming" in resumed.stderr
    # the reference: the same run, uninterrupted (in this process, to spare a start-up), in the
    # precision the killed run measured for itself (this process may have measured another earlier)
    assert main([*args, "--set", f"train.precision={began}", "--out", str(tmp_path / "straight")]) == 0

    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    assert len(runs) == 2, "a resumed run must continue its MLflow run, not open another"
    assert all(run.info.status == "FINISHED" for run in runs)
    state = torch.load(tmp_path / "killed" / "checkpoints" / CHECKPOINT, weights_only=True)
    killed_id = state["run_id"]
    straight_id = next(r.info.run_id for r in runs if r.info.run_id != killed_id)
    assert state["epoch"] == EPOCHS
    assert state["precision"] == began, "the resumed run changed precision"

    for key in ("lr", "train_loss"):
        killed, straight = _history(client, killed_id, key), _history(client, straight_id, key)
        assert [s for s, _ in killed] == list(range(1, EPOCHS + 1)), f"{key}: steps {killed} (first {first})"
        assert [s for s, _ in straight] == list(range(1, EPOCHS + 1))
        if key == "lr":
            assert [v for _, v in killed] == pytest.approx([v for _, v in straight], rel=1e-9)
        else:
            # same batches, same augmentation, same weights: the same losses up to float noise
            assert [v for _, v in killed] == pytest.approx([v for _, v in straight], rel=1e-3), first
    val_k = _history(client, killed_id, "val_dice")
    val_s = _history(client, straight_id, "val_dice")
    assert [s for s, _ in val_k] == [2, 4]
    assert [v for _, v in val_k] == pytest.approx([v for _, v in val_s], abs=1e-3)
    assert (tmp_path / "killed" / "bundle" / "model.safetensors").exists()


def test_a_resumed_run_keeps_the_precision_it_began_in(tiny_dataset, tmp_path, monkeypatch, capsys):
    """bf16 is chosen by measuring this CPU; a busier machine may measure it slower the next day,
    but a run resumed then must not change its numerics half-way (nor a bf16 run's memory layout)."""
    from medseg import runtime
    from medseg.cli import main

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 3.0)
    args = ["train", "--data", str(tiny_dataset), *TINY_ARGS, "--set", "tracking.log_model=false"]
    run = tmp_path / "run"
    assert main([*args, "--epochs", "1", "--out", str(run)]) == 0
    ckpt = run / "checkpoints" / CHECKPOINT
    assert torch.load(ckpt, weights_only=True)["precision"] == "bf16"
    capsys.readouterr()

    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.5)  # today bf16 measures slower
    assert main([*args, "--epochs", "2", "--out", str(run), "--resume"]) == 0
    assert "precision: bf16, as the run began" in capsys.readouterr().err
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["precision"]) == (2, "bf16")
    # a new run measures afresh and picks fp32
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "new")]) == 0
    assert torch.load(tmp_path / "new" / "checkpoints" / CHECKPOINT, weights_only=True)["precision"] == "fp32"

    # moved to a CPU without native bf16: the run goes on in fp32 and says so
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert main([*args, "--epochs", "3", "--out", str(run), "--resume"]) == 0
    assert "began in bf16, which this CPU does not run natively: it goes on in fp32" in capsys.readouterr().err
    assert torch.load(ckpt, weights_only=True)["precision"] == "fp32"


def _fake_checkpoint(path, step: int) -> None:
    state = TrainState(model={}, optimizer={}, scheduler={}, scaler={}, epoch=1, step_in_epoch=0,
                       global_step=step, best=-1.0, stale=0, history=[], run_id=None, config={}, ranks=[])
    save_state(state, path)


def test_resume_auto_skips_corrupt_checkpoint(tmp_path, caplog):
    ckpt = tmp_path / "checkpoints"
    _fake_checkpoint(ckpt / CHECKPOINT, step=4)
    (ckpt / TIMED_CHECKPOINT).write_bytes(b"\x00partial write")
    path, state = find_checkpoint(tmp_path, "auto")
    assert path.name == CHECKPOINT
    assert state.global_step == 4
    assert "skipping checkpoint" in caplog.text

    # the newest valid one wins
    _fake_checkpoint(ckpt / TIMED_CHECKPOINT, step=6)
    path, _ = find_checkpoint(tmp_path, "auto")
    assert path.name == TIMED_CHECKPOINT

    # all corrupt: refused, not silently restarted
    for p in ckpt.iterdir():
        p.write_bytes(b"garbage")
    with pytest.raises(InputError, match="no checkpoint there loads"):
        find_checkpoint(tmp_path, "auto")
    # nothing at all: a fresh start
    assert find_checkpoint(tmp_path / "empty", "auto") is None


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(tiny_dataset, tmp_path):
    """A scheduler's SIGTERM (pre-emption) ends training with its state saved, ready to resume."""
    import threading

    from medseg.config import load_config
    from medseg.train import TrainingStoppedError, train

    overrides = [TINY[i + 1] for i in range(len(TINY)) if TINY[i] == "--set"]
    cfg = load_config(None, [*overrides, f"train.epochs={EPOCHS}", "tracking.enabled=false"])
    ckpt = tmp_path / "run" / "checkpoints" / TIMED_CHECKPOINT

    def terminate_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=terminate_after_first_checkpoint, daemon=True)
    watcher.start()
    with pytest.raises(TrainingStoppedError, match="continue with --resume"):
        train(cfg, tiny_dataset, out_dir=tmp_path / "run")
    watcher.join(timeout=5)
    state = torch.load(ckpt, weights_only=True)
    assert state["step_in_epoch"] >= 1
    assert not (tmp_path / "run" / "bundle").exists()
    # the handler was removed again: SIGTERM means what it meant before
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.slow
def test_two_trainings_into_one_folder_the_second_is_refused(tiny_dataset, tmp_path):
    """Run B into run A's folder is refused with A's PID; once A is killed, the folder is free again."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["train", "--data", str(tiny_dataset), "--out", "run", *TINY[:1], "50", *TINY[2:]]
    first = subprocess.Popen([sys.executable, "-m", "medseg", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        ckpt_dir = tmp_path / "run" / "checkpoints"
        while not (ckpt_dir / TIMED_CHECKPOINT).exists() and not (ckpt_dir / CHECKPOINT).exists():
            assert first.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = run_cli(*args, cwd=tmp_path, timeout=120)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"PID {first.pid}" in lines[0]
        assert first.poll() is None, "the refused run must not disturb the running one"
    finally:
        first.kill()
        first.wait(timeout=30)
    # the kernel released the lock with the process: the next run (a resume) is not blocked
    from medseg.locks import exclusive

    with exclusive(tmp_path / "run"):
        pass
