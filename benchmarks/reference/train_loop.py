"""The MONAI spleen-tutorial training loop, written plainly: what a user would run instead of ``medseg train``.

CacheDataset of LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd -> ScaleIntensityRanged
-> CropForegroundd -> SpatialPadd (to the patch), then per step RandCropByPosNegLabeld (``--batch`` patches of ``--patch`` from one
volume, pos 1 : neg 1) -> RandFlipd (3 axes) -> RandRotate90d (patches square in x, y) -> RandShiftIntensityd;
DataLoader batch 1
(so a step holds ``--batch`` patches), DiceCELoss(softmax), Adam 1e-4, torch fp32. The network is the
bundle configuration's own (``--config``: a medseg ``config.yaml``, built by medseg.models), so the
comparison with ``medseg train`` is at the same network, patch and batch.

Times ``--steps`` steps after ``--warmup`` and prints one JSON line: samples/s (patches per second),
the fraction of step time spent waiting for data, seconds per step.

Run: python benchmarks/reference/train_loop.py --data DATASET --config config.yaml --patch 64 64 32 --batch 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from monai.data import CacheDataset, DataLoader, list_data_collate
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medseg.config import config_from_dict
from medseg.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Decathlon-style folder with dataset.json")
    parser.add_argument("--config", required=True, help="medseg config.yaml: network, spacing, labels")
    parser.add_argument("--patch", type=int, nargs=3, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()

    root = Path(args.data)
    spec = json.loads((root / "dataset.json").read_text())
    items = [{"image": str(root / e["image"]), "label": str(root / e["label"])} for e in spec["training"]]
    cfg = config_from_dict(yaml.safe_load(Path(args.config).read_text()))
    keys = ["image", "label"]
    transforms = Compose(
        [
            LoadImaged(keys),
            EnsureChannelFirstd(keys),
            Orientationd(keys, axcodes="RAS"),
            Spacingd(keys, pixdim=cfg.preprocess.spacing, mode=("bilinear", "nearest")),
            ScaleIntensityRanged("image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(keys, source_key="image", allow_smaller=True),
            SpatialPadd(keys, spatial_size=args.patch),
            RandCropByPosNegLabeld(
                keys,
                "label",
                spatial_size=args.patch,
                pos=1,
                neg=1,
                num_samples=args.batch,
                allow_smaller=False,
            ),
            RandFlipd(keys, prob=0.1, spatial_axis=0),
            RandFlipd(keys, prob=0.1, spatial_axis=1),
            RandFlipd(keys, prob=0.1, spatial_axis=2),
            # the tutorial's quarter turns in the first two axes: only for a patch square in them (a
            # 48 x 64 patch turned is 64 x 48, and the batch cannot be stacked)
            *([RandRotate90d(keys, prob=0.1, max_k=3)] if args.patch[0] == args.patch[1] else []),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    )
    t0 = time.perf_counter()
    dataset = CacheDataset(items, transforms, cache_rate=1.0, progress=False)
    cache_s = time.perf_counter() - t0
    loader = DataLoader(
        dataset, batch_size=1, shuffle=True, num_workers=args.num_workers, collate_fn=list_data_collate
    )
    net = build_model(cfg.model, out_channels=max(cfg.labels) + 1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    net.train()

    steps, wait, compute, samples = 0, 0.0, 0.0, 0
    timed_from = None
    while steps < args.warmup + args.steps:
        t_data = time.perf_counter()
        for batch in loader:
            t_step = time.perf_counter()
            if steps == args.warmup:
                timed_from = t_data
                wait, compute, samples = 0.0, 0.0, 0
            opt.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            t_end = time.perf_counter()
            wait += t_step - t_data
            compute += t_end - t_step
            samples += batch["image"].shape[0]
            steps += 1
            t_data = time.perf_counter()
            if steps >= args.warmup + args.steps:
                break
    elapsed = time.perf_counter() - (timed_from or 0.0)
    print(
        json.dumps(
            {
                "samples_per_s": round(samples / elapsed, 3),
                "data_wait_fraction": round(wait / max(wait + compute, 1e-9), 4),
                "s_per_step": round(elapsed / args.steps, 4),
                "steps_timed": args.steps,
                "cache_s": round(cache_s, 2),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
