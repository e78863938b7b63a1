"""Resampling probabilities back to the source grid: the separable (axis-aligned) path, the general
(``grid_sample``) path and an independent trilinear reference (scipy) agree; slabs bound the memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from medseg import predict
from medseg.predict import MIXED_CELL, argmax_classes, axis_aligned_map, cell_labels, resample_to_grid


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
    # labels only: picked per source cell, interpolated where a cell's corners disagree
    picked_labels = resample_to_grid([(probs, model)], target, shape)
    # the masks: equal but for exact ties broken by rounding; every class shows in this geometry
    for labels in (fast_labels, picked_labels):
        assert (labels != general_labels).mean() < 1e-3
        assert min(_dice_per_label(labels, general_labels, 3)) >= 0.999
        assert min(_dice_per_label(labels, expected.argmax(axis=0), 3)) >= 0.999
    assert set(np.unique(fast_labels)) == {0, 1, 2}


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


def _spy_on_slabs(monkeypatch) -> set[range]:
    """Record the rows of every slab a source is sampled on, whichever path samples it."""
    rows_seen: set[range] = set()
    for fn in ("_sample_axis_aligned", "_sample_general", "_labels_axis_aligned"):
        original = getattr(predict, fn)

        def spy(*args, _original=original):
            rows_seen.update(a for a in args if isinstance(a, range))
            return _original(*args)

        monkeypatch.setattr(predict, fn, spy)
    return rows_seen


@pytest.mark.parametrize("name", ["flipped", "oblique"])
@pytest.mark.parametrize("probabilities", [False, True])
def test_tiny_slabs_give_the_same_mask_and_bound_each_slab(name, probabilities, monkeypatch):
    """Slabs of one target row at a time: the same mask as one slab; no slab asks for more."""
    model, target, shape = GEOMETRIES[name]
    probs = _smooth_probs(MODEL_SHAPE, 3, seed=5)
    kwargs = {"return_probabilities": probabilities}
    whole = resample_to_grid([(probs, model)], target, shape, chunk_voxels=10**9, **kwargs)
    rows_seen = _spy_on_slabs(monkeypatch)
    sliced = resample_to_grid([(probs, model)], target, shape, chunk_voxels=1, **kwargs)
    if probabilities:  # float16, summed in another order
        np.testing.assert_allclose(sliced[1].astype(np.float32), whole[1].astype(np.float32), atol=1e-3)
        sliced, whole = sliced[0], whole[0]
    assert (sliced != whole).mean() < 1e-3  # exact ties aside
    # slabs go along the target's last axis (the result is in Fortran order, as NIfTI stores it)
    assert sorted(rows_seen, key=lambda r: r.start) == [range(i, i + 1) for i in range(shape[2])]


def test_default_slab_size_shrinks_with_the_number_of_classes(monkeypatch):
    model, target, shape = GEOMETRIES["flipped"]
    monkeypatch.setattr(predict, "RESAMPLE_CHUNK_VALUES", 8 * shape[0] * shape[1])
    rows_seen = _spy_on_slabs(monkeypatch)
    resample_to_grid([(_smooth_probs(MODEL_SHAPE, 4, seed=0), model)], target, shape)
    assert max(len(r) for r in rows_seen) == 2  # 8 planes of values / 4 classes


def test_cell_labels_mark_class_borders_and_the_edge():
    probs = torch.zeros(3, 4, 3, 3)
    probs[0] = 1.0
    probs[:, 3] = torch.tensor([0.2, 0.1, 0.7])[:, None, None]  # the last plane says class 2
    probs[:, 0, 0, 0] = torch.tensor([0.4, 0.4, 0.2])  # a tie goes to the lower class: 0
    cells = cell_labels(probs)
    assert cells.shape == (3 + 4, 2 + 4, 2 + 4)
    inner = cells[2:-2, 2:-2, 2:-2]
    assert (inner[:2] == 0).all()  # cells between planes 0..2: all corners background
    assert (inner[2] == MIXED_CELL).all()  # between planes 2 and 3: background and class 2
    # one voxel outside the grid: mixed (part inside); beyond it: background
    for dim in range(3):
        assert (cells.select(dim, 0) == 0).all()
        assert (cells.select(dim, -1) == 0).all()
        assert (cells.select(dim, 1)[1:-1, 1:-1] == MIXED_CELL).all()
        assert (cells.select(dim, -2)[1:-1, 1:-1] == MIXED_CELL).all()


def test_noisy_probabilities_fall_back_to_interpolating_every_voxel(monkeypatch):
    """Mostly mixed cells (noise): the slab is interpolated whole, with the same mask."""
    model, target, shape = GEOMETRIES["flipped"]
    probs = torch.softmax(torch.randn(3, *MODEL_SHAPE, generator=torch.Generator().manual_seed(0)), dim=0)
    fallbacks = []
    original = predict._probabilities_on_slab

    def spy(*args):
        fallbacks.append(1)
        return original(*args)

    monkeypatch.setattr(predict, "_probabilities_on_slab", spy)
    labels = resample_to_grid([(probs, model)], target, shape)
    assert fallbacks
    general = resample_to_grid([(probs, model)], target, shape, axis_aligned=False)
    assert (labels != general).mean() < 1e-3


def test_argmax_classes_matches_torch_argmax_with_ties():
    scores = torch.tensor([[0.5, 0.2, 0.3, 0.3], [0.5, 0.7, 0.3, 0.1], [0.0, 0.7, 0.4, 0.3]])
    assert argmax_classes(scores).tolist() == scores.argmax(dim=0).tolist() == [0, 1, 2, 0]
    rand = torch.rand(5, 1000)
    assert torch.equal(argmax_classes(rand).long(), rand.argmax(dim=0))


def test_tta_probabilities_are_the_mean_over_flips():
    """The blended TTA probabilities (averaged in place) and each flip's labels."""
    from medseg.predict import flip_sets, sliding_window_logits

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1).eval()
    image = torch.randn(1, 12, 10, 9)
    flip_labels: list[torch.Tensor] = []
    tta = sliding_window_logits(net, image, roi_size=(8, 8, 8), tta=True, flip_labels=flip_labels)
    per_flip = []
    for dims in flip_sets(True):
        flipped = torch.flip(image[None], dims)[0] if dims else image
        probs = sliding_window_logits(net, flipped, roi_size=(8, 8, 8))
        per_flip.append(torch.flip(probs, [d - 1 for d in dims]) if dims else probs)
    torch.testing.assert_close(tta, torch.stack(per_flip).mean(dim=0), atol=1e-5, rtol=1e-5)
    assert len(flip_labels) == 8
    for labels, probs in zip(flip_labels, per_flip, strict=True):
        assert labels.dtype == torch.uint8
        assert torch.equal(labels.long(), probs.argmax(dim=0))


def test_softmax_classes_in_place_or_into_half_precision(monkeypatch):
    from medseg.predict import softmax_classes

    monkeypatch.setattr(predict, "SOFTMAX_SLAB_VALUES", 3 * 2 * 9 * 7)  # several slabs along dim 2
    logits = torch.randn(1, 3, 10, 9, 7) * 4
    expected = torch.softmax(logits, dim=1)
    half = softmax_classes(logits.clone(), torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), expected, atol=1e-3, rtol=0)
    same = logits.clone()
    assert softmax_classes(same, torch.float32) is same
    torch.testing.assert_close(same, expected)


def test_large_volumes_keep_half_precision_probabilities(monkeypatch):
    """Above HALF_PROBS_VOXELS the CPU keeps the stitched probabilities in float16 (half the memory
    of a 512x512x600 CT's), within half precision of the float32 ones, TTA included."""
    from medseg.predict import sliding_window_logits

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1).eval()
    image = torch.randn(1, 12, 10, 9)
    for tta in (False, True):
        full = sliding_window_logits(net, image, roi_size=(8, 8, 8), tta=tta)
        monkeypatch.setattr(predict, "HALF_PROBS_VOXELS", 12 * 10 * 9 - 1)
        half = sliding_window_logits(net, image, roi_size=(8, 8, 8), tta=tta)
        monkeypatch.undo()
        assert full.dtype == torch.float32
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float(), full, atol=2e-3, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_separable_spacing_gives_monais_grid_and_values(seed, monkeypatch):
    """Preprocessing's resampling (``SeparableSpacingd``): MONAI's own output grid and affine, and the
    values of MONAI's ``Spacingd`` up to float32 rounding; one axis at a time for the image, whatever
    its flips, permutation or obliquity (Spacing keeps the grid's directions), MONAI's path for
    nearest-neighbour labels."""
    from monai.data import MetaTensor
    from monai.transforms import Orientationd, Spacingd

    import medseg.separable
    from medseg.transforms import SeparableSpacingd

    rng = np.random.default_rng(seed)
    perm = tuple(int(i) for i in rng.permutation(3))
    affine = _grid(perm, tuple(rng.choice([-1.0, 1.0], 3)), tuple(rng.uniform(0.5, 3.0, 3)), rng.uniform(-90, 90, 3))
    if seed >= 4:
        affine = _rotated(affine, 0.3)
    shape = tuple(int(n) for n in rng.integers(8, 30, 3))
    image = MetaTensor(torch.randn(2, *shape) * 100, affine=torch.as_tensor(affine))
    label = MetaTensor(torch.randint(0, 3, (1, *shape)).float(), affine=torch.as_tensor(affine))
    item = Orientationd(keys=("image", "label"), axcodes="RAS", labels=None)({"image": image, "label": label})
    pixdim = tuple(float(p) for p in rng.uniform(0.7, 2.5, 3))
    monai = Spacingd(("image", "label"), pixdim=pixdim, mode=("bilinear", "nearest"), padding_mode="border", dtype=np.float32)(dict(item))
    calls = []
    original = medseg.separable.resample_axis_aligned
    monkeypatch.setattr(medseg.separable, "resample_axis_aligned", lambda *a, **k: calls.append(1) or original(*a, **k))
    ours = SeparableSpacingd(("image", "label"), pixdim=pixdim, modes=("bilinear", "nearest"))(dict(item))
    assert len(calls) == 1  # the image only
    for key in ("image", "label"):
        assert ours[key].shape == monai[key].shape
        torch.testing.assert_close(ours[key].affine, monai[key].affine)
        assert len(ours[key].applied_operations) == len(monai[key].applied_operations)
    torch.testing.assert_close(ours["image"].as_tensor(), monai["image"].as_tensor(), atol=2e-3, rtol=1e-5)
    assert torch.equal(ours["label"].as_tensor(), monai["label"].as_tensor())
    # a grid that is not axis-aligned (none here, as MONAI's Spacing keeps directions) goes to MONAI
    monkeypatch.setattr(medseg.separable, "axis_aligned_map", lambda *a, **k: None)
    fallback = SeparableSpacingd(("image",), pixdim=pixdim, modes=("bilinear",))(dict(item))["image"]
    assert len(calls) == 1
    assert torch.equal(fallback.as_tensor(), monai["image"].as_tensor())
