"""HRNet-OCR single-scale, and in hierarchical multi-scale attention: the paper's model.

Attribute names follow the original checkpoint layout (backbone, ocr, scale_attn), so the published snapshots load
by stripping `module.`.
"""
from __future__ import annotations

import torch
from torch import nn

from .hrnet import HRNetTrunk
from .layers import attn_head, resize
from .mscale import MscaleBase, check_attn_bn_stats
from .ocr import OCRBlock


class OCRNetBody(nn.Module):
    """HRNetV2 trunk (720 channels at stride 4 for W48) followed by the OCR block."""

    def __init__(
        self,
        num_classes: int,
        trunk: str = "hrnet_w48",
        mid_ch: int = 512,
        key_ch: int = 256,
        timm_pretrained: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = HRNetTrunk(trunk, timm_pretrained=timm_pretrained)
        self.ocr = OCRBlock(self.backbone.out_channels, num_classes, mid_ch, key_ch)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class logits, auxiliary logits, OCR features), at stride 4."""
        return self.ocr(self.backbone(x))


class OCRNet(OCRNetBody):
    """Single-scale HRNet-OCR (`ocrnet.HRNet`): `pred` and `aux` logits at the input size."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, aux, _ = self.heads(images)
        size = images.shape[-2:]
        return {"pred": resize(logits, size), "aux": resize(aux, size)}


class MscaleOCRNet(OCRNetBody, MscaleBase):
    """HRNet-OCR in hierarchical multi-scale attention (`ocrnet.HRNet_Mscale`).

    The attention head reads the OCR features; both the class and the auxiliary logits are fused across scales.
    """

    def __init__(
        self,
        num_classes: int,
        trunk: str = "hrnet_w48",
        mid_ch: int = 512,
        key_ch: int = 256,
        attn_ch: int = 256,
        lo_scale: float = 0.5,
        timm_pretrained: bool = False,
        attn_bn_stats: str = "both",
    ) -> None:
        super().__init__(num_classes, trunk, mid_ch, key_ch, timm_pretrained)
        if not 0 < lo_scale < 1:
            raise ValueError(f"lo_scale must lie in (0, 1), got {lo_scale}")
        self.lo_scale = float(lo_scale)
        self.attn_bn_stats = check_attn_bn_stats(attn_bn_stats)
        self.scale_attn = attn_head(self.ocr.out_channels, attn_ch)

    def single_features(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits and auxiliary logits resized to x's size, and the OCR features the attention head reads."""
        logits, aux, ocr_feats = self.heads(x)
        size = x.shape[-2:]
        return {"pred": resize(logits, size), "aux": resize(aux, size)}, ocr_feats
