"""Dense CRF refinement of class probabilities, in PyTorch (CPU or GPU).

Mean-field inference for a fully connected 3D CRF (Krähenbühl & Koltun 2011) with
Potts compatibility and two kernels:

- smoothness: a Gaussian over position (sigma in mm), applied exactly by separable
  1D convolutions;
- appearance: a bilateral kernel over position (sigma in mm) and intensity (sigma
  in the normalised image's units), applied with a bilateral grid (Chen, Paris &
  Durand 2007): the probabilities are splatted into a coarse (x, y, z, intensity)
  grid whose cells are one sigma wide, blurred there, and sliced back with
  trilinear interpolation in space and linear interpolation in intensity.

Both filters are normalised (each voxel receives a weighted *average* of its
neighbours' label distribution), so the weights read as "how many logits a fully
agreeing neighbourhood is worth". One iteration:
``Q = softmax(log P + w_s * G(Q) + w_b * B(Q))``.

No compiled extension is needed (MONAI's ``CRF`` needs ``monai._C``).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F

from medseg.config import CRFConfig

Spacing = tuple[float, float, float]
_SLICE_CHUNK = 8_000_000  # floats of the expanded grid sliced at a time (32 MB)
_Y_BLOCK = 16  # y rows sliced by one banded matrix product
_MAX_CRF_VOXELS = 8_000_000  # per mean-field pass (larger boxes run in z slabs): bounds the grid's memory


def _interp_matrix(n: int, cell: float, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """(n, g) linear-interpolation weights from a coarse axis of cells ``cell`` voxels wide, and per
    voxel its lower cell (row i is zero outside columns ``lower[i]`` and ``lower[i] + 1``).

    Voxel i sits at coarse position i / cell + 1 (one empty cell of margin each side,
    so the blur can spread past the border); row i holds the two tent weights.
    """
    pos = torch.arange(n, device=device, dtype=torch.float32) / cell + 1.0
    g = math.floor(float(pos[-1])) + 3
    lo = torch.floor(pos).long()
    frac = pos - lo
    m = torch.zeros((n, g), device=device, dtype=torch.float32)
    rows = torch.arange(n, device=device)
    m[rows, lo] = 1.0 - frac
    m[rows, lo + 1] = frac
    return m, lo.tolist()


def _binomial_blur(grid: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """[1, 4, 6, 4, 1] / 16 blur (variance one cell^2) along ``dims``, zero outside; ``grid`` is kept.

    Shifted in-place adds into one new tensor per axis (no zero-padded copy): half the memory traffic.
    """
    for d in dims:
        n = grid.shape[d]
        out = grid * 6.0
        for shift, weight in ((1, 4.0), (2, 1.0)):
            if n > shift:
                out.narrow(d, shift, n - shift).add_(grid.narrow(d, 0, n - shift), alpha=weight)
                out.narrow(d, 0, n - shift).add_(grid.narrow(d, shift, n - shift), alpha=weight)
        grid = out
    return grid.div_(16.0 ** len(dims))


# nearest splat (box, variance 1/12 cell^2) + binomial blur (1) + tent slice (1/6) has a variance of
# 1.25 cell^2: cells of sigma / 1.118 give a kernel close to a Gaussian of the requested sigma.
_CELL_PER_SIGMA = 1.0 / math.sqrt(1.25)


class GridFilter:
    """A normalised Gaussian (no guide) or bilateral (with a guide image) filter on a coarse grid.

    Chen, Paris & Durand (2007): values are splatted into a grid over (x, y,
    intensity, z) whose cells are about one sigma wide (nearest cell in space, linear
    in intensity), blurred there, and sliced back with linear interpolation along
    all four axes. Everything that depends only on geometry and the guide is
    computed once and reused by every mean-field iteration; a call costs two
    ``index_add_`` passes, small matrix products and one ``grid_sample``: fast on CPU
    and GPU, no compiled extension. Memory: about 32 bytes per voxel with a guide, 16 without.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        *,
        sigma_vox: tuple[float, float, float],
        guide: torch.Tensor | None = None,
        sigma_intensity: float = 1.0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape = X, Y, Z = tuple(int(s) for s in shape)
        device = torch.device(device)
        cells = [max(s * _CELL_PER_SIGMA, 1e-3) for s in sigma_vox]
        # x and y are sliced by small dense matrices; z and intensity by grid_sample
        self.mx, self.x_lower = _interp_matrix(X, cells[0], device)
        self.my, self.y_lower = _interp_matrix(Y, cells[1], device)
        gx, gy = self.mx.shape[1], self.my.shape[1]
        pos_z = torch.arange(Z, device=device, dtype=torch.float32) / cells[2] + 1.0
        gz = math.floor(float(pos_z[-1])) + 3
        if guide is None:
            nb = 1
            pos_b = torch.zeros(X * Y * Z, device=device)
        else:
            guide = guide.to(device).float().reshape(-1)
            # robust intensity range: a few outliers must not blow up the intensity axis
            sample = guide[:: max(1, guide.numel() // 1_000_000)]
            q = torch.quantile(sample, torch.tensor([0.001, 0.999], device=device))
            lo, hi = float(q[0]), float(q[1])
            pos_b = guide.clamp(lo, hi).sub_(lo).div_(sigma_intensity * _CELL_PER_SIGMA).add_(1.0)
            nb = math.floor(float(pos_b.max())) + 3
        self.gshape = (gx, gy, nb, gz)
        # splat: nearest cell in x, y, z; linear in intensity (two taps). Per voxel only the cell index
        # (int64: index_add_ with int32 indices was 13x slower here), the upper tap's weight and
        # intensity coordinate, and the normaliser are kept: 24 bytes with a guide, 12 without; the
        # second tap's index and the slicing grid are rebuilt per call from them.
        ix = torch.round(torch.arange(X, device=device) / cells[0] + 1.0).long()
        iy = torch.round(torch.arange(Y, device=device) / cells[1] + 1.0).long()
        iz = torch.round(pos_z).long()
        base = (ix[:, None, None] * gy + iy[None, :, None]) * nb
        self.idx0 = (base + torch.floor(pos_b).long().view(X, Y, Z)).mul_(gz).add_(iz[None, None, :]).reshape(-1)
        self.upper: torch.Tensor | None = None  # weight of the next intensity bin
        self.b_coord: torch.Tensor | None = None  # grid_sample's intensity coordinate, in [-1, 1]
        if nb > 1:
            self.upper = pos_b - torch.floor(pos_b)
            self.b_coord = pos_b.mul_(2.0 / (nb - 1)).sub_(1.0)
        del pos_b
        self.z_coord = pos_z * (2.0 / (gz - 1)) - 1.0  # (Z,): the same for every (x, y) row
        self.norm = self._filter(torch.ones((1, X * Y * Z), device=device)).clamp_min_(1e-6)

    def _slice_grid(self, r0: int, r1: int) -> torch.Tensor:
        """grid_sample's (z, intensity) coordinates for the (x, y) rows ``r0:r1``: (rows, 1, Z, 2)."""
        z = self.z_coord[None, :].expand(r1 - r0, -1)
        Z = self.shape[2]
        b = (
            self.b_coord[r0 * Z : r1 * Z].view(r1 - r0, Z)
            if self.b_coord is not None
            else torch.zeros_like(z)
        )
        return torch.stack([z, b], dim=-1)[:, None]

    def _filter(self, values: torch.Tensor) -> torch.Tensor:
        """(C, N) values -> (C, N) unnormalised filter response."""
        c = values.shape[0]
        X, Y, _Z = self.shape
        gx, gy, nb, gz = self.gshape
        g = torch.zeros((c, gx * gy * nb * gz), device=values.device, dtype=torch.float32)
        if self.upper is None:
            g.index_add_(1, self.idx0, values)
        else:
            upper = values * self.upper
            g.index_add_(1, self.idx0 + gz, upper)
            g.index_add_(1, self.idx0, upper.neg_().add_(values))  # the lower tap: values * (1 - w)
            del upper
        g = _binomial_blur(g.view(c, gx, gy, nb, gz), (1, 2, 3, 4) if nb > 1 else (1, 2, 4))
        # sliced a few x rows at a time: the grid expanded to full (x, y) resolution is C*X*Y*B*gz
        # floats (3.7 GB for a 390x390x213 grid), a chunk of it stays in cache. The grid is laid out
        # (x, y, C, B, z) once, so both contractions are plain matrix products whose result is already
        # grid_sample's (rows*Y, C, B, gz) input: no permuted copies per chunk. Each product takes only
        # the band of cells its rows interpolate from (a row has two non-zero weights): on a
        # 192x117x58 box, 4 instead of 60 cells along x, 6 instead of 38 along y (2.5x faster).
        k = c * nb * gz
        g = g.permute(1, 2, 0, 3, 4).reshape(gx, gy * k)
        out = torch.empty((c, X * Y * _Z), device=values.device, dtype=torch.float32)
        rows = max(1, _SLICE_CHUNK // max(Y * k, 1))
        for i0 in range(0, X, rows):
            i1 = min(X, i0 + rows)
            a, b = self.x_lower[i0], self.x_lower[i1 - 1] + 2
            part = (self.mx[i0:i1, a:b] @ g[a:b]).view(i1 - i0, gy, k)  # x sliced: (rows, gy, C*B*gz)
            full = torch.empty((i1 - i0, Y, k), device=values.device, dtype=torch.float32)
            for j0 in range(0, Y, _Y_BLOCK):  # y sliced: (rows, Y, C*B*gz)
                j1 = min(Y, j0 + _Y_BLOCK)
                a, b = self.y_lower[j0], self.y_lower[j1 - 1] + 2
                full[:, j0:j1] = torch.matmul(self.my[j0:j1, a:b], part[:, a:b])
            part = full
            grid = self._slice_grid(i0 * Y, i1 * Y)
            sliced = F.grid_sample(part.view(-1, c, nb, gz), grid, mode="bilinear", align_corners=True)
            out[:, i0 * Y * _Z : i1 * Y * _Z] = sliced[:, :, 0].transpose(0, 1).reshape(c, -1)
        return out

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """Filter (C, X, Y, Z) values: a weighted average over each voxel's neighbourhood."""
        c = values.shape[0]
        out = self._filter(values.reshape(c, -1).float()).div_(self.norm)
        return out.view(c, *self.shape)


def dense_crf(
    probs: torch.Tensor,
    image: torch.Tensor,
    *,
    spacing: Spacing,
    cfg: CRFConfig | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Refine class probabilities (C, X, Y, Z) with a dense CRF guided by ``image`` (X, Y, Z) or (1, X, Y, Z).

    ``spacing`` is the voxel size in mm of this grid; ``image`` is in normalised units
    (the network's input). Returns refined probabilities on the same device, in ``probs``' dtype
    (float32, or float16: the CRF reads it slab by slab in float32); with ``inplace`` they are written
    over ``probs`` (no second copy of a scan's probabilities: 1.4 GB on a 512x512x600 CT).
    """
    cfg = cfg or CRFConfig()
    if image.ndim == 4:
        image = image[0]
    if probs.ndim != 4 or tuple(probs.shape[1:]) != tuple(image.shape):
        raise ValueError(f"probs {tuple(probs.shape)} and image {tuple(image.shape)} do not match")
    if not probs.is_floating_point():
        probs = probs.float()
    box = _undecided_box(probs, spacing, cfg)
    if box is None:  # every voxel is background beyond what the pairwise terms could change
        return probs
    out = probs if inplace else probs.clone()
    network_labels = _argmax_uint8(probs[(slice(None), *box)]) if cfg.skip_labels else None
    _mean_field_slabs(probs[(slice(None), *box)], image[box], spacing, cfg, out=out[(slice(None), *box)])
    if network_labels is not None:
        _keep_network_labels(out[(slice(None), *box)], network_labels, cfg.skip_labels)
    return out


def keep_skipped_labels(refined: torch.Tensor, probs: torch.Tensor, skip: list[int]) -> torch.Tensor:
    """``refined`` (written over) with the network's labels, from ``probs``, wherever the network or
    the CRF calls a label in ``skip``: what ``dense_crf`` does with ``cfg.skip_labels`` (the tuner
    uses it to score a CRF that leaves some labels alone without running the CRF again)."""
    if skip:
        _keep_network_labels(refined, _argmax_uint8(probs), skip)
    return refined


def _argmax_uint8(probs: torch.Tensor, slab: int = 16) -> torch.Tensor:
    """``medseg.predict.argmax_classes`` slab by slab along the first spatial axis (its running
    maximum is one slab, not a copy of a whole class)."""
    from medseg.predict import argmax_classes

    out = torch.empty(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    for i0 in range(0, probs.shape[1], slab):
        out[i0 : i0 + slab] = argmax_classes(probs[:, i0 : i0 + slab])
    return out


def _keep_network_labels(refined: torch.Tensor, network: torch.Tensor, skip: list[int], slab: int = 16) -> None:
    """Where the network or the CRF calls a label in ``skip``, the network's label (one-hot) replaces
    the CRF's probabilities, so those labels come out as the network found them."""
    skip_t = torch.tensor(skip, dtype=torch.uint8, device=network.device)
    for i0 in range(0, refined.shape[1], slab):
        part, net = refined[:, i0 : i0 + slab], network[i0 : i0 + slab]
        mask = torch.isin(net, skip_t) | torch.isin(_argmax_uint8(part), skip_t)
        if mask.any():
            onehot = torch.nn.functional.one_hot(net[mask].long(), part.shape[0]).T.to(part.dtype)
            part[:, mask] = onehot


def _mean_field_slabs(
    probs: torch.Tensor, image: torch.Tensor, spacing: Spacing, cfg: CRFConfig, *, out: torch.Tensor
) -> None:
    """``_mean_field`` into ``out`` (which may be ``probs`` itself) in slabs along z of at most
    ``_MAX_CRF_VOXELS`` voxels, each with a halo of three of the largest sigma on both sides (the
    kernels' reach): memory bounded whatever the scan's size. The bilateral grid of a 390x340x210
    model grid at 3 mm / 0.25 sigmas took 11.7 GB in one piece; slabs change the refined
    probabilities only at the 1 % level of the kernels' weights beyond the halo. A slab's core is
    written at once except its last ``halo`` planes, which the next slab's halo still reads: they
    are written (from a copy) once that slab has run."""
    X, Y, Z = image.shape
    plane = X * Y
    if plane * Z <= _MAX_CRF_VOXELS:
        out.copy_(_mean_field(probs, image, spacing, cfg))
        return
    halo = math.ceil(3.0 * max(cfg.smooth_sigma_mm, cfg.bilateral_sigma_mm) / spacing[2])
    core = max(halo, _MAX_CRF_VOXELS // plane - 2 * halo, 1)
    pending: tuple[slice, torch.Tensor] | None = None  # planes the next slab reads, not yet written
    for z0 in range(0, Z, core):
        z1 = min(Z, z0 + core)
        a, b = max(0, z0 - halo), min(Z, z1 + halo)
        part = _mean_field(probs[..., a:b], image[..., a:b], spacing, cfg)
        if pending is not None:
            out[..., pending[0]] = pending[1]
        keep = z1 if z1 == Z else max(z0, z1 - halo)  # from here on, the next slab's halo reads it
        out[..., z0:keep] = part[..., z0 - a : keep - a]
        pending = (slice(keep, z1), part[..., keep - a : z1 - a].clone())
        del part
    assert pending is not None
    out[..., pending[0]] = pending[1]


def _undecided_box(probs: torch.Tensor, spacing: Spacing, cfg: CRFConfig) -> tuple[slice, ...] | None:
    """The box the CRF can change, or None when it can change nothing.

    A voxel's energy moves by at most ``smooth_weight + bilateral_weight`` (normalised filters of
    probabilities), so a voxel whose background log-odds against every other class exceed that keeps
    its label whatever its neighbours say. The CRF runs on the box around the others, grown by three
    of the largest sigma (beyond it the kernels weigh less than 1 %): on a CT most of the grid is
    decided background, and the CRF is the costliest stage on a whole-body grid.
    """
    # background's log-odds against the likeliest other class, as the unary term clamps them; one
    # channel at a time (a copy of all of a scan's log-probabilities was 0.9 GB on a 16-body grid)
    margin = probs[0].clamp_min(1e-6).float().log_() - probs[1:].amax(dim=0).float().clamp_min_(1e-6).log_()
    undecided = margin <= cfg.smooth_weight + cfg.bilateral_weight
    if not bool(undecided.any()):
        return None
    grow_mm = 3.0 * max(cfg.smooth_sigma_mm, cfg.bilateral_sigma_mm)
    box = []
    for axis, n in enumerate(undecided.shape):
        others = tuple(d for d in range(undecided.ndim) if d != axis)
        hit = torch.nonzero(undecided.any(dim=others)).flatten()
        grow = math.ceil(grow_mm / spacing[axis])
        box.append(slice(max(0, int(hit[0]) - grow), min(n, int(hit[-1]) + 1 + grow)))
    return tuple(box)


def _mean_field(probs: torch.Tensor, image: torch.Tensor, spacing: Spacing, cfg: CRFConfig) -> torch.Tensor:
    """Mean-field iterations of the dense CRF over the whole of ``probs`` (C, X, Y, Z).

    The filters are built first (their construction needs transient index arithmetic), and every
    per-iteration step runs in place: an 8 M-voxel slab peaked at 1.45 GiB here (allocator included)."""
    image = image.to(probs.device).float()
    smooth_vox = cast(Spacing, tuple(cfg.smooth_sigma_mm / s for s in spacing))
    bil_vox = cast(Spacing, tuple(cfg.bilateral_sigma_mm / s for s in spacing))
    shape = cast(tuple[int, int, int], tuple(image.shape))  # 3D: probs is 4D and probs.shape[1:] matched it
    smooth = GridFilter(shape, sigma_vox=smooth_vox, device=probs.device) if cfg.smooth_weight > 0 else None
    bilateral = (
        GridFilter(
            shape,
            sigma_vox=bil_vox,
            guide=image,
            sigma_intensity=cfg.bilateral_intensity_sigma,
            device=probs.device,
        )
        if cfg.bilateral_weight > 0
        else None
    )
    unary = probs.float().clamp_min(1e-6).log_()
    q = probs.float()
    for _ in range(cfg.iterations):
        energy = unary.clone()
        for weight, kernel in ((cfg.smooth_weight, smooth), (cfg.bilateral_weight, bilateral)):
            if kernel is None:
                continue
            # the filters are linear and normalised (a constant stays constant), so the last
            # class's response is 1 minus the others': one channel fewer to filter
            part = kernel(q[:-1])
            energy[:-1].add_(part, alpha=weight)
            energy[-1].sub_(part.sum(dim=0), alpha=weight).add_(weight)
            del part
        del q
        q = _softmax_(energy)
    return q


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 0, written over ``x`` (no second tensor of the slab's size)."""
    x.sub_(x.amax(dim=0, keepdim=True)).exp_()
    return x.div_(x.sum(dim=0, keepdim=True))
