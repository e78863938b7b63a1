"""Network registry: the classic U-Net of Ronneberger et al. (2015) and MONAI's variants.

``build_model(cfg.model, in_channels=1, out_channels=n_labels)`` looks the name up
in ``MODELS``; an unknown name fails listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    return nn.Identity()


def _activation(kind: str) -> nn.Module:
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=True)
    if kind == "prelu":
        return nn.PReLU()  # one weight, as MONAI's
    return nn.ReLU(inplace=True)


class DoubleConv(nn.Sequential):
    """Two 3x3(x3) convolutions, each followed by ReLU or ``act`` (and optional normalisation before it)."""

    def __init__(
        self, dims: int, in_ch: int, out_ch: int, norm: str = "none", dropout: float = 0.0, act: str = "relu"
    ) -> None:
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(((in_ch, out_ch), (out_ch, out_ch))):
            layers += [
                conv(a, b, kernel_size=3, padding=1, bias=norm == "none"),
                _norm(norm, dims, b),
                _activation(act),
            ]
            if dropout and i == 1:
                layers.append((nn.Dropout2d if dims == 2 else nn.Dropout3d)(dropout))
        super().__init__(*layers)


class ClassicUNet(nn.Module):
    """The U-Net of the paper, in 2D or 3D.

    Contracting path: per level two 3x3 convolutions with ReLU, then 2x2 max-pooling,
    features doubled per level. Expanding path: 2x2 transposed ("up-") convolution
    halving the features, concatenation with the skip, two 3x3 convolutions with ReLU.
    A 1x1 convolution maps to the classes. Differences from the paper, on purpose:
    padded ("same") convolutions, so that output and input sizes match and sliding
    windows tile exactly; optional normalisation (``norm="none"`` is the paper's form).

    Input sizes must be divisible by ``2**depth``.

    Example:
        >>> net = ClassicUNet(spatial_dims=3, in_channels=1, out_channels=4, features=8, depth=2)
        >>> net(torch.zeros(1, 1, 16, 16, 16)).shape
        torch.Size([1, 4, 16, 16, 16])
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: int = 64,
        depth: int = 4,
        norm: str = "none",
        dropout: float = 0.0,
        act: str = "relu",
    ) -> None:
        super().__init__()
        dims = spatial_dims
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        up = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        conv1 = nn.Conv2d if dims == 2 else nn.Conv3d
        widths = [features * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList()
        in_ch = in_channels
        for w in widths[:-1]:
            self.down.append(DoubleConv(dims, in_ch, w, norm, act=act))
            in_ch = w
        self.pool = pool(kernel_size=2, stride=2)
        self.bottom = DoubleConv(dims, widths[-2], widths[-1], norm, dropout, act=act)
        self.up = nn.ModuleList()
        self.decode = nn.ModuleList()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1], strict=True):
            self.up.append(up(w_low, w, kernel_size=2, stride=2))
            self.decode.append(DoubleConv(dims, 2 * w, w, norm, act=act))
        self.head = conv1(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2**self.depth
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"ClassicUNet input spatial size {tuple(x.shape[2:])} must be divisible by {factor}"
            )
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for upconv, block, skip in zip(self.up, self.decode, reversed(skips), strict=True):
            x = block(torch.cat([skip, upconv(x)], dim=1))
        return self.head(x)


def _classic(cfg: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    return ClassicUNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=cfg.features,
        depth=cfg.depth,
        norm=cfg.norm,
        dropout=cfg.dropout,
        act="relu" if cfg.act == "auto" else cfg.act,
    )


def _monai_unet(cfg: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(cfg.features * 2**i for i in range(cfg.depth + 1)),
        strides=(2,) * cfg.depth,
        num_res_units=2,
        norm=_monai_norm(cfg.norm),
        act=_monai_act(cfg.act),
        dropout=cfg.dropout,
    )


def _monai_act(kind: str) -> Any:
    """medseg's ``model.act`` in MONAI's terms (auto: MONAI's own PReLU; leakyrelu: 0.01, as nnU-Net)."""
    if kind == "leakyrelu":
        return ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
    return "prelu" if kind == "auto" else kind


def _monai_norm(kind: str) -> Any:
    """medseg's ``model.norm`` in MONAI's terms (instance norm with learnt affine, as nnU-Net)."""
    return {"none": None, "batch": "batch", "instance": ("instance", {"affine": True})}[kind]


def _basic_unet(cfg: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.nets import BasicUNet

    if cfg.depth != 4:
        raise ConfigError(
            f"model.depth: basic_unet has a fixed depth of 4, got {cfg.depth}; use monai_unet, "
            "classic_unet or dynunet for another depth"
        )
    f = cfg.features
    return BasicUNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=(f, f, 2 * f, 4 * f, 8 * f, f),
        norm=_monai_norm(cfg.norm),
        dropout=cfg.dropout,
    )


class DeepSupervisionUNet(nn.Module):
    """MONAI's DynUNet (the nnU-Net architecture) with deep supervision kept out of ``forward``'s type.

    ``forward`` always returns the full-resolution logits ``(B, C, *spatial)``, so inference,
    sliding windows and the model contract treat it like any other network. In training
    mode with deep supervision the auxiliary logits of the coarser decoder levels
    (upsampled to full size by DynUNet) are kept in ``aux_outputs`` for the loss
    (``deep_supervision_weights``), and cleared by the next call.
    """

    def __init__(self, net: nn.Module, num_aux: int) -> None:
        super().__init__()
        self.net = net
        self.num_aux = num_aux
        self.aux_outputs: list[torch.Tensor] = []
        # DynUNet registers its blocks twice (``skip_layers`` aliases them): keep each tensor once
        # in the state dict, so safetensors can store it, and fill the aliases back on load
        first: dict[int, str] = {}
        self._aliases: dict[str, str] = {}
        for name, tensor in net.state_dict(keep_vars=True).items():
            key = f"net.{name}"
            if id(tensor) in first:
                self._aliases[key] = first[id(tensor)]
            else:
                first[id(tensor)] = key
        self._register_state_dict_hook(_drop_aliases)
        self._register_load_state_dict_pre_hook(_fill_aliases, with_module=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training and self.num_aux and out.ndim == x.ndim + 1:
            heads = torch.unbind(out, dim=1)
            self.aux_outputs = list(heads[1:])
            return heads[0]
        self.aux_outputs = []
        return out


def _drop_aliases(module: DeepSupervisionUNet, state_dict, prefix: str, local_metadata) -> None:
    for alias in module._aliases:
        state_dict.pop(prefix + alias, None)


def _fill_aliases(module: DeepSupervisionUNet, state_dict, prefix: str, *args) -> None:
    for alias, canonical in module._aliases.items():
        if prefix + alias not in state_dict and prefix + canonical in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + canonical]


def deep_supervision_weights(num_aux: int) -> list[float]:
    """nnU-Net's weights for the main output and the auxiliary ones: 1, 1/2, 1/4, ... normalised."""
    w = [0.5**i for i in range(num_aux + 1)]
    return [v / sum(w) for v in w]


def _dynunet(cfg: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.nets import DynUNet

    if cfg.norm == "none":
        raise ConfigError("model.norm: dynunet needs a normalisation (instance or batch), got 'none'")
    levels = cfg.depth + 1
    strides = [1] + [2] * cfg.depth
    num_aux = min(2, cfg.depth - 1) if cfg.deep_supervision else 0
    net = DynUNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3] * levels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=[min(cfg.features * 2**i, 320) for i in range(levels)],
        dropout=cfg.dropout or None,
        norm_name=("INSTANCE", {"affine": True}) if cfg.norm == "instance" else "BATCH",
        deep_supervision=num_aux > 0,
        deep_supr_num=max(1, num_aux),
        res_block=False,
    )
    return DeepSupervisionUNet(net, num_aux)


MODELS: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {
    "classic_unet": _classic,
    "monai_unet": _monai_unet,
    "basic_unet": _basic_unet,
    "dynunet": _dynunet,
}


def divisor_of(cfg: ModelConfig) -> int:
    """Patch sizes must be divisible by this."""
    return 16 if cfg.name == "basic_unet" else 2**cfg.depth


def build_model(cfg: ModelConfig, *, in_channels: int | None = None, out_channels: int) -> nn.Module:
    """The registered network ``cfg.name``; ``in_channels`` defaults to ``cfg.in_channels`` (planned), else 1."""
    in_channels = in_channels or cfg.in_channels or 1
    try:
        factory = MODELS[cfg.name]
    except KeyError:
        raise ConfigError(
            f"model.name: unknown model {cfg.name!r}. Available options are: {sorted(MODELS)}"
        ) from None
    if problem := cfg.act_problem():
        raise ConfigError(f"model.act: {problem}")
    return factory(cfg, in_channels, out_channels)
