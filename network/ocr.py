"""Object-contextual representations (Yuan et al.), as the original's OCR block.

Module names follow the original checkpoint layout: conv3x3_ocr, ocr_gather_head, ocr_distri_head
(object_context_block.{f_pixel, f_object, f_down, f_up}, conv_bn_dropout), cls_head, aux_head.
Everything here keeps PyTorch's default initialisation, as in the original.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import bn_relu


def _conv1_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 1, bias=False), bn_relu(out_ch)]


class SpatialGather(nn.Module):
    """Class centres: feature averages weighted by each class's softmax over all pixels -> [N, C, K, 1]."""

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        n, k = logits.shape[:2]
        weights = F.softmax(logits.reshape(n, k, -1), dim=2)  # [N, K, HW]
        centres = torch.matmul(weights, feats.reshape(n, feats.shape[1], -1).permute(0, 2, 1))  # [N, K, C]
        return centres.permute(0, 2, 1).unsqueeze(3)


class ObjectAttention(nn.Module):
    """Each pixel attends over the K class centres (softmax over K, scaled by key_ch^-0.5)."""

    def __init__(self, in_ch: int, key_ch: int) -> None:
        super().__init__()
        self.key_ch = key_ch
        self.f_pixel = nn.Sequential(*_conv1_bn_relu(in_ch, key_ch), *_conv1_bn_relu(key_ch, key_ch))
        self.f_object = nn.Sequential(*_conv1_bn_relu(in_ch, key_ch), *_conv1_bn_relu(key_ch, key_ch))
        self.f_down = nn.Sequential(*_conv1_bn_relu(in_ch, key_ch))
        self.f_up = nn.Sequential(*_conv1_bn_relu(key_ch, in_ch))

    def forward(self, feats: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        n, _, h, w = feats.shape
        query = self.f_pixel(feats).reshape(n, self.key_ch, -1).permute(0, 2, 1)  # [N, HW, key]
        key = self.f_object(centres).reshape(n, self.key_ch, -1)  # [N, key, K]
        value = self.f_down(centres).reshape(n, self.key_ch, -1).permute(0, 2, 1)  # [N, K, key]
        sim = F.softmax(torch.matmul(query, key) * self.key_ch**-0.5, dim=-1)
        context = torch.matmul(sim, value).permute(0, 2, 1).reshape(n, self.key_ch, h, w)
        return self.f_up(context)


class SpatialOCR(nn.Module):
    """Object context concatenated with the pixel features, fused by conv1x1-BN-ReLU and Dropout2d."""

    def __init__(self, in_ch: int, key_ch: int, out_ch: int, dropout: float = 0.05) -> None:
        super().__init__()
        self.object_context_block = ObjectAttention(in_ch, key_ch)
        self.conv_bn_dropout = nn.Sequential(*_conv1_bn_relu(2 * in_ch, out_ch), nn.Dropout2d(dropout))

    def forward(self, feats: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        context = self.object_context_block(feats, centres)
        return self.conv_bn_dropout(torch.cat([context, feats], 1))


class OCRBlock(nn.Module):
    """Trunk features -> (class logits, auxiliary soft-region logits, OCR features), all at the input's size."""

    def __init__(self, in_ch: int, num_classes: int, mid_ch: int = 512, key_ch: int = 256) -> None:
        super().__init__()
        self.conv3x3_ocr = nn.Sequential(nn.Conv2d(in_ch, mid_ch, 3, padding=1), bn_relu(mid_ch))
        self.ocr_gather_head = SpatialGather()
        self.ocr_distri_head = SpatialOCR(mid_ch, key_ch, mid_ch, dropout=0.05)
        self.cls_head = nn.Conv2d(mid_ch, num_classes, 1)
        self.aux_head = nn.Sequential(nn.Conv2d(in_ch, in_ch, 1), bn_relu(in_ch), nn.Conv2d(in_ch, num_classes, 1))
        self.out_channels = mid_ch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.conv3x3_ocr(x)
        aux = self.aux_head(x)
        centres = self.ocr_gather_head(feats, aux)
        ocr_feats = self.ocr_distri_head(feats, centres)
        return self.cls_head(ocr_feats), aux, ocr_feats
