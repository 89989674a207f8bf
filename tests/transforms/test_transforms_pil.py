"""The transforms reproduce the original's: Pillow's resize values, its crop placement, its RandAugment ops and
its bilateral blur, checked against Pillow itself, a literal re-statement of the original's code, or geometry
worked out by hand."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from transforms import CenterCropPad, RandomScaleCrop, ResizeHeight, ResizeLongEdge, build_transforms
from transforms.photometric import BilateralBlur
from transforms.randaugment import OPS, RandAugment, op_value
from transforms.resample import nearest_index, pil_resize, pil_resize_window, vertical_first
from utils.config import ConfigError, DataConfig, from_dict

IGNORE = 255
PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def random_image(rng: np.random.Generator, h: int, w: int, gray: bool = False) -> np.ndarray:
    """Smooth structure plus noise: every filter tap and rounding matters."""
    shape = (h, w) if gray else (h, w, 3)
    ramp = (np.add.outer(np.arange(h) * 7, np.arange(w) * 3) % 256).astype(np.int64)
    noise = rng.integers(-40, 41, shape)
    base = ramp if gray else ramp[..., None] + np.array([0, 80, 160])
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def pil_reference(array: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size, PIL_FILTERS[resample]))


# ------------------------------------------------------------------------------------------- resampling

SIZES = [  # (h, w, out_h, out_w): downscale, upscale, mixed, odd, 1-pixel results, vertical-first cases
    (37, 53, 14, 21), (101, 67, 31, 25), (64, 64, 160, 160), (45, 77, 91, 153), (33, 91, 71, 40),
    (80, 18, 40, 9), (150, 40, 23, 37), (29, 31, 29, 62), (58, 23, 117, 23), (17, 19, 1, 7), (9, 300, 9, 81),
    (257, 129, 70, 128), (61, 59, 60, 58),
]


@pytest.mark.parametrize("h,w,oh,ow", SIZES)
@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "nearest"])
def test_full_resize_is_pillows(h, w, oh, ow, resample):
    rng = np.random.default_rng(h * 1000 + w)
    for gray in (False, True):
        image = random_image(rng, h, w, gray)
        out = pil_resize(image, (ow, oh), resample)
        assert out.shape == (oh, ow) + image.shape[2:] and out.flags.writeable
        assert np.array_equal(out, pil_reference(image, (ow, oh), resample))


@pytest.mark.parametrize("h,w,oh,ow", SIZES)
@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "nearest"])
def test_window_is_the_window_of_pillows_full_resize(h, w, oh, ow, resample):
    rng = np.random.default_rng(oh * 1000 + ow)
    image = random_image(rng, h, w)
    full = pil_reference(image, (ow, oh), resample)
    windows = [(0, 0, ow, oh), (0, 0, 1, 1), (ow - 1, oh - 1, 1, 1)]
    for _ in range(12):
        n, m = int(rng.integers(1, ow + 1)), int(rng.integers(1, oh + 1))
        windows.append((int(rng.integers(0, ow - n + 1)), int(rng.integers(0, oh - m + 1)), n, m))
    for x0, y0, n, m in windows:
        out = pil_resize_window(image, (ow, oh), (x0, y0, n, m), resample)
        assert out.shape == (m, n, 3)
        assert np.array_equal(out, full[y0 : y0 + m, x0 : x0 + n]), (x0, y0, n, m)


def test_window_at_training_sizes_is_bit_exact():
    """Cityscapes-like scales (1024x2048 at 0.5-2.0, crop 1024x2048) and a Mapillary-like downscale."""
    rng = np.random.default_rng(3)
    for (h, w), s, (ch, cw) in [((512, 1024), 1.73, (512, 1024)), ((512, 1024), 0.61, (512, 1024)),
                                ((1000, 750), 0.41, (256, 256)), ((750, 1000), 1.37, (256, 256))]:
        image = random_image(rng, h, w)
        size = (int(w * s), int(h * s))
        full = pil_reference(image, size, "bicubic")
        n, m = min(cw, size[0]), min(ch, size[1])
        x0, y0 = int(rng.integers(0, size[0] - n + 1)), int(rng.integers(0, size[1] - m + 1))
        assert np.array_equal(pil_resize_window(image, size, (x0, y0, n, m), "bicubic"),
                              full[y0 : y0 + m, x0 : x0 + n])


def test_pass_order_rule_covers_both_orders():
    """The sizes above exercise both of the installed Pillow's pass orders (or Pillow never reorders)."""
    orders = {vertical_first((w, h), (ow, oh)) for h, w, oh, ow in SIZES}
    assert orders == {False, True} or orders == {False}
    assert not vertical_first((100, 100), (100, 101)) and not vertical_first((100, 100), (50, 50))


def test_nearest_index_is_pillows_sampling():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n_in, n_out = (int(v) for v in rng.integers(1, 3000, 2))
        row = np.arange(n_in, dtype=np.int32)[None, :]
        pil = np.asarray(Image.fromarray(row, mode="I").resize((n_out, 1), Image.NEAREST))[0]
        assert np.array_equal(nearest_index(n_in, n_out), pil), (n_in, n_out)
    # 4 -> 6: (x + 0.5) * 4 / 6 is exactly 3 at x = 4, but Pillow's running sum 1/3 + 4 * (2/3) ends just
    # below 3, so it samples pixel 2 there.
    assert nearest_index(4, 6).tolist() == [0, 1, 1, 2, 2, 3]
    pil = np.asarray(Image.fromarray(np.arange(4, dtype=np.int32)[None, :], mode="I").resize((6, 1), Image.NEAREST))
    assert pil[0].tolist() == [0, 1, 1, 2, 2, 3]


def test_resample_errors():
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="window"):
        pil_resize_window(image, (8, 8), (4, 4, 5, 1), "bicubic")
    with pytest.raises(ValueError, match="resample"):
        pil_resize(image, (8, 8), "lanczos")
    with pytest.raises(ValueError, match="uint8"):
        pil_resize(image.astype(np.float32), (8, 8), "bicubic")
    with pytest.raises(ValueError, match="resample"):
        RandomScaleCrop((4, 4), resample="cv2")
    with pytest.raises(ValueError, match="placement"):
        RandomScaleCrop((4, 4), placement="random")


# ------------------------------------------------------------------------ training scale + crop (original)


class PyRandom:
    """python `random`'s uniform/randint drawn from a numpy Generator, so that the literal original below and
    our transform see the same numbers in the same order."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def uniform(self, a: float, b: float) -> float:
        return self.rng.uniform(a, b)

    def randint(self, a: int, b: int) -> int:
        return int(self.rng.integers(a, b + 1))


def original_random_size_and_crop(image, mask, crop_hw, scale_min, scale_max, centroid, rnd):
    """The original's RandomSizeAndCrop(crop, crop_nopad=False) + RandomCrop, statement by statement, on PIL."""
    img, msk = Image.fromarray(image), Image.fromarray(mask)
    scale_amt = rnd.uniform(scale_min, scale_max)
    w, h = [int(i * scale_amt) for i in img.size]
    if centroid is not None:
        centroid = [int(c * scale_amt) for c in centroid]
    img, msk = img.resize((w, h), Image.BICUBIC), msk.resize((w, h), Image.NEAREST)
    target_h, target_w = crop_hw
    if w == target_w and h == target_h:
        return np.asarray(img), np.asarray(msk)
    pad_h = (target_h - h) // 2 + 1 if target_h > h else 0
    pad_w = (target_w - w) // 2 + 1 if target_w > w else 0
    if pad_h or pad_w:
        border = (pad_w, pad_h, pad_w, pad_h)
        img = ImageOps.expand(img, border=border, fill=(0, 0, 0))
        msk = ImageOps.expand(msk, border=border, fill=IGNORE)
        w, h = img.size
    if centroid is not None:
        c_x, c_y = centroid
        x1 = min(w - target_w, max(0, rnd.randint(c_x - target_w, c_x)))
        y1 = min(h - target_h, max(0, rnd.randint(c_y - target_h, c_y)))
    else:
        x1 = 0 if w == target_w else rnd.randint(0, w - target_w)
        y1 = 0 if h == target_h else rnd.randint(0, h - target_h)
    box = (x1, y1, x1 + target_w, y1 + target_h)
    return np.asarray(img.crop(box)), np.asarray(msk.crop(box))


CROP_CASES = [  # (h, w, crop (h, w), scale range, centroid)
    (60, 90, (48, 64), (0.5, 0.5), None),  # smaller than the crop on both axes
    (60, 90, (48, 64), (0.7, 0.7), None),  # smaller on one axis
    (60, 90, (48, 64), (1.3, 1.3), None),  # larger on both
    (61, 97, (40, 50), (0.4, 2.2), None),
    (61, 97, (40, 50), (0.4, 2.2), (90, 3)),  # centroids near edges
    (61, 97, (40, 50), (0.4, 2.2), (2, 58)),
    (61, 97, (33, 47), (0.4, 2.2), (48, 30)),
    (45, 45, (64, 32), (0.3, 1.9), (44, 0)),
]


@pytest.mark.parametrize("case", CROP_CASES)
def test_scale_crop_is_the_originals_pixel_for_pixel(case):
    h, w, crop, (smin, smax), centroid = case
    rng = np.random.default_rng(h + w)
    image = random_image(rng, h, w)
    mask = rng.integers(0, 19, (h, w)).astype(np.uint8)
    t = RandomScaleCrop(crop, smin, smax, ignore_index=IGNORE)
    for seed in range(6):
        out, out_mask = t(image, mask, np.random.default_rng(seed), centroid)
        ref, ref_mask = original_random_size_and_crop(image, mask, crop, smin, smax, centroid, PyRandom(seed))
        assert out.shape == ref.shape == crop + (3,) and out_mask.shape == ref_mask.shape == crop
        assert np.array_equal(out, ref) and np.array_equal(out_mask, ref_mask), seed


def test_small_image_is_centred_with_at_most_2px_jitter():
    """20x30 into a 25x36 crop: pads (25-20)//2+1 = 3 rows and (36-30)//2+1 = 4 columns each side, so the image
    starts at column 4 - x1, x1 in {0, 1, 2}, and row 3 - y1, y1 in {0, 1}: the centre offset is (3, 2.5)."""
    image = np.full((20, 30, 3), 200, np.uint8)
    mask = np.full((20, 30), 7, np.uint8)
    t = RandomScaleCrop((25, 36), 1.0, 1.0, ignore_index=IGNORE)
    offsets = set()
    for seed in range(60):
        out, out_mask = t(image, mask, np.random.default_rng(seed))
        ys, xs = np.nonzero(out_mask == 7)
        y0, x0 = int(ys.min()), int(xs.min())
        assert out_mask.sum() and (out_mask == 7).sum() == 600 and (out_mask[out_mask != 7] == IGNORE).all()
        assert (out[out_mask == 7] == 200).all() and (out[out_mask != 7] == 0).all()
        offsets.add((y0, x0))
    assert offsets == {(y, x) for y in (2, 3) for x in (2, 3, 4)}


def test_small_on_one_axis_pads_that_axis_only():
    """20x60 into a 25x36 crop: rows padded by 3 (image at row 3 - y1, y1 in {0, 1}); columns not padded, the
    crop start uniform in [0, 60 - 36]."""
    image = np.tile(np.arange(60, dtype=np.uint8)[None, :, None], (20, 1, 3))
    mask = np.tile(np.arange(60, dtype=np.uint8)[None, :], (20, 1))
    t = RandomScaleCrop((25, 36), 1.0, 1.0, ignore_index=IGNORE)
    rows, starts = set(), set()
    for seed in range(200):
        _, out_mask = t(image, mask, np.random.default_rng(seed))
        valid = np.nonzero((out_mask != IGNORE).all(axis=1))[0]
        assert len(valid) == 20 and (out_mask[:, 0] != IGNORE).sum() == 20
        rows.add(int(valid[0]))
        starts.add(int(out_mask[valid[0], 0]))
    assert rows == {2, 3} and starts == set(range(25))


class StubRng:
    """Returns set values and records the integer ranges asked for."""

    def __init__(self, scale: float, picks):
        self.scale, self.picks, self.asked = scale, list(picks), []

    def uniform(self, a, b):
        return self.scale

    def integers(self, lo, hi):
        self.asked.append((int(lo), int(hi)))
        pick = self.picks.pop(0)
        return lo if pick == "lo" else hi - 1


def test_centroid_crop_near_an_edge_by_hand():
    """100x200 image, scale 1, crop 50x80, centroid (190, 95): x1 = randint(110, 190) clipped to [0, 120],
    y1 = randint(45, 95) clipped to [0, 50]. The lowest draw puts the crop at [110, 190), which misses the
    centroid column 190; any draw from 120 up gives the last window [120, 200)."""
    mask = np.add.outer(np.arange(100) % 2, np.zeros(200, np.int64)).astype(np.uint8)
    image = np.zeros((100, 200, 3), np.uint8)
    x_idx = np.tile(np.arange(200)[None, :], (100, 1))
    t = RandomScaleCrop((50, 80), 1.0, 1.0, ignore_index=IGNORE)
    for picks, (x1, y1) in ((("lo", "lo"), (110, 45)), (("hi", "hi"), (120, 50))):
        rng = StubRng(1.0, picks)
        image[..., 0] = x_idx % 256  # the column index, to read back where the crop sits
        image[..., 1] = np.arange(100)[:, None]
        out, out_mask = t(image, mask, rng, centroid=(190, 95))
        assert rng.asked == [(110, 191), (45, 96)]
        assert int(out[0, 0, 0]) == x1 and int(out[0, 0, 1]) == y1
    # Scale 0.5: a 50x100 image (no padding: 50 rows fit the crop exactly) and the centroid scaled to
    # (int(190 * 0.5), int(95 * 0.5)) = (95, 47): x1 = randint(15, 95), y1 = randint(-3, 47), clipped to 0.
    rng = StubRng(0.5, ["lo", "hi"])
    t(image, mask, rng, centroid=(190, 95))
    assert rng.asked == [(95 - 80, 96), (47 - 50, 48)]


def test_centroid_is_not_shifted_by_the_padding():
    """20x30 image, crop 25x36, centroid (5, 5): the canvas is 26x38 and the centroid stays (5, 5) (not
    (9, 8)), so x1 = randint(-31, 5) clipped to [0, 2] and y1 = randint(-20, 5) clipped to [0, 1]."""
    image = np.zeros((20, 30, 3), np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    t = RandomScaleCrop((25, 36), 1.0, 1.0, ignore_index=IGNORE)
    rng = StubRng(1.0, ["hi", "lo"])
    _, out_mask = t(image, mask, rng, centroid=(5, 5))
    assert rng.asked == [(-31, 6), (-20, 6)]
    # x1 = 5 -> clipped to 2: the image starts at column 4 - 2 = 2; y1 = -20 -> 0: row 3 - 0 = 3.
    ys, xs = np.nonzero(out_mask == 0)
    assert (int(ys.min()), int(xs.min())) == (3, 2)


def test_centroid_draws_pile_up_at_the_clip():
    """Over many draws the clip puts 71 of the 81 values of randint(110, 190) on x1 = 120."""
    image = np.zeros((100, 200, 3), np.uint8)
    image[..., 0] = np.arange(200)[None, :] % 256
    mask = np.zeros((100, 200), np.uint8)
    t = RandomScaleCrop((50, 80), 1.0, 1.0, ignore_index=IGNORE)
    rng = np.random.default_rng(0)
    starts = np.array([int(t(image, mask, rng, centroid=(190, 95))[0][0, 0, 0]) for _ in range(2000)])
    assert set(starts.tolist()) == set(range(110, 121))
    assert 0.80 < (starts == 120).mean() < 0.95  # 71 / 81 = 0.877


# ------------------------------------------------------------------------------------------ evaluation


def test_mapillary_eval_size_truncates():
    """3000x4000 (w x h) to long edge 2177: 1632x2177 (int(1632.75)), not 1633; and the landscape twin."""
    for (w, h), expected in (((3000, 4000), (2177, 1632)), ((4000, 3000), (1632, 2177))):
        image = np.zeros((h, w, 3), np.uint8)
        mask = np.zeros((h, w), np.uint8)
        out, out_mask = ResizeLongEdge(2177)(image, mask)
        assert out.shape[:2] == expected and out_mask.shape == expected
        out_cv, _ = ResizeLongEdge(2177, resample="opencv")(image, None)
        assert out_cv.shape[:2] == expected


@pytest.mark.parametrize("shape,size", [((61, 97), 45), ((97, 61), 45), ((40, 30), 77), ((45, 33), 45)])
def test_resize_long_edge_is_pillows(shape, size):
    rng = np.random.default_rng(sum(shape))
    image = random_image(rng, *shape)
    mask = rng.integers(0, 66, shape).astype(np.uint8)
    out, out_mask = ResizeLongEdge(size)(image, mask)
    h, w = shape
    if max(h, w) == size:
        assert out is image and out_mask is mask
        return
    s = size / max(h, w)
    target = (int(w * s), int(h * s))
    assert np.array_equal(out, pil_reference(image, target, "bilinear"))
    assert np.array_equal(out_mask, pil_reference(mask, target, "nearest"))


def original_map_crop_val(image, mask, size):
    """The original's ResizeHeight(size) + CenterCropPad(size), statement by statement, on PIL."""
    img, msk = Image.fromarray(image), Image.fromarray(mask)
    w, h = img.size
    target_w = int(w / h * size)
    img, msk = img.resize((target_w, size), Image.BICUBIC), msk.resize((target_w, size), Image.NEAREST)
    w, h = img.size
    tw, th = size, size
    pad_x = tw - w if w < tw else 0
    pad_y = th - h if h < th else 0
    if pad_x or pad_y:
        img = ImageOps.expand(img, border=(pad_x, pad_y, pad_x, pad_y), fill=0)
        msk = ImageOps.expand(msk, border=(pad_x, pad_y, pad_x, pad_y), fill=IGNORE)
    x1 = int(round((w - tw) / 2.0))
    y1 = int(round((h - th) / 2.0))
    box = (x1, y1, x1 + tw, y1 + th)
    return np.asarray(img.crop(box)), np.asarray(msk.crop(box))


@pytest.mark.parametrize("shape,size", [((60, 80), 45), ((80, 60), 45), ((61, 97), 50), ((97, 61), 64),
                                        ((30, 30), 47), ((45, 90), 45)])
def test_map_crop_val_is_the_originals(shape, size):
    rng = np.random.default_rng(sum(shape) + size)
    image = random_image(rng, *shape)
    mask = rng.integers(0, 65, shape).astype(np.uint8)
    image2, mask2 = ResizeHeight(size)(image, mask)
    out, out_mask = CenterCropPad(size, IGNORE)(image2, mask2)
    ref, ref_mask = original_map_crop_val(image, mask, size)
    assert out.shape == ref.shape == (size, size, 3)
    assert np.array_equal(out, ref) and np.array_equal(out_mask, ref_mask)


def test_center_crop_pad_portrait_by_hand():
    """A 16-wide, 40-tall image to 40x40: padded by 24 columns each side, crop from column round(-12) = -12 of
    the padded image: 12 columns outside it (0 in the mask as PIL fills), 24 of padding (ignore), then 4 of
    the image's 16 columns fit."""
    image = np.full((40, 16, 3), 9, np.uint8)
    mask = np.full((40, 16), 3, np.uint8)
    out, out_mask = CenterCropPad(40, IGNORE)(image, mask)
    assert (out_mask[:, :12] == 0).all() and (out_mask[:, 12:36] == IGNORE).all() and (out_mask[:, 36:] == 3).all()
    assert (out[:, :36] == 0).all() and (out[:, 36:] == 9).all()


def test_build_transforms_options():
    cfg = DataConfig.make(crop_size=(32, 48))
    crop = build_transforms(cfg, True, IGNORE).joint[0]
    assert (crop.resample, crop.placement) == ("pil", "original")
    crop = build_transforms(cfg.updated(resample="opencv", crop_placement="uniform"), True,
                            IGNORE).joint[0]
    assert (crop.resample, crop.placement) == ("opencv", "uniform")
    val = build_transforms(cfg.updated(eval_size=45, resample="opencv"), False, IGNORE)
    assert [type(j).__name__ for j in val.joint] == ["ResizeLongEdge"] and val.joint[0].resample == "opencv"
    crop_val = build_transforms(cfg.updated(eval_size=45, map_crop_val=True), False, IGNORE)
    assert [type(j).__name__ for j in crop_val.joint] == ["ResizeHeight", "CenterCropPad"]
    image = random_image(np.random.default_rng(0), 60, 90)
    x, m = crop_val(image, np.zeros((60, 90), np.uint8))
    assert x.shape == (3, 45, 45) and m.shape == (45, 45)
    with pytest.raises(ValueError, match="map_crop_val needs data.eval_size"):
        build_transforms(cfg.updated(map_crop_val=True), False, IGNORE)
    with pytest.raises(ValueError, match="eval_native_labels"):
        build_transforms(cfg.updated(eval_size=45, map_crop_val=True, eval_native_labels=True),
                         False, IGNORE)


def test_config_keys():
    cfg = from_dict({"data": {"resample": "opencv", "crop_placement": "uniform", "map_crop_val": True, "eval_size": 45}})
    assert (cfg.data.resample, cfg.data.augment.crop_placement, cfg.data.map_crop_val) == ("opencv", "uniform", True)
    with pytest.raises(ConfigError, match=r"data\.resample: expected one of \['pil', 'opencv'\]"):
        from_dict({"data": {"resample": "cubic"}})
    with pytest.raises(ConfigError, match=r"data\.augment\.crop_placement"):
        from_dict({"data": {"crop_placement": "centre"}})
    with pytest.raises(ConfigError, match=r"data\.map_crop_val needs data\.eval_size"):  # at load, before any work
        from_dict({"data": {"map_crop_val": True}})


# ---------------------------------------------------------------------------------------------- RandAugment


def test_op_values_are_the_originals_formula():
    assert op_value("Solarize", 30) == 110 and op_value("Solarize", 15) == 55
    assert int(op_value("Posterize", 15)) == 6 and int(op_value("Posterize", 30)) == 8
    assert int(op_value("Posterize", 7)) == 4  # 4 + 4 * 7 / 30 = 4.93
    assert op_value("Brightness", 15) == pytest.approx(1.0) and op_value("Color", 0) == pytest.approx(0.1)
    assert op_value("Sharpness", 30) == pytest.approx(1.9) and op_value("Rotate", 10) == 10
    assert op_value("ShearX", 30) == pytest.approx(0.3) and op_value("TranslateY", 30) == pytest.approx(0.33)


class SignRng:
    """random() > 0.5 flips the sign in the original; this returns the value it is given."""

    def __init__(self, value: float):
        self.value = value

    def random(self):
        return self.value


def original_op(name: str, img: Image.Image, msk: Image.Image, v: float, flip: bool):
    """The original's op on PIL images (datasets/randaugment.py), its sign flip given."""
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate") and flip:
        v = -v
    affine = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
              "TranslateX": (1, 0, v * img.size[0], 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, v * img.size[1])}
    if name in affine:
        return (img.transform(img.size, Image.AFFINE, affine[name], resample=Image.BILINEAR, fillcolor=(0, 0, 0)),
                msk.transform(msk.size, Image.AFFINE, affine[name], resample=Image.NEAREST, fillcolor=IGNORE))
    if name == "Rotate":
        return img.rotate(v, fillcolor=(0, 0, 0)), msk.rotate(v, resample=Image.NEAREST, fillcolor=IGNORE)
    ops = {"Identity": lambda i: i, "AutoContrast": ImageOps.autocontrast, "Invert": ImageOps.invert,
           "Equalize": ImageOps.equalize, "Solarize": lambda i: ImageOps.solarize(i, v),
           "Posterize": lambda i: ImageOps.posterize(i, int(v)),
           "Color": lambda i: ImageEnhance.Color(i).enhance(v),
           "Brightness": lambda i: ImageEnhance.Brightness(i).enhance(v),
           "Sharpness": lambda i: ImageEnhance.Sharpness(i).enhance(v)}
    return ops[name](img), msk


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("magnitude", [0, 9, 30])
def test_randaugment_ops_are_pils(op, magnitude):
    rng = np.random.default_rng(magnitude)
    image = random_image(rng, 41, 57)
    mask = rng.integers(0, 19, (41, 57)).astype(np.uint8)
    t = RandAugment(1, magnitude, IGNORE, ops=(op,))
    v = (magnitude / 30) * (OPS_RANGES[op][1] - OPS_RANGES[op][0]) + OPS_RANGES[op][0]
    for draw, flip in ((0.9, True), (0.1, False)):
        out, out_mask = t.apply(op, image, mask, SignRng(draw))
        ref, ref_mask = original_op(op, Image.fromarray(image), Image.fromarray(mask), v, flip)
        assert np.array_equal(out, np.asarray(ref)) and np.array_equal(out_mask, np.asarray(ref_mask))


OPS_RANGES = {"Identity": (0, 1), "ShearX": (0, 0.3), "ShearY": (0, 0.3), "TranslateX": (0, 0.33),
              "TranslateY": (0, 0.33), "Rotate": (0, 30), "AutoContrast": (0, 1), "Invert": (0, 1),
              "Equalize": (0, 1), "Solarize": (0, 110), "Posterize": (4, 8), "Color": (0.1, 1.9),
              "Brightness": (0.1, 1.9), "Sharpness": (0.1, 1.9)}


def test_shear_is_about_the_origin():
    """ShearX maps output (x, y) to input (x + v*y, y): row 0 is unchanged, lower rows shift."""
    image = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 3, (20, 1, 3))
    mask = np.tile(np.arange(64, dtype=np.uint8)[None, :], (20, 1))
    out, out_mask = RandAugment(1, 30, IGNORE).apply("ShearX", image, mask, SignRng(0.1))
    assert np.array_equal(out_mask[0], mask[0]) and np.array_equal(out[0], image[0])
    assert out_mask[10, 0] == 3 and (out_mask[19, -5:] == IGNORE).all()  # 0.3 * 10 = 3 columns at row 10


def test_ops_are_drawn_with_replacement_and_uniformly():
    class Recording(RandAugment):
        def apply(self, name, image, mask, rng):
            self.seen.append(name)
            return image, mask

    t = Recording(2, 10, IGNORE)
    t.seen = []
    image = random_image(np.random.default_rng(1), 8, 8)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        t(image, None, rng)
    pairs = list(zip(t.seen[::2], t.seen[1::2]))
    assert sum(a == b for a, b in pairs) > 150  # with replacement: 3000 / 14 = 214 pairs of the same op expected
    counts = {op: t.seen.count(op) for op in OPS}
    assert min(counts.values()) > 330 and max(counts.values()) < 530  # 6000 / 14 = 429 each


# ---------------------------------------------------------------------------------------------- bilateral


def skimage_bilateral_reference(image: np.ndarray, sigma_spatial: float) -> np.ndarray:
    """skimage 0.16-0.18 denoise_bilateral(image, sigma_spatial=s, multichannel=True) * 255 -> uint8, per pixel,
    as its Python wrapper and Cython loop compute it."""
    vmax = int(image.max())
    win = max(5, 2 * int(math.ceil(3 * sigma_spatial)) + 1)
    img = np.multiply(image, 1.0 / 255, dtype=np.float64)
    sigma_color = img.std()
    color_lut = np.exp(-0.5 * (np.linspace(0, vmax, 10000, endpoint=False) ** 2 / sigma_color**2))
    grid = np.arange(-win // 2, win // 2 + 1)
    rr, cc = np.meshgrid(grid, grid, indexing="ij")
    range_lut = np.exp(-0.5 * (np.hypot(rr, cc) ** 2 / sigma_spatial**2)).ravel()
    rows, cols, dims = img.shape
    dist_scale = 10000 / dims / img.max()
    ext = (win - 1) // 2
    out = np.empty_like(img)
    for r in range(rows):
        for c in range(cols):
            total = [0.0] * dims
            total_weight = 0.0
            for wr in range(-ext, ext + 1):
                for wc in range(-ext, ext + 1):
                    rr_, cc_ = r + wr, c + wc
                    inside = 0 <= rr_ < rows and 0 <= cc_ < cols
                    values = [float(img[rr_, cc_, d]) if inside else 0.0 for d in range(dims)]
                    dist = 0.0
                    for d in range(dims):
                        t = float(img[r, c, d]) - values[d]
                        dist += t * t
                    dist = math.sqrt(dist)
                    weight = range_lut[(wr + ext) * win + (wc + ext)] * color_lut[min(int(dist * dist_scale), 9999)]
                    for d in range(dims):
                        total[d] += values[d] * weight
                    total_weight += weight
            for d in range(dims):  # 0/0 (every weight underflowed) is NaN, which the uint8 cast turns into 0
                out[r, c, d] = total[d] / total_weight if total_weight else math.nan
    return np.nan_to_num(out * 255, nan=0.0).astype(np.uint8)


@pytest.mark.parametrize("sigma", [0.05, 0.4, 0.7])
def test_bilateral_is_skimages_algorithm(sigma):
    rng = np.random.default_rng(int(sigma * 100))
    image = np.full((9, 11, 3), 120, np.uint8)
    image[:, 6:] = 121  # a near-flat region: the only place where the narrow colour kernel averages
    image += rng.integers(0, 3, image.shape).astype(np.uint8)
    image[2:4, 1:3] = 250
    expected = skimage_bilateral_reference(image, sigma)
    out = BilateralBlur.denoise(image, sigma)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert not np.array_equal(out, image)


def test_bilateral_bands_and_constant_images():
    rng = np.random.default_rng(0)
    image = rng.integers(100, 104, (23, 40, 3)).astype(np.uint8)
    whole = BilateralBlur.denoise(image, 0.5)
    try:
        BilateralBlur.BAND_PIXELS = 40 * 3  # 3 rows per band
        assert np.array_equal(BilateralBlur.denoise(image, 0.5), whole)
    finally:
        BilateralBlur.BAND_PIXELS = 16384
    # A constant image: skimage returns the uint8 input and the original's in-place `*= 255` wraps it.
    flat = np.full((4, 5, 3), 7, np.uint8)
    assert (BilateralBlur.denoise(flat, 0.5) == (7 * 255) % 256).all()
    blur = BilateralBlur()
    assert (blur.sigma_min, blur.sigma_max) == (0.05, 0.75)
    with pytest.raises(ValueError, match="sigma"):
        BilateralBlur(0.0, 1.0)
