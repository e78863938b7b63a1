"""Training-time stand-ins for torch modules (medseg.kernels): same parameters, same results, where
torch's own CPU kernels are wrong (bf16 NaN weight gradients) or lose the layout (instance norm)."""

from __future__ import annotations

import json

import torch

from medseg.config import Config
from medseg.kernels import (
    ChannelsLastInstanceNorm3d,
    Fp32ThinConv3d,
    QuickPReLU,
    fp32_on_thin_maps,
    keep_channels_last,
    quick_prelu_backward,
    training_stand_ins,
)
from medseg.models import build_model


def test_convolutions_on_maps_two_voxels_thin_run_in_fp32_under_cpu_bf16():
    """oneDNN's bf16 conv3d weight gradient came out NaN on maps 2 voxels along the first axis
    (a 32-wide patch's bottleneck at depth 4): those convolutions run in fp32, the rest as they were."""
    cfg = Config.model_validate({"model": {"name": "monai_unet", "features": 4, "depth": 4, "in_channels": 1}})
    plain, guarded = build_model(cfg.model, out_channels=3), build_model(cfg.model, out_channels=3)
    n_convs = sum(type(m) in (torch.nn.Conv3d, torch.nn.ConvTranspose3d) for m in guarded.modules())
    assert fp32_on_thin_maps(guarded) == n_convs > 0
    assert not any(type(m) in (torch.nn.Conv3d, torch.nn.ConvTranspose3d) for m in guarded.modules())
    assert list(guarded.state_dict()) == list(plain.state_dict())
    guarded.load_state_dict(plain.state_dict())  # strict: the same parameters under the same names
    x = torch.randn(2, 1, 32, 32, 16)
    torch.testing.assert_close(guarded(x), plain(x))  # outside autocast nothing changes

    conv = torch.nn.Conv3d(4, 4, 3, padding=1)
    fp32_on_thin_maps(conv)
    assert isinstance(conv, Fp32ThinConv3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        thin = conv(torch.randn(1, 4, 2, 8, 8))
        thick = conv(torch.randn(1, 4, 3, 8, 8))
        other_axis = conv(torch.randn(1, 4, 8, 8, 2))
    assert thin.dtype == torch.float32
    assert thick.dtype == other_axis.dtype == torch.bfloat16
    thin.sum().backward()
    assert conv.weight.grad is not None
    assert bool(torch.isfinite(conv.weight.grad).all())


def test_instance_norms_give_a_channels_last_map_back_channels_last_with_the_same_values():
    """torch's instance norm returns a channels-last input contiguous; the stand-in keeps the layout,
    so the activation's backward and the next convolution see one layout. Values, gradients and state
    dict are the plain norm's; a contiguous input stays contiguous."""
    plain_norm = torch.nn.InstanceNorm3d(4, affine=True)
    x = torch.randn(2, 4, 6, 5, 3).contiguous(memory_format=torch.channels_last_3d)
    assert not plain_norm(x).is_contiguous(memory_format=torch.channels_last_3d)  # what is mended

    for name in ("monai_unet", "classic_unet"):
        cfg = Config.model_validate({"model": {"name": name, "features": 4, "depth": 2, "in_channels": 1}})
        plain, kept = build_model(cfg.model, out_channels=3), build_model(cfg.model, out_channels=3)
        kept.load_state_dict(plain.state_dict())
        n_norms = sum(type(m) is torch.nn.InstanceNorm3d for m in kept.modules())
        assert keep_channels_last(kept) == n_norms > 0, name
        assert list(kept.state_dict()) == list(plain.state_dict())
        norms = [m for m in kept.modules() if isinstance(m, ChannelsLastInstanceNorm3d)]
        seen: list[bool] = []

        def record(module, args, out, seen=seen):
            seen.append(out.is_contiguous(memory_format=torch.channels_last_3d))

        hooks = [m.register_forward_hook(record) for m in norms]
        x = torch.randn(2, 1, 16, 16, 8)
        for fmt in (torch.channels_last_3d, torch.contiguous_format):
            plain.to(memory_format=fmt), kept.to(memory_format=fmt)
            seen.clear()
            xin = x.clone().contiguous(memory_format=fmt).requires_grad_()
            xref = x.clone().contiguous(memory_format=fmt).requires_grad_()
            out, ref = kept(xin), plain(xref)
            torch.testing.assert_close(out, ref)
            out.square().sum().backward()
            ref.square().sum().backward()
            torch.testing.assert_close(xin.grad, xref.grad)
            assert len(seen) == len(norms), name
            if fmt == torch.channels_last_3d:
                assert all(seen), name  # every norm gave channels-last back
            else:
                assert not any(seen), name  # a contiguous map stays contiguous
        for h in hooks:
            h.remove()


def test_quick_prelu_has_torchs_values_and_gradients_in_fp32_and_bf16_and_both_layouts():
    """The one-weight PReLU's backward without torch's slow CPU kernel: the same outputs, input
    gradients and weight gradient as nn.PReLU (fp32 to rounding; bf16 autocast within bf16's
    precision, outputs identical), channels-last or not; several weights stay nn.PReLU."""
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        plain, quick = torch.nn.PReLU(), torch.nn.PReLU()
        assert quick_prelu_backward(quick) == 1
        assert isinstance(quick, QuickPReLU)
        for module in (plain, quick):
            module.weight.data.fill_(0.3)
        x = torch.randn(2, 4, 6, 5, 3).contiguous(memory_format=fmt)
        g = torch.randn(2, 4, 6, 5, 3).contiguous(memory_format=torch.channels_last_3d)  # either layout
        for bf16 in (False, True):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                ya, yb = plain(xa), quick(xb)
            assert ya.dtype == yb.dtype == (torch.bfloat16 if bf16 else torch.float32)
            torch.testing.assert_close(yb, ya, rtol=0, atol=0)
            ya.backward(g.to(ya.dtype))
            yb.backward(g.to(yb.dtype))
            torch.testing.assert_close(xb.grad, xa.grad)
            tol = {"rtol": 2e-2, "atol": 1e-2} if bf16 else {}
            torch.testing.assert_close(quick.weight.grad, plain.weight.grad, **tol)
            assert quick.weight.grad.dtype == torch.float32
            assert float(quick.weight.grad) != 0.0
            plain.weight.grad = quick.weight.grad = None
    assert quick_prelu_backward(torch.nn.PReLU(num_parameters=4)) == 0


def test_a_monai_unet_trains_to_the_same_weights_with_the_stand_in():
    cfg = Config.model_validate({"model": {"name": "monai_unet", "features": 4, "depth": 2, "in_channels": 1}})
    torch.manual_seed(0)
    plain = build_model(cfg.model, out_channels=2)
    swapped = build_model(cfg.model, out_channels=2)
    swapped.load_state_dict(plain.state_dict())
    swapped_counts = training_stand_ins(swapped)  # every stand-in the trainer swaps in
    assert swapped_counts["fp32 on thin maps"] > 0
    assert swapped_counts["channels-last instance norms"] > 0
    assert swapped_counts["quick PReLU backward"] > 0
    x = torch.randn(2, 1, 16, 16, 8)
    for net in (plain, swapped):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(plain.state_dict().items(), swapped.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_training_at_a_32_wide_patch_stays_in_bf16_without_skipping_a_step(tiny_dataset, tmp_path):
    """The plan of a small dataset: a depth-4 U-Net at 32x32x16 has a 2x2x1 bottleneck. Before the
    stand-in, bf16 weight gradients there went NaN within the first 0-17 steps here (1 in 3 to 10 steps
    after that), the run skipped them and after 3 fell back to fp32 for good."""
    from medseg.config import load_config
    from medseg.train import train
    from tests.helpers import TINY_OVERRIDES

    cfg = load_config(None, [
        *TINY_OVERRIDES, "tracking.enabled=false", "postprocess.tune_on_validation=false",
        "train.val_surface_metrics=false", "model.name=monai_unet", "model.depth=4", "model.features=8",
        "train.patch_size=[32,32,16]", "train.batch_size=2", "train.precision=bf16", "train.epochs=1",
        "train.iterations_per_epoch=40", "train.memory_format=contiguous",
    ])
    result = train(cfg, tiny_dataset, out_dir=tmp_path / "run")
    meta = json.loads((result.bundle / "metadata.json").read_text())
    assert meta["precision"] == "bf16"
    assert meta.get("skipped_nonfinite_steps", 0) == 0
