"""Image-only transforms (RGB uint8 in, RGB uint8 out), called as `t(image, rng) -> image`, and normalisation.

ColorJitter and GaussianBlur compute what the original computed (Pillow's ImageEnhance and HSV conversion, and
skimage's gaussian through scipy); OpenCVColorJitter and OpenCVGaussianBlur are faster approximations
(data.augment.photometric=opencv).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from PIL import Image, ImageEnhance
from scipy import ndimage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _check_strength(strength: float) -> float:
    if not 0 <= strength <= 0.5:
        raise ValueError(f"data.augment.color_jitter: the colour jitter strength must be in [0, 0.5] (hue shifts beyond half a "
                         f"turn are undefined), got {strength}")
    return float(strength)


def hue_shift(hue_factor: float) -> int:
    """The shift added to Pillow's 8-bit H channel: np.uint8(hue_factor * 255) as numpy 1.x computed it on x86
    (truncation toward zero, then wrapped modulo 256), so -0.25 gives -63 -> 193."""
    return int(hue_factor * 255) % 256


class ColorJitter:
    """The original's colour jitter: its copy of the old torchvision ColorJitter(s, s, s, s) on PIL images.

    Factors: brightness, contrast and saturation U(max(0, 1 - s), 1 + s), hue U(-s, s), drawn in that order;
    the four ops are then applied in a random order. Brightness, contrast and saturation are Pillow's
    ImageEnhance.Brightness / Contrast / Color(...).enhance(factor): a float32 blend with a black image, a grey
    image of the rounded mean luma, or the image's luma, truncated to uint8 (clipped when the factor is above 1).
    Hue converts to Pillow's HSV, adds hue_shift(factor) to the 8-bit H channel with wrap-around and converts
    back; the round trip runs even when the shift is 0 (it is lossy: HSV is quantised to 8 bits). With s = 0 no
    op runs and the image is returned unchanged.
    """

    def __init__(self, strength: float):
        self.strength = _check_strength(strength)

    def __repr__(self) -> str:
        return f"ColorJitter({self.strength})"

    def draw(self, rng: np.random.Generator) -> list[tuple[str, float]]:
        """The ops of one call, in the order they are applied, each with its factor."""
        if self.strength == 0:
            return []
        s = self.strength
        factors = [float(rng.uniform(max(0.0, 1 - s), 1 + s)) for _ in range(3)] + [float(rng.uniform(-s, s))]
        return [(JITTER_OPS[i], factors[i]) for i in rng.permutation(4)]

    @staticmethod
    def apply(image: np.ndarray, ops: list[tuple[str, float]]) -> np.ndarray:
        """`ops` (name, factor) applied in order to an RGB uint8 image; a new array."""
        if not ops:
            return image
        img = Image.fromarray(np.ascontiguousarray(image))
        for name, factor in ops:
            if name == "brightness":
                img = ImageEnhance.Brightness(img).enhance(factor)
            elif name == "contrast":
                img = ImageEnhance.Contrast(img).enhance(factor)
            elif name == "saturation":
                img = ImageEnhance.Color(img).enhance(factor)
            elif name == "hue":
                shift = hue_shift(factor)
                h, s, v = img.convert("HSV").split()
                h = h.point([(i + shift) % 256 for i in range(256)])
                img = Image.merge("HSV", (h, s, v)).convert("RGB")
            else:
                raise ValueError(f"unknown colour jitter op {name!r}; expected one of {JITTER_OPS}")
        return np.array(img)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(image, self.draw(rng))


class GaussianBlur:
    """The original's Gaussian blur: sigma = 0.15 + U * 1.15 (pixels), always applied, as
    skimage.filters.gaussian(image, sigma, multichannel=True) * 255 cast to uint8 computed it.

    That is: the image times 1/255 in float64; scipy.ndimage.gaussian_filter with sigma (s, s, 0) (the channel
    axis is not blurred), mode 'nearest' (edge pixels repeated) and truncate 4.0 (radius int(4 s + 0.5)), axis 0
    (vertical) first, in float64; times 255, then truncated to uint8. The truncation makes the result half a
    level darker on average than rounding would, and lowers flat areas by one level for some values and sigmas
    (for sigma 0.3, 185 of the 256 levels), as in the original.
    """

    def __init__(self, sigma_min: float = 0.15, sigma_max: float = 1.3):
        if not 0 < sigma_min <= sigma_max:
            raise ValueError(f"Gaussian blur needs 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma=[{self.sigma_min}, {self.sigma_max}])"

    def draw(self, rng: np.random.Generator) -> float:
        return self.sigma_min + float(rng.random()) * (self.sigma_max - self.sigma_min)

    @staticmethod
    def blur(image: np.ndarray, sigma: float) -> np.ndarray:
        """The uint8 result for one sigma (pixels); [H,W] or [H,W,C]."""
        x = np.multiply(image, 1.0 / 255, dtype=np.float64)
        sigmas = (sigma, sigma) + (0,) * (image.ndim - 2)
        ndimage.gaussian_filter(x, sigmas, output=x, mode="nearest", truncate=4.0)
        x *= 255
        return x.astype(np.uint8)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.blur(image, self.draw(rng))


class OpenCVColorJitter:
    """A faster colour jitter (data.augment.photometric=opencv), roughly 7x cheaper than ColorJitter: the same factor
    distributions and random order, computed on uint8 arrays with OpenCV. Brightness, contrast and saturation
    differ from the original's by at most one level: blends are rounded (Pillow truncates, so each original op
    is about 0.4 of a level darker on average), the contrast mean is not rounded and grey is OpenCV's luma. Hue
    differs more (a few levels on average, up to about 15): a shift of round(h * 256) on OpenCV's full-range
    HSV instead of trunc(h * 255) on Pillow's, and no HSV round trip when the shift is 0."""

    def __init__(self, strength: float):
        self.strength = _check_strength(strength)

    def __repr__(self) -> str:
        return f"OpenCVColorJitter({self.strength})"

    def _factor(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(max(0.0, 1 - self.strength), 1 + self.strength))

    @staticmethod
    def _blend(a: np.ndarray, b: np.ndarray | float, alpha: float) -> np.ndarray:
        """alpha * a + (1 - alpha) * b, saturated to uint8."""
        if isinstance(b, float):
            return cv2.addWeighted(a, alpha, a, 0.0, (1 - alpha) * b)
        return cv2.addWeighted(a, alpha, b, 1 - alpha, 0.0)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for op in rng.permutation(4):
            if op == 0:
                image = self._blend(image, 0.0, self._factor(rng))
            elif op == 1:
                mean = float(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean())
                image = self._blend(image, mean, self._factor(rng))
            elif op == 2:
                gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
                image = self._blend(image, gray, self._factor(rng))
            else:
                shift = int(round(rng.uniform(-self.strength, self.strength) * 256)) % 256
                if shift:
                    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)  # hue over 0..255
                    lut = ((np.arange(256) + shift) % 256).astype(np.uint8)
                    hsv[..., 0] = cv2.LUT(hsv[..., 0], lut)
                    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
        return image


class OpenCVGaussianBlur:
    """A faster Gaussian blur (data.augment.photometric=opencv), roughly 30x cheaper than GaussianBlur: sigma ~
    U(sigma_min, sigma_max) with cv2.GaussianBlur on uint8, which rounds instead of truncating (the original is
    half a level darker on average; pixels differ by at most 2 levels), reflects at the borders
    (BORDER_REFLECT_101) instead of repeating the edge pixel and cuts the kernel at about 3 sigma."""

    def __init__(self, sigma_min: float = 0.15, sigma_max: float = 1.3):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __repr__(self) -> str:
        return f"OpenCVGaussianBlur(sigma=[{self.sigma_min}, {self.sigma_max}])"

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sigma = float(rng.uniform(self.sigma_min, self.sigma_max))
        return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma)


class BilateralBlur:
    """The original's RandomBilateralBlur: skimage's denoise_bilateral(image, sigma_spatial=U(0.05, 0.75),
    multichannel=True) with every other argument at its default, times 255 and truncated to uint8.

    Computed here without skimage, as skimage 0.16-0.18 (the versions of the original's time) compute it: the
    image scaled by 1/255; a win x win window, win = max(5, 2 * ceil(3 * sigma) + 1); zero outside the image;
    colour weights from a 10000-bin table of exp(-d^2 / (2 * sigma_color^2)), sigma_color = std of the scaled
    image. Kept as they were: the table spans the uint8 maximum while distances are scaled by the float
    maximum over 3 channels, so the colour kernel is 85x narrower than asked (only pixels within about 2 grey
    levels of the centre get weight); the spatial table is laid out on a win+1 grid and read with a stride of
    win, which scrambles the spatial kernel (its peak lands at offset (+2, -1); for sigma below about 0.2 pixels
    with no similar neighbour there get no weight at all and become 0); a constant image is returned as its
    uint8 values times 255, wrapped modulo 256 (the original's in-place multiply).
    """

    BINS = 10000
    BAND_PIXELS = 16384  # pixels per band of rows processed together

    def __init__(self, sigma_min: float = 0.05, sigma_max: float = 0.75):
        if not 0 < sigma_min <= sigma_max:
            raise ValueError(f"bilateral blur needs 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __repr__(self) -> str:
        return f"BilateralBlur(sigma=[{self.sigma_min}, {self.sigma_max}])"

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.denoise(image, float(rng.uniform(self.sigma_min, self.sigma_max)))

    @classmethod
    def denoise(cls, image: np.ndarray, sigma_spatial: float) -> np.ndarray:
        """The uint8 result for one spatial sigma (pixels)."""
        vmax = int(image.max())
        if int(image.min()) == vmax:
            return ((image.astype(np.uint16) * 255) % 256).astype(np.uint8)
        win = max(5, 2 * int(math.ceil(3 * sigma_spatial)) + 1)
        img = np.multiply(image, 1.0 / 255, dtype=np.float64)
        sigma_color = img.std()
        color_lut = np.exp(-0.5 * (np.linspace(0, vmax, cls.BINS, endpoint=False) ** 2 / sigma_color**2))
        grid = np.arange(-win // 2, win // 2 + 1)
        rr, cc = np.meshgrid(grid, grid, indexing="ij")
        range_lut = np.exp(-0.5 * (np.hypot(rr, cc) ** 2 / sigma_spatial**2)).ravel()
        dist_scale = cls.BINS / image.shape[2] / img.max()
        ext = (win - 1) // 2
        h, w = image.shape[:2]
        planes = np.ascontiguousarray(img.transpose(2, 0, 1))
        padded = np.pad(planes, ((0, 0), (ext, ext), (ext, ext)))
        out = np.empty_like(planes)
        band = max(1, cls.BAND_PIXELS // w)  # rows per band: the buffers stay in cache
        for r0 in range(0, h, band):
            r1 = min(r0 + band, h)
            out[:, r0:r1] = cls._band(planes[:, r0:r1], padded[:, r0 : r1 + 2 * ext], win, range_lut, color_lut,
                                      dist_scale)
        out *= 255
        # Where every weight underflows (small sigmas: the scrambled spatial table puts no weight near the centre)
        # the result is 0/0; NaN becomes 0 in the uint8 cast, as on the x86 machines the original ran on.
        np.nan_to_num(out, copy=False, nan=0.0)
        return np.ascontiguousarray(out.transpose(1, 2, 0)).astype(np.uint8)

    @classmethod
    def _band(cls, planes, padded, win, range_lut, color_lut, dist_scale) -> np.ndarray:
        """Rows of the result: planes [C,h,w] and their zero-padded neighbourhood [C,h+win-1,w+win-1].

        The window offsets run in skimage's loop order, so every pixel's sums accumulate in the same order.
        """
        h, w = planes.shape[1:]
        total = np.zeros_like(planes)
        total_weight = np.zeros((h, w))
        dist, t, weight, prod = (np.empty((h, w)) for _ in range(4))
        bins = np.empty((h, w), np.int64)
        for kr in range(win):
            for kc in range(win):
                values = padded[:, kr : kr + h, kc : kc + w]
                np.subtract(planes[0], values[0], out=t)
                np.multiply(t, t, out=dist)
                for d in range(1, len(planes)):
                    np.subtract(planes[d], values[d], out=t)
                    np.multiply(t, t, out=t)
                    dist += t
                np.sqrt(dist, out=dist)
                dist *= dist_scale
                np.copyto(bins, dist, casting="unsafe")  # truncation, as the C cast
                np.minimum(bins, cls.BINS - 1, out=bins)
                np.take(color_lut, bins, out=weight)
                np.multiply(range_lut[kr * win + kc], weight, out=weight)
                for d in range(len(planes)):
                    np.multiply(values[d], weight, out=prod)
                    total[d] += prod
                total_weight += weight
        with np.errstate(invalid="ignore"):
            total /= total_weight
        return total


class Normalize:
    """RGB uint8 [H,W,3] -> float32 tensor [3,H,W], (x / 255 - mean) / std."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.mean = torch.tensor([255.0 * m for m in mean]).view(3, 1, 1)
        self.inv_std = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)

    def __repr__(self) -> str:
        return "Normalize(imagenet)"

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        out = torch.empty((3, h, w), dtype=torch.float32)
        out.copy_(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))  # one pass: cast + transpose
        return out.sub_(self.mean).mul_(self.inv_std)
