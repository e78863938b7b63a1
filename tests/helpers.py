"""What several test modules share: the repo paths, running the CLI as a user would, the tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from medseg.config import flatten

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDSEG_SHARED_DATA") or REPO.parent / "shared" / "data") / "totalsegmentator"
# CI sets this: a missing ../shared/data then fails the real-scan tests instead of skipping them
REQUIRE_SHARED_DATA = os.environ.get("MEDSEG_REQUIRE_SHARED_DATA", "") not in ("", "0")

# the smallest settings that run the real pipeline (medseg/configs/smoke.yaml, one file for every test)
TINY_OVERRIDES: list[str] = [
    f"{key}={value}"
    for key, value in flatten(yaml.safe_load((REPO / "medseg" / "configs" / "smoke.yaml").read_text())).items()
]
TINY_ARGS: list[str] = [arg for item in TINY_OVERRIDES for arg in ("--set", item)]


def train_untuned_bundle(dataset: Path, out: Path) -> Path:
    """A one-epoch bundle at the tiny settings with the post-processing tuning off (what a tuning
    keeps depends on the training), tracking off; returns the bundle folder."""
    from medseg.config import load_config
    from medseg.train import train

    cfg = load_config(
        None,
        [*TINY_OVERRIDES, "train.epochs=1", "tracking.enabled=false", "postprocess.tune_on_validation=false"],
    )
    return train(cfg, dataset, out_dir=out).bundle


def run_cli(*args: str, cwd: Path, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m medseg ARGS`` as a user would, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "medseg", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"medseg {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def run_torchrun(*args: str, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m medseg ARGS`` on 127.0.0.1 (Gloo on CPU), output captured."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "medseg", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
