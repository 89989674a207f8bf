"""Hierarchical multi-scale attention (Tao et al. 2020): two-scale training, n-scale inference.

A subclass implements `single_forward(x) -> {'pred', 'attn'[, 'aux']}`, every map at the size of `x`
(`attn` is a sigmoid weight with one channel). All fusion happens on logits, lower scales having priority:
    pred = a_0.5 * p_0.5 + (1 - a_0.5) * [a_1 * p_1 + (1 - a_1) * down(p_2)]   (all resized to 1x)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import reduce

import torch
from torch import nn

from .layers import rescale, resize, resize_as

FUSED_KEYS = ("pred", "aux")  # outputs fused across scales when a model produces them
FUSION_RULES = ("attention", "average", "max")  # how per-scale logits are combined at inference


def scale_key(prefix: str, scale: float) -> str:
    """'pred', 0.5 -> 'pred_0.5x' (the original's key format)."""
    return f"{prefix}_{float(scale)}x"


def check_scales(scales: Sequence[float]) -> list[float]:
    """Validated inference scales, sorted high to low (the order the chain evaluates them)."""
    scales = [float(s) for s in scales]
    bad = [s for s in scales if not s > 0]
    if bad:
        raise ValueError(f"inference scales must be positive, got {bad} in {scales}")
    if 1.0 not in scales:
        raise ValueError(f"inference scales must contain 1.0 (the output resolution), got {scales}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"inference scales must be distinct, got {scales}")
    return sorted(scales, reverse=True)


def fuse_step(fused: torch.Tensor | None, scale: float, pred: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """One link of the hierarchical chain, scales visited high to low.

    At scales >= 1 the running result is resized to the current scale; below 1 the current scale's weighted
    prediction is upsampled to the running result (which then stays at 1x). The product a*p is formed at the
    low resolution and upsampled, and the attention is upsampled separately, as in the original.
    The arithmetic is float32 whatever precision the network ran in (a no-op in fp32): under fp16/bf16 autocast
    a weight near 0 or 1 would otherwise round a scale's contribution away.
    """
    if fused is None:
        return pred
    pred, attn = pred.float(), attn.float()
    if scale >= 1.0:
        return attn * pred + (1 - attn) * resize_as(fused, pred).float()
    fused = fused.float()
    return resize_as(attn * pred, fused) + (1 - resize_as(attn, fused)) * fused


class MscaleBase(nn.Module):
    """Wraps a single-scale network (`single_forward`) in hierarchical multi-scale attention."""

    lo_scale: float = 0.5
    train_hi_attn: bool = False  # run the attention head on training's 1.0x pass too (see two_scale_forward)

    def single_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def single_forward_without_attn(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`single_forward` without 'attn'; subclasses override it to skip the attention head's cost."""
        out = self.single_forward(x)
        del out["attn"]
        return out

    def forward(self, images: torch.Tensor, scales: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
        if self.training and scales is None:
            return self.two_scale_forward(images)
        return self.nscale_forward(images, scales if scales is not None else (self.lo_scale, 1.0))

    def two_scale_forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training: the low-scale copy and the input through the shared network, fused by the low attention.

        The 1.0x attention is not used by any output. The original computes it anyway; skipping it (the default)
        leaves every output and gradient bit-identical and saves the head's forward at full resolution (~18% of
        a single-scale forward for HRNet-OCR). The one difference: the head's BatchNorm running statistics are
        then updated by the 0.5x pass alone, the scale whose batch statistics the trained attention used.
        `train_hi_attn=True` restores the original's computation (running statistics of both passes).
        """
        lo = self.single_forward(rescale(images, self.lo_scale))
        hi = self.single_forward(images) if self.train_hi_attn else self.single_forward_without_attn(images)
        out: dict[str, torch.Tensor] = {scale_key("attn", self.lo_scale): lo["attn"]}
        for key in FUSED_KEYS:
            if key in hi:
                out[key] = fuse_step(hi[key], self.lo_scale, lo[key], lo["attn"])
                out[scale_key(key, self.lo_scale)] = lo[key]
                out[scale_key(key, 1.0)] = hi[key]
        return out

    def nscale_forward(self, images: torch.Tensor, scales: Sequence[float]) -> dict[str, torch.Tensor]:
        """Inference on any scale set containing 1.0; returns the fused maps and every scale's own."""
        out: dict[str, torch.Tensor] = {}
        fused: dict[str, torch.Tensor | None] = {k: None for k in FUSED_KEYS}
        for s in check_scales(scales):
            single = self.single_forward(rescale(images, s))
            out[scale_key("attn", s)] = single["attn"]
            for key in FUSED_KEYS:
                if key in single:
                    out[scale_key(key, s)] = single[key]
                    fused[key] = fuse_step(fused[key], s, single[key], single["attn"])
        out.update({k: v for k, v in fused.items() if v is not None})
        return out


def fuse_scales(
    preds: Mapping[float, torch.Tensor],
    scales: Sequence[float],
    rule: str = "attention",
    attns: Mapping[float, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Fuse precomputed per-scale logits (each at its own scale's resolution) into logits at the 1.0 size.

    attention: the hierarchical chain of `fuse_step`, high to low (`nscale_forward` without the network);
    average: the mean of the logits resized to 1x (the original's --multi_scale_inference);
    max: their per-pixel, per-class maximum.
    """
    order = check_scales(scales)
    if rule == "attention":
        if attns is None:
            raise ValueError("attention fusion needs the per-scale attention maps")
        fused = None
        for s in order:
            fused = fuse_step(fused, s, preds[s], attns[s])
        return fused
    size = preds[1.0].shape[-2:]
    resized = [resize(preds[s], size) for s in order]
    if rule == "average":
        return reduce(torch.add, resized) / len(resized)
    if rule == "max":
        return reduce(torch.maximum, resized)
    raise ValueError(f"unknown fusion rule {rule!r}; expected one of {', '.join(FUSION_RULES)}")
