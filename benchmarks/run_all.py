"""medseg against the MONAI reference pipeline on this machine, side by side, in one run.

Measures, and prints as tables (JSON to benchmarks/results/run_all.json, a PNG bar chart beside it):

1. Inference end to end on a CT-sized volume (512x512x200 at 0.8x0.8x2.5 mm: one abdominal phantom
   of benchmarks/phantoms.py, an unseen seed, with its reference labels; ``--full`` adds a mosaic of
   16 phantoms at that size and one at 512x512x600, which take most of an hour on 2 cores). Each pipeline runs as its own process, as a user runs it: ``medseg infer``
   with ``--backend auto`` (after one run that measures and caches the choice), ``medseg infer`` with
   torch fp32, and the MONAI spleen-tutorial pipeline (benchmarks/reference/spleen_pipeline.py) with
   the same bundle weights. Seconds per stage, whole-process wall time, peak RSS, Dice per label
   between the masks and against the reference labels.
2. The network alone: every backend/precision on a batch of windows (medseg.backends.measure), its
   achieved GFLOP/s beside this machine's measured matmul peak (fp32 and bf16).
3. Training samples/s and data-wait fraction at the bundle's network, patch and batch: ``medseg train``
   against the MONAI tutorial loop (benchmarks/reference/train_loop.py), validation off, in turns
   (2 rounds, ``--full`` 3; the ratio is the median of the rounds'); then the same at ``--train-patch``
   (80x80x32 by default: the 4-minute bundle's patch is smaller than an 11-minute plan's).
4. Post-processing (connected components: medseg's cc3d path against MONAI's
   KeepLargestConnectedComponent, which needs scikit-image) and the dense CRF at a given size.

The bundle: ``--model BUNDLE``, else one trained here as a user would (``medseg train --time-budget
4m`` on 12 phantoms), cached in ``--work`` with the volumes.

Run: python benchmarks/run_all.py [--full] [--model BUNDLE] [--work /tmp/medseg-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
COMMON = ["train.val_surface_metrics=false", "tracking.enabled=false"]


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict:
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "flags": [f for f in wanted if f in flags],
        "load_avg_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of an n x n matmul in ``dtype`` (the machine's practical peak)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------- data and bundle


def run_medseg(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "medseg", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


def prepare_bundle(work: Path, budget: str) -> Path:
    """A bundle trained here, as a user would (``medseg train --time-budget``), on the phantoms."""
    bundle = work / "run" / "bundle"
    if (bundle / "model.safetensors").is_file():
        return bundle
    data = prepare_phantoms(work)
    print(f"training the benchmark bundle (medseg train --time-budget {budget}) ...", flush=True)
    t0 = time.perf_counter()
    sets = [x for s in COMMON for x in ("--set", s)]
    run_medseg("train", "--data", str(data), "--out", str(work / "run"), "--time-budget", budget, *sets)
    print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return bundle


def make_ct_volume(
    path: Path, shape: tuple[int, int, int], spacing=(0.8, 0.8, 2.5), seed: int = 500, mosaic: bool = True
) -> Path:
    """A CT-sized mosaic of abdominal phantoms (benchmarks/phantoms.py, unseen seeds) at ``spacing``:
    in-plane 2 x 2 tiles of 256 voxels, along z one layer per 50 slices, each tile a phantom resampled
    to ``spacing`` and centred, air around; its reference labels beside it (``*_label.nii.gz``).
    ``mosaic=False``: one phantom in the middle of the field of view (one body, as a real scan: the
    mosaic's 16 livers are 16 components, which keep-largest post-processing rightly cuts to one)."""
    from phantoms import make_case
    from scipy import ndimage

    from medseg.io import Volume, write_nifti

    label_path = path.with_name(path.name.replace(".nii.gz", "_label.nii.gz"))
    if path.is_file() and label_path.is_file():
        return path
    image = np.full(shape, -1000, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    tile = (shape[0] // 2, shape[1] // 2, 50) if mosaic else shape
    n = 0
    for z0 in range(0, shape[2], tile[2]):
        for x0 in range(0, shape[0] - tile[0] + 1, tile[0]):
            for y0 in range(0, shape[1] - tile[1] + 1, tile[1]):
                img, lbl, affine = make_case(seed + n)
                n += 1
                zoom = np.abs(np.diag(affine)[:3]) / np.asarray(spacing)
                img = ndimage.zoom(img.astype(np.float32), zoom, order=1, cval=-1000.0)
                lbl = ndimage.zoom(lbl, zoom, order=0)
                extent = [
                    min(a, b, shape[i] - o)
                    for i, (a, b, o) in enumerate(zip(img.shape, tile, (x0, y0, z0), strict=True))
                ]
                src = tuple(
                    slice((a - e) // 2, (a - e) // 2 + e) for a, e in zip(img.shape, extent, strict=True)
                )
                off = [(t - e) // 2 for t, e in zip(tile, extent, strict=True)]
                dst = tuple(
                    slice(o + d, o + d + e) for o, d, e in zip((x0, y0, z0), off, extent, strict=True)
                )
                image[dst] = np.rint(img[src]).astype(np.int16)
                label[dst] = lbl[src]
    target = np.diag([*spacing, 1.0])
    target[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    write_nifti(Volume(array=label, affine=target, meta={"kind": "label"}), label_path, dtype="uint8")
    write_nifti(Volume(array=image, affine=target, meta={"kind": "image"}), path, dtype="int16")
    return path


def prepare_phantoms(work: Path) -> Path:
    """12 training + 4 test phantoms (benchmarks/phantoms.py), cached in ``work``."""
    from phantoms import make_dataset

    data = work / "phantoms"
    if not (data / "dataset.json").is_file():
        make_dataset(data)
    return data


# ----------------------------------------------------------------------------- end to end


def run_with_rss(cmd: list[str]) -> dict:
    """Run ``cmd`` and measure its peak RSS with wait4 (per child, not cumulative)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with (
        open(os.devnull, "w") as null,
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=null, text=True) as proc,
    ):
        stdout = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": stdout}


def medseg_infer(
    bundle: Path, volume: Path, out: Path, backend: str, precision: str, extra: tuple[str, ...] = ()
) -> dict:
    cmd = [sys.executable, "-m", "medseg", "infer", "--model", str(bundle), "--input", str(volume)]
    cmd += ["--output", str(out), "--device", "cpu", "--backend", backend, "--precision", precision]
    cmd += ["--overwrite", "--no-report", *extra]
    run = run_with_rss(cmd)
    stem = volume.name.removesuffix(".nii.gz")
    sidecar = json.loads((out / f"{stem}_seg.json").read_text())
    run["stages_s"] = sidecar.get("timings_s", {})
    run["backend"] = sidecar.get("backend")
    run["mask"] = str(out / f"{stem}_seg.nii.gz")
    return run


def reference_infer(bundle: Path, volume: Path, out: Path) -> dict:
    cmd = [sys.executable, str(HERE / "reference" / "spleen_pipeline.py"), "--model", str(bundle)]
    cmd += ["--input", str(volume), "--output", str(out)]
    run = run_with_rss(cmd)
    run["stages_s"] = json.loads(run["stdout"].strip().splitlines()[-1])["timings_s"]
    run["mask"] = str(out / volume.name.replace(".nii.gz", "_seg.nii.gz"))
    return run


def mask_dice(a_path: str, b_path: str, labels: dict[int, str]) -> dict[str, float | None]:
    import nibabel as nib

    a = np.asarray(nib.load(a_path).dataobj).astype(np.uint8)
    b = np.asarray(nib.load(b_path).dataobj).astype(np.uint8).reshape(a.shape)
    out: dict[str, float | None] = {}
    for k, name in labels.items():
        if k == 0:
            continue
        total = int((a == k).sum()) + int((b == k).sum())
        out[name] = round(2 * int(((a == k) & (b == k)).sum()) / total, 4) if total else None
    return out


def bench_inference(bundle: Path, volume: Path, work: Path, repeats: int) -> dict:
    """Alternating whole-process runs of each pipeline; median wall time, per-stage seconds, peak RSS.

    medseg runs with the bundle's defaults; when its validation tuning kept flip TTA (8 passes,
    which the reference does not run), also with ``--no-tta``: the reference's work."""
    from medseg.bundle import load_bundle

    loaded = load_bundle(bundle)
    labels, tta = loaded.labels, loaded.config.infer.tta
    out = work / "out"
    first = medseg_infer(bundle, volume, out / "auto", "auto", "auto")  # measures and caches the choice
    no_tta = "medseg auto --no-tta"
    runs: dict[str, list[dict]] = {"medseg auto": [], "medseg torch fp32": [], "reference (MONAI)": []}
    if tta:
        runs[no_tta] = []
    for _ in range(repeats):
        runs["medseg auto"].append(medseg_infer(bundle, volume, out / "auto", "auto", "auto"))
        runs["medseg torch fp32"].append(medseg_infer(bundle, volume, out / "torch", "torch", "fp32"))
        runs["reference (MONAI)"].append(reference_infer(bundle, volume, out / "reference"))
        if tta:
            runs[no_tta].append(medseg_infer(bundle, volume, out / "no_tta", "auto", "auto", ("--no-tta",)))
    rows = {}
    for name, items in runs.items():
        best = sorted(items, key=lambda r: r["wall_s"])[len(items) // 2]
        rows[name] = {
            "wall_s": round(statistics.median(r["wall_s"] for r in items), 2),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in items)),
            "stages_s": best["stages_s"],
            "backend": best.get("backend"),
        }
    masks = {name: items[-1]["mask"] for name, items in runs.items()}
    truth = volume.with_name(volume.name.replace(".nii.gz", "_label.nii.gz"))
    return {
        "volume": str(volume),
        "first_auto_run_wall_s": round(first["wall_s"], 2),
        "auto_choice": first.get("backend"),
        "bundle_tta": tta,
        "rows": rows,
        "dice": {
            "medseg auto vs medseg torch fp32": mask_dice(
                masks["medseg auto"], masks["medseg torch fp32"], labels
            ),
            "medseg auto vs reference": mask_dice(masks["medseg auto"], masks["reference (MONAI)"], labels),
            "medseg torch fp32 vs reference": mask_dice(
                masks["medseg torch fp32"], masks["reference (MONAI)"], labels
            ),
            **{
                f"{name} vs truth": mask_dice(mask, str(truth), labels)
                for name, mask in masks.items()
                if truth.is_file()
            },
        },
    }


# ----------------------------------------------------------------------------- training


STEPS_PER_EPOCH = 40  # medseg epochs of a fixed number of steps: a short epoch is a noisy figure


def bench_training(work: Path, bundle: Path, epochs: int, rounds: int = 2, patch: list[int] | None = None) -> dict:
    """Training samples/s at the same network, patch and patches per step: ``medseg train`` (its own
    loop, the precision it measures here; ``STEPS_PER_EPOCH`` steps per epoch, the first epoch left
    out as warm-up) against the MONAI tutorial loop (reference/train_loop.py, as many steps), one
    after the other on the benchmark's data; validation and tuning off in both.

    A medseg step holds ``batch_size`` volumes times ``samples_per_volume`` patches; the reference
    draws that many patches from one volume per step, so both steps hold the same patches.

    The pair runs ``rounds`` times in turn (medseg, reference, medseg, reference, ...) and the ratio
    is the median of the rounds' ratios: on this shared 2-core machine the speed of both drifted by
    a quarter within an hour (the matmul peak 285 then 219 GFLOP/s), so a single pair could compare
    a fast minute with a slow one. ``patch``: another patch than the bundle's (same network)."""
    import yaml

    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    patch = patch or [int(p) for p in cfg["train"]["patch_size"]]
    batch = int(cfg["train"]["batch_size"]) * int(cfg["augment"].get("samples_per_volume", 1))
    data = prepare_phantoms(work)
    pairs = [_training_pair(work, bundle, cfg, data, patch, batch, epochs) for _ in range(rounds)]
    ratios = [m["samples_per_s"] / r["samples_per_s"] for m, r in pairs]
    medseg = {**pairs[0][0], "samples_per_s": round(statistics.median(m["samples_per_s"] for m, _ in pairs), 3)}
    reference = {**pairs[0][1], "samples_per_s": round(statistics.median(r["samples_per_s"] for _, r in pairs), 3)}
    return {
        "patch": patch,
        "batch": batch,
        "medseg": medseg,
        "reference (MONAI)": reference,
        "rounds": [{"medseg": m, "reference (MONAI)": r, "ratio": round(q, 3)} for (m, r), q in zip(pairs, ratios, strict=True)],
        "ratio": round(statistics.median(ratios), 2),
    }


def _training_pair(
    work: Path, bundle: Path, cfg: dict, data: Path, patch: list[int], batch: int, epochs: int
) -> tuple[dict, dict]:
    """One medseg training run and one reference loop run, back to back: (medseg, reference)."""
    from medseg.checkpoint import load_state

    model = cfg["model"]
    run = work / "train_bench"
    sets = [
        *COMMON,
        f"model.name={model['name']}",
        f"model.features={model['features']}",
        f"model.depth={model['depth']}",
        f"model.act={model.get('act', 'auto')}",
        f"train.patch_size=[{','.join(map(str, patch))}]",
        f"train.batch_size={cfg['train']['batch_size']}",
        f"augment.samples_per_volume={cfg['augment'].get('samples_per_volume', 1)}",
        f"preprocess.spacing=[{','.join(map(str, cfg['preprocess']['spacing']))}]",
        f"train.epochs={epochs}",
        f"train.iterations_per_epoch={STEPS_PER_EPOCH}",
        f"train.val_every={epochs + 1}",
        "postprocess.tune_on_validation=false",
    ]
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    run_medseg("train", "--data", str(data), "--out", str(run), *[x for s in sets for x in ("--set", s)])
    medseg_wall = time.perf_counter() - t0
    history = list(load_state(run / "checkpoints" / "last.pt").history)
    steady = history[1:] or history  # the first epoch includes warm-up
    medseg = {
        "samples_per_s": round(statistics.mean(h["samples_per_s"] for h in steady), 3),
        "data_wait_fraction": round(statistics.mean(h["data_wait_fraction"] for h in steady), 4),
        "epochs": len(history),
        "steps_timed": int(sum(h["steps"] for h in steady)),
        "wall_s": round(medseg_wall, 1),
        "precision": json.loads((run / "bundle" / "metadata.json").read_text()).get("precision"),
        "memory_format": json.loads((run / "bundle" / "metadata.json").read_text()).get("train_memory_format"),
    }
    cmd = [sys.executable, str(HERE / "reference" / "train_loop.py"), "--data", str(data)]
    cmd += ["--config", str(bundle / "config.yaml"), "--patch", *map(str, patch), "--batch", str(batch)]
    cmd += ["--steps", str(STEPS_PER_EPOCH * (epochs - 1))]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"reference training loop exited {proc.returncode}: {proc.stderr[-3000:]}")
    return medseg, json.loads(proc.stdout.strip().splitlines()[-1])


def print_training(result: dict) -> None:
    print(f"\n## Training at patch {result['patch']}, batch {result['batch']} (same network)")
    print("| loop | samples/s | data wait | notes |\n| --- | --- | --- | --- |")
    m, r = result["medseg"], result["reference (MONAI)"]
    print(f"| medseg | {m['samples_per_s']:.2f} | {100 * m['data_wait_fraction']:.0f} % | "
          f"{m['steps_timed']} steps, precision {m['precision']} |")  # fmt: skip
    print(f"| reference (MONAI) | {r['samples_per_s']:.2f} | {100 * r['data_wait_fraction']:.0f} % | "
          f"{r['steps_timed']} steps, fp32 |")  # fmt: skip
    rounds = result.get("rounds", [])
    each = ", ".join(f"{r['ratio']:.2f}x" for r in rounds)
    print(f"medseg / reference: {result['ratio']}x" + (f" (median of {len(rounds)} rounds in turn: {each})" if rounds else ""))


# ----------------------------------------------------------------------------- network, post-processing, CRF


def bench_network(bundle_path: Path, work: Path, peaks: dict[str, float]) -> dict:
    """Every backend/precision on the parity batch (sw_batch windows): seconds, GFLOP/s, % of peak."""
    from torch.utils.flop_counter import FlopCounterMode

    from medseg.backends import default_window_shape, measure
    from medseg.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    shape = default_window_shape(bundle)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        bundle.network(torch.zeros(shape))
    flops = counter.get_total_flops()
    candidates = measure(bundle, window_shape=shape, cache_dir=work / "cache", rounds=7)
    rows = []
    for c in candidates:
        gflops = flops / c.seconds / 1e9 if c.seconds else None
        peak = peaks["bf16" if c.precision == "bf16" else "fp32"]
        rows.append(
            {
                "candidate": c.name,
                "seconds": c.seconds,
                "gflop_s": round(gflops, 1) if gflops else None,
                "percent_of_peak": round(100 * gflops / peak, 1) if gflops else None,
                "agreement": c.agreement,
                "passed": c.passed,
                "note": c.note,
            }
        )
    return {"window_shape": list(shape), "gflop_per_batch": round(flops / 1e9, 2), "candidates": rows}


def bench_postprocess(size: int) -> dict:
    """Keep-largest-component + small-object removal on a ``size``^3 mask: medseg (cc3d) and MONAI."""
    from monai.transforms import KeepLargestConnectedComponent

    from medseg.config import PostprocessConfig
    from medseg.postprocess import postprocess_labels

    rng = np.random.default_rng(0)
    labels = np.zeros((size,) * 3, np.uint8)
    zz = np.indices(labels.shape).astype(np.float32) - size / 2
    labels[(zz**2).sum(0) < (size / 4) ** 2] = 1
    labels[(rng.random(labels.shape) < 0.002)] = 2  # speckle: many small components
    labels[size // 8 : size // 4, size // 8 : size // 4, size // 8 : size // 4] = 2
    cfg = PostprocessConfig(keep_largest=True, min_volume_mm3=10.0)
    t0 = time.perf_counter()
    ours = postprocess_labels(labels, cfg, spacing=(1.0, 1.0, 1.0), label_ids=[1, 2])
    medseg_s = time.perf_counter() - t0
    monai_keep = KeepLargestConnectedComponent(applied_labels=[1, 2], is_onehot=False, connectivity=3)
    out: dict = {"size": size, "medseg_s": round(medseg_s, 3)}
    t0 = time.perf_counter()
    try:
        theirs = np.asarray(monai_keep(torch.as_tensor(labels[None]))[0])
    except RuntimeError as exc:  # MONAI's CPU path needs scikit-image, not a medseg dependency
        out["monai_keep_largest"] = f"not run: {exc}"
        return out
    out["monai_keep_largest_s"] = round(time.perf_counter() - t0, 3)
    out["same_mask"] = bool((ours == theirs).all())
    return out


def bench_crf(size: int) -> dict:
    from medseg.crf import dense_crf

    rng = np.random.default_rng(0)
    zz = np.indices((size,) * 3).astype(np.float32) - size / 2
    inside = (zz**2).sum(0) < (size / 4) ** 2
    image = torch.as_tensor(inside.astype(np.float32) + rng.normal(0, 0.35, inside.shape).astype(np.float32))
    logits = torch.as_tensor(
        np.stack([~inside, inside]).astype(np.float32) * 2 + rng.normal(0, 1.5, (2, *inside.shape))
    )
    probs = torch.softmax(logits.float(), 0)
    t0 = time.perf_counter()
    dense_crf(probs, image, spacing=(1.0, 1.0, 1.0))
    return {"size": size, "crf_s": round(time.perf_counter() - t0, 2), "iterations": 5}


# ----------------------------------------------------------------------------- report


def print_inference(result: dict) -> None:
    rows = result["rows"]
    ref = rows["reference (MONAI)"]["wall_s"]
    print(f"\n## Inference end to end: {Path(result['volume']).name}")
    print(
        f"auto chose: {result['auto_choice']} (first run, measuring and caching: {result['first_auto_run_wall_s']} s)"
    )
    print("| pipeline | wall s | vs reference | peak RSS MiB | stages s |\n| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        stages = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in row["stages_s"].items())
        print(
            f"| {name} | {row['wall_s']:.1f} | {row['wall_s'] / ref:.2f}x | {row['peak_rss_mib']} | {stages} |"
        )
    for pair, dice in result["dice"].items():
        print(f"Dice {pair}: " + ", ".join(f"{k} {v}" for k, v in dice.items()))


def print_network(result: dict, peaks: dict) -> None:
    print(
        f"\n## Network forward: batch {result['window_shape']}, {result['gflop_per_batch']} GFLOP per batch"
    )
    print(f"matmul peak here: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(
        "| backend | s per batch | GFLOP/s | % of peak | agreement | parity |\n| --- | --- | --- | --- | --- | --- |"
    )
    for r in result["candidates"]:
        if r["seconds"] is None:
            print(f"| {r['candidate']} | - | - | - | - | {r['note']} |")
            continue
        verdict = "passed" if r["passed"] else "failed"
        print(
            f"| {r['candidate']} | {r['seconds']:.3f} | {r['gflop_s']} | {r['percent_of_peak']} | "
            f"{r['agreement']} | {verdict} |"
        )


def plot(results: dict, png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    infer = results["inference"]
    fig = Figure(figsize=(10, 3.2 * len(infer) + 3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(infer) + 1, 1)
    for ax, result in zip(axes, infer, strict=False):
        names = list(result["rows"])
        colours = ["#a52" if n.startswith("reference") else "#27a" if "torch" in n else "#2a7" for n in names]
        ax.barh(names, [result["rows"][n]["wall_s"] for n in names], color=colours)
        ax.set_xlabel("seconds, whole process")
        ax.set_title(f"inference end to end, {Path(result['volume']).name}")
    net = results["network"]["candidates"]
    ok = [r for r in net if r["seconds"]]
    axes[-1].barh([r["candidate"] for r in ok], [r["gflop_s"] for r in ok], color="#27a")
    axes[-1].axvline(results["peaks_gflops"]["fp32"], color="k", ls="--", label="matmul peak fp32")
    axes[-1].axvline(results["peaks_gflops"]["bf16"], color="r", ls=":", label="matmul peak bf16")
    axes[-1].set_xlabel("achieved GFLOP/s (network forward)")
    axes[-1].legend(loc="lower right")
    fig.suptitle(f"{results['machine']['cpu']}, {results['machine']['torch_threads']} threads")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="realistic sizes, 3 runs each (long)")
    parser.add_argument("--model", help="bundle to use (default: one trained here, cached in --work)")
    parser.add_argument("--work", default="/tmp/medseg-bench")
    parser.add_argument("--budget", default="4m", help="medseg train --time-budget of the benchmark bundle")
    parser.add_argument("--out", default=str(HERE / "results" / "run_all.json"))
    parser.add_argument(
        "--train-patch", type=int, nargs=3, default=[80, 80, 32], metavar=("X", "Y", "Z"),
        help="training is also compared at this patch (default: what the budget planner picks for the "
        "phantoms in 11 minutes here); the bundle's own patch (a 4-minute plan's) is smaller",
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"mode": "full" if args.full else "quick", "machine": machine_info()}
    print(json.dumps(results["machine"]))
    bundle = Path(args.model) if args.model else prepare_bundle(work, args.budget)
    results["bundle"] = {"path": str(bundle), "trained_here": not args.model}
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    results["peaks_gflops"] = {k: round(v, 1) for k, v in peaks.items()}
    results["network"] = bench_network(bundle, work, peaks)
    print_network(results["network"], peaks)
    runs = {"epochs": 4 if args.full else 3, "rounds": 3 if args.full else 2}
    results["training"] = bench_training(work, bundle, **runs)
    print_training(results["training"])
    if list(args.train_patch) != list(results["training"]["patch"]):
        results["training_at_train_patch"] = bench_training(work, bundle, **runs, patch=list(args.train_patch))
        print_training(results["training_at_train_patch"])
    volumes = [make_ct_volume(work / "one_body_512x512x200.nii.gz", (512, 512, 200), seed=900, mosaic=False)]
    if args.full:  # the 16-body mosaic and the long scan take most of an hour on 2 cores
        volumes.append(make_ct_volume(work / "ct_512x512x200.nii.gz", (512, 512, 200)))
        volumes.append(make_ct_volume(work / "ct_512x512x600.nii.gz", (512, 512, 600)))
    results["inference"] = []
    for volume in volumes:
        result = bench_inference(bundle, volume, work, repeats=3 if args.full else 1)
        results["inference"].append(result)
        print_inference(result)
    size = 256 if args.full else 128
    results["postprocess"] = bench_postprocess(size)
    results["crf"] = bench_crf(size)
    print(f"\n## Post-processing at {size}^3: {json.dumps(results['postprocess'])}")
    print(f"## Dense CRF at {size}^3 (5 iterations, CPU): {results['crf']['crf_s']} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"\nwritten {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
