"""Trilinear resampling one axis at a time, between grids that differ by a permutation of the axes,
flips, scales and a shift: a scan reoriented and respaced to a model grid, and back.

Three 1D linear interpolations give the values trilinear ``grid_sample`` gives (up to rounding) for
a fraction of its memory and time: ``grid_sample`` needs a sampling grid of three floats per output
voxel (1 GB on a 512x512x600 CT's model grid) and reads eight neighbours per voxel. Oblique grids are
not separable; ``axis_aligned_map`` says which are, and callers keep a general path for the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

AXIS_ALIGNED_TOLERANCE = 1e-4
"""How far (in source voxels, anywhere on the target grid) a mapping may stray from axis-aligned
and still take the separable path: far below what changes an interpolated probability's argmax."""

RESAMPLE_SLAB_VALUES = 2**24
"""Float32 values (channels x voxels) per slab of the target in ``resample_axis_aligned``: 64 MiB."""


@dataclass(frozen=True)
class AxisMap:
    """Target axis ``j`` (position in the tuple) reads source axis ``source_axis`` at
    ``scale * index + offset`` (source voxel coordinates); ``scale < 0`` is a flip."""

    source_axis: int
    scale: float
    offset: float


def axis_aligned_map(
    to_source: np.ndarray, target_shape: Sequence[int], *, tolerance: float = AXIS_ALIGNED_TOLERANCE
) -> tuple[AxisMap, AxisMap, AxisMap] | None:
    """The per-axis maps when target voxel -> source voxel (``to_source``, 4x4) is a permutation,
    flips, scales and a shift (the usual case: the model grid is the source reoriented and respaced);
    None when it is oblique (or sheared) by more than ``tolerance`` voxels over the target grid."""
    m = np.asarray(to_source, dtype=np.float64)[:3, :3]
    extent = np.maximum(np.asarray(target_shape, dtype=np.float64) - 1.0, 1.0)
    maps: list[AxisMap] = []
    for j in range(3):
        a = int(np.argmax(np.abs(m[:, j])))
        maps.append(AxisMap(a, float(m[a, j]), float(to_source[a, 3])))
    if sorted(mp.source_axis for mp in maps) != [0, 1, 2] or any(mp.scale == 0.0 for mp in maps):
        return None
    stray = np.abs(m) * extent[None, :]
    for j, mp in enumerate(maps):
        stray[mp.source_axis, j] = 0.0
    if float(stray.sum(axis=1).max()) > tolerance:
        return None
    return maps[0], maps[1], maps[2]


def slab_index(rows: range, target_shape: Sequence[int]) -> list[np.ndarray]:
    """The target voxel indices of a slab, per axis: ``rows`` of axis 0, all of axes 1 and 2."""
    return [np.arange(rows.start, rows.stop, dtype=np.float64)] + [
        np.arange(n, dtype=np.float64) for n in target_shape[1:]
    ]


def linear_taps(
    coords: np.ndarray, size: int, *, border: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear interpolation along one axis of ``size`` voxels at ``coords``: the two neighbours'
    indices (clamped) and weights. Outside the axis a neighbour's weight is zero (zero padding), or
    with ``border`` the coordinate is clamped to the axis first (``grid_sample``'s border padding)."""
    if border:
        coords = np.clip(coords, 0.0, size - 1.0)
    lower = np.floor(coords)
    upper_weight = coords - lower
    lower_weight = 1.0 - upper_weight
    i0 = lower.astype(np.int64)
    i1 = i0 + 1
    lower_weight[(i0 < 0) | (i0 >= size)] = 0.0
    upper_weight[(i1 < 0) | (i1 >= size)] = 0.0
    return (
        torch.from_numpy(np.clip(i0, 0, size - 1)),
        torch.from_numpy(np.clip(i1, 0, size - 1)),
        torch.from_numpy(lower_weight.astype(np.float32)),
        torch.from_numpy(upper_weight.astype(np.float32)),
    )


def interpolate_axis(x: torch.Tensor, dim: int, coords: np.ndarray, *, border: bool = False) -> torch.Tensor:
    """``x`` linearly interpolated along ``dim`` at source coordinates ``coords``, float32 (padding as
    ``linear_taps``)."""
    i0, i1, w0, w1 = linear_taps(coords, x.shape[dim], border=border)
    shape = [1] * x.ndim
    shape[dim] = -1
    # advanced indexing, not index_select: several times faster along the last (contiguous) axis
    lower: tuple[slice | torch.Tensor, ...] = (*(slice(None),) * dim, i0)
    out = x[lower].float().mul_(w0.view(shape))
    if bool((w1 != 0).any()):  # whole-voxel coordinates (same spacing, a flip) need one neighbour only
        upper: tuple[slice | torch.Tensor, ...] = (*(slice(None),) * dim, i1)
        out.add_(x[upper].float().mul_(w1.view(shape)))
    return out


def sample_axis_aligned(
    source: torch.Tensor,
    maps: tuple[AxisMap, AxisMap, AxisMap],
    rows: range,
    target_shape: Sequence[int],
    *,
    border: bool = False,
) -> torch.Tensor:
    """A source's channels (C, N) on target rows ``rows`` (of axis 0) x the whole of axes 1, 2, by
    three 1D linear interpolations: the values of trilinear ``grid_sample`` (zero or border padding)."""
    # source axes in target order: dim 1 + j of ``x`` is the source axis target axis j reads
    x = source.permute(0, *(1 + mp.source_axis for mp in maps))
    index = slab_index(rows, target_shape)
    x = interpolate_axis(x, 1, maps[0].scale * index[0] + maps[0].offset, border=border)
    # then the axis whose interpolation leaves the smaller intermediate
    order = (2, 3) if target_shape[1] * x.shape[3] <= x.shape[2] * target_shape[2] else (3, 2)
    for dim in order:
        x = interpolate_axis(x, dim, maps[dim - 1].scale * index[dim - 1] + maps[dim - 1].offset, border=border)
    return x.reshape(x.shape[0], -1)


def resample_axis_aligned(
    source: torch.Tensor,
    maps: tuple[AxisMap, AxisMap, AxisMap],
    target_shape: Sequence[int],
    *,
    border: bool = True,
    slab_values: int = RESAMPLE_SLAB_VALUES,
) -> torch.Tensor:
    """``source`` (C, X, Y, Z) on the whole target grid (C, *target_shape), float32, a slab of the
    target's first axis at a time (the intermediates stay a slab's size)."""
    c = source.shape[0]
    out = torch.empty((c, *target_shape), dtype=torch.float32)
    plane = c * int(np.prod(target_shape[1:]))
    step = max(1, slab_values // max(plane, 1))
    for start in range(0, target_shape[0], step):
        rows = range(start, min(target_shape[0], start + step))
        out[:, rows.start : rows.stop] = sample_axis_aligned(source, maps, rows, target_shape, border=border).view(
            c, len(rows), *target_shape[1:]
        )
    return out
