"""Accuracy in the same wall-clock budget: medseg (``train --time-budget``, no config) against a plain
MONAI training loop, on data medseg's generator never made.

Datasets (built under ``--work``, reused when present):
- ``phantoms``: 12 training / 4 test abdominal phantoms from ``benchmarks/phantoms.py``
  (independent anatomy and intensity rules: liver, kidneys, a low-contrast fatty organ).
- ``metaballs``: 12 training / 4 test phantoms from ``benchmarks/metaballs.py``, a second
  generator with rules of its own (organs as metaballs, correlated noise, distractors at the
  organs' intensities, some cases stored LPS or with a rescale slope).
- ``realct``: the shared real CT (TotalSegmentator's ``example_ct_sm`` with ``example_seg``:
  spleen -> 1, liver -> 2, every other class background) as 6 training and 2 test *views*:
  the scan rotated (up to 12 degrees), scaled (0.9-1.1) and re-noised, each view its own
  random transform. Test views are held out but show the same patient; the DICOM series in
  ../shared/data is another patient without a reference (it does not overlap this scan), so
  it gives no Dice.

Each method gets the same budget, one after the other, on the same machine:
- medseg: ``python -m medseg train --data D --time-budget Nm`` (nothing else set; MLflow off),
  then ``medseg infer`` with the bundle's defaults (its tuned post-processing included);
- MONAI: ``UNet`` (16-256 channels, 2 residual units), Dice+CE, AdamW 1e-3, spacing = the
  dataset's median, CT window -175..250 HU, ``RandCropByPosNegLabeld`` 96x96x32 (4 per case),
  flips; validation on medseg's own validation split 5 times over the budget; test prediction
  by sliding window, inverted to the source grid (``Invertd``).

Both are scored in the source grid with ``medseg.metrics`` (Dice, HD95 mm) per label and case.
Prints a table, writes ``benchmarks/results/accuracy_<set>.json`` and ``accuracy_<set>.png``
(validation Dice against training minutes).

Run: ``python benchmarks/accuracy.py --minutes 11 --sets phantoms realct`` (quick: ``--minutes 3``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from medseg.metrics import dice, hd95

SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data")) / "totalsegmentator"


# ----------------------------------------------------------------------------- datasets


def make_realct(out: Path, *, train: int = 6, test: int = 2, seed: int = 0) -> Path:
    """Views of the shared real CT (rotated, scaled, re-noised), spleen=1 liver=2, as a Decathlon folder."""
    from scipy import ndimage

    img_nii = nib.load(SHARED / "example_ct_sm.nii.gz")
    image = np.asarray(img_nii.dataobj, dtype=np.float32)
    seg = np.asarray(nib.load(SHARED / "example_seg.nii.gz").dataobj)
    label = np.zeros(seg.shape, np.uint8)
    label[seg == 1], label[seg == 5] = 1, 2
    rng = np.random.default_rng(seed)
    centre = (np.asarray(image.shape) - 1) / 2
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for index in range(train + test):
        split = "training" if index < train else "test"
        img_dir, lbl_dir = ("imagesTr", "labelsTr") if split == "training" else ("imagesTs", "labelsTs")
        for d in (img_dir, lbl_dir):
            (out / d).mkdir(parents=True, exist_ok=True)
        angle = np.radians(rng.uniform(-12, 12))
        c, s = np.cos(angle), np.sin(angle)
        matrix = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) / rng.uniform(0.9, 1.1)
        offset = centre - matrix @ centre + rng.uniform(-4, 4, 3) * [1, 1, 0.3]
        view = ndimage.affine_transform(image, matrix, offset, order=1, mode="nearest")
        view = view + rng.normal(0, rng.uniform(5, 20), view.shape)
        view_label = ndimage.affine_transform(label, matrix, offset, order=0, mode="constant")
        name = f"view_{index:02d}.nii.gz"
        nib.save(nib.Nifti1Image(np.rint(view).astype(np.int16), img_nii.affine), out / img_dir / name)
        nib.save(nib.Nifti1Image(view_label.astype(np.uint8), img_nii.affine), out / lbl_dir / name)
        entries[split].append({"image": f"./{img_dir}/{name}", "label": f"./{lbl_dir}/{name}"})
    spec = {
        "name": "realct-views",
        "description": "views of TotalSegmentator's example_ct_sm (Apache-2.0), spleen and liver",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen", "2": "liver"},
        "numTraining": train,
        "numTest": test,
        "training": entries["training"],
        "test": [e["image"] for e in entries["test"]],
        "test_labels": [e["label"] for e in entries["test"]],
    }
    (out / "dataset.json").write_text(json.dumps(spec, indent=2))
    return out


GENERATED = ("phantoms", "metaballs")  # sets drawn by a generator (a seed, a number of test cases)
TEST_CASES = 4  # the phantoms' test cases by default: 12 training and 4 test, as issue 9 measured


def tag(name: str, seed: int = 0, test: int = TEST_CASES) -> str:
    """The set's name in folders and result files: ``phantoms_seed<N>`` for another draw of phantoms,
    ``_test<M>`` added for another number of test cases (the same 12 training cases, the first 4
    test cases the same)."""
    if name not in GENERATED:
        return name
    return name + (f"_seed{seed}" if seed else "") + (f"_test{test}" if test != TEST_CASES else "")


def dataset(name: str, work: Path, seed: int = 0, test: int = TEST_CASES) -> Path:
    root = work / tag(name, seed, test)
    if not (root / "dataset.json").exists():
        if name == "phantoms":
            from phantoms import make_dataset

            make_dataset(root, train=12, test=test, seed=seed)
        elif name == "metaballs":
            from metaballs import make_dataset as make_metaballs

            make_metaballs(root, train=12, test=test, seed=seed)
        else:
            make_realct(root)
    return root


def _spec(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def score(pred: np.ndarray, ref: np.ndarray, spacing, labels: dict[int, str]) -> dict[str, float]:
    out = {}
    for k, name in labels.items():
        if k:
            out[f"dice_{name}"] = dice(pred == k, ref == k)
            out[f"hd95_{name}"] = hd95(pred == k, ref == k, spacing)
    return out


def score_predictions(root: Path, preds: Path, labels: dict[int, str]) -> dict[str, dict[str, float]]:
    """Per test case of the set at ``root``, ``score`` of medseg's mask in ``preds`` (``<case>_seg.nii.gz``)."""
    spec = _spec(root)
    cases = {}
    for image, ref_path in zip(spec["test"], spec["test_labels"], strict=True):
        stem = Path(image).name.removesuffix(".nii.gz")
        ref = nib.load(root / ref_path)
        pred = np.asarray(nib.load(preds / f"{stem}_seg.nii.gz").dataobj)
        cases[stem] = score(pred, np.asarray(ref.dataobj), ref.header.get_zooms()[:3], labels)
    return cases


# ----------------------------------------------------------------------------- medseg


def run_medseg(
    root: Path,
    out: Path,
    minutes: float,
    labels: dict[int, str],
    *,
    reuse: bool = False,
    overrides: tuple[str, ...] = (),
    epochs: int | None = None,
) -> dict:
    """The medseg CLI as a user runs it: train with a budget (nothing else), then infer the test images.
    ``reuse``: a finished run in ``out`` is scored again without training. ``overrides``: ``--set``
    values for the training (an experiment; the benchmark's figures are measured without).
    ``epochs``: ``--epochs N`` instead of the budget (a user who counts epochs; the issue's first
    measurement chose them so that training took about the budget)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = out / "medseg_run"
    medseg = [sys.executable, "-m", "medseg"]
    start = time.monotonic()
    if not (reuse and (run / "bundle").is_dir()):
        train = [
            "train",
            "--data",
            str(root),
            *(["--epochs", str(epochs)] if epochs else ["--time-budget", f"{minutes}m"]),
            "--set",
            "tracking.enabled=false",
            *(arg for item in overrides for arg in ("--set", item)),
        ]
        subprocess.run([*medseg, *train, "--out", str(run)], check=True, env=env, cwd=out)
    train_s = time.monotonic() - start
    spec = _spec(root)
    preds = out / "medseg_pred"
    images = [str(root / t) for t in spec["test"]]
    infer = [
        "infer",
        "--model",
        str(run / "bundle"),
        "--input",
        *images,
        "--output",
        str(preds),
        "--overwrite",
    ]
    subprocess.run([*medseg, *infer], check=True, env=env, cwd=out)
    cases = score_predictions(root, preds, labels)
    from medseg.checkpoint import load_state

    state = run / "checkpoints" / "last.pt"
    history = list(load_state(state).history) if state.exists() else []
    curve = [(h["elapsed_s"] / 60, h["val_dice"]) for h in history if "val_dice" in h and "elapsed_s" in h]
    if reuse and curve:  # not trained now: the run's own clock
        train_s = max(h.get("elapsed_s", 0.0) for h in history)
    tuning = run / "postprocess_tuning.md"
    return {
        "train_s": train_s,
        "cases": cases,
        "curve": curve,
        "tuning": tuning.read_text() if tuning.exists() else None,
        "plan": (run / "plan.txt").read_text() if (run / "plan.txt").exists() else None,
    }


# ----------------------------------------------------------------------------- the plain MONAI loop


def _monai_transforms(spacing, patch):
    from monai import transforms as T

    keys = ["image", "label"]
    base = [
        T.LoadImaged(keys),
        T.EnsureChannelFirstd(keys),
        T.Orientationd(keys, axcodes="RAS"),
        T.Spacingd(keys, pixdim=spacing, mode=("bilinear", "nearest")),
        T.ScaleIntensityRanged("image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        T.CropForegroundd(keys, source_key="image", allow_smaller=True),
    ]
    train = [
        *base,
        T.SpatialPadd(keys, spatial_size=patch),
        T.RandCropByPosNegLabeld(keys, "label", spatial_size=patch, pos=1, neg=1, num_samples=4),
        T.RandFlipd(keys, prob=0.5, spatial_axis=0),
        T.RandFlipd(keys, prob=0.5, spatial_axis=1),
        T.RandShiftIntensityd("image", offsets=0.1, prob=0.5),
    ]
    return T.Compose(train), T.Compose(base)


def run_monai(root: Path, minutes: float, labels: dict[int, str], val_names: list[str]) -> dict:
    """Plain MONAI loop under the same wall-clock budget (setup, caching and validation included)."""
    import torch
    from monai.data import CacheDataset, DataLoader, list_data_collate
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import AsDiscreted, Compose, Invertd

    start = time.monotonic()
    deadline = start + minutes * 60
    spec = _spec(root)
    zooms = [nib.load(root / e["image"]).header.get_zooms()[:3] for e in spec["training"]]
    spacing = tuple(float(v) for v in np.median(np.asarray(zooms), axis=0))
    patch = (96, 96, 32)
    train_tf, base_tf = _monai_transforms(spacing, patch)
    items = [{"image": str(root / e["image"]), "label": str(root / e["label"])} for e in spec["training"]]
    val_items = [i for i in items if Path(i["image"]).name.removesuffix(".nii.gz") in val_names]
    train_items = [i for i in items if i not in val_items] or items
    torch.manual_seed(0)
    train_ds = CacheDataset(train_items, train_tf, cache_rate=1.0, progress=False)
    val_ds = CacheDataset(val_items, base_tf, cache_rate=1.0, progress=False) if val_items else None
    loader = DataLoader(train_ds, batch_size=1, shuffle=True, collate_fn=list_data_collate)
    n_out = max(labels) + 1
    net = UNet(
        3, 1, n_out, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="instance"
    )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-5)
    infer = lambda x: sliding_window_inference(x, patch, 4, net, overlap=0.25)
    curve, steps, val_every_s = [], 0, minutes * 60 / 5
    next_val = time.monotonic() + val_every_s
    while time.monotonic() < deadline - 20:
        for batch in loader:
            net.train()
            opt.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            steps += 1
            if val_ds is not None and time.monotonic() >= next_val:
                curve.append(((time.monotonic() - start) / 60, _monai_val(net, val_ds, infer, labels)))
                next_val = time.monotonic() + val_every_s
            if time.monotonic() >= deadline - 20:
                break
    train_s = time.monotonic() - start
    post = Compose(
        [
            Invertd("pred", transform=base_tf, orig_keys="image", nearest_interp=False),
            AsDiscreted("pred", argmax=True),
        ]
    )
    cases = {}
    test_ds = [
        {"image": str(root / i), "label": str(root / r)}
        for i, r in zip(spec["test"], spec["test_labels"], strict=True)
    ]
    net.eval()
    with torch.no_grad():
        for item in test_ds:
            data = base_tf(item)
            data["pred"] = infer(data["image"][None])[0]
            pred = np.asarray(post(data)["pred"][0]).astype(np.int64)
            ref = nib.load(item["label"])
            stem = Path(item["image"]).name.removesuffix(".nii.gz")
            cases[stem] = score(pred, np.asarray(ref.dataobj), ref.header.get_zooms()[:3], labels)
    return {"train_s": train_s, "steps": steps, "cases": cases, "curve": curve, "spacing": spacing}


def _monai_val(net, val_ds, infer, labels) -> float:
    import torch

    net.eval()
    scores = []
    with torch.no_grad():
        for item in val_ds:
            pred = infer(item["image"][None]).argmax(1)[0].numpy()
            ref = np.asarray(item["label"][0]).round()
            scores += [dice(pred == k, ref == k) for k in labels if k]
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- report


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PER_CASE_TARGET = 0.90


def summary(result: dict, labels: dict[int, str]) -> dict[str, float]:
    out = {}
    for k, name in labels.items():
        if k:
            values = [c[f"dice_{name}"] for c in result["cases"].values()]
            dists = [c[f"hd95_{name}"] for c in result["cases"].values() if np.isfinite(c[f"hd95_{name}"])]
            out[f"dice_{name}_mean"] = float(np.mean(values))
            out[f"dice_{name}_min"] = float(np.min(values))
            out[f"hd95_{name}_mean"] = float(np.mean(dists)) if dists else float("nan")
    out["dice_mean"] = float(np.mean([out[f"dice_{n}_mean"] for k, n in labels.items() if k]))
    # issue 9's per-case target: every label at PER_CASE_TARGET or more on a test case
    out["cases"] = len(result["cases"])
    out["cases_every_label_at_target"] = sum(
        all(c[f"dice_{n}"] >= PER_CASE_TARGET for k, n in labels.items() if k) for c in result["cases"].values()
    )
    return out


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        if r["curve"]:
            xs, ys = zip(*r["curve"], strict=True)
            ax.plot(xs, ys, marker="o", label=f"{name} (validation)")
        ax.scatter(
            [r["train_s"] / 60], [r["summary"]["dice_mean"]], marker="*", s=120, label=f"{name} (test, final)"
        )
    ax.set_xlabel("training minutes (wall clock)")
    ax.set_ylabel("mean foreground Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(textwrap.fill(title, 70), fontsize=9)  # a long machine name must not run off the figure
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=11.0)
    parser.add_argument("--sets", nargs="+", default=["phantoms", "realct"],
                        choices=[*GENERATED, "realct"])
    parser.add_argument("--work", default="/tmp/medseg-accuracy")
    parser.add_argument("--reuse", action="store_true", help="score a finished medseg run again, no training")
    parser.add_argument("--methods", nargs="+", default=["medseg", "monai"], choices=["medseg", "monai"])
    parser.add_argument("--seed", type=int, default=0,
                        help="the phantoms' draw (0: the set the tables below were measured on; another "
                             "seed is data no tuning of medseg's has seen)")
    parser.add_argument("--test", type=int, default=TEST_CASES,
                        help="phantoms' test cases (default 4; four cases move the mean by several "
                             "hundredths between draws, 20 tell variants apart better)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="medseg train --set for an experiment (repeatable); results are written "
                             "under --variant's name")
    parser.add_argument("--variant", default="",
                        help="a name for this experiment's folder and result files (with --set); its JSON "
                             "and PNG go to its folder under --work, not to benchmarks/results")
    parser.add_argument("--epochs", type=int, default=None,
                        help="medseg trains --epochs N instead of --time-budget (with --variant; --minutes "
                             "is then the plain loop's budget: choose N so that medseg takes about as long)")
    args = parser.parse_args()
    if (args.overrides or args.epochs) and not args.variant:
        parser.error("--set and --epochs need --variant NAME, so an experiment does not overwrite the "
                     "benchmark's results")
    work = Path(args.work)
    (HERE / "results").mkdir(exist_ok=True)
    for name in args.sets:
        root = dataset(name, work, args.seed, args.test)
        labels = {int(k): v for k, v in _spec(root)["labels"].items()}
        set_tag = tag(name, args.seed, args.test) + (f"_{args.variant}" if args.variant else "")
        out = work / f"{set_tag}_{args.minutes:g}min"
        out.mkdir(parents=True, exist_ok=True)
        results_dir = out if args.variant else HERE / "results"  # an experiment's stay beside its runs
        saved = results_dir / f"accuracy_{set_tag}.json"
        results = {}
        if saved.exists() and set(args.methods) != {"medseg", "monai"}:  # one method again: keep the other
            previous = json.loads(saved.read_text())
            if previous.get("minutes") == args.minutes:
                results = {m: r for m, r in previous["results"].items() if m not in args.methods}
        if "medseg" in args.methods:
            results["medseg"] = run_medseg(
                root, out, args.minutes, labels, reuse=args.reuse, overrides=tuple(args.overrides),
                epochs=args.epochs,
            )
        val_names = []
        splits = out / "medseg_run" / "splits.json"
        if splits.exists():
            val_names = json.loads(splits.read_text())["val"]
        if "monai" in args.methods:
            results["monai"] = run_monai(root, args.minutes, labels, val_names)
        for r in results.values():
            r["summary"] = summary(r, labels)
        machine = f"{_cpu_model()}, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f} at the end"
        print(f"\n## {name}: {args.minutes:g} min budget each ({machine})\n")
        print("| method | label | Dice mean | Dice min (case) | HD95 mean mm |\n|---|---|---|---|---|")
        for method, r in results.items():
            s = r["summary"]
            for k, label in labels.items():
                if k:
                    print(
                        f"| {method} | {label} | {s[f'dice_{label}_mean']:.3f} | {s[f'dice_{label}_min']:.3f} | "
                        f"{s[f'hd95_{label}_mean']:.1f} |"
                    )
            print(f"| {method} | **mean** | **{s['dice_mean']:.3f}** | every label >= {PER_CASE_TARGET:.2f} on "
                  f"{s['cases_every_label_at_target']} of {s['cases']} cases | |")
        payload = {"set": name, "minutes": args.minutes, "machine": machine, "results": results}
        saved.write_text(json.dumps(payload, indent=2, default=str))
        plot(
            results,
            results_dir / f"accuracy_{set_tag}.png",
            f"{set_tag}: {args.minutes:g} min each, {machine}",
        )


if __name__ == "__main__":
    main()
