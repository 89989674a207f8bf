"""Pillow-exact resizing of numpy arrays, whole or only a window of the result.

The original pipeline resized with `PIL.Image.resize`: BICUBIC and BILINEAR are antialiased when downscaling
(the filter support widens by the scale factor) and NEAREST samples source pixel floor((x + 0.5) * in / out).
Every function here returns exactly Pillow's uint8 values.

A window of the resized image is computed without resizing the whole image, and is still bit-identical to
`resize(...)[y0:y0+m, x0:x0+n]`, because Pillow resamples in two independent passes with a uint8 intermediate,
each pass's coefficients depending only on the input and output sizes of its own axis. For horizontal-first:
  * the horizontal pass runs only on the source rows that the window's vertical taps read;
  * the vertical pass runs only on the window's columns of that intermediate; the rows no tap of the window
    reads are left zero (they only change output rows outside the window);
and symmetrically for vertical-first. Recent Pillow (13.0 does) runs the vertical pass first when the height
shrinks by more than twice as many pixels as the width; older Pillow, such as the original's, always starts
horizontally (the orders round and clip the uint8 intermediate differently, so some pixels differ). Which rule the
installed Pillow follows is probed once, so a window always equals the installed Pillow's full resize.
Pillow's own `box=` argument cannot do this exactly: the box is single precision and moves every coefficient.
NEAREST windows are an index lookup that repeats Pillow's accumulation of the source position.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

NEAREST, BILINEAR, BICUBIC = "nearest", "bilinear", "bicubic"
_PIL_FILTERS = {NEAREST: Image.NEAREST, BILINEAR: Image.BILINEAR, BICUBIC: Image.BICUBIC}
_SUPPORT = {BILINEAR: 1.0, BICUBIC: 2.0}  # filter half-widths of Pillow's triangle and Keys (a = -0.5) kernels
# Below this fraction of the output, a window is computed on its own; above, the whole resize is as cheap.
_WINDOW_FRACTION = 0.6


def _check(array: np.ndarray, size: tuple[int, int], resample: str) -> None:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"expected a uint8 [H,W] mask or [H,W,3] RGB image, got {array.dtype} {array.shape}")
    if min(size) < 1:
        raise ValueError(f"resize target must be at least 1x1, got {size}")
    if resample not in _PIL_FILTERS:
        raise ValueError(f"resample must be one of {list(_PIL_FILTERS)}, got {resample!r}")


def _pil(array: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    # np.array, not asarray: a writable copy (asarray of a PIL image is a read-only view of its bytes).
    return np.array(Image.fromarray(np.ascontiguousarray(array)).resize(size, _PIL_FILTERS[resample]))


def pil_resize(array: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    """`Image.fromarray(array).resize(size, resample)` as an array; size is (width, height)."""
    _check(array, size, resample)
    return _pil(array, size, resample)


def nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output pixel of Pillow's NEAREST resize along one axis (-1: outside the source).

    Pillow starts at 0.5 * step and adds the step once per pixel (step = in / out in double precision), then
    truncates; the cumulative sum repeats that accumulation and its rounding exactly.
    """
    step = float(in_size) / out_size
    pos = np.full(out_size, step)
    pos[0] = step * 0.5
    index = np.floor(np.cumsum(pos)).astype(np.int64)
    index[(index < 0) | (index >= in_size)] = -1
    return index


_REORDERS: list[bool] = []  # [whether the installed Pillow may run the vertical pass first], probed once


def _pillow_reorders() -> bool:
    if not _REORDERS:
        # 18x80 -> 9x40 shrinks the height by 40 > 2 * 9 pixels: the two pass orders differ on this pattern.
        probe = (np.arange(80 * 18, dtype=np.int64).reshape(80, 18) * 37 % 251).astype(np.uint8)
        horizontal_first = _pil(_pil(probe, (9, 80), BICUBIC), (9, 40), BICUBIC)
        _REORDERS.append(not np.array_equal(_pil(probe, (9, 40), BICUBIC), horizontal_first))
    return _REORDERS[0]


def vertical_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether Pillow resizes (w, h) `in_size` to `out_size` with the vertical pass first."""
    shrink_h, shrink_w = in_size[1] - out_size[1], in_size[0] - out_size[0]
    return shrink_h > 0 and shrink_h > 2 * shrink_w and _pillow_reorders()


def _tap_span(in_size: int, out_size: int, first: int, last: int, resample: str) -> tuple[int, int]:
    """Source range [lo, hi) that Pillow's filter reads for outputs first..last along one axis (with a margin)."""
    scale = float(in_size) / out_size
    support = _SUPPORT[resample] * max(scale, 1.0)
    lo = int((first + 0.5) * scale - support + 0.5) - 2
    hi = int((last + 0.5) * scale + support + 0.5) + 2
    return max(lo, 0), min(hi, in_size)


def pil_resize_window(
    array: np.ndarray, size: tuple[int, int], window: tuple[int, int, int, int], resample: str
) -> np.ndarray:
    """`pil_resize(array, size, resample)[y0:y0+m, x0:x0+n]` for window (x0, y0, n, m), computing little else.

    The window must lie inside the resized image.
    """
    _check(array, size, resample)
    out_w, out_h = size
    x0, y0, n, m = window
    if n < 1 or m < 1 or x0 < 0 or y0 < 0 or x0 + n > out_w or y0 + m > out_h:
        raise ValueError(f"window {window} (x0, y0, width, height) is not inside the resized size {size}")
    in_h, in_w = array.shape[:2]
    if resample == NEAREST:
        xi = nearest_index(in_w, out_w)[x0 : x0 + n]
        yi = nearest_index(in_h, out_h)[y0 : y0 + m]
        out = array[np.ix_(np.maximum(yi, 0), np.maximum(xi, 0))]
        if (xi < 0).any() or (yi < 0).any():  # Pillow leaves pixels it cannot map at 0
            out[(yi < 0)[:, None] | (xi < 0)[None, :]] = 0
        return out
    if n * m >= _WINDOW_FRACTION * out_w * out_h:
        return _pil(array, size, resample)[y0 : y0 + m, x0 : x0 + n]
    if vertical_first((in_w, in_h), size):
        return _transpose(_first_pass_window(_transpose(array), (out_h, out_w), (y0, x0, m, n), resample))
    return _first_pass_window(array, size, window, resample)


def _transpose(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.swapaxes(0, 1))


def _first_pass_window(
    array: np.ndarray, size: tuple[int, int], window: tuple[int, int, int, int], resample: str
) -> np.ndarray:
    """The window of a horizontal-then-vertical resize (on a transposed array: vertical-then-horizontal)."""
    out_w, out_h = size
    x0, y0, n, m = window
    in_h, in_w = array.shape[:2]
    if out_h == in_h:
        rows, r0 = array[y0 : y0 + m], y0
    else:
        r0, r1 = _tap_span(in_h, out_h, y0, y0 + m - 1, resample)
        rows = array[r0:r1]
    if out_w != in_w:  # the horizontal pass alone (the height is unchanged), then the window's columns
        rows = _pil(rows, (out_w, rows.shape[0]), resample)
    rows = rows[:, x0 : x0 + n]
    if out_h == in_h:
        return np.ascontiguousarray(rows)
    tall = np.zeros((in_h, n) + array.shape[2:], np.uint8)
    tall[r0 : r0 + rows.shape[0]] = rows
    return _pil(tall, (n, out_h), resample)[y0 : y0 + m]
