"""CPU bf16 training on thin feature maps: non-finite weight gradients with and without medseg's guard.

torch's CPU bf16 3D convolution returned NaN weight gradients from finite inputs on feature maps 2
voxels along the first spatial axis (a depth-4 U-Net at a 32x32x16 patch has a 2x2x1 bottleneck);
medseg runs those convolutions in fp32 (``medseg.kernels.fp32_on_thin_maps``). This measures,
on this machine: (1) single convolutions on random bf16 input, trials with a non-finite weight
gradient, plain and guarded; (2) short training runs of the two U-Nets at 32x32x16 in bf16, steps
with a non-finite gradient norm and seconds per step, plain and guarded. Prints a table, writes JSON.

Run: python benchmarks/bf16_thin_maps.py [--trials 20] [--steps 150] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run_all import machine_info
from medseg.config import Config
from medseg.kernels import fp32_on_thin_maps
from medseg.models import build_model
from medseg.runtime import cpu_has_native_bf16, set_memory_format
from medseg.train import make_loss, make_optimizer

SHAPES = [(2, 2, 1), (2, 2, 2), (2, 4, 1), (2, 8, 8), (2, 32, 16), (3, 3, 1), (4, 2, 2), (4, 4, 2), (8, 2, 2), (8, 8, 4)]


def conv_trials(shape: tuple[int, ...], channels: int, trials: int, guard: bool) -> int:
    bad = 0
    for _ in range(trials):
        conv = torch.nn.Conv3d(channels, channels, 3, padding=1)
        if guard:
            fp32_on_thin_maps(conv)
        x = torch.randn(2, channels, *shape, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.float().backward(torch.randn(y.shape))
        bad += int(not torch.isfinite(conv.weight.grad).all())
    return bad


def train_run(name: str, guard: bool, steps: int, channels_last: bool, seed: int = 0, bf16: bool = True) -> dict:
    torch.manual_seed(seed)
    cfg = Config.model_validate({"model": {"name": name, "features": 16, "depth": 4, "in_channels": 1}})
    model = build_model(cfg.model, out_channels=3)
    if guard:
        fp32_on_thin_maps(model)
    patch = (32, 32, 16)
    image = torch.randn(4, 1, *patch)
    if channels_last:
        set_memory_format(model, torch.channels_last_3d)
        image = image.contiguous(memory_format=torch.channels_last_3d)
    label = (image[:, :1] > 0.5).float() + (image[:, :1] > 1.5).float()
    loss_fn, opt = make_loss(cfg), make_optimizer(cfg, model.parameters())
    nonfinite, first, times = 0, None, []
    for step in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(image)
        loss_fn(out.float(), label).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        if torch.isfinite(norm):
            opt.step()
        else:
            nonfinite += 1
            first = step if first is None else first
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])
    return {"model": name, "precision": "bf16" if bf16 else "fp32", "guard": guard,
            "channels_last": channels_last, "steps": steps,
            "nonfinite_steps": nonfinite, "first_nonfinite_step": first,
            "median_step_s": round(times[len(times) // 2], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bf16_thin_maps.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{'feature map':>12} {'channels':>8} {'plain':>8} {'guarded':>8}  (trials with a non-finite weight gradient, of {args.trials})")
    for shape in SHAPES:
        for ch in (16, 32):
            plain, guarded = conv_trials(shape, ch, args.trials, False), conv_trials(shape, ch, args.trials, True)
            rows.append({"feature_map": list(shape), "channels": ch, "plain": plain, "guarded": guarded})
            print(f"{'x'.join(map(str, shape)):>12} {ch:>8} {plain:>8} {guarded:>8}", flush=True)
    runs = []
    print(f"\n{'model':>12} {'layout':>14} {'run':>12} {'non-finite steps':>17} {'first':>6} {'s/step':>7}")
    for name in ("monai_unet", "classic_unet"):
        for last in (False, True):
            for guard, bf16 in ((False, True), (True, True), (False, False)):
                r = train_run(name, guard, args.steps, last, bf16=bf16)
                runs.append(r)
                layout = "channels-last" if last else "contiguous"
                run = "fp32" if not bf16 else "bf16 guarded" if guard else "bf16 plain"
                print(f"{name:>12} {layout:>14} {run:>12} {r['nonfinite_steps']:>17} "
                      f"{r['first_nonfinite_step']!s:>6} {r['median_step_s']:>7}", flush=True)
    out = {"what": __doc__.splitlines()[0], "machine": machine_info(), "native_bf16": cpu_has_native_bf16(),
           "conv_trials": rows, "training_32x32x16_batch4": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
