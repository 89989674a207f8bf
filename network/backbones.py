"""Trunks from timm, returning (stride-4 features, high-level stride-8 features)."""
from __future__ import annotations

import timm
import torch
from torch import nn

# timm ResNets whose layers we regroup into the original's layout (backbone.layer0..layer4).
RESNET_LAYOUT = ("resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet152")


def _dilate(layer: nn.Module, dilation: int) -> None:
    """The original's OS8 rule: every 3x3 conv of the layer dilated, and no stride in the layer."""
    for name, m in layer.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if m.kernel_size == (3, 3):
            m.dilation, m.padding, m.stride = (dilation, dilation), (dilation, dilation), (1, 1)
        elif name.endswith("downsample.0"):
            m.stride = (1, 1)


class ResNetTrunk(nn.Module):
    """A timm ResNet as the original regroups it: layer0 = (conv1, bn1, relu, maxpool), layer1..4.

    Dilated to output stride 8: layer3's 3x3 convs dilation 2, layer4's dilation 4, downsampling stride 1.
    Returns layer1 (stride 4) and layer4 (stride 8).
    """

    def __init__(self, name: str = "resnet50") -> None:
        super().__init__()
        net = timm.create_model(name, pretrained=False, zero_init_last=False)
        self.layer0 = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        _dilate(self.layer3, 2)
        _dilate(self.layer4, 4)
        self.low_channels = net.feature_info[1]["num_chs"]
        self.high_channels = net.num_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s4 = self.layer1(self.layer0(x))
        return s4, self.layer4(self.layer3(self.layer2(s4)))

    @staticmethod
    def imagenet_key(key: str) -> str | None:
        """Map a torchvision/timm classification key to ours; None for the classifier."""
        if key.startswith(("fc.", "global_pool.")):
            return None
        for src, dst in (("conv1.", "layer0.0."), ("bn1.", "layer0.1.")):
            if key.startswith(src):
                return dst + key[len(src):]
        return key


class TimmTrunk(nn.Module):
    """Any timm model with `features_only` and `output_stride=8`: its stride-4 and last feature maps."""

    def __init__(self, name: str) -> None:
        super().__init__()
        probe = timm.create_model(name, pretrained=False, features_only=True)
        reductions = probe.feature_info.reduction()
        if 4 not in reductions:
            raise ValueError(f"timm model '{name}' has no stride-4 feature map (reductions {reductions})")
        low = reductions.index(4)
        try:
            self.body = timm.create_model(
                name, pretrained=False, features_only=True, output_stride=8, out_indices=(low, len(reductions) - 1)
            )
        except (TypeError, AssertionError, ValueError) as e:
            raise ValueError(f"timm model '{name}' cannot be dilated to output stride 8: {e}") from e
        self.low_channels, self.high_channels = self.body.feature_info.channels()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.body(x)
        return low, high

    @staticmethod
    def imagenet_key(key: str) -> str | None:
        return "body." + key


def build_trunk(name: str) -> nn.Module:
    """A trunk returning (stride-4, stride-8) features, with `low_channels` and `high_channels`."""
    if name in RESNET_LAYOUT:
        return ResNetTrunk(name)
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:5]
        raise ValueError(f"unknown trunk '{name}'" + (f"; similar timm models: {close}" if close else ""))
    return TimmTrunk(name)
