"""One training step of MONAI's UNet with PReLU (MONAI's default) and with LeakyReLU (``model.act``).

Both networks are built by ``medseg.models.build_model`` (16-256 features, 2 residual units,
instance norm) and trained on the same random batch, steps alternating one by one in one process
(whole processes in turn drift by +-10 % on a shared 2-core machine): in bf16 autocast,
channels-last, instance norms keeping that layout (``medseg.kernels.keep_channels_last``; what
``medseg train`` runs on an AVX-512 bf16 CPU), and in fp32 contiguous (what the MONAI tutorial loop
runs); PReLU with medseg's backward in both (``medseg.kernels.quick_prelu_backward``). Prints the
median seconds a step and writes JSON.

Run: python benchmarks/activation_step.py [--patch 80 80 32] [--batch 4] [--pairs 30] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.config import ModelConfig
from medseg.kernels import keep_channels_last, quick_prelu_backward
from medseg.models import build_model


def _step(net, opt, loss_fn, image: torch.Tensor, label: torch.Tensor, bf16: bool) -> float:
    """Seconds of one forward, Dice+CE, backward and AdamW step."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = net(image)
    loss = loss_fn(logits.float(), label)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[80, 80, 32])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "activation_step.json"))
    args = parser.parse_args()
    from monai.losses import DiceCELoss
    from run_all import machine_info

    torch.manual_seed(0)
    out: dict = {"machine": machine_info(), "patch": args.patch, "batch": args.batch, "pairs": args.pairs}
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    label = torch.randint(0, 4, (args.batch, 1, *args.patch))
    for setting, bf16 in (("bf16 channels-last", True), ("fp32 contiguous", False)):
        nets, opts = {}, {}
        for act in ("prelu", "leakyrelu"):
            net = build_model(ModelConfig(name="monai_unet", features=16, depth=4, act=act), out_channels=4)
            quick_prelu_backward(net)  # as the trainer runs it (PReLU's backward without torch's kernel)
            if bf16:  # and instance norms keep the channels-last layout
                keep_channels_last(net)
                net = net.to(memory_format=torch.channels_last_3d)
            nets[act], opts[act] = net, torch.optim.AdamW(net.parameters(), 1e-3)
        image = torch.randn(args.batch, 1, *args.patch)
        if bf16:
            image = image.contiguous(memory_format=torch.channels_last_3d)

        for act in nets:  # warm-up
            for _ in range(2):
                _step(nets[act], opts[act], loss_fn, image, label, bf16)
        times: dict[str, list[float]] = {act: [] for act in nets}
        for _ in range(args.pairs):
            for act in nets:
                times[act].append(_step(nets[act], opts[act], loss_fn, image, label, bf16))
        medians = {act: round(statistics.median(t), 4) for act, t in times.items()}
        speedup = round(medians["prelu"] / medians["leakyrelu"], 3)
        out[setting] = {"median_s": medians, "leakyrelu_speedup": speedup, "steps_s": times}
        print(f"{setting}: PReLU {medians['prelu']:.3f} s a step, LeakyReLU {medians['leakyrelu']:.3f} s ({speedup:.2f}x)")
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
