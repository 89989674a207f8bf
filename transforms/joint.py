"""Geometric transforms applied to the image and its mask together (OpenCV/numpy).

Every joint transform is called as `t(image, mask, rng, centroid) -> (image, mask)`: image RGB uint8 [H,W,3],
mask uint8 [H,W] or None, `rng` a numpy Generator, `centroid` an (x, y) pixel of the input that a crop must keep
(or None). Images are interpolated bicubic, masks nearest; padding is 0 for images and the ignore value for masks.
"""
from __future__ import annotations

import math

import cv2
import numpy as np


def _pad_value_mask(ignore_index: int) -> int:
    if not 0 <= ignore_index <= 255:
        raise ValueError(f"ignore_index must fit the uint8 masks (0..255), got {ignore_index}")
    return ignore_index


def _warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int], flags: int) -> np.ndarray:
    # Replicate, not constant, at the border: the caller fills the padding itself, and a constant border would
    # bleed black into the outer ring of interpolated pixels.
    return cv2.warpAffine(image, matrix, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)


class RandomScaleCrop:
    """Random scale s ~ U(scale_min, scale_max), then a crop_size (h, w) crop, padded when the image is smaller.

    With `pre_size` > 0 the scale is multiplied by pre_size / long edge first (Mapillary: long edge 2177).
    Scale and crop are one affine warp, so only the crop is interpolated (the result equals resizing the whole
    image with pixel-centre alignment and cutting the window out). A smaller scaled image is placed at a random
    offset in the crop; a given centroid is mapped through scale and padding and the crop contains it.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_min: float = 0.5,
        scale_max: float = 2.0,
        pre_size: int = 0,
        ignore_index: int = 255,
    ):
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"crop_size must be (height, width) with positive values, got {crop_size}")
        if not 0 < scale_min <= scale_max:
            raise ValueError(f"need 0 < scale_min <= scale_max, got {scale_min}, {scale_max}")
        self.crop_h, self.crop_w = int(crop_size[0]), int(crop_size[1])
        self.scale_min, self.scale_max = float(scale_min), float(scale_max)
        self.pre_size = int(pre_size)
        self.ignore_index = _pad_value_mask(ignore_index)

    def __repr__(self) -> str:
        return (
            f"RandomScaleCrop(crop=({self.crop_h}, {self.crop_w}), scale=[{self.scale_min}, {self.scale_max}], "
            f"pre_size={self.pre_size})"
        )

    @staticmethod
    def _place(size: int, crop: int, c: int | None, rng: np.random.Generator) -> tuple[int, int]:
        """(offset of the scaled image in the canvas, start of the crop in the canvas) along one axis."""
        pad = max(crop - size, 0)
        offset = int(rng.integers(0, pad + 1))
        canvas = size + pad
        if c is None:
            return offset, int(rng.integers(0, canvas - crop + 1))
        c = min(max(c + offset, 0), canvas - 1)
        lo, hi = max(0, c - crop + 1), min(c, canvas - crop)
        return offset, int(rng.integers(lo, hi + 1))

    def __call__(self, image, mask, rng, centroid=None):
        h, w = image.shape[:2]
        s = rng.uniform(self.scale_min, self.scale_max)
        if self.pre_size > 0:
            s *= self.pre_size / max(h, w)
        sw, sh = max(int(w * s), 1), max(int(h * s), 1)
        sx, sy = sw / w, sh / h
        cx = cy = None
        if centroid is not None:
            cx, cy = int(math.floor((centroid[0] + 0.5) * sx)), int(math.floor((centroid[1] + 0.5) * sy))
        ox, x1 = self._place(sw, self.crop_w, cx, rng)
        oy, y1 = self._place(sh, self.crop_h, cy, rng)
        # dst = (src + 0.5) * scale - 0.5 + offset - crop start: the pixel-centre convention of cv2.resize.
        m = np.array([[sx, 0, 0.5 * sx - 0.5 + ox - x1], [0, sy, 0.5 * sy - 0.5 + oy - y1]], np.float64)
        size = (self.crop_w, self.crop_h)
        out = _warp(image, m, size, cv2.INTER_CUBIC)
        out_mask = None if mask is None else _warp(mask, m, size, cv2.INTER_NEAREST)
        # The scaled image covers [ox - x1, ox - x1 + sw) x [oy - y1, oy - y1 + sh) of the crop; the rest is pad.
        x0, y0 = ox - x1, oy - y1
        xa, xb, ya, yb = max(x0, 0), min(x0 + sw, self.crop_w), max(y0, 0), min(y0 + sh, self.crop_h)
        if xa > 0 or ya > 0 or xb < self.crop_w or yb < self.crop_h:
            keep = np.zeros((self.crop_h, self.crop_w), bool)
            keep[ya:yb, xa:xb] = True
            out[~keep] = 0
            if out_mask is not None:
                out_mask[~keep] = self.ignore_index
        return out, out_mask


class HorizontalFlip:
    """Mirror image and mask together with probability p."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"

    def __call__(self, image, mask, rng, centroid=None):
        if rng.random() >= self.p:
            return image, mask
        return cv2.flip(image, 1), (None if mask is None else cv2.flip(mask, 1))


class ResizeLongEdge:
    """Deterministic resize so that the long edge is `size` (bilinear image, nearest mask); evaluation pre_size."""

    def __init__(self, size: int, resize_mask: bool = True):
        self.size = int(size)
        self.resize_mask = resize_mask  # False: keep native-resolution labels (metrics at native resolution)

    def __repr__(self) -> str:
        return f"ResizeLongEdge({self.size}, resize_mask={self.resize_mask})"

    def __call__(self, image, mask, rng=None, centroid=None):
        h, w = image.shape[:2]
        s = self.size / max(h, w)
        if s == 1.0:
            return image, mask
        size = (max(int(round(w * s)), 1), max(int(round(h * s)), 1))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        if mask is not None and self.resize_mask:
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST_EXACT)
        return image, mask
