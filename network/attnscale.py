"""Explicit multi-scale attention ("attention to scale", Chen et al. 2016): the baseline of the paper's Table 3.

One shared network runs at a fixed scale set (the same in training and evaluation, e.g. 0.5, 1.0, 2.0). The
features of every scale, resized to the 1.0 feature grid, are concatenated and an attention head predicts one
logit map per scale; a softmax across scales turns them into weights, which are resized to the input and weight
each scale's prediction (also resized to the input):

    pred = sum_s w_s * up(p_s),   w = softmax_s(scale_attn(cat[f_1.0, f_s for the other scales ascending]))

The outputs have the keys of the hierarchical models (network/mscale.py): 'pred' (and 'aux' for HRNet-OCR)
fused, 'pred_{s}x' (and 'aux_{s}x') of each scale at that scale's resolution, so that `loss.scale_weight`
supervises each scale like ours, and 'attn_{s}x', each scale's weight at the input size. The attention has one
channel per trained scale: another scale set is refused (`check_eval_scales`).

Layout of the original's `attnscale.ASDV3P` (`attnscale.DeepV3R50`, `DeepV3R50B`): backbone, aspp, bot_fine,
bot_aspp, final as DeepLabV3+, and `scale_attn` a Sequential, 'plain' = Conv3(n*304->512), ReLU,
Conv1(512->n, padding=1) or 'bn' = Conv3(n*304->256), BN, ReLU, Conv3(256->256), BN, ReLU, Conv1(256->n), no
biases. Its attention channels follow the scales ascending, its feature concat puts 1.0 first. It applies the
raw logits without any normalisation (attn_norm='none', which its aliases fix; see docs/differences.md).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .deeplab import DeepLabV3PlusBody
from .layers import rescale, resize, seg_head
from .mscale import FUSED_KEYS, scale_key
from .ocrnet import OCRNetBody

ATTN_HEADS = ("bn", "plain")  # the original's bn_head=True (DeepV3R50B) and bn_head=False (DeepV3R50) layouts
ATTN_NORMS = ("softmax", "none")  # softmax across scales (Chen et al.) | raw logits (the original's attnscale)


def check_train_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """The model's scale set, ascending (the order of the attention channels): distinct, positive, with 1.0."""
    try:
        out = tuple(sorted(float(s) for s in scales))
    except (TypeError, ValueError):
        raise ValueError(f"scales must be a list of numbers, got {scales!r}") from None
    if len(out) < 2 or any(not s > 0 for s in out) or 1.0 not in out or len(set(out)) != len(out):
        raise ValueError(f"scales must be at least two distinct positive scales including 1.0, got {list(scales)}")
    return out


def explicit_attn_head(in_ch: int, num_scales: int, bot_ch: int, kind: str) -> nn.Sequential:
    """One logit map per scale from the concatenated features (numbered layers, as the original)."""
    if kind == "bn":  # the segmentation head's layout, one output per scale
        return seg_head(in_ch, num_scales, bot_ch)
    if kind == "plain":
        # padding=1 on the 1x1 conv makes the map 2 px larger (zeros at the border); the original has it and
        # resizes the map to the input, as the fusion here does anyway
        return nn.Sequential(
            nn.Conv2d(in_ch, bot_ch, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(bot_ch, num_scales, 1, padding=1, bias=False),
        )
    raise ValueError(f"attn_head must be one of {', '.join(ATTN_HEADS)}, got {kind!r}")


class ExplicitBase(nn.Module):
    """Explicit attention over a fixed scale set; a subclass provides `single_features` and `scale_attn`.

    `single_features(x) -> ({'pred'[, 'aux']} at the size of x, the features the attention head reads)`.
    """

    scales: tuple[float, ...] = (0.5, 1.0, 2.0)  # ascending: attention channel i weights scales[i]
    attn_norm: str = "softmax"
    scale_attn: nn.Module

    def _setup_explicit(self, scales: Sequence[float], attn_norm: str) -> None:
        self.scales = check_train_scales(scales)
        if attn_norm not in ATTN_NORMS:
            raise ValueError(f"attn_norm must be one of {', '.join(ATTN_NORMS)}, got {attn_norm!r}")
        self.attn_norm = attn_norm

    def single_features(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def check_eval_scales(self, scales: Sequence[float]) -> None:
        """A clear error for an inference scale set other than the trained one."""
        given = sorted(float(s) for s in scales)
        if given != list(self.scales):
            own = "[" + ",".join(f"{s:g}" for s in self.scales) + "]"
            raise ValueError(
                f"{type(self).__name__} was built for the scales {own} (its attention has one channel per scale): "
                f"evaluate it with eval.scales={own}, not {given}; another set needs a model trained with "
                f"model.options.scales set to it")

    def forward(self, images: torch.Tensor, scales: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
        if scales is not None:
            self.check_eval_scales(scales)
        return self.explicit_forward(images)

    def attention_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, n, h, w] attention logits -> the weights of the n scales (float32)."""
        logits = logits.float()  # under fp16/bf16 autocast the softmax and the weighted sum stay float32
        return torch.softmax(logits, dim=1) if self.attn_norm == "softmax" else logits

    def explicit_forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        order = [1.0] + [s for s in self.scales if s != 1.0]  # the original's concat order of the features
        maps: dict[float, dict[str, torch.Tensor]] = {}
        feats: list[torch.Tensor] = []
        for s in order:
            out, f = self.single_features(rescale(images, s))
            maps[s] = out
            feats.append(f if not feats else resize(f, feats[0].shape[-2:]))
        # softmax at the attention's own resolution, then resized: bilinear weights still sum to 1 per pixel
        weights = resize(self.attention_weights(self.scale_attn(torch.cat(feats, 1))), images.shape[-2:])
        out: dict[str, torch.Tensor] = {}
        for i, s in enumerate(self.scales):
            out[scale_key("attn", s)] = weights[:, i:i + 1]
        for key in FUSED_KEYS:
            if key not in maps[1.0]:
                continue
            fused = None
            for i, s in enumerate(self.scales):
                term = resize(maps[s][key], images.shape[-2:]).float() * weights[:, i:i + 1]
                fused = term if fused is None else fused + term
                out[scale_key(key, s)] = maps[s][key]
            out[key] = fused
        return out


class ExplicitDeepV3Plus(DeepLabV3PlusBody, ExplicitBase):
    """DeepLabV3+ with explicit attention over a fixed scale set (`attnscale.DeepV3R50[B]` with the resnet50 trunk).

    The head reads the 304-channel decoder features of every scale (n x 304 channels).
    """

    def __init__(
        self,
        num_classes: int,
        trunk: str = "resnet50",
        aspp_ch: int = 256,
        fine_ch: int = 48,
        head_ch: int = 256,
        attn_ch: int = 256,
        scales: Sequence[float] = (0.5, 1.0, 2.0),
        attn_head: str = "bn",
        attn_norm: str = "softmax",
    ) -> None:
        super().__init__(num_classes, trunk, aspp_ch, fine_ch, head_ch)
        self._setup_explicit(scales, attn_norm)
        self.scale_attn = explicit_attn_head(len(self.scales) * self.decoder_channels, len(self.scales), attn_ch,
                                             attn_head)

    def single_features(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        logits, cat_s4 = self.decode(x)
        return {"pred": resize(logits, x.shape[-2:])}, cat_s4


class ExplicitOCRNet(OCRNetBody, ExplicitBase):
    """HRNet-OCR with explicit attention over a fixed scale set (no original counterpart).

    The head reads the OCR features of every scale; class and auxiliary logits are fused with the same weights.
    """

    def __init__(
        self,
        num_classes: int,
        trunk: str = "hrnet_w48",
        mid_ch: int = 512,
        key_ch: int = 256,
        attn_ch: int = 256,
        scales: Sequence[float] = (0.5, 1.0, 2.0),
        attn_head: str = "bn",
        attn_norm: str = "softmax",
        timm_pretrained: bool = False,
    ) -> None:
        super().__init__(num_classes, trunk, mid_ch, key_ch, timm_pretrained)
        self._setup_explicit(scales, attn_norm)
        self.scale_attn = explicit_attn_head(len(self.scales) * self.ocr.out_channels, len(self.scales), attn_ch,
                                             attn_head)

    def single_features(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        logits, aux, ocr_feats = self.heads(x)
        size = x.shape[-2:]
        return {"pred": resize(logits, size), "aux": resize(aux, size)}, ocr_feats
