"""Dense CRF (medseg.crf): it improves a noisy prediction, respects edges, and runs on any size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.config import CRFConfig
from medseg.crf import GridFilter, dense_crf
from medseg.metrics import dice, hd95


def noisy_sphere(shape=(40, 44, 36), seed=0, flip_noise=1.19):
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = np.asarray(shape) / 2
    truth = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) <= (0.3 * min(shape)) ** 2
    image = truth.astype(np.float32) + rng.normal(0, 0.35, shape).astype(np.float32)
    logit = 2.0 * (2.0 * truth - 1.0) + rng.normal(0, flip_noise, shape)
    p1 = 1 / (1 + np.exp(-logit))
    probs = torch.tensor(np.stack([1 - p1, p1]), dtype=torch.float32)
    return truth, torch.from_numpy(image), probs


def test_crf_improves_a_noisy_sphere():
    truth, image, probs = noisy_sphere()
    before_probs = probs.clone()
    before = probs.argmax(0).numpy() == 1
    q = dense_crf(probs, image, spacing=(1.0, 1.0, 1.0))  # the default kernels
    after = q.argmax(0).numpy() == 1
    torch.testing.assert_close(probs, before_probs)  # input untouched
    assert q.shape == probs.shape
    torch.testing.assert_close(q.sum(0), torch.ones(q.shape[1:]), atol=1e-4, rtol=0)
    assert dice(before, truth) < 0.8
    assert dice(after, truth) > 0.95
    assert hd95(after, truth, (1, 1, 1)) < hd95(before, truth, (1, 1, 1)) / 3


def test_appearance_kernel_is_what_follows_the_edge():
    """With only the smoothness kernel a wide blur rounds the prediction; the bilateral kernel keeps to the edge."""
    truth, image, probs = noisy_sphere(seed=1)
    smooth_only = CRFConfig(bilateral_weight=0.0, smooth_weight=4.0, smooth_sigma_mm=6.0)
    bilateral = CRFConfig(smooth_weight=0.0, bilateral_sigma_mm=5.0)
    d_smooth = dice(dense_crf(probs, image, spacing=(1, 1, 1), cfg=smooth_only).argmax(0).numpy() == 1, truth)
    d_bilateral = dice(
        dense_crf(probs, image, spacing=(1, 1, 1), cfg=bilateral).argmax(0).numpy() == 1, truth
    )
    assert d_bilateral > d_smooth


def test_spacing_is_in_mm():
    """The same physical sigma on a grid of 2 mm voxels spans half as many voxels."""
    impulse = torch.zeros(1, 41, 41, 41)
    impulse[0, 20, 20, 20] = 1.0
    spread = {}
    for spacing in (1.0, 2.0):
        f = GridFilter((41, 41, 41), sigma_vox=(6.0 / spacing,) * 3)
        out = f._filter(impulse.reshape(1, -1)).view(41, 41, 41).numpy()
        profile = out[:, 20, 20] / out[:, 20, 20].sum()
        x = np.arange(41) - 20
        spread[spacing] = float(np.sqrt((profile * x**2).sum()))
    assert spread[1.0] == pytest.approx(6.0, rel=0.25)
    assert spread[2.0] == pytest.approx(3.0, rel=0.25)


def test_gaussian_filter_matches_scipy_on_smooth_data():
    rng = np.random.default_rng(0)
    data = ndimage.gaussian_filter(rng.random((30, 32, 28)), 3).astype(np.float32)
    f = GridFilter(data.shape, sigma_vox=(3.0, 3.0, 3.0))
    ours = f(torch.from_numpy(data)[None])[0].numpy()
    ref = ndimage.gaussian_filter(data, 3.0, mode="nearest")
    inner = (slice(6, -6),) * 3
    assert np.corrcoef(ours[inner].ravel(), ref[inner].ravel())[0, 1] > 0.97
    constant = f(torch.full((1, *data.shape), 0.3))
    torch.testing.assert_close(constant, torch.full_like(constant, 0.3), atol=1e-5, rtol=0)


def test_bilateral_does_not_leak_across_an_intensity_edge():
    image = torch.zeros(24, 24, 24)
    image[12:] = 4.0  # a strong edge (8 intensity sigmas)
    values = torch.zeros(1, 24, 24, 24)
    values[0, :12] = 1.0
    f = GridFilter((24, 24, 24), sigma_vox=(6.0, 6.0, 6.0), guide=image, sigma_intensity=0.5)
    out = f(values)[0]
    assert float(out[14:].max()) < 0.05
    assert float(out[:10].min()) > 0.95


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 4, 5), (1, 9, 7), (8, 1, 1)])
def test_runs_on_tiny_inputs(shape):
    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.tensor(rng.normal(size=(3, *shape)), dtype=torch.float32), 0)
    image = torch.tensor(rng.normal(size=shape), dtype=torch.float32)
    q = dense_crf(probs, image, spacing=(0.8, 0.8, 2.5), cfg=CRFConfig(iterations=2))
    assert q.shape == probs.shape
    assert torch.isfinite(q).all()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="do not match"):
        dense_crf(torch.ones(2, 4, 4, 4) / 2, torch.zeros(4, 4, 5), spacing=(1, 1, 1))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _truth, image, probs = noisy_sphere()
    cpu = dense_crf(probs, image, spacing=(1, 1, 1))
    gpu = dense_crf(probs.cuda(), image.cuda(), spacing=(1, 1, 1)).cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0)


def test_crf_runs_only_where_it_can_change_a_label():
    """A small uncertain object in a large decided-background grid: the cropped CRF gives the labels
    the whole-grid CRF gives (but for near-ties), and a grid decided everywhere comes back as it went in."""
    from medseg.crf import _mean_field, _undecided_box

    torch.manual_seed(0)
    shape = (96, 80, 40)
    image = torch.randn(shape) * 0.2
    probs = torch.full((3, *shape), 1e-5)
    probs[0] = 1.0
    zz = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    inside = ((zz - torch.tensor([30.0, 40.0, 20.0])[:, None, None, None]) ** 2).sum(0) < 64
    noisy = torch.softmax(torch.randn(3, int(inside.sum())) * 2, dim=0)
    probs[:, inside] = noisy
    probs = probs / probs.sum(0, keepdim=True)
    spacing = (1.0, 1.0, 2.0)
    box = _undecided_box(probs, spacing, CRFConfig())
    assert box is not None
    assert all(b.stop - b.start < n for b, n in zip(box, shape, strict=True))  # a real crop
    whole = _mean_field(probs, image, spacing, CRFConfig())
    cropped = dense_crf(probs, image, spacing=spacing)
    differ = int((whole.argmax(0) != cropped.argmax(0)).sum())
    assert differ <= 0.005 * int(inside.sum()), differ  # near-ties of random probabilities inside the object
    assert torch.equal(cropped.argmax(0)[~inside], whole.argmax(0)[~inside])
    decided = torch.zeros((3, *shape))
    decided[0] = 1.0
    assert torch.equal(dense_crf(decided, image, spacing=spacing), decided)


@pytest.mark.parametrize(
    "update", [{}, {"bilateral_weight": 12.0, "bilateral_sigma_mm": 3.0, "bilateral_intensity_sigma": 0.25}]
)
def test_a_grid_too_large_for_one_pass_runs_in_slabs_with_the_same_labels(monkeypatch, update):
    """Above the voxel budget the CRF runs in z slabs with a halo (bounded memory): the labels are
    those of the one-pass CRF but for a handful of near-ties at the slab seams."""
    import medseg.crf as crf

    truth, image, probs = noisy_sphere(shape=(40, 44, 60))
    cfg = CRFConfig(**update)
    whole = dense_crf(probs, image, spacing=(1.0, 1.0, 2.0), cfg=cfg)
    monkeypatch.setattr(crf, "_MAX_CRF_VOXELS", 40 * 44 * 20)  # three slabs or more
    calls = []
    one_pass = crf._mean_field
    monkeypatch.setattr(crf, "_mean_field", lambda *a, **k: calls.append(a[0].shape) or one_pass(*a, **k))
    slabs = dense_crf(probs, image, spacing=(1.0, 1.0, 2.0), cfg=cfg)
    assert len(calls) >= 3
    assert all(c[1:3] == (40, 44) and c[3] < 60 for c in calls)
    differ = (slabs.argmax(0) != whole.argmax(0)).float().mean().item()
    assert differ < 2e-3
    assert dice(slabs.argmax(0).numpy() == 1, truth) == pytest.approx(
        dice(whole.argmax(0).numpy() == 1, truth), abs=3e-3
    )
    # in place (as inference runs it: no second copy of the scan's probabilities): the same result,
    # although each slab's output overwrites what the next slab's halo reads only after it has run
    own = probs.clone()
    assert dense_crf(own, image, spacing=(1.0, 1.0, 2.0), cfg=cfg, inplace=True) is own
    torch.testing.assert_close(own, slabs)


def test_half_precision_probabilities_are_refined_in_float32_slabs():
    """A large scan's probabilities are kept in float16 (medseg.predict.HALF_PROBS_VOXELS): the CRF
    refines them (in place, as inference runs it) to the labels the float32 probabilities get."""
    _truth, image, probs = noisy_sphere()
    full = dense_crf(probs, image, spacing=(1.0, 1.0, 2.0))
    half = probs.half()
    out = dense_crf(half, image, spacing=(1.0, 1.0, 2.0), inplace=True)
    assert out is half
    assert out.dtype == torch.float16
    assert (out.argmax(0) != full.argmax(0)).float().mean().item() < 1e-3
    torch.testing.assert_close(out.float(), full, atol=2e-3, rtol=0)


def test_skipped_labels_come_out_as_the_network_found_them():
    """``skip_labels``: the CRF refines the others; every voxel the network or the CRF calls a
    skipped label keeps the network's label, so that label's mask is the network's."""
    truth, image, probs = noisy_sphere()
    three = torch.cat([probs * 0.9, torch.full((1, *probs.shape[1:]), 0.1)])  # label 2: a plate below
    three[:, :, :, 2:3] = torch.tensor([0.3, 0.3, 0.4]).view(3, 1, 1, 1)  # a thin plate the CRF erodes
    network = three.argmax(0)
    strong = {"smooth_weight": 10.0, "bilateral_weight": 10.0}
    refined = dense_crf(three, image, spacing=(1.0, 1.0, 1.0), cfg=CRFConfig(**strong)).argmax(0)
    assert ((refined == 2) != (network == 2)).sum() > 0, "the CRF alone changes the plate"
    kept = dense_crf(three, image, spacing=(1.0, 1.0, 1.0), cfg=CRFConfig(**strong, skip_labels=[2])).argmax(0)
    assert torch.equal(kept == 2, network == 2)
    assert ((kept == 1) != (network == 1)).sum() > 100, "label 1 is still refined"
    assert dice(kept.numpy() == 1, truth) > dice(network.numpy() == 1, truth) + 0.1
