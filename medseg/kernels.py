"""Training-time stand-ins for torch modules whose CPU kernels are wrong here.

Each is a subclass of the module it replaces, with the same parameters and state dict keys, swapped
in place (``module.__class__``) on the training network only: bundles, exports and inference build
the plain network and load the same weights.

- ``fp32_on_thin_maps``: CPU bf16 3D convolutions whose weight gradient comes out NaN.
"""

from __future__ import annotations

from typing import Any

import torch

# torch 2.13's CPU bf16 3D convolution (oneDNN) returns NaN weight gradients from finite inputs when
# the feature map's first spatial axis is 2 voxels: 2x2x1, 2x2x2, 2x4x1, 2x8x8, 2x16x16, 2x32x16 gave
# NaN in 1-10 of 20-30 random trials each; first axis 1, 3, 4 or 8 (4x2x2, 3x3x1, 8x2x2, 4x4x2, ...)
# never, nor fp32 (benchmarks/results/bf16_conv3d_nan_amd_2026-12-06.json, bf16_thin_maps_*.json).
# A depth-4 U-Net's bottleneck is 2 voxels along x for a 32-voxel-wide patch. Convolutions on such
# maps run in fp32 under bf16 autocast: they are the network's smallest.
BF16_FAILING_FIRST_AXIS = 2


class _Fp32OnThinMaps:
    """Mixin for a 3D convolution: under CPU bf16 autocast, an input whose first spatial axis has
    ``BF16_FAILING_FIRST_AXIS`` voxels or fewer is convolved in fp32 (forward and backward). Same
    parameters and state dict as the convolution it extends; otherwise it is that convolution."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.ndim == 5
            and x.shape[2] <= BF16_FAILING_FIRST_AXIS
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        ):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float(), *args, **kwargs)  # type: ignore[misc]
        return super().forward(x, *args, **kwargs)  # type: ignore[misc]


class Fp32ThinConv3d(_Fp32OnThinMaps, torch.nn.Conv3d):
    pass


class Fp32ThinConvTranspose3d(_Fp32OnThinMaps, torch.nn.ConvTranspose3d):
    pass


_THIN_GUARDS: dict[type, type] = {torch.nn.Conv3d: Fp32ThinConv3d, torch.nn.ConvTranspose3d: Fp32ThinConvTranspose3d}


def fp32_on_thin_maps(network: torch.nn.Module) -> int:
    """Make every plain 3D convolution of ``network`` run in fp32 on maps 2 voxels thin along the
    first spatial axis under CPU bf16 autocast (``_Fp32OnThinMaps``), in place: each module's class
    is swapped for its guarded subclass, so parameters, state dict keys and the module tree stay as
    they were. Returns how many convolutions were guarded."""
    count = 0
    for module in network.modules():
        guarded = _THIN_GUARDS.get(type(module))
        if guarded is not None:
            module.__class__ = guarded
            count += 1
    return count

