"""HRNetV2 trunk: timm's HRNet modules with the original's bilinear fuse and 720-channel output.

timm's `hrnet_*` models with `features_only=True, feature_location=''` hold exactly the original's backbone keys
(conv1/bn1/conv2/bn2, layer1, transition1-3, stage2-4) in the same order. Their fuse layers, though, upsample
with nearest-neighbour by a fixed factor, while the original upsamples bilinearly to the exact size of the target
branch (which also makes odd input sizes work). So the modules are taken over as they are and only the fuse step
and the trunk's forward are ours.
"""
from __future__ import annotations

import timm
import torch
from timm.models.hrnet import cfg_cls as TIMM_HRNET_CONFIGS
from torch import nn

from .layers import resize

# Classification-only parts of the HRNet ImageNet checkpoints (HRNet-Image-Classification / timm layout).
IMAGENET_HEAD_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def hrnet_names() -> list[str]:
    """The HRNet widths timm defines (hrnet_w18_small ... hrnet_w64); the default trunk is hrnet_w48."""
    return sorted(TIMM_HRNET_CONFIGS)


class BilinearFuseModule(nn.Module):
    """One HighResolutionModule: parallel branches, then every output fused from every input.

    For output i from input j > i the term is conv1x1-BN, upsampled bilinearly (align_corners=False) to the
    size of branch i; j < i is a chain of stride-2 conv3x3-BN; the terms are summed in order j = 0, 1, ...
    and passed through ReLU (the original's `HighResolutionModule.forward`).
    """

    def __init__(self, branches: nn.ModuleList, fuse_layers: nn.Module) -> None:
        super().__init__()
        self.branches = branches
        if isinstance(fuse_layers, nn.ModuleList):  # a single-branch module has no fuse layers
            fuse_layers = nn.ModuleList(nn.ModuleList(_without_upsample(f) for f in row) for row in fuse_layers)
        self.fuse_layers = fuse_layers
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        x = [branch(t) for branch, t in zip(self.branches, x)]
        if len(self.branches) == 1:
            return x
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = None
            for j, layer in enumerate(row):
                term = layer(x[j])
                if j > i:
                    term = resize(term, x[i].shape[-2:])
                y = term if y is None else y + term
            out.append(self.relu(y))
        return out


def _without_upsample(layer: nn.Module) -> nn.Module:
    """timm's j > i fuse layer is (conv, bn, nn.Upsample); the upsample is parameter-free and done in forward."""
    if isinstance(layer, nn.Sequential) and any(isinstance(m, nn.Upsample) for m in layer):
        return nn.Sequential(*(m for m in layer if not isinstance(m, nn.Upsample)))
    return layer


class HRNetTrunk(nn.Module):
    """HRNetV2: stem (two stride-2 conv3x3), layer1, transitions and stages 2-4; the four branch outputs are
    upsampled bilinearly to stride 4 and concatenated (`out_channels`, 720 for W48).

    `timm_pretrained` fetches timm's ImageNet weights (needs the network); otherwise the original's init
    (conv normal std 0.001, BN weight 1 bias 0) is applied. An ImageNet file in the HRNet classification layout
    loads with utils.checkpoint.load_trunk_weights (see `imagenet_key`).
    """

    def __init__(self, name: str = "hrnet_w48", timm_pretrained: bool = False) -> None:
        super().__init__()
        if name not in TIMM_HRNET_CONFIGS:
            raise ValueError(f"unknown HRNet trunk '{name}' (known: {', '.join(hrnet_names())})")
        net = _create_timm_hrnet(name, timm_pretrained)
        self.conv1, self.bn1, self.conv2, self.bn2 = net.conv1, net.bn1, net.conv2, net.bn2
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = net.layer1
        self.transition1 = net.transition1
        self.stage2 = _bilinear_stage(net.stage2)
        self.transition2 = net.transition2
        self.stage3 = _bilinear_stage(net.stage3)
        self.transition3 = net.transition3
        self.stage4 = _bilinear_stage(net.stage4)
        self.branch_channels = list(net.stage4[-1].get_num_in_chs())
        self.out_channels = sum(self.branch_channels)
        if not timm_pretrained:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's `init_weights`."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stage-4 branch outputs at strides 4, 8, 16, 32."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        feats = [self.layer1(x)]
        for transition, stage in (
            (self.transition1, self.stage2),
            (self.transition2, self.stage3),
            (self.transition3, self.stage4),
        ):
            # A new branch grows from the lowest-resolution one; identity transitions pass a branch through.
            feats = stage([t(feats[min(i, len(feats) - 1)]) for i, t in enumerate(transition)])
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.branches(x)
        size = feats[0].shape[-2:]
        return torch.cat([feats[0]] + [resize(f, size) for f in feats[1:]], 1)

    @staticmethod
    def imagenet_key(key: str) -> str | None:
        """HRNet classification checkpoints use our names; their classification head is dropped."""
        return None if key.startswith(IMAGENET_HEAD_PREFIXES) else key


def _create_timm_hrnet(name: str, pretrained: bool) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True, feature_location="")
    except Exception as e:  # hub / network errors come in many types; say what was being fetched
        if not pretrained:
            raise
        raise RuntimeError(f"could not fetch timm's pretrained '{name}' weights (offline?): {e}") from e


def _bilinear_stage(stage: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*(BilinearFuseModule(m.branches, m.fuse_layers) for m in stage))

