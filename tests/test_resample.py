"""Resampling probabilities back to the source grid: the separable (axis-aligned) path, the general
(``grid_sample``) path and an independent trilinear reference (scipy) agree; slabs bound the memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from medseg import predict
from medseg.predict import argmax_classes, axis_aligned_map, resample_to_grid


def _grid(
    perm: tuple[int, int, int], signs: tuple[float, ...], spacing: tuple[float, ...], origin
) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[:, list(perm)] * np.asarray(signs) * np.asarray(spacing)[None, :]
    affine[:3, 3] = origin
    return affine


def _rotated(affine: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    out = affine.copy()
    out[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ affine[:3, :3]
    return out


def _smooth_probs(shape: tuple[int, int, int], n_classes: int, seed: int) -> torch.Tensor:
    """Probabilities with blobs a few voxels wide (as a network's), summing to 1 per voxel."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, n_classes, *(max(2, s // 3) for s in shape), generator=gen)
    logits = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")[0]
    return torch.softmax(4.0 * logits, dim=0)


MODEL_SHAPE = (16, 18, 14)


def _centred_model_grid(
    target: np.ndarray, shape: tuple[int, int, int], spacing, shift=(0.0, 0.0, 0.0)
) -> np.ndarray:
    """A RAS model grid of ``MODEL_SHAPE`` at ``spacing`` centred on the target grid (then shifted, mm)."""
    centre = (target @ np.append((np.asarray(shape) - 1) / 2.0, 1.0))[:3]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = centre - np.asarray(spacing) * (np.asarray(MODEL_SHAPE) - 1) / 2.0 + np.asarray(shift)
    return affine


def _geometry(target: np.ndarray, shape, spacing, shift=(0.0, 0.0, 0.0)):
    return _centred_model_grid(target, shape, spacing, shift), target, shape


# (model grid, target grid, target shape): the model grid is RAS at its own spacing, the target
# is an input as it is stored
GEOMETRIES = {
    "flipped": _geometry(
        _grid((0, 1, 2), (-1, -1, 1), (0.8, 0.8, 2.5), (5.3, 4.1, 3.0)), (29, 31, 9), (1.5, 1.5, 2.0)
    ),
    "permuted_anisotropic": _geometry(
        _grid((2, 0, 1), (1, -1, 1), (2.9, 0.7, 0.6), (-10.0, 8.0, -7.5)),
        (9, 33, 37),
        (1.2, 1.5, 1.7),
        (0.3, -0.2, 0.7),
    ),
    # whole-voxel coordinates: one neighbour per axis
    "same_spacing_flip": _geometry(
        _grid((1, 0, 2), (-1, 1, -1), (1.0, 1.0, 1.0), (15.0, 2.0, 13.0)), (14, 16, 12), (1.0, 1.0, 1.0)
    ),
    # the target reaches past the model grid on every side
    "partly_outside": _geometry(
        _grid((0, 1, 2), (1, 1, 1), (1.3, 1.1, 0.9), (-5.0, -4.0, -3.0)), (30, 34, 36), (1.6, 1.6, 1.6)
    ),
    "oblique": _geometry(
        _rotated(_grid((0, 1, 2), (-1, -1, 1), (0.8, 0.8, 2.5), (5.3, 4.1, 3.0)), 0.3),
        (29, 31, 9),
        (1.5, 1.5, 2.0),
    ),
}


def _reference(probs: torch.Tensor, model: np.ndarray, target: np.ndarray, shape) -> np.ndarray:
    """Trilinear with zero padding by scipy, background where the model grid does not reach."""
    to_source = np.linalg.inv(model) @ target
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coords = to_source[:3, :3] @ idx + to_source[:3, 3:4]
    sampled = np.stack(
        [map_coordinates(p.numpy().astype(np.float64), coords, order=1, mode="grid-constant") for p in probs]
    )
    sampled[0] += np.clip(1.0 - sampled.sum(axis=0), 0.0, None)
    return sampled.reshape(len(probs), *shape)


def _dice_per_label(a: np.ndarray, b: np.ndarray, n_classes: int) -> list[float]:
    return [
        2.0 * ((a == k) & (b == k)).sum() / max(1, (a == k).sum() + (b == k).sum()) for k in range(n_classes)
    ]


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_both_paths_match_an_independent_trilinear_reference(name):
    model, target, shape = GEOMETRIES[name]
    probs = _smooth_probs(MODEL_SHAPE, 3, seed=len(name))
    expected = _reference(probs, model, target, shape)
    fast_labels, fast_probs = resample_to_grid([(probs, model)], target, shape, return_probabilities=True)
    general_labels, general_probs = resample_to_grid(
        [(probs, model)], target, shape, return_probabilities=True, axis_aligned=False
    )
    # float16 output: within half a unit in the last place of values up to 1
    np.testing.assert_allclose(fast_probs.astype(np.float64), expected, atol=1e-3)
    np.testing.assert_allclose(general_probs.astype(np.float64), expected, atol=1e-3)
    # the masks: equal but for exact ties broken by rounding; every class shows in this geometry
    assert (fast_labels != general_labels).mean() < 1e-3
    assert min(_dice_per_label(fast_labels, general_labels, 3)) >= 0.999
    assert set(np.unique(fast_labels)) == {0, 1, 2}  # the geometry shows every class


@pytest.mark.parametrize("name", ["flipped", "permuted_anisotropic", "same_spacing_flip", "partly_outside"])
def test_axis_aligned_geometries_take_the_separable_path(name):
    model, target, shape = GEOMETRIES[name]
    maps = axis_aligned_map(np.linalg.inv(model) @ target, shape)
    assert maps is not None
    assert sorted(m.source_axis for m in maps) == [0, 1, 2]


def test_oblique_geometry_takes_the_general_path():
    model, target, shape = GEOMETRIES["oblique"]
    assert axis_aligned_map(np.linalg.inv(model) @ target, shape) is None
    # a rotation too small to move any target voxel measurably is still axis-aligned
    barely = _rotated(GEOMETRIES["flipped"][1], 1e-9)
    assert axis_aligned_map(np.linalg.inv(model) @ barely, shape) is not None


def test_ensemble_of_an_axis_aligned_and_an_oblique_model_grid():
    model, target, shape = GEOMETRIES["flipped"]
    oblique_model = _rotated(model, -0.2)
    sources = [
        (_smooth_probs(MODEL_SHAPE, 3, seed=1), model),
        (_smooth_probs(MODEL_SHAPE, 3, seed=2), oblique_model),
    ]
    labels, probs = resample_to_grid(sources, target, shape, return_probabilities=True)
    expected = (
        _reference(sources[0][0], model, target, shape)
        + _reference(sources[1][0], oblique_model, target, shape)
    ) / 2
    np.testing.assert_allclose(probs.astype(np.float64), expected, atol=1e-3)
    assert min(_dice_per_label(labels, expected.argmax(axis=0), 3)) >= 0.999


@pytest.mark.parametrize("name", ["flipped", "oblique"])
def test_tiny_slabs_give_the_same_mask_and_bound_each_slab(name, monkeypatch):
    """Slabs of one target row at a time: the same mask as one slab; no slab asks for more."""
    model, target, shape = GEOMETRIES[name]
    probs = _smooth_probs(MODEL_SHAPE, 3, seed=5)
    whole = resample_to_grid([(probs, model)], target, shape, chunk_voxels=10**9)
    rows_seen: list[int] = []
    for fn in ("_sample_axis_aligned", "_sample_general"):
        original = getattr(predict, fn)

        def spy(probs, geometry, rows, target_shape, _original=original):
            rows_seen.append(len(rows))
            return _original(probs, geometry, rows, target_shape)

        monkeypatch.setattr(predict, fn, spy)
    sliced = resample_to_grid([(probs, model)], target, shape, chunk_voxels=1)
    np.testing.assert_array_equal(sliced, whole)
    assert rows_seen == [1] * shape[0]


def test_default_slab_size_shrinks_with_the_number_of_classes(monkeypatch):
    model, target, shape = GEOMETRIES["flipped"]
    monkeypatch.setattr(predict, "RESAMPLE_CHUNK_VALUES", 8 * shape[1] * shape[2])
    rows_seen: list[int] = []
    original = predict._sample_axis_aligned

    def spy(probs, maps, rows, target_shape):
        rows_seen.append(len(rows))
        return original(probs, maps, rows, target_shape)

    monkeypatch.setattr(predict, "_sample_axis_aligned", spy)
    resample_to_grid([(_smooth_probs(MODEL_SHAPE, 4, seed=0), model)], target, shape)
    assert max(rows_seen) == 2  # 8 planes of values / 4 classes


def test_argmax_classes_matches_torch_argmax_with_ties():
    scores = torch.tensor([[0.5, 0.2, 0.3, 0.3], [0.5, 0.7, 0.3, 0.1], [0.0, 0.7, 0.4, 0.3]])
    assert argmax_classes(scores).tolist() == scores.argmax(dim=0).tolist() == [0, 1, 2, 0]
    rand = torch.rand(5, 1000)
    assert torch.equal(argmax_classes(rand).long(), rand.argmax(dim=0))
