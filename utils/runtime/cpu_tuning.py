"""CPU-only kernel tuning for fp32 training on a CPU, opt-in with `run.cpu_tuning` (default off): the convolutions'
weight gradients computed by the kernel that is fastest for their shape and for the instruction set oneDNN runs on
this CPU. `tune_for_cpu` applies it; train.py calls it when the key is on. A GPU gets nothing from it, and no
researcher trains on a CPU; on the 2-core development machine it made the demo's training step about 1.1x faster,
within the noise of the demo's wall time and of the test suite's
(docs/benchmarks/cpu-tuning_cpu-2core_2026-12-08.md).

On a CPU in fp32 PyTorch computes a convolution's backward pass with oneDNN. How good oneDNN's channels-last weight
gradient is depends on the kernels it picks for the CPU (docs/performance.md, "Convolution weight gradients on a
CPU"):

* with AVX2 kernels it runs at 15-40 GFLOP/s where the forward pass and the input gradient run at 60-80, about
  half of a full-width training step. The same sums come out up to three times faster as one matrix product per
  kernel tap (the output gradient times the input pixels the tap sees);
* with AVX-512 kernels it runs at 150-210 GFLOP/s, two to three times faster than those matrix products (80-90
  GFLOP/s for PyTorch's `torch.mm` on the AMD core measured). Only convolutions whose taps mostly see zero padding
  (ASPP's large dilations on small maps) still gain, because the products skip the padding.

`weight_grad_route` picks one of:

* "native", oneDNN's own backward: tiny convolutions (under 10 MFLOP: narrow test models, 4x4 maps), and on
  AVX-512 everything but the padding-bound convolutions. Such convolutions run the plain `nn.Conv2d` call;
* "flat", for stride 1 on maps that padding enlarges by at most 15 % (AVX2): every tap's input is a view of one
  padded copy of the input, so nothing is copied per tap;
* "taps", for strided convolutions, small maps and large dilations (AVX2), and padding-bound ones (either): each
  tap's pixels are copied, and only where the tap sees the input, so taps that see only padding cost nothing;
* "onednn", for the stem (fewer than 16 input channels) on AVX2: oneDNN's weight gradient on contiguous (NCHW)
  copies.

The forward pass and the input gradient are oneDNN's own calls, bit-identical to a plain `nn.Conv2d`; the weight
gradient is the same sum in another order (fp32 rounding; against float64 it is as close or closer). Only
training on a CPU in fp32/fp64 without autocast takes this path; everything else (inference, CUDA, autocast,
grouped or non-zero-padded convolutions) is a plain `nn.Conv2d` call. The choice depends only on the shapes and
the instruction set, never on timings, so a run and its resumption compute the same sums.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_NATIVE_FLOPS = 10e6  # weight gradients below this many multiply-adds x 2 stay with oneDNN's own backward
_ONEDNN_CHANNELS = 16  # below this many input channels (the stem) oneDNN's contiguous kernel is the fast one
_FLAT_OVERHEAD = 1.15  # most padded-map pixels per output pixel for which the flat route's extra products pay
_SEEN_AVX512 = 0.5  # on AVX-512, the taps route where at most this share of the tap-pixel products sees the input
_BELOW_AVX512 = ("SSE", "AVX2")  # ONEDNN_MAX_CPU_ISA values (prefixes, and "AVX") that cap oneDNN below AVX-512


def tune_for_cpu(model: nn.Module, device: torch.device) -> str:
    """Route the weight gradients of `model`'s convolutions (`route_weight_grads`; parameters and state dict stay as
    they are) when `device` is a CPU; returns one line for the log saying what was done."""
    if device.type != "cpu":
        return f"run.cpu_tuning: nothing to tune on {device.type}"
    routed = route_weight_grads(model)
    rule = "AVX-512" if onednn_avx512() else "AVX2"
    return f"run.cpu_tuning: {routed} convolutions with weight gradients routed by shape ({rule} rule)"


@functools.lru_cache(maxsize=1)
def onednn_avx512() -> bool:
    """Whether oneDNN runs AVX-512 kernels here: the CPU has them (PyTorch's dispatch reports AVX512) and
    ONEDNN_MAX_CPU_ISA (older name DNNL_MAX_CPU_ISA), if set, does not cap oneDNN below them."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return not (cap == "AVX" or cap.startswith(_BELOW_AVX512))


def _valid(offset: int, stride: int, size: int, n_out: int) -> tuple[int, int]:
    """The output indices r (from, to) whose input index r * stride + offset lies inside 0 .. size - 1."""
    first = max(0, (stride - 1 - offset) // stride)
    return first, min(n_out, (size - 1 - offset) // stride + 1)


def _weight_grad_taps(grad: torch.Tensor, x: torch.Tensor, weight_shape: torch.Size, stride: tuple[int, int],
                      padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """One matrix product per tap over the output pixels where the tap sees the input, not the zero padding: a
    tap that only sees padding (large ASPP dilations on small maps) costs nothing. Copies each tap's pixels."""
    k, c, kh, kw = weight_shape
    _, _, out_h, out_w = grad.shape
    height, width = x.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xn, gn = x.permute(0, 2, 3, 1), grad.permute(0, 2, 3, 1)
    out = x.new_zeros(k, kh, kw, c)
    for i in range(kh):
        top = i * dh - ph
        r0, r1 = _valid(top, sh, height, out_h)
        for j in range(kw):
            left = j * dw - pw
            c0, c1 = _valid(left, sw, width, out_w)
            if r1 <= r0 or c1 <= c0:
                continue
            g = gn[:, r0:r1, c0:c1].reshape(-1, k)
            seen = xn[:, r0 * sh + top: (r1 - 1) * sh + top + 1: sh, c0 * sw + left: (c1 - 1) * sw + left + 1: sw]
            out[:, i, j] = g.t() @ seen.reshape(-1, c)
    return out.permute(0, 3, 1, 2)


def _weight_grad_flat(grad: torch.Tensor, x: torch.Tensor, weight_shape: torch.Size, padding: tuple[int, int],
                      dilation: tuple[int, int]) -> torch.Tensor:
    """Stride 1 only. The zero-padded input and the output gradient, widened with zeros to the padded map, as
    flat (pixels, channels) matrices: tap (i, j) then sees the input rows from offset i * dh * padded width +
    j * dw on, a view, so each tap is one product without a copy. The zeros cost (padded / output pixels) more
    multiplications, hence `_FLAT_OVERHEAD`."""
    k, c, kh, kw = weight_shape
    n, _, out_h, out_w = grad.shape
    height, width = x.shape[2:]
    (ph, pw), (dh, dw) = padding, dilation
    hp, wp = height + 2 * ph, width + 2 * pw
    rows = n * hp * wp
    flat_x = x.new_zeros(rows + (kh - 1) * dh * wp + (kw - 1) * dw, c)  # the last image's taps run past its end
    flat_x[:rows].view(n, hp, wp, c)[:, ph: ph + height, pw: pw + width] = x.permute(0, 2, 3, 1)
    wide_g = grad.new_zeros(n, hp, wp, k)
    wide_g[:, :out_h, :out_w] = grad.permute(0, 2, 3, 1)
    g = wide_g.view(rows, k).t()
    out = x.new_empty(k, kh, kw, c)
    for i in range(kh):
        for j in range(kw):
            start = i * dh * wp + j * dw
            out[:, i, j] = g @ flat_x[start: start + rows]
    return out.permute(0, 3, 1, 2)


def seen_share(x_shape: Sequence[int], weight_shape: Sequence[int], out_shape: Sequence[int],
               stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> float:
    """The share of a convolution's (tap, output pixel) products whose input pixel lies inside the map, not in the
    zero padding: 1 for a 1x1 kernel, about 0.25 for ASPP's rate 24 on a 32x32 map."""
    share = 1.0
    for axis in (0, 1):
        size, n_out, taps = x_shape[2 + axis], out_shape[2 + axis], weight_shape[2 + axis]
        seen = 0
        for i in range(taps):
            first, last = _valid(i * dilation[axis] - padding[axis], stride[axis], size, n_out)
            seen += max(0, last - first)
        share *= seen / (taps * n_out)
    return share


def weight_grad_route(x_shape: Sequence[int], weight_shape: Sequence[int], out_shape: Sequence[int],
                      stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int] = (1, 1),
                      avx512: bool | None = None) -> str:
    """Which kernel computes a weight gradient: "native" (oneDNN's own backward), "onednn" (contiguous copies),
    "flat" or "taps". `avx512`: the rule for oneDNN's AVX-512 kernels (default: `onednn_avx512()`)."""
    k, c, kh, kw = weight_shape
    if 2 * out_shape[0] * out_shape[2] * out_shape[3] * k * c * kh * kw < _NATIVE_FLOPS:
        return "native"
    if onednn_avx512() if avx512 is None else avx512:
        bound = seen_share(x_shape, weight_shape, out_shape, stride, padding, dilation) <= _SEEN_AVX512
        return "taps" if bound else "native"
    if c < _ONEDNN_CHANNELS:
        return "onednn"
    padded = (x_shape[2] + 2 * padding[0]) * (x_shape[3] + 2 * padding[1])
    if stride == (1, 1) and padded <= _FLAT_OVERHEAD * out_shape[2] * out_shape[3]:
        return "flat"
    return "taps"


def weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int], route: str | None = None) -> torch.Tensor:
    """d loss / d weight of a 2-d convolution (groups 1) by `route`, by default the one `weight_grad_route` picks."""
    route = route or weight_grad_route(x.shape, weight.shape, grad.shape, stride, padding, dilation)
    if route == "native":
        return onednn_backward(grad, x, weight, stride, padding, dilation, [False, True, False])[1]
    if route == "onednn":
        return onednn_backward(grad.contiguous(), x.contiguous(), weight.contiguous(), stride, padding, dilation,
                               [False, True, False])[1]
    if route == "flat":
        return _weight_grad_flat(grad, x, weight.shape, padding, dilation)
    return _weight_grad_taps(grad, x, weight.shape, stride, padding, dilation)


def onednn_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], mask: list[bool]) -> tuple[torch.Tensor, ...]:
    """oneDNN's convolution backward (PyTorch's own) for the gradients `mask` selects: input, weight, bias."""
    return torch.ops.aten.convolution_backward(grad, x, weight, None, list(stride), list(padding), list(dilation),
                                               False, [0, 0], 1, mask)


class _Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, route):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation)
        ctx.route = route
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        grad_x = grad_w = grad_b = None
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if want_x:
            grad_x = onednn_backward(grad, x, weight, stride, padding, dilation, [True, False, False])[0]
        if want_w:
            grad_w = weight_grad(grad, x, weight, stride, padding, dilation, ctx.route)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def conv_out_shape(x_shape: Sequence[int], weight_shape: Sequence[int], stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """The output shape of a 2-d convolution of a batched input (the formula of `nn.Conv2d`'s documentation)."""
    size = [(x_shape[2 + a] + 2 * padding[a] - dilation[a] * (weight_shape[2 + a] - 1) - 1) // stride[a] + 1
            for a in (0, 1)]
    return x_shape[0], weight_shape[0], size[0], size[1]


class CpuTrainingConv2d(nn.Conv2d):
    """`nn.Conv2d` whose CPU training backward takes `_Conv2dFunction` where `weight_grad_route` picks another
    route than oneDNN's own; the same module in every other respect (parameters, state dict, forward values)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (torch.is_grad_enabled() and weight.requires_grad and input.device.type == "cpu"
                and input.dtype == weight.dtype and input.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu") and input.dim() == 4):
            geometry = self.stride, self.padding, self.dilation
            route = weight_grad_route(input.shape, weight.shape, conv_out_shape(input.shape, weight.shape, *geometry),
                                      *geometry)
            if route != "native":  # the plain call is oneDNN's own backward without the Function's overhead
                return _Conv2dFunction.apply(input, weight, bias, *geometry, route)
        return super()._conv_forward(input, weight, bias)


def route_weight_grads(model: nn.Module) -> int:
    """Make every plain zero-padded, ungrouped `nn.Conv2d` of `model` a `CpuTrainingConv2d`; returns how many.

    The class is swapped in place: parameters, buffers, hooks and the state dict stay as they are."""
    count = 0
    for m in model.modules():
        if (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
                and not isinstance(m.padding, str)):
            m.__class__ = CpuTrainingConv2d
            count += 1
    return count
