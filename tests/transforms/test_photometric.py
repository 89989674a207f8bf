"""The image-only transforms reproduce the original's: colour jitter as Pillow's ImageEnhance and HSV conversion
computed it, Gaussian blur as skimage's gaussian (through scipy) computed it.

Checked against Pillow itself, a literal re-statement of the original's adjust_hue, and references written from
the formulas of Pillow's C code (Blend.c, Convert.c) and of skimage + scipy.ndimage, so a change of either
library's arithmetic shows up here."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from transforms import (
    BilateralBlur,
    ColorJitter,
    GaussianBlur,
    OpenCVColorJitter,
    OpenCVGaussianBlur,
    build_transforms,
)
from transforms.photometric import JITTER_OPS, hue_shift
from utils.config import ConfigError, DataConfig, from_dict

IGNORE = 255


def sample_image(rng: np.random.Generator, h: int = 61, w: int = 83) -> np.ndarray:
    """Smooth colours plus noise, with grey, saturated and tied-channel pixels (every HSV branch)."""
    ramp = np.add.outer(np.arange(h) * 5, np.arange(w) * 3)[..., None] + np.array([0, 90, 170])
    image = np.clip(ramp % 256 + rng.integers(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)
    image[:8, :8] = rng.integers(0, 256, (8, 8, 1))  # grey: saturation 0
    image[8:16, :8] = rng.choice([0, 255], (8, 8, 3))  # pure and saturated colours
    image[16:24, :8, 1] = image[16:24, :8, 0]  # red and green tied
    return image


# ------------------------------------------------------------------ Pillow's arithmetic, restated from its C code


def pil_blend(degenerate: np.ndarray, image: np.ndarray, alpha: float) -> np.ndarray:
    """ImagingBlend: float32 in1 + alpha * (in2 - in1), truncated; clipped to 0..255 outside alpha in [0, 1]."""
    a = np.float32(alpha)
    d = degenerate.astype(np.float32)
    t = d + a * (image.astype(np.float32) - d)
    if 0 <= alpha <= 1:
        return t.astype(np.uint8)
    return np.clip(t, 0, 255).astype(np.uint8)


def pil_luma(image: np.ndarray) -> np.ndarray:
    """RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16 (Pillow 7.0 and later)."""
    r, g, b = (image[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def ref_enhance(image: np.ndarray, op: str, factor: float) -> np.ndarray:
    luma = pil_luma(image)
    if op == "brightness":
        degenerate = np.zeros_like(image)
    elif op == "contrast":  # a grey image of the mean luma, rounded half up
        degenerate = np.full_like(image, int(luma.astype(np.int64).sum() / luma.size + 0.5))
    else:
        degenerate = np.repeat(luma[..., None], 3, axis=2)
    return pil_blend(degenerate, image, factor)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C round() of non-negative doubles."""
    r = np.floor(x)
    return r + (x - r >= 0.5)


def ref_rgb2hsv(image: np.ndarray) -> np.ndarray:
    """Convert.c rgb2hsv: float32 channel ratios, the hue wrapped and scaled in double, both truncated."""
    r, g, b = (image[..., i] for i in range(3))
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    fmax = maxc.astype(np.float32)
    cr = fmax - minc.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = cr / fmax
        rc, gc, bc = ((fmax - c.astype(np.float32)) / cr for c in (r, g, b))
        h = np.where(r == maxc, bc - gc,
                     np.where(g == maxc, ((2.0 + rc.astype(np.float64)) - bc).astype(np.float32),
                              ((4.0 + gc.astype(np.float64)) - rc).astype(np.float32)))
        h = np.fmod(h.astype(np.float64) / 6.0 + 1.0, 1.0).astype(np.float32)
        uh = np.clip(np.trunc(h.astype(np.float64) * 255.0), 0, 255)
        us = np.clip(np.trunc(s.astype(np.float64) * 255.0), 0, 255)
    flat = minc == maxc
    return np.stack([np.where(flat, 0, uh).astype(np.uint8), np.where(flat, 0, us).astype(np.uint8), maxc], -1)


# Convert.c hsv2rgb: which of (v, t, p, q) lands in R, G, B for each sextant i % 6
SEXTANT_CHANNELS = np.array([[0, 1, 2], [3, 0, 2], [2, 0, 1], [2, 3, 0], [1, 2, 0], [0, 2, 3]])


def ref_hsv2rgb(hsv: np.ndarray) -> np.ndarray:
    """Convert.c hsv2rgb: sextant and remainder in double (the remainder stored as float32), p, q, t rounded."""
    x = hsv[..., 0].astype(np.float64) * 6.0 / 255.0
    i = np.floor(x)
    f = (x - i).astype(np.float32)
    fs = (hsv[..., 1].astype(np.float64) / 255.0).astype(np.float32)
    v = hsv[..., 2].astype(np.float64)
    p = round_half_away(v * (1.0 - fs.astype(np.float64)))
    q = round_half_away(v * (1.0 - (fs * f).astype(np.float64)))  # fs * f: a float32 product
    t = round_half_away(v * (1.0 - fs.astype(np.float64) * (1.0 - f.astype(np.float64))))
    p, q, t = (np.clip(a, 0, 255).astype(np.uint8) for a in (p, q, t))
    values = np.stack([hsv[..., 2], t, p, q])
    channels = SEXTANT_CHANNELS[i.astype(np.int64) % 6]
    rgb = np.stack([np.take_along_axis(values, channels[None, ..., c], 0)[0] for c in range(3)], -1)
    return np.where((hsv[..., 1] == 0)[..., None], hsv[..., 2:3], rgb)


def original_adjust_hue(image: np.ndarray, hue_factor: float) -> np.ndarray:
    """The original's adjust_hue, restated: Pillow HSV, H += np.uint8(hue_factor * 255) with wrap-around. numpy 2
    refuses np.uint8 of a negative float, so the cast is numpy's array cast, which is what numpy 1.x did."""
    h, s, v = Image.fromarray(image).convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.array(hue_factor * 255).astype(np.uint8)
    return np.array(Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB"))


# ------------------------------------------------------------------------------------------------ colour jitter

FACTORS = [0.0, 0.5, 0.75, 0.8137, 0.9999, 1.0, 1.0001, 1.07, 1.1932, 1.25, 1.6]
PIL_ENHANCE = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
               "saturation": ImageEnhance.Color}


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_enhance_ops_are_pillows_and_the_formulas(op):
    rng = np.random.default_rng(len(op))
    for seed, factor in enumerate(FACTORS):
        image = sample_image(np.random.default_rng(seed))
        out = ColorJitter.apply(image, [(op, factor)])
        assert out.dtype == np.uint8 and out.shape == image.shape and out.flags.writeable
        assert np.array_equal(out, np.asarray(PIL_ENHANCE[op](Image.fromarray(image)).enhance(factor))), factor
        assert np.array_equal(out, ref_enhance(image, op, factor)), factor
    dark = (sample_image(rng) // 3).astype(np.uint8)  # a contrast mean far from 128
    assert np.array_equal(ColorJitter.apply(dark, [(op, 1.2)]), ref_enhance(dark, op, 1.2))


def test_enhance_truncates():
    """Pillow truncates the blend: brightness 1.1 maps 7 to 7.7 -> 7 and 100 to 110; contrast 0.85 around the
    mean 10 maps 0, 13, 20, 7 to 1.5, 12.55, 18.5, 7.45 -> 1, 12, 18, 7."""
    image = np.array([[[7, 100, 255]]], np.uint8)
    assert ColorJitter.apply(image, [("brightness", 1.1)]).tolist() == [[[7, 110, 255]]]
    grey = np.array([0, 13, 20, 7], np.uint8).reshape(1, 4, 1).repeat(3, axis=2)  # luma mean 10
    assert ColorJitter.apply(grey, [("contrast", 0.85)])[0, :, 0].tolist() == [1, 12, 18, 7]


HUES = [-0.5, -0.25, -0.1234, -0.01, -0.002, 0.0, 0.003, 0.05, 0.1999, 0.25, 0.5]


def test_hue_is_the_originals():
    rng = np.random.default_rng(7)
    image = sample_image(rng)
    hsv = ref_rgb2hsv(image)
    for factor in HUES:
        out = ColorJitter.apply(image, [("hue", factor)])
        assert np.array_equal(out, original_adjust_hue(image, factor)), factor
        shifted = hsv.copy()
        shifted[..., 0] += np.uint8(hue_shift(factor))
        assert np.array_equal(out, ref_hsv2rgb(shifted)), factor


def test_hue_shift_is_numpys_uint8_cast():
    assert [hue_shift(f) for f in (-0.5, -0.25, -0.002, 0.0, 0.002, 0.25, 0.5)] == [129, 193, 0, 0, 0, 63, 127]
    factors = np.random.default_rng(0).uniform(-0.5, 0.5, 500)
    assert [hue_shift(f) for f in factors] == (factors * 255).astype(np.uint8).tolist()


def test_a_zero_hue_shift_still_round_trips_through_hsv():
    """Like the original, a hue factor in (-1/255, 1/255) shifts by 0 but the 8-bit HSV round trip still runs."""
    image = sample_image(np.random.default_rng(3))
    out = ColorJitter.apply(image, [("hue", 0.001)])
    assert not np.array_equal(out, image)
    assert np.array_equal(out, ref_hsv2rgb(ref_rgb2hsv(image)))


@pytest.mark.slow
def test_pillow_hsv_is_the_formula():
    """Pillow's HSV conversions (the original's) against Convert.c restated: RGB -> HSV on every combination of
    58 levels per channel (ties and extremes included) and 100k random colours; HSV -> RGB on every hue with 58
    saturations and values."""
    levels = np.unique(np.r_[0:256:5, 1, 2, 127, 128, 253, 254])
    assert len(levels) == 58
    grid = np.array(list(itertools.product(levels, repeat=3)), np.uint8)
    colours = np.concatenate([grid, np.random.default_rng(0).integers(0, 256, (100_000, 3), dtype=np.uint8)])
    colours = colours[: len(colours) // 256 * 256].reshape(-1, 256, 3)
    assert np.array_equal(np.asarray(Image.fromarray(colours).convert("HSV")), ref_rgb2hsv(colours))
    hsv = np.array(list(itertools.product(range(256), levels, levels)), np.uint8).reshape(-1, 256, 3)
    pil = Image.frombytes("HSV", (hsv.shape[1], hsv.shape[0]), hsv.tobytes()).convert("RGB")
    assert np.array_equal(np.asarray(pil), ref_hsv2rgb(hsv))


def test_jitter_applies_the_drawn_ops_in_order():
    image = sample_image(np.random.default_rng(11))
    jitter = ColorJitter(0.25)
    for seed in range(6):
        ops = jitter.draw(np.random.default_rng(seed))
        expected = image
        for name, factor in ops:
            if name == "hue":
                expected = original_adjust_hue(expected, factor)
            else:
                expected = ref_enhance(expected, name, factor)
        assert np.array_equal(ColorJitter.apply(image, ops), expected)
        assert np.array_equal(jitter(image, np.random.default_rng(seed)), expected)


def test_jitter_draws():
    """Brightness, contrast and saturation U(max(0, 1 - s), 1 + s), hue U(-s, s), every order of the 4 ops."""
    rng = np.random.default_rng(0)
    jitter = ColorJitter(0.25)
    draws = [jitter.draw(rng) for _ in range(3000)]
    assert all(sorted(name for name, _ in ops) == sorted(JITTER_OPS) for ops in draws)
    assert len({tuple(name for name, _ in ops) for ops in draws}) == 24
    for op, (lo, hi) in zip(JITTER_OPS, [(0.75, 1.25)] * 3 + [(-0.25, 0.25)]):
        values = np.array([dict(ops)[op] for ops in draws])
        assert lo <= values.min() < lo + 0.002 and hi - 0.002 < values.max() <= hi, op
        assert abs(values.mean() - (lo + hi) / 2) < 0.01, op
    wide = np.array([dict(ColorJitter(0.5).draw(rng))["contrast"] for _ in range(2000)])
    assert 0.5 <= wide.min() < 0.502 and 1.498 < wide.max() <= 1.5


def test_jitter_strength():
    image = sample_image(np.random.default_rng(1))
    assert ColorJitter(0.0).draw(np.random.default_rng(0)) == []
    assert ColorJitter(0.0)(image, np.random.default_rng(0)) is image
    with pytest.raises(ValueError, match=r"data\.augment\.color_jitter.*\[0, 0\.5\].*0\.7"):
        ColorJitter(0.7)
    with pytest.raises(ValueError, match=r"data\.augment\.color_jitter"):
        OpenCVColorJitter(-0.1)


# ------------------------------------------------------------------------------------------------ Gaussian blur


def ref_gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """skimage gaussian(image, sigma, multichannel=True) * 255 -> uint8, restated: image * (1/255) in float64;
    per spatial axis (rows first) a kernel exp(-x^2 / (2 sigma^2)) / sum over |x| <= int(4 sigma + 0.5), edge
    pixels repeated, accumulated as scipy's symmetric correlation does (centre tap, then the pairs from the
    outermost in); channels not mixed; times 255, truncated."""
    x = np.multiply(image, 1.0 / 255, dtype=np.float64)
    radius = int(4.0 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * taps**2)
    weights = weights / weights.sum()
    for axis in (0, 1):
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="edge")

        def shifted(k: int) -> np.ndarray:
            return np.take(padded, np.arange(radius + k, radius + k + n), axis=axis)

        out = shifted(0) * weights[radius]
        for j in range(radius, 0, -1):
            out = out + (shifted(-j) + shifted(j)) * weights[radius - j]
        x = out
    return (x * 255).astype(np.uint8)


SIGMAS = [0.15, 0.2, 0.37, 0.5, 0.77, 1.0, 1.13, 1.2999]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_gaussian_blur_is_skimages(sigma):
    rng = np.random.default_rng(int(sigma * 1000))
    for shape in [(61, 83, 3), (40, 7, 3), (3, 4, 3), (1, 9, 3), (30, 20)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        out = GaussianBlur.blur(image, sigma)
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert np.array_equal(out, ref_gaussian(image, sigma)), shape
    smooth = sample_image(rng)
    assert np.array_equal(GaussianBlur.blur(smooth, sigma), ref_gaussian(smooth, sigma))


def test_gaussian_blur_truncates_and_keeps_channels_apart():
    """A flat 200 at sigma 0.5 sums to 199.99999x and becomes 199, as in the original; 0 and 255 stay."""
    for value, sigma, expected in [(200, 0.5, 199), (200, 1.0, 200), (0, 0.5, 0), (255, 0.5, 255), (255, 1.3, 255)]:
        assert np.unique(GaussianBlur.blur(np.full((12, 12, 3), value, np.uint8), sigma)).tolist() == [expected]
    image = np.zeros((9, 9, 3), np.uint8)
    image[..., 1] = 255
    assert np.array_equal(GaussianBlur.blur(image, 1.3), image)  # an exact 0 / 255 per channel: no bleeding


def test_gaussian_blur_draws():
    """sigma = 0.15 + U * 1.15, on every call."""
    blur = GaussianBlur()
    rng = np.random.default_rng(0)
    sigmas = np.array([blur.draw(rng) for _ in range(3000)])
    assert 0.15 <= sigmas.min() < 0.152 and 1.298 < sigmas.max() < 1.3
    assert abs(sigmas.mean() - 0.725) < 0.02
    image = sample_image(np.random.default_rng(2))
    assert np.array_equal(blur(image, np.random.default_rng(5)),
                          GaussianBlur.blur(image, blur.draw(np.random.default_rng(5))))
    with pytest.raises(ValueError, match="sigma_min"):
        GaussianBlur(0.0, 1.0)


# ------------------------------------------------------------------------------------------ pipeline and options


def test_photometric_key_picks_the_implementations():
    cfg = DataConfig.make(crop_size=(32, 48))
    assert cfg.augment.photometric == "original"

    def kinds(c: DataConfig) -> list[type]:
        return [type(t) for t in build_transforms(c, True, IGNORE).photometric]

    assert kinds(cfg) == [ColorJitter, GaussianBlur]
    assert kinds(cfg.updated(photometric="opencv")) == [OpenCVColorJitter, OpenCVGaussianBlur]
    assert kinds(cfg.updated(photometric="opencv", bilateral_blur=True)) == [OpenCVColorJitter, BilateralBlur]
    assert kinds(cfg.updated(color_jitter=0.0, gaussian_blur=False)) == []
    assert from_dict({"data": {"photometric": "opencv"}}).data.augment.photometric == "opencv"
    with pytest.raises(ConfigError, match=r"data\.augment\.photometric: expected one of \['original', 'opencv'\]"):
        from_dict({"data": {"photometric": "pil"}})


def test_original_pipeline_output_is_the_ops_on_the_crop():
    """The default training pipeline's image is ColorJitter then GaussianBlur of the jointly transformed crop,
    with the draws in that order from the same generator."""
    cfg = DataConfig.make(crop_size=(32, 48), hflip=False)
    image = sample_image(np.random.default_rng(4), 60, 90)
    mask = np.zeros((60, 90), np.uint8)
    full = build_transforms(cfg, True, IGNORE)
    rng = np.random.default_rng(9)
    expected, _ = full.joint[0](image, mask, rng, None)
    expected = GaussianBlur.blur(ColorJitter.apply(expected, ColorJitter(0.25).draw(rng)), GaussianBlur().draw(rng))
    out, _ = full(image, mask, np.random.default_rng(9))
    assert np.array_equal(out, full.normalize(expected))


def test_opencv_versions_stay_close_to_the_original():
    """The faster versions approximate the original: the same factors give images within a few grey levels."""
    image = sample_image(np.random.default_rng(6))
    opencv = OpenCVGaussianBlur()
    sigma = float(np.random.default_rng(1).uniform(opencv.sigma_min, opencv.sigma_max))
    fast = opencv(image, np.random.default_rng(1)).astype(int)
    exact = GaussianBlur.blur(image, sigma).astype(int)
    assert np.abs(fast - exact)[2:-2, 2:-2].mean() < 1.0
    blend = OpenCVColorJitter._blend(image, 0.0, 1.2).astype(int)
    assert np.abs(blend - ColorJitter.apply(image, [("brightness", 1.2)]).astype(int)).max() <= 1
    assert np.array_equal(OpenCVColorJitter(0.0)(image, np.random.default_rng(0)), image)
