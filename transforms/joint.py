"""Geometric transforms applied to the image and its mask together.

Every joint transform is called as `t(image, mask, rng, centroid) -> (image, mask)`: image RGB uint8 [H,W,3],
mask uint8 [H,W] or None, `rng` a numpy Generator, `centroid` an (x, y) pixel of the input that a crop should keep
(or None). Masks are resized nearest; padding is 0 for images and the ignore value for masks.

Resampling (`resample`): "pil" gives exactly the values of Pillow's resize, which the original pipeline used
(antialiased BICUBIC/BILINEAR when downscaling); "opencv" uses cv2.resize (faster, aliased when downscaling).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .resample import BICUBIC, BILINEAR, NEAREST, pil_resize, pil_resize_window

RESAMPLE = ("pil", "opencv")
PLACEMENT = ("original", "uniform")
_CV2 = {BICUBIC: cv2.INTER_CUBIC, BILINEAR: cv2.INTER_LINEAR, NEAREST: cv2.INTER_NEAREST_EXACT}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _resize(array: np.ndarray, size: tuple[int, int], filter_: str, resample: str) -> np.ndarray:
    """Whole-image resize to (width, height) with Pillow's or OpenCV's filter of that name."""
    if resample == "pil":
        return pil_resize(array, size, filter_)
    # INTER_NEAREST_EXACT samples floor((x + 0.5) * in / out) like Pillow; INTER_NEAREST would lag half a pixel.
    return cv2.resize(array, size, interpolation=_CV2[filter_])


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
    """Random scale s ~ U(scale_min, scale_max), resize to (int(w*s), int(h*s)) (image bicubic, mask nearest),
    then a crop_size (h, w) crop; an axis smaller than the crop is padded (image 0, mask ignore).

    With `long_edge` > 0 the scale is multiplied by long_edge / (the image's long edge) first. Only the source region under the
    crop is resized; with resample="pil" the result is bit-identical to Pillow resizing the whole image.

    placement="original" (the original's RandomCrop): an axis smaller than the crop is padded by
    (crop - size) // 2 + 1 on both sides, so the image sits centred with at most 2 px of jitter, and the crop
    start is uniform over the padded axis. With a centroid c (scaled to int(c * s), not shifted by that padding)
    the start is randint(c - crop, c) clipped to [0, padded size - crop].
    placement="uniform" (ours): a smaller image lands at a uniformly random offset in the crop, and a centroid,
    mapped through scale and padding, is always inside the crop.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_min: float = 0.5,
        scale_max: float = 2.0,
        long_edge: int = 0,
        ignore_index: int = 255,
        resample: str = "pil",
        placement: str = "original",
    ):
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"crop_size must be (height, width) with positive values, got {crop_size}")
        if not 0 < scale_min <= scale_max:
            raise ValueError(f"need 0 < scale_min <= scale_max, got {scale_min}, {scale_max}")
        self.crop_h, self.crop_w = int(crop_size[0]), int(crop_size[1])
        self.scale_min, self.scale_max = float(scale_min), float(scale_max)
        self.long_edge = int(long_edge)
        self.ignore_index = _pad_value_mask(ignore_index)
        self.resample = _check_choice("resample", resample, RESAMPLE)
        self.placement = _check_choice("crop placement", placement, PLACEMENT)

    def __repr__(self) -> str:
        return (
            f"RandomScaleCrop(crop=({self.crop_h}, {self.crop_w}), scale=[{self.scale_min}, {self.scale_max}], "
            f"long_edge={self.long_edge}, resample={self.resample}, placement={self.placement})"
        )

    @staticmethod
    def _place(size: int, crop: int, c: int | None, rng: np.random.Generator) -> tuple[int, int]:
        """Uniform placement: (offset of the scaled image in the canvas, start of the crop in the canvas)."""
        pad = max(crop - size, 0)
        offset = int(rng.integers(0, pad + 1))
        canvas = size + pad
        if c is None:
            return offset, int(rng.integers(0, canvas - crop + 1))
        c = min(max(c + offset, 0), canvas - 1)
        lo, hi = max(0, c - crop + 1), min(c, canvas - crop)
        return offset, int(rng.integers(lo, hi + 1))

    @staticmethod
    def _place_original(size: int, crop: int, c: int | None, rng: np.random.Generator) -> tuple[int, int]:
        """The original's RandomCrop along one axis: (pad before the image, start of the crop in the canvas)."""
        pad = (crop - size) // 2 + 1 if crop > size else 0
        canvas = size + 2 * pad
        if c is not None:
            start = int(rng.integers(c - crop, c + 1))  # python's randint(c - crop, c): both ends included
            return pad, min(canvas - crop, max(0, start))
        return pad, (0 if canvas == crop else int(rng.integers(0, canvas - crop + 1)))

    def __call__(self, image, mask, rng, centroid=None):
        h, w = image.shape[:2]
        s = rng.uniform(self.scale_min, self.scale_max)
        if self.long_edge > 0:
            s *= self.long_edge / max(h, w)
        sw, sh = max(int(w * s), 1), max(int(h * s), 1)
        if self.placement == "original":
            cx = cy = None
            if centroid is not None:
                cx, cy = int(centroid[0] * s), int(centroid[1] * s)
            ox, x1 = self._place_original(sw, self.crop_w, cx, rng)
            oy, y1 = self._place_original(sh, self.crop_h, cy, rng)
        else:
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
        window = (xa, ya, xb - xa, yb - ya)
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = self._window(image, (sw, sh), window, BICUBIC)
        if mask is None:
            return out, None
        out_mask = np.full(shape, self.ignore_index, mask.dtype)
        out_mask[ya - y0 : yb - y0, xa - x0 : xb - x0] = self._window(mask, (sw, sh), window, NEAREST)
        return out, out_mask

    def _window(self, array: np.ndarray, size: tuple[int, int], window: tuple[int, int, int, int], filter_: str):
        if self.resample == "pil":
            return pil_resize_window(array, size, window, filter_)
        h, w = array.shape[:2]
        x0, y0, n, m = window
        return _scale_window(array, size[0] / w, size[1] / h, x0, y0, n, m, _CV2[filter_])


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
    """Deterministic resize so that the long edge is `size` (bilinear image, nearest mask); the evaluation size.

    As the original's Scale: the other side becomes int(side * size / long edge) (3000x4000 -> 1632x2177), and an
    image whose long edge already is `size` is left untouched.
    """

    def __init__(self, size: int, resize_mask: bool = True, resample: str = "pil"):
        self.size = int(size)
        self.resize_mask = resize_mask  # False: keep native-resolution labels (metrics at native resolution)
        self.resample = _check_choice("resample", resample, RESAMPLE)

    def __repr__(self) -> str:
        return f"ResizeLongEdge({self.size}, resize_mask={self.resize_mask}, resample={self.resample})"

    def __call__(self, image, mask, rng=None, centroid=None):
        h, w = image.shape[:2]
        long_edge = w if w > h else h
        if long_edge == self.size:
            return image, mask
        scale = self.size / long_edge
        size = (max(int(w * scale), 1), max(int(h * scale), 1))
        image = _resize(image, size, BILINEAR, self.resample)
        if mask is not None and self.resize_mask:
            mask = _resize(mask, size, NEAREST, self.resample)
        return image, mask


class ResizeHeight:
    """Resize to height `size` and width int(w / h * size): image bicubic, mask nearest (the original's
    ResizeHeight, the first half of its Mapillary --map_crop_val evaluation)."""

    def __init__(self, size: int, resample: str = "pil"):
        self.size = int(size)
        self.resample = _check_choice("resample", resample, RESAMPLE)

    def __repr__(self) -> str:
        return f"ResizeHeight({self.size}, resample={self.resample})"

    def __call__(self, image, mask, rng=None, centroid=None):
        h, w = image.shape[:2]
        size = (max(int(w / h * self.size), 1), self.size)
        image = _resize(image, size, BICUBIC, self.resample)
        return image, (None if mask is None else _resize(mask, size, NEAREST, self.resample))


class CenterCropPad:
    """The original's CenterCropPad(size): a size x size crop at ((w - size) / 2, (h - size) / 2), rounded half to
    even, after padding a side shorter than `size` by the whole shortfall on both ends (image 0, mask ignore).

    As in the original, the crop offset is computed from the unpadded size, so a short side ends up off-centre
    (a 1632-wide image cropped to 2177 shows columns from -272 of the padded image on), and the part of the crop
    outside the padded image is 0 in both image and mask, as PIL's crop fills it.
    """

    def __init__(self, size: int, ignore_index: int = 255):
        self.size = int(size)
        self.ignore_index = _pad_value_mask(ignore_index)

    def __repr__(self) -> str:
        return f"CenterCropPad({self.size})"

    def _axis(self, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per output position: inside the padded canvas, inside the image, and the image index."""
        pad = self.size - length if length < self.size else 0
        canvas = np.arange(self.size) + int(round((length - self.size) / 2.0))
        source = canvas - pad
        return (canvas >= 0) & (canvas < length + 2 * pad), (source >= 0) & (source < length), source

    def __call__(self, image, mask, rng=None, centroid=None):
        h, w = image.shape[:2]
        in_canvas_y, in_image_y, ys = self._axis(h)
        in_canvas_x, in_image_x, xs = self._axis(w)
        rows, cols = np.nonzero(in_image_y)[0], np.nonzero(in_image_x)[0]
        out = np.zeros((self.size, self.size) + image.shape[2:], image.dtype)
        out[np.ix_(rows, cols)] = image[np.ix_(ys[rows], xs[cols])]
        if mask is None:
            return out, None
        out_mask = np.zeros((self.size, self.size), mask.dtype)
        out_mask[np.ix_(np.nonzero(in_canvas_y)[0], np.nonzero(in_canvas_x)[0])] = self.ignore_index
        out_mask[np.ix_(rows, cols)] = mask[np.ix_(ys[rows], xs[cols])]
        return out, out_mask
