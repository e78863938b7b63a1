"""The MONAI spleen-tutorial inference pipeline, written plainly: what a user would run instead of medseg.

LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd -> the bundle's intensity
CropForegroundd (body, HU > -500, as medseg) -> normalisation (window clip, then z-score with the
bundle's mean/std) ->
``sliding_window_inference`` (sw_batch 4, the bundle's patch and overlap, gaussian blending) ->
Invertd (back to the input grid) -> AsDiscreted(argmax) -> SaveImaged. The network and its weights
are the bundle's own (``model.safetensors``, built from ``config.yaml``), in eval mode, torch fp32.

Prints one JSON line: seconds per stage and the mask path.

Run: python benchmarks/reference/spleen_pipeline.py --model BUNDLE --input IMAGE.nii.gz --output DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

import numpy as np
import torch
import yaml
from monai.inferers import sliding_window_inference
from monai.transforms import (
    AsDiscreted,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    SaveImaged,
    ScaleIntensityRanged,
    Spacingd,
)
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medseg.config import config_from_dict
from medseg.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    args = parser.parse_args()
    timings = {"imports_s": time.perf_counter() - T_START}

    t0 = time.perf_counter()
    bundle = Path(args.model)
    cfg = config_from_dict(yaml.safe_load((bundle / "config.yaml").read_text()))
    model = build_model(cfg.model, out_channels=max(cfg.labels) + 1)
    model.load_state_dict(load_file(str(bundle / "model.safetensors")))
    model.eval()
    it = cfg.preprocess.intensity
    lo, hi = it.window
    pre = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=cfg.preprocess.spacing, mode="bilinear"),
            CropForegroundd(keys="image", source_key="image", select_fn=lambda x: x > -500, margin=4),
            ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True),
            NormalizeIntensityd(keys="image", subtrahend=it.mean, divisor=it.std),
        ]
    )
    post = Compose(
        [
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
            SaveImaged(
                keys="pred",
                output_dir=args.output,
                output_postfix="seg",
                separate_folder=False,
                resample=False,
                output_dtype=np.uint8,
                print_log=False,
            ),
        ]
    )
    timings["setup_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    data = pre({"image": args.input})
    timings["load_preprocess_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.no_grad():
        data["pred"] = sliding_window_inference(
            data["image"][None],
            roi_size=tuple(int(p) for p in cfg.train.patch_size),
            sw_batch_size=args.sw_batch_size,
            predictor=model,
            overlap=cfg.infer.overlap,
            mode="gaussian",
        )[0]
    timings["network_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    post(data)
    timings["invert_save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - T_START
    print(json.dumps({"timings_s": {k: round(v, 3) for k, v in timings.items()}}))


if __name__ == "__main__":
    main()
