"""A time-budgeted run whose warm-up is slower than the run: how much of its budget does training use?

The budget plan measures a few training steps at candidate sizes and plans the patch and the number
of steps from them. On a shared machine a burst of other work can land on that warm-up; the plan then
buys too few steps, and only the epochs fitted to the run's own speed can use the budget. Two ways to
slow the warm-up, each on a tiny synthetic dataset with a 90 s budget (as ``tests/test_budget.py``):

- ``--factor F``: every warm-up measurement multiplied by F (a busy machine that went quiet just before
  the first step; deterministic);
- ``--busy N``: N processes spinning for the first 15 s of the run (the warm-up and what follows; as
  it happens, so the plan differs from run to run).

Prints the seconds used of the budget, the steps planned and run, the validations and the validation
Dice; writes JSON to benchmarks/results/ (``--out``).

Run: python benchmarks/slow_warmup.py --factor 1 10 --busy 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "slow_warmup.json"
OVERRIDES = ["train.time_budget_s=90", "model.features=4", "model.depth=2", "preprocess.spacing=[3,3,4]",
             "tracking.enabled=false", "train.val_surface_metrics=false"]
SPIN = "import time\nt = time.time()\nwhile time.time() - t < 15: pass"


def one_run(factor: float, busy: int) -> dict:
    """One 90 s budgeted run in this process, its warm-up slowed ``factor`` times or beside ``busy`` spinners."""
    import medseg.plan as plan
    from medseg.config import load_config
    from medseg.synthetic import make_dataset
    from medseg.train import train

    measure = plan.measure_step_seconds
    plan.plan_for_budget.__kwdefaults__["measure"] = lambda *a, **k: factor * measure(*a, **k)
    tmp = Path(tempfile.mkdtemp())
    make_dataset(tmp / "data", cases=5, size=24, seed=1, test_fraction=0.2)
    cfg = load_config(None, OVERRIDES)
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        result = train(cfg, tmp / "data", out_dir=tmp / "run")
    finally:
        for p in spinners:
            p.wait()
    text = (tmp / "run" / "plan.txt").read_text()
    steps_planned = next((int(w) for line in text.splitlines() if "steps of" in line
                          for w in line.split(":", 1)[1].split()[:1] if w.isdigit()), None)
    validated = [h["val_dice"] for h in result.history if h.get("val_dice") is not None]
    return {
        "factor": factor,
        "busy": busy,
        "budget_s": 90,
        "used_s": round(result.duration_s, 1),
        "steps_planned": steps_planned,
        "steps_run": int(sum(h.get("steps", 0) for h in result.history)),
        "epochs_run": len(result.history),
        "validations": len(validated),
        "final_val_dice": round(validated[-1], 3) if validated else None,
        "plan": [line.strip() for line in text.splitlines() if "patch " in line or "steps of" in line][:2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=float, nargs="*", default=[1.0, 10.0], help="warm-up slowdowns")
    parser.add_argument("--busy", type=int, nargs="*", default=[6], help="spinning processes beside the warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON written (default: {RESULTS})")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: factor, busy
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(float(args.one[0]), int(args.one[1]))))
        return
    rows = []
    for factor, busy in [(f, 0) for f in args.factor] + [(1.0, b) for b in args.busy]:
        proc = subprocess.run([sys.executable, __file__, "--one", str(factor), str(busy)], capture_output=True,
                              text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"warm-up x{factor:g}, {busy} busy: {row['used_s']} of 90 s used, {row['steps_planned']} steps "
              f"planned, {row['steps_run']} run, {row['validations']} validations, Dice {row['final_val_dice']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    args.out.write_text(json.dumps({"machine": machine, "runs": rows}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
