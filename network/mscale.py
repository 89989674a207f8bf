"""Hierarchical multi-scale attention (Tao et al. 2020): two-scale training, n-scale inference.

A subclass implements `single_features(x) -> ({'pred'[, 'aux']}, features)`, every map at the size of `x`, and
holds the attention head `scale_attn`, which reads `features`; `single_forward` adds 'attn' (the head's sigmoid
weight, one channel, resized to x). All fusion happens on logits, lower scales having priority:
    pred = a_0.5 * p_0.5 + (1 - a_0.5) * [a_1 * p_1 + (1 - a_1) * down(p_2)]   (all resized to 1x)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import rescale, resize, resize_as

FUSED_KEYS = ("pred", "aux")  # outputs fused across scales when a model produces them
FUSION_RULES = ("attention", "average", "max")  # how per-scale logits are combined at inference
# Which training passes update the attention head's BatchNorm running statistics (see two_scale_forward).
ATTN_BN_STATS = ("both", "low")


def check_attn_bn_stats(value: str) -> str:
    if value not in ATTN_BN_STATS:
        raise ValueError(f"attn_bn_stats must be one of {', '.join(ATTN_BN_STATS)}, got {value!r}")
    return value


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


def fuse_step(fused: torch.Tensor | None, scale: float, pred: torch.Tensor, attn: torch.Tensor | None) -> torch.Tensor:
    """One link of the hierarchical chain, scales visited high to low.

    At scales >= 1 the running result is resized to the current scale; below 1 the current scale's weighted
    prediction is upsampled to the running result (which then stays at 1x). The product a*p is formed at the
    low resolution and upsampled, and the attention is upsampled separately, as in the original.
    The arithmetic is float32 whatever precision the network ran in (a no-op in fp32): under fp16/bf16 autocast
    a weight near 0 or 1 would otherwise round a scale's contribution away.
    """
    if fused is None:  # the top scale: its attention (None where not computed) weights nothing
        return pred
    if attn is None:
        raise ValueError(f"scale {scale:g} continues the chain but has no attention weight")
    pred, attn = pred.float(), attn.float()
    if scale >= 1.0:
        return attn * pred + (1 - attn) * resize_as(fused, pred).float()
    fused = fused.float()
    return resize_as(attn * pred, fused) + (1 - resize_as(attn, fused)) * fused


class MscaleBase(nn.Module):
    """Wraps a single-scale network (`single_features` + `scale_attn`) in hierarchical multi-scale attention."""

    lo_scale: float = 0.5
    attn_bn_stats: str = "both"  # one of ATTN_BN_STATS
    scale_attn: nn.Module

    def single_features(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({'pred'[, 'aux']} at the size of x, the features the attention head reads)."""
        raise NotImplementedError

    def single_forward(self, x: torch.Tensor, attention: bool = True) -> dict[str, torch.Tensor]:
        """The original's `_fwd`: the maps and the attention, each at the size of x. `attention=False` skips the
        head (no 'attn') where nothing reads it: the top scale of an n-scale chain."""
        out, feats = self.single_features(x)
        if attention:
            out["attn"] = resize(self.scale_attn(feats), x.shape[-2:])
        return out

    def forward(self, images: torch.Tensor, scales: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
        if self.training and scales is None:
            return self.two_scale_forward(images)
        return self.nscale_forward(images, scales if scales is not None else (self.lo_scale, 1.0))

    def two_scale_forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training: the low-scale copy and the input through the shared network, fused by the low attention.

        The 1.0x attention is not used by any output, but the original computes it, so its BatchNorm layers
        update their running statistics twice per step, with the 0.5x batch and then the 1.0x one, and inference
        uses that mix at every scale. attn_bn_stats='both' (the default) reproduces exactly this by running the
        head on the 1.0x features under no_grad: outputs and gradients are those of skipping it, and the head's
        backward at full resolution is never built. 'low' skips the head: running statistics of the 0.5x pass
        only, the batches whose statistics the trained attention actually saw.
        """
        lo = self.single_forward(rescale(images, self.lo_scale))
        hi, hi_feats = self.single_features(images)
        if self.attn_bn_stats == "both" and self.training:
            self._update_attn_statistics(hi_feats)
        out: dict[str, torch.Tensor] = {scale_key("attn", self.lo_scale): lo["attn"]}
        for key in FUSED_KEYS:
            if key in hi:
                out[key] = fuse_step(hi[key], self.lo_scale, lo[key], lo["attn"])
                out[scale_key(key, self.lo_scale)] = lo[key]
                out[scale_key(key, 1.0)] = hi[key]
        return out

    @torch.no_grad()
    def _update_attn_statistics(self, feats: torch.Tensor) -> None:
        """The attention head's forward for its BatchNorm running statistics alone (the output is discarded)."""
        self.scale_attn(feats)

    def nscale_forward(self, images: torch.Tensor, scales: Sequence[float]) -> dict[str, torch.Tensor]:
        """Inference on any scale set containing 1.0; returns the fused maps and every scale's own.

        The top scale starts the chain, so its attention weights nothing; in eval mode its head is not run and
        there is no 'attn' of that scale (the original runs the head and drops the map when the top scale is 2.0).
        At 0.5, 1, 2 on HRNet-OCR this head is 11.6 % of the inference's multiply-adds (docs/performance.md). In
        training mode it runs, as in the original, for its BatchNorm running statistics.
        """
        out: dict[str, torch.Tensor] = {}
        fused: dict[str, torch.Tensor | None] = {k: None for k in FUSED_KEYS}
        order = check_scales(scales)
        for s in order:
            single = self.single_forward(rescale(images, s), attention=self.training or s != order[0])
            attn = single.get("attn")
            if attn is not None:
                out[scale_key("attn", s)] = attn
            for key in FUSED_KEYS:
                if key in single:
                    out[scale_key(key, s)] = single[key]
                    fused[key] = fuse_step(fused[key], s, single[key], attn)
        out.update({k: v for k, v in fused.items() if v is not None})
        return out
