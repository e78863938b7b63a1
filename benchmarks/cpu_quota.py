"""torch's threads under a CPU quota: the host's count (torch's default) against medseg's fitted one.

A container's CPU quota (``docker run --cpus N``, a Kubernetes CPU limit) does not change what torch
sees: it starts one thread per core of the host. Each measurement here runs in a fresh child
process placed in a cgroup of its own with a quota of Q CPUs (v1 ``cpu.cfs_quota_us`` or v2
``cpu.max``, what Docker writes), and times the default DynUNet's training step (forward, Dice+CE
-like loss, backward, AdamW; 80x96x32, batch 2, fp32) and its inference forward (no grad, batch 2)
with torch's default thread count and with ``medseg.runtime.fit_threads_to_cpus``'s (the quota
rounded up). The two settings alternate process by process, ``--rounds`` times. Needs root (it
makes cgroups); prints a table and writes JSON.

Run: sudo python benchmarks/cpu_quota.py [--quotas 0.5 1 1.25 1.5] [--rounds 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(threads: int, steps: int) -> dict:
    """Step and forward times with ``threads`` torch threads (0: torch's default), in this process."""
    import torch

    from medseg.config import ModelConfig
    from medseg.models import build_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_model(ModelConfig(), out_channels=4)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x, y = torch.randn(2, 1, 80, 96, 32), torch.randint(0, 4, (2, 80, 96, 32))

    def step() -> float:
        start = time.perf_counter()
        out = net(x)
        out = out[:, 0] if out.dim() == 6 else out  # deep supervision: the full-resolution head
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    def forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            net.eval()(x)
        net.train()
        return time.perf_counter() - start

    for _ in range(2):
        step()
    steps_s = [step() for _ in range(steps)]
    forward()
    forward_s = [forward() for _ in range(steps)]
    return {"threads": torch.get_num_threads(), "step_s": steps_s, "forward_s": forward_s}


def _quota_group(quota: float | None) -> Path | None:
    """A fresh cgroup with ``quota`` CPUs (None: no group, the machine as it is)."""
    if quota is None:
        return None
    from medseg.cgroups import cgroup_dirs

    for folder, version in cgroup_dirs():
        if not os.access(folder, os.W_OK):
            continue
        if version == "v2" and "cpu" not in (folder / "cgroup.subtree_control").read_text().split():
            continue
        group = folder / f"medseg-bench-{uuid.uuid4().hex[:8]}"
        group.mkdir()
        if version == "v1":
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
        else:
            (group / "cpu.max").write_text(f"{int(quota * 100000)} 100000")
        return group
    raise SystemExit("cpu_quota.py: no cgroup this user may create (run as root on a machine with cgroups)")


def run_in(group: Path | None, threads: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, __file__, "--child", str(threads), "--steps", str(steps)]
    if group is not None:
        cmd = ["sh", "-c", f"echo $$ > {group / 'cgroup.procs'} && exec \"$@\"", "sh", *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quotas", type=float, nargs="+", default=[0.5, 1.0, 1.25, 1.5])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "cpu_quota.json"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps)))
        return
    from run_all import machine_info

    out: dict = {"machine": machine_info(), "steps": args.steps, "rounds": args.rounds, "quotas": {}}
    print(f"{'quota (CPUs)':>12} {'threads':>9} {'step s (median)':>16} {'forward s':>10}")
    for quota in args.quotas:
        fitted = max(1, math.ceil(quota - 1e-6))
        runs: dict[str, list[dict]] = {"default": [], "fitted": []}
        for _ in range(args.rounds):
            for name, threads in (("default", 0), ("fitted", fitted)):
                group = _quota_group(quota)
                try:
                    runs[name].append(run_in(group, threads, args.steps))
                finally:
                    if group is not None:
                        group.rmdir()
        row = {}
        for name, results in runs.items():
            step = statistics.median(s for r in results for s in r["step_s"])
            fwd = statistics.median(s for r in results for s in r["forward_s"])
            row[name] = {"threads": results[0]["threads"], "step_median_s": round(step, 4),
                         "forward_median_s": round(fwd, 4), "runs": results}
            print(f"{quota:>12g} {results[0]['threads']:>9} {step:>16.3f} {fwd:>10.3f}")
        row["step_speedup"] = round(row["default"]["step_median_s"] / row["fitted"]["step_median_s"], 3)
        row["forward_speedup"] = round(row["default"]["forward_median_s"] / row["fitted"]["forward_median_s"], 3)
        print(f"{'':>12} fitted/default: step {row['step_speedup']}x, forward {row['forward_speedup']}x")
        out["quotas"][str(quota)] = row
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
