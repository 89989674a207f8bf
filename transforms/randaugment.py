"""RandAugment on an image/mask pair, as the original's: N ops drawn with replacement, each at magnitude M (0..30).

Every op is the original's PIL call, so the pixels are Pillow's. An op's value is v = M / 30 * (max - min) + min
of its range: shear 0..0.3, translate 0..0.33 of the image size, rotate 0..30 degrees, solarize threshold
0..110, posterize 4..8 bits (int(v) kept), colour / brightness / sharpness factor 0.1..1.9. Shear, translate and
rotate flip the sign of v with probability 0.5. Shear and translate are PIL affine maps about the image origin
(top-left) with a bilinear image and a nearest mask; rotate is PIL's rotate about the centre with nearest
resampling for both (PIL's default, which the original kept). Uncovered pixels are 0 in the image and the
dataset's ignore value in the mask; colour ops leave the mask alone.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
PHOTOMETRIC = ("AutoContrast", "Invert", "Equalize", "Solarize", "Posterize", "Color", "Brightness", "Sharpness")
OPS = ("Identity",) + GEOMETRIC + PHOTOMETRIC
RANGES = {
    "Identity": (0.0, 1.0),
    "ShearX": (0.0, 0.3),
    "ShearY": (0.0, 0.3),
    "TranslateX": (0.0, 0.33),
    "TranslateY": (0.0, 0.33),
    "Rotate": (0.0, 30.0),
    "AutoContrast": (0.0, 1.0),
    "Invert": (0.0, 1.0),
    "Equalize": (0.0, 1.0),
    "Solarize": (0.0, 110.0),
    "Posterize": (4.0, 8.0),
    "Color": (0.1, 1.9),
    "Brightness": (0.1, 1.9),
    "Sharpness": (0.1, 1.9),
}
_ENHANCE = {"Color": ImageEnhance.Color, "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


def op_value(name: str, magnitude: int) -> float:
    """v = M / 30 * (max - min) + min, the original's value of op `name` at magnitude M."""
    lo, hi = RANGES[name]
    return float(magnitude) / 30 * (hi - lo) + lo


class RandAugment:
    """`num_ops` ops per sample drawn uniformly with replacement from `ops`, each at magnitude `magnitude`."""

    def __init__(self, num_ops: int, magnitude: int, ignore_index: int = 255, ops: tuple[str, ...] = OPS):
        if num_ops < 1 or not 0 <= magnitude <= 30:
            raise ValueError(f"RandAugment needs N >= 1 and 0 <= M <= 30, got N={num_ops}, M={magnitude}")
        unknown = [o for o in ops if o not in OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {list(OPS)}")
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index must fit the uint8 masks (0..255), got {ignore_index}")
        self.num_ops, self.magnitude, self.ignore_index, self.ops = int(num_ops), int(magnitude), ignore_index, ops

    def __repr__(self) -> str:
        return f"RandAugment(N={self.num_ops}, M={self.magnitude})"

    def __call__(self, image, mask, rng, centroid=None):
        for k in rng.integers(0, len(self.ops), size=self.num_ops):
            image, mask = self.apply(self.ops[int(k)], image, mask, rng)
        return image, mask

    def apply(self, name: str, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
        """Op `name` at this transform's magnitude; draws the sign of shear, translate and rotate from `rng`."""
        v = op_value(name, self.magnitude)
        if name == "Identity":
            return image, mask
        img = Image.fromarray(image)
        if name in GEOMETRIC:
            if rng.random() > 0.5:
                v = -v
            msk = None if mask is None else Image.fromarray(mask)
            if name == "Rotate":
                img = img.rotate(v, fillcolor=(0, 0, 0))
                msk = None if msk is None else msk.rotate(v, resample=Image.NEAREST, fillcolor=self.ignore_index)
            else:
                w, h = img.size
                params = {
                    "ShearX": (1, v, 0, 0, 1, 0),
                    "ShearY": (1, 0, 0, v, 1, 0),
                    "TranslateX": (1, 0, v * w, 0, 1, 0),
                    "TranslateY": (1, 0, 0, 0, 1, v * h),
                }[name]
                img = img.transform(img.size, Image.AFFINE, params, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
                if msk is not None:
                    msk = msk.transform(msk.size, Image.AFFINE, params, resample=Image.NEAREST,
                                        fillcolor=self.ignore_index)
            return np.array(img), (None if msk is None else np.array(msk))
        if name == "AutoContrast":
            img = ImageOps.autocontrast(img)
        elif name == "Invert":
            img = ImageOps.invert(img)
        elif name == "Equalize":
            img = ImageOps.equalize(img)
        elif name == "Solarize":
            img = ImageOps.solarize(img, v)
        elif name == "Posterize":
            img = ImageOps.posterize(img, int(v))
        else:
            img = _ENHANCE[name](img).enhance(v)
        return np.array(img), mask
