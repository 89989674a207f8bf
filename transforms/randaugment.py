"""RandAugment on an image/mask pair (REFERENCE.md 5.3): N ops drawn with replacement, magnitude M/30 of each range.

Geometric ops (shear, translate, rotate) move the mask too (nearest, filled with the dataset's ignore value; the
image is filled with 0); colour ops touch the image only.
"""
from __future__ import annotations

import cv2
import numpy as np

GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
PHOTOMETRIC = ("AutoContrast", "Invert", "Equalize", "Solarize", "Posterize", "Color", "Brightness", "Sharpness")
OPS = ("Identity",) + GEOMETRIC + PHOTOMETRIC


def _blend(image: np.ndarray, other: np.ndarray, factor: float) -> np.ndarray:
    """other + factor * (image - other), saturated (PIL's ImageEnhance convention)."""
    return cv2.addWeighted(image, factor, other, 1 - factor, 0.0)


def _affine(image, mask, m: np.ndarray, ignore_index: int):
    h, w = image.shape[:2]
    image = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if mask is not None:
        mask = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=ignore_index)
    return image, mask


class RandAugment:
    """`num_ops` ops per sample, each at magnitude `magnitude` (0..30), with a random sign where it matters."""

    def __init__(self, num_ops: int, magnitude: int, ignore_index: int = 255, ops: tuple[str, ...] = OPS):
        if num_ops < 1 or not 0 <= magnitude <= 30:
            raise ValueError(f"RandAugment needs N >= 1 and 0 <= M <= 30, got N={num_ops}, M={magnitude}")
        unknown = [o for o in ops if o not in OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {list(OPS)}")
        self.num_ops, self.magnitude, self.ignore_index, self.ops = int(num_ops), int(magnitude), ignore_index, ops

    def __repr__(self) -> str:
        return f"RandAugment(N={self.num_ops}, M={self.magnitude})"

    def __call__(self, image, mask, rng, centroid=None):
        for name in rng.choice(self.ops, size=self.num_ops, replace=True):
            image, mask = self.apply(str(name), image, mask, rng)
        return image, mask

    def apply(self, name: str, image, mask, rng: np.random.Generator):
        v = self.magnitude / 30.0
        sign = 1.0 if rng.random() < 0.5 else -1.0
        h, w = image.shape[:2]
        if name in GEOMETRIC:
            cx, cy = (w - 1) / 2, (h - 1) / 2
            if name == "ShearX":
                s = sign * 0.3 * v
                m = np.array([[1, s, -s * cy], [0, 1, 0]], np.float64)
            elif name == "ShearY":
                s = sign * 0.3 * v
                m = np.array([[1, 0, 0], [s, 1, -s * cx]], np.float64)
            elif name == "TranslateX":
                m = np.array([[1, 0, sign * 0.33 * v * w], [0, 1, 0]], np.float64)
            elif name == "TranslateY":
                m = np.array([[1, 0, 0], [0, 1, sign * 0.33 * v * h]], np.float64)
            else:
                m = cv2.getRotationMatrix2D((cx, cy), sign * 30.0 * v, 1.0)
            return _affine(image, mask, m, self.ignore_index)
        if name == "AutoContrast":
            lo = image.reshape(-1, 3).min(0).astype(np.float32)
            hi = image.reshape(-1, 3).max(0).astype(np.float32)
            scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1), 1.0)
            image = np.clip((image - np.where(hi > lo, lo, 0)) * scale + 0.5, 0, 255).astype(np.uint8)
        elif name == "Invert":
            image = 255 - image
        elif name == "Equalize":
            image = np.stack([cv2.equalizeHist(np.ascontiguousarray(image[..., c])) for c in range(3)], axis=2)
        elif name == "Solarize":
            threshold = int(round(256 - 110 * v))
            image = np.where(image >= threshold, 255 - image, image).astype(np.uint8)
        elif name == "Posterize":
            bits = 8 - int(round(4 * v))
            image = image & np.uint8((0xFF << (8 - bits)) & 0xFF)
        elif name in ("Color", "Brightness", "Sharpness"):
            factor = 1.0 + sign * 0.9 * v
            if name == "Color":
                other = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            elif name == "Brightness":
                other = np.zeros_like(image)
            else:
                kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
                other = cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REPLICATE)
            image = _blend(image, other, factor)
        return image, mask
