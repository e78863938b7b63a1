#!/usr/bin/env bash
# The CUDA paths in one run, under 8 minutes on one GPU; any error stops it with a non-zero exit.
#   1. 2-epoch training with AMP (bf16, or fp16 + grad scaler) on synthetic data
#   2. inference on the GPU: stitching on the GPU, and with the sw_device split (accumulate on the CPU);
#      the two masks must agree
#   3. flip TTA and the dense CRF on the GPU (through `medseg infer --tta --crf --device cuda`)
#   4. the GPU column: network forward seconds and GFLOP/s, torch fp16/bf16 autocast on CUDA
# Run from the repository root: bash benchmarks/gpu_check.sh   (PYTHON=... to pick the interpreter)
set -euo pipefail
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
W=$(mktemp -d /tmp/medseg-gpu-check.XXXXXX)
trap 'echo "gpu_check: FAILED (work folder kept: $W)" >&2' ERR
step() { echo; echo "== $* ($(date +%T))"; }

step "CUDA present"
$PY -c "import torch; assert torch.cuda.is_available(), 'CUDA is not available'; print(torch.cuda.get_device_name(0), torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step "synthetic data"
$PY -m medseg synth --out "$W/data" --cases 6 --size 64 --seed 0

step "2-epoch AMP training on cuda"
timeout 300 $PY -m medseg train --data "$W/data" --out "$W/run" --epochs 2 \
  --set train.device=cuda --set train.amp=true --set tracking.enabled=false --set train.val_every=1 \
  --set model.features=16 --set model.depth=3 --set "train.patch_size=[48,48,16]" \
  --set "preprocess.spacing=[1.5,1.5,2.5]"
B="$W/run/bundle"
test -f "$B/model.safetensors"

step "inference on cuda: GPU stitching vs the sw_device split, TTA"
timeout 180 $PY - "$B" "$W/data" <<'PY'
import sys, time
from pathlib import Path
import numpy as np, torch
from medseg.bundle import load_bundle
from medseg.io import load_volume

bundle_path, data = Path(sys.argv[1]), Path(sys.argv[2])
volume = load_volume(sorted((data / "imagesTs").glob("*.nii.gz"))[0])
bundle = load_bundle(bundle_path, device="cuda")
masks = {}
for name, voxels in (("gpu stitching", 1 << 40), ("sw_device split", 0)):
    infer = bundle.config.infer.model_copy(update={"accumulate_on_cpu_voxels": voxels})
    bundle.config = bundle.config.model_copy(update={"infer": infer})
    torch.cuda.synchronize(); t0 = time.perf_counter()
    masks[name] = bundle.predict(volume, device="cuda").array
    torch.cuda.synchronize(); print(f"{name}: {time.perf_counter() - t0:.2f} s")
a, b = masks.values()
agree = float((a == b).mean())
print(f"agreement gpu stitching vs split: {agree:.6f}")
assert agree > 0.999, "the sw_device split changes the mask"
tta = bundle.predict(volume, device="cuda", tta=True).array
assert tta.shape == volume.shape and tta.max() > 0, "TTA on cuda gave an empty mask"
print("TTA on cuda: ok, foreground voxels", int((tta > 0).sum()))
PY

step "medseg infer --device cuda --tta --crf"
timeout 180 $PY -m medseg infer --model "$B" --input "$W/data/imagesTs" --output "$W/pred" \
  --device cuda --tta --crf --backend torch --no-report
ls "$W"/pred/*_seg.nii.gz >/dev/null
$PY -m medseg evaluate --pred "$W/pred" --ref "$W/data/labelsTs" --out "$W/metrics.csv" | tail -5

step "GPU column: network forward"
timeout 120 $PY - "$B" <<'PY'
import sys, time
import torch
from torch.utils.flop_counter import FlopCounterMode
from medseg.backends import default_window_shape, make_predictor
from medseg.bundle import load_bundle

bundle = load_bundle(sys.argv[1], device="cuda")
shape = (4, *default_window_shape(bundle)[1:])
with torch.no_grad(), FlopCounterMode(display=False) as counter:
    bundle.network(torch.zeros(shape, device="cuda"))
flops = counter.get_total_flops()
x = torch.randn(shape, device="cuda")
for precision in ("fp32", "auto"):
    predictor = make_predictor(bundle, "torch", precision, "cuda")
    for _ in range(3):
        predictor(x)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(10):
        predictor(x)
    torch.cuda.synchronize(); s = (time.perf_counter() - t0) / 10
    print(f"{predictor.reason}: {s * 1000:.1f} ms per batch {list(shape)}, {flops / s / 1e12:.2f} TFLOP/s")
PY

echo
echo "gpu_check: all passed ($W)"
