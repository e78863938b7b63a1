"""One contract run over every registered model (forward, backward, sizes)."""

from __future__ import annotations

import pytest
import torch

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models import MODELS, ClassicUNet, build_model, divisor_of


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dims", [2, 3])
def test_forward_backward(name, dims):
    cfg = ModelConfig(name=name, spatial_dims=dims, features=4, depth=4 if name == "basic_unet" else 2)
    net = build_model(cfg, in_channels=1, out_channels=3)
    size = divisor_of(cfg) * 2
    x = torch.randn(2, 1, *([size] * dims), requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3, *([size] * dims))
    y.mean().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()


def test_classic_unet_structure():
    net = ClassicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=64, depth=4, norm="none")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    ups = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    # 2 convs per level on the way down (4) + bottom (1) + up (4), then the 1x1 head
    assert len(convs) == 2 * 9 + 1
    assert all(c.kernel_size == (3, 3) for c in convs[:-1])
    assert convs[-1].kernel_size == (1, 1)
    assert [u.kernel_size for u in ups] == [(2, 2)] * 4
    assert [c.out_channels for c in convs[:10:2]] == [64, 128, 256, 512, 1024]
    assert not any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.InstanceNorm2d) for m in net.modules())


def test_indivisible_input_is_refused():
    net = ClassicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=4, depth=2)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 1, 10, 8, 8))


def test_unknown_model_lists_options():
    with pytest.raises(ConfigError, match="Available options are"):
        build_model(ModelConfig(name="nope"), out_channels=2)


def _signature(net: torch.nn.Module) -> tuple:
    """What a knob can change: the layer types and every parameter's shape."""
    return tuple(
        (type(m).__name__, getattr(m, "p", None), tuple(p.shape for p in m.parameters(recurse=False)))
        for m in net.modules()
    )


KNOBS = {"features": 8, "depth": 3, "norm": "batch", "dropout": 0.2, "act": "leakyrelu"}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_every_knob_changes_the_network_or_is_refused(name, knob):
    """A config knob the model ignores would lie to the user: it must change the network, or be refused."""
    base = ModelConfig(name=name, features=4, depth=4 if name == "basic_unet" else 2, norm="instance")
    changed = base.model_copy(update={knob: KNOBS[knob]})
    reference = _signature(build_model(base, out_channels=2))
    try:
        other = build_model(changed, out_channels=2)
    except ConfigError as exc:
        message = str(exc)
    else:
        assert _signature(other) != reference, f"{name} ignores model.{knob}"
        return
    assert f"model.{knob}" in message


@pytest.mark.parametrize("name", sorted(MODELS))
def test_norm_none_means_no_normalisation_or_is_refused(name):
    cfg = ModelConfig(name=name, features=4, depth=4 if name == "basic_unet" else 2, norm="none")
    try:
        net = build_model(cfg, out_channels=2)
    except ConfigError as exc:
        message = str(exc)
    else:
        assert not any("Norm" in type(m).__name__ for m in net.modules()), f"{name}: norm=none still normalises"
        return
    assert "model.norm" in message


def test_act_auto_keeps_each_networks_own_activation():
    """Bundles saved before ``model.act`` existed have no such key: auto must build what they hold."""
    acts = {
        name: {type(m).__name__ for m in build_model(ModelConfig(name=name, features=4, depth=2), out_channels=2).modules()}
        for name in ("classic_unet", "monai_unet")
    }
    assert "ReLU" in acts["classic_unet"]
    assert "PReLU" in acts["monai_unet"]
    leaky = build_model(ModelConfig(name="monai_unet", features=4, depth=2, act="leakyrelu"), out_channels=2)
    assert not any(isinstance(m, torch.nn.PReLU) for m in leaky.modules())
    with pytest.raises(ValueError, match="dynunet has its own activation"):
        ModelConfig(name="dynunet", act="prelu")  # refused with the config, before any data is read
