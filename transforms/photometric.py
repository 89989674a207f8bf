"""Image-only transforms (RGB uint8 in, RGB uint8 out), called as `t(image, rng) -> image`, and normalisation."""
from __future__ import annotations

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ColorJitter:
    """Brightness, contrast, saturation (factors U(1-s, 1+s)) and hue (shift U(-s, s) of a turn, s <= 0.5),
    applied in a random order, as torchvision's ColorJitter(s, s, s, s) but on uint8 arrays with OpenCV."""

    def __init__(self, strength: float):
        if not 0 <= strength <= 0.5:
            raise ValueError(f"colour jitter strength must be in [0, 0.5], got {strength}")
        self.strength = float(strength)

    def __repr__(self) -> str:
        return f"ColorJitter({self.strength})"

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


class GaussianBlur:
    """Gaussian blur with sigma ~ U(sigma_min, sigma_max), always applied (the original: 0.15 + U * 1.15)."""

    def __init__(self, sigma_min: float = 0.15, sigma_max: float = 1.3):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma=[{self.sigma_min}, {self.sigma_max}])"

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sigma = float(rng.uniform(self.sigma_min, self.sigma_max))
        return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma)


class BilateralBlur:
    """Edge-preserving blur: spatial sigma ~ U(sigma_min, sigma_max) pixels, colour sigma = the image's std
    (as skimage's denoise_bilateral default that the original calls)."""

    def __init__(self, sigma_min: float = 0.5, sigma_max: float = 1.5):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __repr__(self) -> str:
        return f"BilateralBlur(sigma=[{self.sigma_min}, {self.sigma_max}])"

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sigma = float(rng.uniform(self.sigma_min, self.sigma_max))
        sigma_color = max(float(image.std()), 1.0)
        d = max(3, 2 * int(round(2 * sigma)) + 1)
        return cv2.bilateralFilter(image, d, sigma_color, sigma)


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
