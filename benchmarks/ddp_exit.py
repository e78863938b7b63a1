"""How often a torchrun rank aborts on leaving: a DDP model left for the interpreter's exit, or collected first.

Each launch is ``torchrun --nproc_per_node 2`` (Gloo, CPU) of a child that does what a medseg training
rank does at its end: a few DistributedDataParallel steps, an ``all_gather_object``, a broadcast, a
barrier; rank 0 then works on alone for half a second (medseg's post-processing tuning) while rank 1
leaves. ``--mode left`` destroys the process group with the DDP model still referenced (medseg before
``runtime.leave_distributed``); ``--mode collected`` drops the model and calls ``leave_distributed``.
A launch fails where a rank exits non-zero: the abort seen is rank 1's "terminate called without an
active exception" (SIGABRT) while Python shuts down. The two modes alternate launch by launch;
``--stress N`` keeps N busy processes running beside them (the abort is a race: it shows more often on
a busy machine). Prints the counts and writes JSON.

Run: python benchmarks/ddp_exit.py [--launches 40] [--stress 2] [--out results/ddp_exit.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(mode: str) -> None:
    """One rank's life under torchrun (see the module docstring)."""
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from medseg.runtime import leave_distributed

    dist.init_process_group("gloo")
    model = DistributedDataParallel(torch.nn.Linear(64, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(16, 64)).sum().backward()
        optimizer.step()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": dist.get_rank()})
    box = [None]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    if dist.get_rank() == 0:
        time.sleep(0.5)
    if mode == "collected":
        del model, optimizer
        leave_distributed()
    else:
        dist.destroy_process_group()


def launch(mode: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, "--child", mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    aborted = "terminate called without an active exception" in proc.stderr
    return {"mode": mode, "rc": proc.returncode, "aborted": aborted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=40, help="launches per mode (default 40)")
    ap.add_argument("--stress", type=int, default=2, help="busy processes beside the launches (default 2)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddp_exit.json"))
    ap.add_argument("--child", choices=("left", "collected"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.stress)]
    rows: list[dict] = []
    try:
        for i in range(args.launches):
            for mode in ("left", "collected"):
                rows.append(launch(mode))
            done = {m: [r for r in rows if r["mode"] == m] for m in ("left", "collected")}
            print(f"launch {i + 1}/{args.launches}: " + ", ".join(
                f"{m} {sum(r['rc'] != 0 for r in rs)} failed" for m, rs in done.items()), flush=True)
    finally:
        for hog in hogs:
            hog.kill()
    summary = {}
    for mode in ("left", "collected"):
        rs = [r for r in rows if r["mode"] == mode]
        summary[mode] = {"launches": len(rs), "failed": sum(r["rc"] != 0 for r in rs),
                         "aborted_at_exit": sum(r["aborted"] for r in rs)}
    import torch

    record = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "stress_processes": args.stress, "summary": summary, "launches": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"{'mode':<10} {'launches':>8} {'failed':>7} {'aborted at exit':>16}")
    for mode, s in summary.items():
        print(f"{mode:<10} {s['launches']:>8} {s['failed']:>7} {s['aborted_at_exit']:>16}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
