"""The training loss: MONAI's Dice + cross-entropy with its gradient written out (``DiceCE``)."""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import DiceCELoss

from medseg.kernels import _is_channels_last_3d


class _DiceCE(torch.autograd.Function):
    """MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` (Dice + cross-entropy, smoothing terms
    as MONAI's) on logits ``x`` (B, C, ...) and integer labels ``y`` (B, 1, ...), as one function
    whose gradient is written out instead of recorded op by op.

    Forward: the logits copied once to fp32 contiguous, one log-softmax (MONAI's loss runs a softmax
    and a log-softmax, each copying channels-last logits to contiguous first), the cross-entropy
    from the label's log-probability, and the Dice terms from per-(case, class) sums: the
    probabilities, the label's probability added up by class, the label counts. Backward, with p the
    softmax, N the voxels, ``a_c`` and ``b_c`` the Dice term's derivatives by p_c off and on the label:
    ``dL/dz = p * (a - s + 1/N) + onehot(y) * (b_y * p_y - 1/N)``, ``s = sum_c a_c p_c + b_y p_y``.
    The gradient comes back in the logits' dtype and layout.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, batch: bool, include_background: bool,
                smooth_nr: float, smooth_dr: float) -> torch.Tensor:
        B, C = x.shape[:2]
        # fp32 (or fp64), contiguous, in one copy: torch's log-softmax along a channel axis that lies
        # innermost (channels-last) took 16 ms of a 4x4x80x80x32 map, the copy and the contiguous one 3.5
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        z = x.to(dtype, memory_format=torch.contiguous_format)
        yi = y.reshape(B, 1, *z.shape[2:]).long()
        logp = torch.log_softmax(z, 1)
        logp_y = logp.gather(1, yi)  # raises on a label outside 0..C-1, as the cross-entropy does
        p = logp.exp_()
        p_y = logp_y.exp()
        n = yi.numel()
        # sums in the maps' own precision (torch sums pairwise), the per-class terms then in fp64: a
        # float64 sum converts the whole map first (0.8 ms of 4x4x80x80x32 against 0.06)
        ce = -logp_y.sum().double() / n
        pred = p.reshape(B, C, -1).sum(-1).double()
        idx = (yi.reshape(B, -1) + torch.arange(B, device=yi.device).unsqueeze(1) * C).reshape(-1)
        ground = torch.bincount(idx, minlength=B * C).reshape(B, C).double()
        inter = torch.zeros(B * C, dtype=p.dtype, device=p.device).scatter_add_(0, idx, p_y.reshape(-1))
        inter = inter.reshape(B, C).double()
        if batch:
            pred, ground, inter = pred.sum(0, keepdim=True), ground.sum(0, keepdim=True), inter.sum(0, keepdim=True)
        first = 0 if include_background else 1
        num = 2 * inter[:, first:] + smooth_nr
        den = pred[:, first:] + ground[:, first:] + smooth_dr
        dice = (1 - num / den).mean()
        # the Dice term's derivatives by p_c (zero for a class left out): a_c everywhere, b_c on the label
        w = 1.0 / num.numel()
        a = torch.zeros_like(pred)
        b = torch.zeros_like(pred)
        a[:, first:] = w * num / den**2
        b[:, first:] = -2 * w / den
        ctx.save_for_backward(p, yi, p_y, idx, a.to(p.dtype), b.expand(B, C).to(p.dtype))
        ctx.n, ctx.x_like = n, torch.empty_like(x, device="meta")  # the logits' dtype and strides
        return (dice + ce).to(dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        p, yi, p_y, idx, a, b = ctx.saved_tensors
        n = ctx.n
        B, C = b.shape
        # p (B, C, ...); a per case (or batch) and class
        a_b = a.reshape(a.shape[0], C, *([1] * (p.ndim - 2)))
        s = torch.matmul(a.reshape(a.shape[0], 1, C), p.reshape(B, C, -1)).reshape(yi.shape)
        b_y = b.reshape(-1).take(idx).reshape(yi.shape)
        s += b_y * p_y
        out = (a_b - s).add_(1.0 / n).mul_(p)
        out.scatter_add_(1, yi, b_y * p_y - 1.0 / n)
        out.mul_(grad)
        # back in the logits' dtype and layout, in one copy
        like = ctx.x_like
        fmt = torch.channels_last_3d if _is_channels_last_3d(like) else torch.contiguous_format
        return out.to(like.dtype, memory_format=fmt), None, None, None, None, None


class DiceCE(DiceCELoss):
    """MONAI's ``DiceCELoss`` with ``to_onehot_y`` and ``softmax``, computed by ``_DiceCE``: the same
    value and gradient (float rounding apart), in fewer passes over the full-resolution maps, with
    the gradient in the logits' own dtype and layout. A bf16 channels-last training step of MONAI's
    UNet(16) at 80x80x32, 4 patches, went from 0.159 to 0.147 s on a 2-core AMD EPYC: MONAI's loss
    copied the channels-last logits to contiguous for each of its two softmaxes, and its contiguous
    gradient met the network's channels-last one in a slow mixed-layout sum. A single-channel output
    (MONAI's binary cross-entropy) or a target not (B, 1, ...) of the logits' size: ``DiceCELoss``."""

    def __init__(self, *, batch: bool = False, include_background: bool = True) -> None:
        super().__init__(to_onehot_y=True, softmax=True, batch=batch, include_background=include_background)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.ndim < 3 or input.shape[1] < 2 or target.shape[1] != 1 or target.shape[2:] != input.shape[2:]:
            return super().forward(input.float(), target)
        x, y = input.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)  # no metadata tracking
        dice = self.dice
        return _DiceCE.apply(x, y, dice.batch, dice.include_background, dice.smooth_nr, dice.smooth_dr)
