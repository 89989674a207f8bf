"""CPU training convolutions with the faster weight-gradient routes (`utils.runtime.cpu_conv`): the forward pass and
the input gradient bit-equal to `nn.Conv2d`, the weight and bias gradients equal in float64 and at fp32 rounding in
float32, for every geometry the models use; the swap leaves parameters and state dicts alone; everything but CPU
training falls through to the plain convolution."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.runtime import cpu_conv
from utils.runtime.cpu_conv import CpuTrainingConv2d, route_weight_grads, weight_grad_route
from utils.runtime.layout import place_model

CPU = torch.device("cpu")

# (in, out, kernel, stride, padding, dilation, bias, size, channels-last), each through both routes: 3x3, strided,
# dilated (ASPP), 1x1 (the routed dilation 2, stride 2), a non-square kernel, 5x5 and 7x7 with odd sizes, NCHW
GEOMETRIES = [
    (5, 7, 3, 1, 1, 1, True, 9, True),
    (5, 7, 3, 1, 1, 1, False, 21, True),
    (5, 7, 3, 2, 1, 1, False, 10, False),
    (4, 6, 3, 1, 2, 2, True, 11, True),
    (4, 6, 3, 1, 6, 6, False, 23, True),
    (8, 3, 1, 1, 0, 2, True, 7, True),
    (8, 3, 1, 2, 0, 1, False, 8, False),
    (3, 4, 5, 1, 2, 1, True, 12, True),
    (3, 4, (3, 1), 1, (1, 0), 1, True, 20, True),
    (6, 5, 7, 2, 3, 1, True, 33, False),
]


ROUTES = ("flat", "native", "onednn", "taps")
_chosen = cpu_conv.weight_grad_route


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    """Every convolution's weight gradient through one route (flat only where it applies: stride 1)."""
    def forced(x_shape, weight_shape, out_shape, stride, padding):
        if request.param == "flat" and stride != (1, 1):
            return _chosen(x_shape, weight_shape, out_shape, stride, padding)
        return request.param
    monkeypatch.setattr(cpu_conv, "weight_grad_route", forced)
    return request.param


def _pair(dtype: torch.dtype, geometry: tuple) -> tuple[nn.Conv2d, nn.Conv2d, torch.Tensor]:
    c, k, ks, stride, pad, dil, bias, size, channels_last = geometry
    torch.manual_seed(0)
    plain = nn.Conv2d(c, k, ks, stride, pad, dil, bias=bias).to(dtype)
    routed = copy.deepcopy(plain)
    assert route_weight_grads(routed) == 1 and type(routed) is CpuTrainingConv2d
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain.to(memory_format=fmt)
    routed.to(memory_format=fmt)
    x = torch.randn(2, c, size, size + 3, dtype=dtype).contiguous(memory_format=fmt)
    return plain, routed, x


def _grads(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    y = conv(x)
    y.backward(torch.ones_like(y) if grad is None else grad)
    found = (y, x.grad, conv.weight.grad) + ((conv.bias.grad,) if conv.bias is not None else ())
    conv.zero_grad(set_to_none=True)
    return found


def _rel(ref: torch.Tensor, value: torch.Tensor) -> float:
    return ((value.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(g[:9]) for g in GEOMETRIES])
def test_float64_gradients_equal_the_plain_convolution(geometry, route):
    plain, routed, x = _pair(torch.float64, geometry)
    y = plain(x)
    grad = torch.randn_like(y)
    want, got = _grads(plain, x, grad), _grads(routed, x, grad)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])  # forward and input gradient: one call
    for w, g in zip(want[2:], got[2:]):
        assert g.shape == w.shape and _rel(w, g) < 1e-12


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(g[:9]) for g in GEOMETRIES])
def test_float32_weight_gradient_is_at_fp32_rounding(geometry, route):
    plain, routed, x = _pair(torch.float32, geometry)
    ref = copy.deepcopy(plain).double()
    grad = torch.randn_like(plain(x))
    exact = _grads(ref, x.double(), grad.double())
    want, got = _grads(plain, x, grad), _grads(routed, x, grad)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    for e, w, g in zip(exact[2:], want[2:], got[2:]):
        # no further from float64 than oneDNN's own sum (to within 10x), and never far: the same sum reordered
        assert _rel(e, g) < max(10 * _rel(e, w), 1e-6)


EDGES = [
    (3, 1, 12, 12, 8),  # every tap but the centre sees only padding (ASPP rate 12 on a small map)
    (3, 1, 6, 6, 8),  # off-centre taps see part of the map
    (3, 3, 2, 2, 13),
    (4, 2, 1, 1, 9),  # even kernel
    (4, 1, 1, 1, 9),
    (3, 2, 5, 3, 7),
    (1, 1, 0, 2, 6),  # the 1x1 convolutions as routed to oneDNN: dilation 2
]


@pytest.mark.parametrize("kernel, stride, padding, dilation, size, how",
                         [e + ("taps",) for e in EDGES] + [e + ("flat",) for e in EDGES if e[1] == 1])
def test_matrix_product_routes_at_the_map_edges(kernel, stride, padding, dilation, size, how):
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    zeros = torch.zeros(2, 3, kernel, kernel, dtype=torch.float64)
    grad = torch.randn(F.conv2d(x, zeros, None, stride, padding, dilation).shape, dtype=torch.float64)
    geometry = (stride, stride), (padding, padding), (dilation, dilation)
    want = torch.ops.aten.convolution_backward(grad, x, zeros, None, *map(list, geometry), False, [0, 0], 1,
                                               [False, True, False])[1]
    if how == "flat":
        got = cpu_conv._weight_grad_flat(grad, x, zeros.shape, geometry[1], geometry[2])
    else:
        got = cpu_conv._weight_grad_taps(grad, x, zeros.shape, *geometry)
    assert got.shape == want.shape and _rel(want, got) < 1e-12


def test_route_choice_by_shape():
    def route(x, w, out, stride=(1, 1), padding=(1, 1)):
        return weight_grad_route(x, w, out, stride, padding)

    assert route((2, 3, 256, 256), (64, 3, 3, 3), (2, 64, 128, 128), (2, 2)) == "onednn"  # the stem
    assert route((2, 48, 64, 64), (48, 48, 3, 3), (2, 48, 64, 64)) == "flat"  # padded 66² / 64² = 1.06
    assert route((2, 48, 64, 64), (48, 48, 3, 3), (2, 48, 32, 32), (2, 2)) == "taps"
    assert route((2, 384, 8, 8), (384, 384, 3, 3), (2, 384, 8, 8)) == "taps"  # 10² / 8² = 1.56
    assert route((2, 2048, 32, 32), (256, 2048, 3, 3), (2, 256, 32, 32), padding=(12, 12)) == "taps"
    assert route((2, 2048, 32, 32), (256, 2048, 1, 1), (2, 256, 32, 32), padding=(0, 0)) == "flat"
    assert route((2, 32, 8, 8), (32, 32, 3, 3), (2, 32, 8, 8)) == "native"  # 2.4 MFLOP: the calls cost more


def test_swap_keeps_parameters_state_dict_and_pickling():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.ConvTranspose2d(4, 4, 1), nn.Conv2d(4, 2, 1))
    params = [id(p) for p in model.parameters()]
    state = copy.deepcopy(model.state_dict())
    assert route_weight_grads(model) == 2
    assert [type(m).__name__ for m in model] == ["CpuTrainingConv2d", "BatchNorm2d", "Conv2d", "Conv2d", "Conv2d",
                                                 "ConvTranspose2d", "CpuTrainingConv2d"]
    assert all(isinstance(m, nn.Conv2d) for m in (model[0], model[6]))
    assert [id(p) for p in model.parameters()] == params
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded[0]) is CpuTrainingConv2d
    assert route_weight_grads(model) == 0  # already routed


def _backward_nodes(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__ if y.grad_fn is not None else "none"


def test_only_cpu_training_without_autocast_takes_the_function():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    route_weight_grads(conv)
    x = torch.randn(1, 3, 8, 8)
    assert _backward_nodes(conv(x)) == "_Conv2dFunctionBackward"
    with torch.no_grad():
        assert _backward_nodes(conv(x)) == "none"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16 and _backward_nodes(y) == "ConvolutionBackward0"
    y.float().sum().backward()  # the native backward under autocast
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32
    conv.weight.requires_grad_(False)
    assert _backward_nodes(conv(x.requires_grad_())) == "ConvolutionBackward0"


def _convolution_backward_calls(conv: nn.Conv2d, x: torch.Tensor) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        conv(x).sum().backward()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution_backward")


def test_input_gradient_only_when_the_input_needs_one():
    """The first layer's input (the image) needs no gradient: on the matrix-product routes no oneDNN backward runs
    at all; with an input that needs one, one call computes it."""
    conv = nn.Conv2d(64, 64, 3, padding=1)  # 19 MFLOP on a 16x16 map: the taps route
    route_weight_grads(conv)
    assert _convolution_backward_calls(conv, torch.randn(1, 64, 16, 16)) == 0
    assert _convolution_backward_calls(conv, torch.randn(1, 64, 16, 16, requires_grad=True)) == 1


def test_channels_last_cpu_placement_routes_and_contiguous_does_not():
    routed = place_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)), CPU, channels_last=True)
    plain = place_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)), CPU, channels_last=False)
    assert [type(m) for m in routed] == [CpuTrainingConv2d, CpuTrainingConv2d]
    assert [type(m) for m in plain] == [nn.Conv2d, nn.Conv2d]
    x = torch.randn(2, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    assert routed(x).is_contiguous(memory_format=torch.channels_last)
    assert F.conv2d(x, routed[0].weight, routed[0].bias).shape == routed[0](x).shape
