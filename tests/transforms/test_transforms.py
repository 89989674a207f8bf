"""Joint transforms keep image and mask aligned; photometric transforms and normalisation do what they say."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from transforms import (
    BilateralBlur,
    ColorJitter,
    GaussianBlur,
    HorizontalFlip,
    Normalize,
    RandomScaleCrop,
    ResizeLongEdge,
    build_transforms,
)
from utils.config import DataConfig

IGNORE = 255
COLORS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)], np.uint8)


def blocks(h: int = 60, w: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A mask of rectangles of classes 0..5 and an image whose colour is the class colour."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        mask[y : y + rng.integers(8, h // 2), x : x + rng.integers(8, w // 2)] = rng.integers(0, len(COLORS))
    return COLORS[mask], mask


def assert_aligned(image: np.ndarray, mask: np.ndarray, tol: int = 40, size: int = 3) -> int:
    """Wherever the size x size neighbourhood of the mask holds one label, the image shows that label's colour
    (black for padding). Returns how many pixels were checked. (Downscaled masks need size 5: nearest sampling
    may skip a thin source structure that bicubic interpolation still shows.)"""
    k = np.ones((size, size), np.uint8)
    # Constant borders that never agree: pixels near the crop edge may depend on unseen neighbours.
    uniform = cv2.erode(mask, k, borderType=cv2.BORDER_CONSTANT, borderValue=0) == cv2.dilate(
        mask, k, borderType=cv2.BORDER_CONSTANT, borderValue=254)
    expected = np.where((mask == IGNORE)[..., None], 0, COLORS[np.minimum(mask, len(COLORS) - 1)])
    diff = np.abs(image.astype(int) - expected.astype(int)).max(axis=2)
    bad = uniform & (diff > tol)
    assert not bad.any(), f"{bad.sum()} misaligned pixels, e.g. at {np.argwhere(bad)[:3].tolist()}"
    return int(uniform.sum())


@pytest.mark.parametrize("options", [("pil", "original"), ("opencv", "uniform"), ("opencv", "original")])
@pytest.mark.parametrize("scale", [(0.5, 0.5), (1.0, 1.0), (2.0, 2.0), (0.4, 2.5)])
@pytest.mark.parametrize("seed", range(4))
def test_scale_crop_keeps_image_and_mask_aligned(scale, seed, options):
    image, mask = blocks(seed=seed)
    t = RandomScaleCrop((48, 64), scale[0], scale[1], ignore_index=IGNORE, resample=options[0], placement=options[1])
    out, out_mask = t(image, mask, np.random.default_rng(seed))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert out_mask.shape == (48, 64) and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= set(range(len(COLORS))) | {IGNORE}
    assert assert_aligned(out, out_mask, size=3 if scale[0] >= 1 else 5) > 500


def test_scale_crop_equals_resize_then_crop_opencv():
    """resample=opencv, scale 2 with no padding: the mask is exactly the nearest-resized mask's window, the image
    the bicubic one up to a sub-pixel shift. (resample=pil is bit-exact: tests/transforms/test_transforms_pil.py.)"""
    image, mask = blocks()
    t = RandomScaleCrop((40, 50), 2.0, 2.0, ignore_index=IGNORE, resample="opencv", placement="uniform")
    out, out_mask = t(image, mask, np.random.default_rng(3))
    big_mask = cv2.resize(mask, (180, 120), interpolation=cv2.INTER_NEAREST_EXACT)
    big = cv2.resize(image, (180, 120), interpolation=cv2.INTER_CUBIC)
    hits = [(y, x) for y in range(120 - 40 + 1) for x in range(180 - 50 + 1)
            if np.array_equal(big_mask[y : y + 40, x : x + 50], out_mask)]
    assert hits, "the crop is not a window of the resized mask"
    y, x = hits[0]
    assert np.abs(big[y : y + 40, x : x + 50].astype(int) - out.astype(int))[2:-2, 2:-2].max() <= 2


def test_small_image_is_padded_with_zero_and_ignore():
    image, mask = blocks(20, 30)
    out, out_mask = RandomScaleCrop((50, 60), 1.0, 1.0, ignore_index=IGNORE)(image, mask, np.random.default_rng(0))
    valid = out_mask != IGNORE
    assert valid.sum() == 20 * 30
    ys, xs = np.nonzero(valid)
    assert ys.max() - ys.min() + 1 == 20 and xs.max() - xs.min() + 1 == 30  # one rectangle: the whole image
    assert (out[~valid] == 0).all()
    y0, x0 = ys.min(), xs.min()
    assert np.array_equal(out_mask[y0 : y0 + 20, x0 : x0 + 30], mask)
    assert np.abs(out[y0 : y0 + 20, x0 : x0 + 30].astype(int) - image.astype(int)).max() <= 1


def test_pre_size_scales_the_long_edge():
    image, mask = blocks(60, 90)
    # s ~ U(1, 1) * 180 / 90: the scaled image is 120x180, larger than the crop, so nothing is padded.
    t = RandomScaleCrop((100, 170), 1.0, 1.0, long_edge=180, ignore_index=IGNORE)
    out, out_mask = t(image, mask, np.random.default_rng(0))
    assert (out_mask != IGNORE).all()
    assert_aligned(out, out_mask)


@pytest.mark.parametrize("seed", range(30))
def test_uniform_crop_contains_the_centroid(seed):
    """placement=uniform (ours) always keeps the centroid; the original's placement may not (test_transforms_pil)."""
    rng = np.random.default_rng(seed)
    h, w = 80, 120
    mask = np.zeros((h, w), np.uint8)
    cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
    mask[max(cy - 2, 0) : cy + 3, max(cx - 2, 0) : cx + 3] = 5  # a 5x5 blob survives a 0.5 nearest downscale
    image = COLORS[mask]
    crop = (int(rng.integers(16, 100)), int(rng.integers(16, 140)))
    t = RandomScaleCrop(crop, 0.5, 2.0, ignore_index=IGNORE, placement="uniform")
    _, out_mask = t(image, mask, rng, centroid=(cx, cy))
    assert (out_mask == 5).any(), f"centroid {(cx, cy)} lost with crop {crop}"


def test_flip_mirrors_both():
    image, mask = blocks()
    out, out_mask = HorizontalFlip(1.0)(image, mask, np.random.default_rng(0))
    assert np.array_equal(out, image[:, ::-1]) and np.array_equal(out_mask, mask[:, ::-1])
    same, same_mask = HorizontalFlip(0.0)(image, mask, np.random.default_rng(0))
    assert same is image and same_mask is mask


def test_flip_rate_is_about_half():
    mask = np.arange(64, dtype=np.uint8).reshape(8, 8)
    image = np.repeat(mask[..., None], 3, axis=2)
    rng = np.random.default_rng(0)
    flips = sum(not np.array_equal(HorizontalFlip(0.5)(image, mask, rng)[1], mask) for _ in range(400))
    assert 150 < flips < 250


@pytest.mark.parametrize("resample", ["pil", "opencv"])
def test_resize_long_edge(resample):
    image, mask = blocks(60, 90)
    out, out_mask = ResizeLongEdge(45, resample=resample)(image, mask)
    assert out.shape == (30, 45, 3) and out_mask.shape == (30, 45)
    assert_aligned(out, out_mask, tol=40)
    _, native = ResizeLongEdge(45, resize_mask=False)(image, mask)
    assert native is mask


def test_color_jitter():
    image, _ = blocks()
    image = (image // 2 + 60).astype(np.uint8)
    assert np.array_equal(ColorJitter(0.0)(image, np.random.default_rng(0)), image)
    a = ColorJitter(0.4)(image, np.random.default_rng(1))
    b = ColorJitter(0.4)(image, np.random.default_rng(1))
    assert a.dtype == np.uint8 and a.shape == image.shape and np.array_equal(a, b)
    outs = [ColorJitter(0.4)(image, np.random.default_rng(s)) for s in range(8)]
    assert len({o.tobytes() for o in outs}) == 8
    means = [o.mean() for o in outs]
    assert max(means) - min(means) > 10  # brightness/contrast really vary
    with pytest.raises(ValueError, match="strength"):
        ColorJitter(0.7)


def test_hue_shift_rotates_colours():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200
    jitter = ColorJitter(0.5)
    hues = set()
    for s in range(20):
        out = jitter(red, np.random.default_rng(s))
        hues.add(int(np.argmax(out[0, 0])))
    assert len(hues) >= 2  # red becomes green- or blue-dominant for large hue shifts


def test_blurs_smooth_but_keep_shape():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for blur in (GaussianBlur(), BilateralBlur()):
        out = blur(noise, np.random.default_rng(1))
        assert out.shape == noise.shape and out.dtype == np.uint8
        assert np.abs(np.diff(out.astype(int), axis=1)).mean() < np.abs(np.diff(noise.astype(int), axis=1)).mean()


def test_normalize():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = (124, 116, 104)
    image[1, 2] = (255, 255, 255)
    t = Normalize()(image)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32 and t.is_contiguous()
    assert torch.allclose(t[:, 0, 0], torch.zeros(3), atol=0.01)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(t[:, 1, 2], expected, atol=1e-5)


def test_build_transforms_train_and_val():
    cfg = DataConfig.make(crop_size=(32, 48))
    image, mask = blocks()
    train = build_transforms(cfg, train=True, ignore_index=IGNORE)
    img_t, mask_t = train(image, mask, np.random.default_rng(0))
    assert img_t.shape == (3, 32, 48) and img_t.dtype == torch.float32
    assert mask_t.shape == (32, 48) and mask_t.dtype == torch.int64
    val = build_transforms(cfg, train=False, ignore_index=IGNORE)
    img_v, mask_v = val(image, mask)
    assert img_v.shape == (3, 60, 90) and torch.equal(mask_v, torch.from_numpy(mask.astype(np.int64)))
    sized = build_transforms(cfg.updated(eval_size=45), train=False, ignore_index=IGNORE)
    assert sized(image, mask)[0].shape == (3, 30, 45)
    assert build_transforms(cfg.updated(eval_size=45, eval_native_labels=True), False, IGNORE)(
        image, mask)[1].shape == (60, 90)


def test_photometric_ops_do_not_move_the_mask():
    """Same seed with and without jitter/blur: the geometric draws come first, so the masks are identical, and
    the unnormalised image stays aligned with its mask."""
    image, mask = blocks(seed=5)
    cfg = DataConfig.make(crop_size=(40, 56))
    full = build_transforms(cfg, True, IGNORE)
    plain = build_transforms(cfg.updated(color_jitter=0.0, gaussian_blur=False), True, IGNORE)
    for seed in range(5):
        _, m1 = full(image, mask, np.random.default_rng(seed))
        x2, m2 = plain(image, mask, np.random.default_rng(seed))
        assert torch.equal(m1, m2)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        rgb = ((x2 * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        assert_aligned(rgb, m2.numpy().astype(np.uint8))


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop_size"):
        RandomScaleCrop((0, 10))
    with pytest.raises(ValueError, match="scale_min"):
        RandomScaleCrop((10, 10), 2.0, 1.0)
    with pytest.raises(ValueError, match="ignore_index"):
        RandomScaleCrop((10, 10), ignore_index=300)


@pytest.mark.parametrize("op", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
def test_randaugment_geometric_ops_move_the_mask(op):
    from transforms.randaugment import RandAugment

    image, mask = blocks(seed=2)
    t = RandAugment(1, 30, ignore_index=IGNORE, ops=(op,))
    out, out_mask = t(image, mask, np.random.default_rng(0))
    assert out.shape == image.shape and out_mask.shape == mask.shape
    assert not np.array_equal(out_mask, mask) and (out_mask == IGNORE).any()  # moved, border filled with ignore
    assert set(np.unique(out_mask)) <= set(range(len(COLORS))) | {IGNORE}
    assert_aligned(out, out_mask, tol=40)


@pytest.mark.parametrize("op", ["Identity", "AutoContrast", "Invert", "Equalize", "Solarize", "Posterize", "Color",
                                "Brightness", "Sharpness"])
def test_randaugment_colour_ops_leave_the_mask(op):
    from transforms.randaugment import RandAugment

    image, mask = blocks(seed=3)
    image = (image.astype(int) * 3 // 4 + 40).astype(np.uint8)  # 40..231: room for every op to act
    out, out_mask = RandAugment(1, 20, ops=(op,))(image, mask, np.random.default_rng(1))
    assert out_mask is mask and out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out, image) == (op == "Identity")


def test_randaugment_in_build_transforms():
    cfg = DataConfig.make(crop_size=(32, 48), rand_augment=(2, 15))
    t = build_transforms(cfg, True, IGNORE)
    assert any(type(j).__name__ == "RandAugment" for j in t.joint)
    image, mask = blocks()
    x, m = t(image, mask, np.random.default_rng(0))
    assert x.shape == (3, 32, 48) and m.shape == (32, 48)
    with pytest.raises(ValueError, match="RandAugment"):
        build_transforms(DataConfig.make(rand_augment=(2, 40)), True, IGNORE)
    with pytest.raises(ValueError, match="rand_augment"):
        build_transforms(DataConfig.make(rand_augment=(2,)), True, IGNORE)
