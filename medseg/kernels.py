"""Training-time stand-ins for torch modules whose CPU kernels are wrong here.

Each is a subclass of the module it replaces, with the same parameters and state dict keys, swapped
in place (``module.__class__``) on the training network (and ``keep_channels_last`` on the torch
predictor's, where it runs channels-last): bundles and exports build the plain network and load the
same weights.

- ``fp32_on_thin_maps``: CPU bf16 3D convolutions whose weight gradient comes out NaN.
- ``keep_channels_last``: 3D instance norms, whose CPU kernel hands a channels-last input back
  contiguous (it runs as a batch norm on a reshaped view).
- ``quick_prelu_backward``: one-weight PReLUs, whose CPU backward kernel is slow.
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


# the mixin's ``forward(x, *args, **kwargs)`` passes the convolution's own arguments through
class Fp32ThinConv3d(_Fp32OnThinMaps, torch.nn.Conv3d):  # type: ignore[misc]
    pass


class Fp32ThinConvTranspose3d(_Fp32OnThinMaps, torch.nn.ConvTranspose3d):  # type: ignore[misc]
    pass


_THIN_GUARDS: dict[type, type] = {torch.nn.Conv3d: Fp32ThinConv3d, torch.nn.ConvTranspose3d: Fp32ThinConvTranspose3d}


def fp32_on_thin_maps(network: torch.nn.Module) -> int:
    """Make every plain 3D convolution of ``network`` run in fp32 on maps 2 voxels thin along the
    first spatial axis under CPU bf16 autocast (``_Fp32OnThinMaps``), in place: each module's class
    is swapped for its guarded subclass, so parameters, state dict keys and the module tree stay as
    they were. Returns how many convolutions were guarded."""
    return _swap_classes(network, _THIN_GUARDS)


def _swap_classes(network: torch.nn.Module, table: dict[type, type], accept=lambda module: True) -> int:
    """Swap the class of every module whose exact type is in ``table`` (and that ``accept`` takes)
    for its stand-in, in place; returns how many."""
    count = 0
    for module in network.modules():
        stand_in = table.get(type(module))
        if stand_in is not None and accept(module):
            module.__class__ = stand_in
            count += 1
    return count


def training_stand_ins(network: torch.nn.Module) -> dict[str, int]:
    """Every stand-in of this module on ``network``, as the trainer runs it (the budget plan's step
    measurement calls this too, so that it times the same network): how many of each were swapped."""
    return {
        "fp32 on thin maps": fp32_on_thin_maps(network),
        "channels-last instance norms": keep_channels_last(network),
        "quick PReLU backward": quick_prelu_backward(network),
    }


class ChannelsLastInstanceNorm3d(torch.nn.InstanceNorm3d):
    """``InstanceNorm3d`` whose output keeps a channels-last 3D input's layout.

    torch's instance norm runs as a batch norm on a ``(1, N*C, ...)`` view, so a channels-last input
    comes back contiguous. The activation after it then works on a contiguous map while its gradient
    arrives channels-last (a PReLU backward over mixed layouts took 3.8 ms on a 4x16x40x40x16 map,
    10x its same-layout time), and the next convolution copies the map back. Giving the layout back
    once, here, made a bf16 training step at 80x80x32, batch 4, 1.22x faster for the classic U-Net(16)
    (0.741 -> 0.609 s) and 1.04x for MONAI's UNet(16) (0.204 -> 0.197 s) on a 2-core AMD EPYC;
    fp32 channels-last alike (1.456 -> 1.214 s, 0.236 -> 0.229 s). Same parameters and state dict.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y.contiguous(memory_format=torch.channels_last_3d) if _is_channels_last_3d(x) else y


def _is_channels_last_3d(x: torch.Tensor) -> bool:
    """A 5D tensor laid out channels-last (and not also contiguous, as size-1 axes can make it)."""
    return x.ndim == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def keep_channels_last(network: torch.nn.Module) -> int:
    """Make every plain ``InstanceNorm3d`` of ``network`` a ``ChannelsLastInstanceNorm3d``, in place
    (class swap: parameters, state dict keys and module tree unchanged). Returns how many."""
    return _swap_classes(network, {torch.nn.InstanceNorm3d: ChannelsLastInstanceNorm3d})


class _OneWeightPReLU(torch.autograd.Function):
    """PReLU with one weight: torch's forward kernel; the backward as LeakyReLU's kernel with the
    weight as its slope, and the weight's gradient as one sum of ``grad * min(x, 0)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.weight_dtype = weight.dtype
        return torch.ops.aten._prelu_kernel(x, w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        layout = torch.channels_last_3d if _is_channels_last_3d(x) else torch.contiguous_format
        grad = grad.contiguous(memory_format=layout)  # one layout: a mixed one is 10x slower
        grad_x = torch.ops.aten.leaky_relu_backward(grad, x, float(w.reshape(())), False)
        grad_w = (grad * torch.clamp(x, max=0)).sum(dtype=torch.float32)
        return grad_x, grad_w.reshape(w.shape).to(ctx.weight_dtype)


class QuickPReLU(torch.nn.PReLU):
    """``nn.PReLU`` whose backward on a CPU, for one weight (MONAI's and medseg's), avoids torch's
    ``_prelu_kernel_backward``: on a 2-core AMD EPYC that kernel took 35 ms on a 4x16x80x80x32 bf16
    map where LeakyReLU's backward took 1.1 ms, and a MONAI UNet(16) bf16 channels-last training step
    at 80x80x32, batch 4, ran 1.16x faster with this (0.193 -> 0.167 s). Same forward kernel, same
    parameters and state dict; the weight's gradient is summed in fp32. Several weights, or a tensor
    not on a CPU: ``nn.PReLU`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.numel() != 1 or x.device.type != "cpu" or not torch.is_grad_enabled():
            return super().forward(x)
        if torch.is_autocast_enabled("cpu"):  # autocast runs prelu in its lower precision; so does this
            x = x.to(torch.get_autocast_dtype("cpu"))
        return _OneWeightPReLU.apply(x, self.weight)


def quick_prelu_backward(network: torch.nn.Module) -> int:
    """Make every plain one-weight ``nn.PReLU`` of ``network`` a ``QuickPReLU``, in place (class swap).
    Returns how many."""
    return _swap_classes(network, {torch.nn.PReLU: QuickPReLU}, accept=lambda m: m.weight.numel() == 1)
