"""Sliding-window inference: a network over overlapping windows of an image, averaged where they overlap."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Maps = dict[str, torch.Tensor]


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of `window` pixels covering [0, length), consecutive ones overlapping by at least
    `overlap` of a window; the last window ends at `length`."""
    if window >= length:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    count = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(count)})


def check_window(window: Sequence[int], overlap: float) -> tuple[int, int] | None:
    """(height, width) of the sliding window, or None for whole-image inference; clear errors for bad values."""
    if len(window) == 0:
        return None
    if len(window) != 2 or any(int(w) <= 0 for w in window):
        raise ValueError(f"eval.window must be [] (whole image) or [height, width] > 0, got {list(window)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"eval.overlap must be in [0, 1), got {overlap}")
    return int(window[0]), int(window[1])


def sliding_forward(
    fn: Callable[[torch.Tensor], Maps], x: torch.Tensor, window: tuple[int, int], overlap: float
) -> Maps:
    """`fn` (maps at the size of its input) over overlapping windows of `x`, averaged (in float32) where windows
    overlap. A window larger than the image is clipped to it, so an image that fits is one whole-image call.
    """
    height, width = x.shape[-2:]
    wh, ww = min(window[0], height), min(window[1], width)
    if (wh, ww) == (height, width):
        return fn(x)
    acc: Maps = {}
    count = x.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y in window_starts(height, wh, overlap):
        for x0 in window_starts(width, ww, overlap):
            out = fn(x[..., y : y + wh, x0 : x0 + ww])
            for key, value in out.items():
                if key not in acc:
                    acc[key] = value.new_zeros((*value.shape[:-2], height, width), dtype=torch.float32)
                acc[key][..., y : y + wh, x0 : x0 + ww] += value.float()
            count[..., y : y + wh, x0 : x0 + ww] += 1
    return {k: v / count for k, v in acc.items()}
