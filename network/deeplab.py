"""DeepLabV3+ (the original's variant) as a single-scale model and wrapped in HMSA."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .backbones import build_trunk
from .layers import attn_head, kaiming_init, norm2d, resize, seg_head
from .mscale import MscaleBase, check_attn_bn_stats


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation if kernel == 3 else 0
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False),
        norm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling; output concat order [image pool, 1x1, rate r for r in rates]."""

    def __init__(self, in_ch: int, out_ch: int = 256, rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__()
        self.features = nn.ModuleList(
            [_conv_bn_relu(in_ch, out_ch, 1)] + [_conv_bn_relu(in_ch, out_ch, 3, r) for r in rates]
        )
        self.img_pooling = nn.AdaptiveAvgPool2d(1)
        self.img_conv = _conv_bn_relu(in_ch, out_ch, 1)
        self.out_channels = out_ch * (len(rates) + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = resize(self.img_conv(self.img_pooling(x)), x.shape[-2:])
        return torch.cat([pooled] + [f(x) for f in self.features], 1)


class DeepLabV3PlusBody(nn.Module):
    """Trunk at output stride 8, ASPP (rates 12/24/36), 1x1 bottlenecks without BN, decoder at stride 4.

    Attribute names follow the original checkpoint layout: backbone, aspp, bot_fine, bot_aspp, final.
    """

    def __init__(
        self,
        num_classes: int,
        trunk: str = "resnet50",
        aspp_ch: int = 256,
        fine_ch: int = 48,
        head_ch: int = 256,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = build_trunk(trunk)
        self.aspp = ASPP(self.backbone.high_channels, aspp_ch)
        self.bot_fine = nn.Conv2d(self.backbone.low_channels, fine_ch, 1, bias=False)
        self.bot_aspp = nn.Conv2d(self.aspp.out_channels, aspp_ch, 1, bias=False)
        self.decoder_channels = fine_ch + aspp_ch
        self.final = seg_head(self.decoder_channels, num_classes, head_ch)
        kaiming_init(self.final)  # the rest keeps PyTorch's default init, as in the original

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits at stride 4, the 304-channel decoder features the attention head reads)."""
        s4, high = self.backbone(x)
        conv_aspp = resize(self.bot_aspp(self.aspp(high)), s4.shape[-2:])
        cat_s4 = torch.cat([self.bot_fine(s4), conv_aspp], 1)
        return self.final(cat_s4), cat_s4


class DeepV3Plus(DeepLabV3PlusBody):
    """Single-scale DeepLabV3+ (`deepv3.DeepV3PlusR50` with the default trunk)."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, _ = self.decode(images)
        return {"pred": resize(logits, images.shape[-2:])}


class MscaleDeepV3Plus(DeepLabV3PlusBody, MscaleBase):
    """DeepLabV3+ in hierarchical multi-scale attention (`mscale.DeepV3R50` with the default trunk)."""

    def __init__(
        self,
        num_classes: int,
        trunk: str = "resnet50",
        aspp_ch: int = 256,
        fine_ch: int = 48,
        head_ch: int = 256,
        attn_ch: int = 256,
        lo_scale: float = 0.5,
        attn_bn_stats: str = "both",
    ) -> None:
        super().__init__(num_classes, trunk, aspp_ch, fine_ch, head_ch)
        if not 0 < lo_scale < 1:
            raise ValueError(f"lo_scale must lie in (0, 1), got {lo_scale}")
        self.lo_scale = float(lo_scale)
        self.attn_bn_stats = check_attn_bn_stats(attn_bn_stats)
        self.scale_attn = attn_head(self.decoder_channels, attn_ch)

    def single_features(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits resized to x's size, and the 304-channel decoder features the attention head reads."""
        logits, cat_s4 = self.decode(x)
        return {"pred": resize(logits, x.shape[-2:])}, cat_s4
