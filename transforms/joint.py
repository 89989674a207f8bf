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


def _scale_window(
    array: np.ndarray, sx: float, sy: float, x0: int, y0: int, out_w: int, out_h: int, interpolation: int
) -> np.ndarray:
    """Window [x0, x0+out_w) x [y0, y0+out_h) of `array` resized by (sx, sy), computing only that window.

    The window must lie inside the resized image. Only the source region it needs (plus a margin for the
    interpolation kernel) is resized, with the scale given explicitly; the result is the full resize's window up
    to a sub-pixel shift of the whole window (the same for image and mask, so they stay aligned).
    """
    h, w = array.shape[:2]
    margin = 3
    xs0 = max(int(math.floor((x0 + 0.5) / sx - 0.5)) - margin, 0)
    ys0 = max(int(math.floor((y0 + 0.5) / sy - 0.5)) - margin, 0)
    xs1 = min(int(math.ceil((x0 + out_w - 0.5) / sx - 0.5)) + margin + 1, w)
    ys1 = min(int(math.ceil((y0 + out_h - 0.5) / sy - 0.5)) + margin + 1, h)
    part = cv2.resize(array[ys0:ys1, xs0:xs1], None, fx=sx, fy=sy, interpolation=interpolation)
    # part[j] is the resized image's pixel j + xs0 * sx (rounded); pad by 2 edge pixels against rounding.
    part = cv2.copyMakeBorder(part, 2, 2, 2, 2, cv2.BORDER_REPLICATE)
    jx, jy = x0 - int(round(xs0 * sx)) + 2, y0 - int(round(ys0 * sy)) + 2
    return part[jy : jy + out_h, jx : jx + out_w]


class RandomScaleCrop:
    """Random scale s ~ U(scale_min, scale_max), then a crop_size (h, w) crop, padded when the image is smaller.

    With `pre_size` > 0 the scale is multiplied by pre_size / long edge first (Mapillary: long edge 2177).
    Only the source region under the crop is resized (the result is the whole image's resize, cut out, up to a
    sub-pixel shift). A smaller scaled image is placed at a random offset in the crop, the rest padded; a given
    centroid is mapped through scale and padding and the crop contains it.
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
        # The crop covers the scaled image's [x1 - ox, x1 - ox + crop_w) x [...]; the part outside it is padding.
        x0, y0 = x1 - ox, y1 - oy
        xa, xb = max(x0, 0), min(x0 + self.crop_w, sw)
        ya, yb = max(y0, 0), min(y0 + self.crop_h, sh)
        shape = (self.crop_h, self.crop_w)
        out = np.zeros(shape + image.shape[2:], image.dtype)
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = _scale_window(image, sx, sy, xa, ya, xb - xa, yb - ya, cv2.INTER_CUBIC)
        if mask is None:
            return out, None
        out_mask = np.full(shape, self.ignore_index, mask.dtype)
        # Nearest with pixel-centre alignment (INTER_NEAREST rounds down and would lag the bicubic image).
        out_mask[ya - y0 : yb - y0, xa - x0 : xb - x0] = _scale_window(
            mask, sx, sy, xa, ya, xb - xa, yb - ya, cv2.INTER_NEAREST_EXACT)
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
