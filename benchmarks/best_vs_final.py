"""The bundle's model, best validated or final: both scored on a finished run's test cases.

For each ``--run RUN_FOLDER --data DATASET`` pair (an ``accuracy.py`` run: ``medseg_run`` under its
``--work`` folder, the Decathlon set it trained on): the weights of ``checkpoints/best.pt`` (what a
0.01 tolerance shipped) and of ``checkpoints/last.pt`` each go into a copy of the run's bundle, are
tuned again by ``medseg tune`` on the run's own validation cases (so each model gets its own
post-processing, as training would have chosen it), then ``medseg infer`` runs on the test cases,
scored as ``accuracy.py`` scores them. Prints a table and writes JSON. Used for
``medseg.train.FINAL_MODEL_TOLERANCE`` (benchmarks/README.md, sixteenth session).

Run: python benchmarks/best_vs_final.py --run W/phantoms_seed21_11min/medseg_run --data W/phantoms_seed21
     [--run ... --data ...] [--work /tmp/medseg-best-vs-final] [--out results/best_vs_final.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from accuracy import _spec, score_predictions, summary


def _medseg(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "medseg", *args], check=True, env=env, cwd=cwd)


def _validation_set(run: Path, data: Path, out: Path) -> Path:
    """The run's validation cases as a Decathlon folder of their own (copies: tune reads no links out)."""
    val = set(json.loads((run / "splits.json").read_text())["val"])
    spec = _spec(data)
    entries = [e for e in spec["training"] if Path(e["label"]).name.removesuffix(".nii.gz") in val]
    for entry in entries:
        for key in ("image", "label"):
            (out / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data / entry[key], out / entry[key])
    (out / "dataset.json").write_text(json.dumps({**spec, "training": entries, "numTraining": len(entries),
                                                  "test": [], "test_labels": [], "numTest": 0}, indent=1))
    return out


def _bundle_from(checkpoint: Path, bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` holding ``checkpoint``'s weights."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(bundle, out, dirs_exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in
               torch.load(checkpoint, weights_only=True, map_location="cpu")["model"].items()}
    if set(weights) != set(load_file(str(out / "model.safetensors"))):
        raise SystemExit(f"{checkpoint}: its weights do not fit the bundle's network")
    save_file(weights, str(out / "model.safetensors"))
    return out


def compare(run: Path, data: Path, work: Path) -> dict:
    from medseg.checkpoint import load_state

    spec = _spec(data)
    labels = {int(k): v for k, v in spec["labels"].items()}
    val = _validation_set(run, data, work / "val_data")
    history = list(load_state(run / "checkpoints" / "last.pt").history)
    validated = [h for h in history if "val_dice" in h]
    best_epoch = json.loads((run / "bundle" / "metadata.json").read_text()).get("best_epoch")
    record: dict = {"validation": {"cases": len(_spec(val)["training"]), "best_epoch": best_epoch,
                                   "best": max(h["val_dice"] for h in validated),
                                   "final_epoch": int(validated[-1]["epoch"]), "final": validated[-1]["val_dice"]}}
    for which in ("best", "final"):
        bundle = _bundle_from(run / "checkpoints" / f"{'last' if which == 'final' else 'best'}.pt",
                              run / "bundle", work / which)
        _medseg("tune", "-m", str(bundle), "--data", str(val), "-o", str(work / f"{which}_tuned"), cwd=work)
        preds = work / f"pred_{which}"
        _medseg("infer", "-m", str(work / f"{which}_tuned"), "-i", *(str(data / t) for t in spec["test"]),
                "-o", str(preds), "--overwrite", cwd=work)
        cases = score_predictions(data, preds, labels)
        record[which] = {"cases": cases, "summary": summary({"cases": cases}, labels)}
    record["final_minus_best"] = record["final"]["summary"]["dice_mean"] - record["best"]["summary"]["dice_mean"]
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="a finished run folder (repeatable)")
    ap.add_argument("--data", action="append", required=True, help="the dataset it trained on (one per --run)")
    ap.add_argument("--work", default="/tmp/medseg-best-vs-final")
    ap.add_argument("--out", default=str(HERE / "results" / "best_vs_final.json"))
    args = ap.parse_args()
    if len(args.run) != len(args.data):
        ap.error("give one --data per --run")
    records = {}
    for i, (run, data) in enumerate(zip(args.run, args.data, strict=True)):
        work = Path(args.work) / f"{i}_{Path(run).resolve().parent.name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        records[str(run)] = compare(Path(run).resolve(), Path(data).resolve(), work)
    print("| run | validation: best (epoch) / final | test: best | test: final | final - best | "
          "every label >= 0.90, best / final |\n|---|---|---|---|---|---|")
    for run, r in records.items():
        v, b, f = r["validation"], r["best"]["summary"], r["final"]["summary"]
        print(f"| {run} | {v['best']:.3f} ({v['best_epoch']}) / {v['final']:.3f} | {b['dice_mean']:.4f} | "
              f"{f['dice_mean']:.4f} | {r['final_minus_best']:+.4f} | {b['cases_every_label_at_target']} / "
              f"{f['cases_every_label_at_target']} of {b['cases']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
