"""Training steps in fp16 and bf16 autocast against fp32, on the CPU and, when there is one, on a CUDA device (the
`gpu`-marked cases, run by scripts/gpu_check.sh).

What a lower precision must keep, on the tiny HRNet-OCR model of the RMI recipe:
- the first step's loss (no update yet) within its precision's unit roundoff of the fp32 loss;
- fp16's loss scaling: with PyTorch's initial scale (2^16) the first steps overflow, and an overflowing step changes
  no parameter and halves the scale, until a step is taken;
- training: the loss falls over ten steps by what fp32's falls, within 40 %;
- the optimizer that train.py builds for the precision (on CUDA fp32/bf16 get the fused SGD kernel, fp16 does not):
  a skipped step leaves it as it was, so the next update is stock SGD's.

On the CPU, over five model seeds, the fall ratio was 0.87-1.13 and the first loss within 0.2 unit roundoffs.

One step's parameter update is not compared element-wise: at random initialisation it is ill-conditioned. Measured
on this model at 64-256 px: an fp32 step on an input perturbed by 2^-8 (relative) moves the update by 44 % to over
100 % (relative norm), and bf16 and fp16 steps differ from fp32 by 13-140 %. No rounding-sized bound on the update
would hold, and a loose one would also pass a skipped step's zero update.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import network
from loss import build_criterion
from train import build_optimizer
from utils.config import LossConfig, load_config
from utils.engine import train_step
from utils.runtime.precision import autocast, grad_scaler

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")])
DEVICES = ["cpu", CUDA]
UNIT = {"fp16": 2.0**-11, "bf16": 2.0**-8}
CLASSES = 5
STEPS = 10
FP16_MAX = torch.finfo(torch.float16).max
INIT_SCALE = 2.0**16  # torch.amp.GradScaler's default, which grad_scaler keeps


@contextlib.contextmanager
def true_fp32(device: torch.device) -> Iterator[None]:
    """fp32 without TF32 on CUDA (cuDNN convolutions default to TF32, a 10-bit mantissa)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tiny_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return network.build_model("hmsa_ocrnet_hrnet_w48", CLASSES, trunk="hrnet_w18_small", mid_ch=16, key_ch=8,
                               attn_ch=16).to(device).train()


def learnable_batch(device: torch.device, n: int = 2, size: int = 64) -> dict[str, torch.Tensor]:
    """Random images whose labels are the quintiles of a smoothed channel: a task the model can start to learn in a
    few steps (random labels would leave the loss flat)."""
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(n, 3, size, size, generator=gen)
    smooth = F.avg_pool2d(image[:, :1], 9, stride=1, padding=4)[:, 0]
    edges = torch.quantile(smooth.flatten(), torch.linspace(0, 1, CLASSES + 1)[1:-1])
    return {"image": image.to(device), "mask": torch.bucketize(smooth, edges).to(device)}


def criterion():
    return build_criterion(LossConfig(main="rmi", aux="bce", scale="bce", aux_weight=0.4, scale_weight=0.05),
                           CLASSES, 255)


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def optimizer(model: nn.Module, precision: str) -> torch.optim.Optimizer:
    """train.py's optimizer for `precision`: SGD, lr 0.01, momentum 0.9, weight decay 1e-4 (the defaults)."""
    return build_optimizer(load_config(None, [f"run.precision={precision}"]), model)


def train(precision: str, device: torch.device, steps: int = STEPS) -> tuple[list[float], int]:
    """(the loss of each taken step, the number of skipped ones): train.py's optimizer on one batch, dropout seeded
    per attempt so that every precision draws the same masks."""
    model = tiny_model(device)
    opt = optimizer(model, precision)
    scaler = grad_scaler(precision, device)
    loss, batch = criterion(), learnable_batch(device)
    low = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def crit(outputs, target):
        # autocast is on: each scale's prediction comes in the low precision (the fusion and the loss are fp32)
        assert outputs["pred_1.0x"].dtype == low and outputs["pred"].dtype == torch.float32, precision
        return loss(outputs, target)

    losses: list[float] = []
    skipped = 0
    while len(losses) < steps:
        assert skipped <= 16, f"{precision}: more than 16 skipped steps (scale {scaler.get_scale()})"
        scale = scaler.get_scale() if scaler.is_enabled() else None
        torch.manual_seed(3 + len(losses))
        terms = train_step(model, [batch], crit, opt, scaler, precision=precision, device=device)
        assert all(v.dtype == torch.float32 for v in terms.values()), {k: v.dtype for k, v in terms.items()}
        if scale is not None and scaler.get_scale() < scale:
            skipped += 1
            continue
        losses.append(terms["loss"].item())
    return losses, skipped


@functools.cache
def fp32_losses(device_type: str) -> list[float]:
    """The fp32 reference of `train`, once per device type for both low precisions."""
    device = torch.device(device_type)
    with true_fp32(device):
        losses, skipped = train(precision="fp32", device=device)
    assert skipped == 0
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_training_follows_fp32(device, precision):
    ref = fp32_losses(device)
    device = torch.device(device)
    losses, skipped = train(precision, device)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert abs(losses[0] - ref[0]) <= UNIT[precision] * ref[0], (precision, losses[0], ref[0])
    fall, ref_fall = losses[0] - losses[-1], ref[0] - ref[-1]
    assert ref_fall >= 0.08 * ref[0], f"fp32 learns too little to compare with: {ref}"
    assert 0.6 * ref_fall <= fall <= 1.4 * ref_fall, (precision, losses, ref)
    assert (skipped > 0) == (precision == "fp16")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_fp16_overflow_skips_the_step_and_halves_the_scale(device):
    device = torch.device(device)
    # The premise, from fp32: some gradient exceeds fp16's range once multiplied by the initial scale.
    model = tiny_model(device)
    crit, batch = criterion(), learnable_batch(device)
    torch.manual_seed(3)
    with true_fp32(device):
        total, _ = crit(model(batch["image"]), batch["mask"])
    total.backward()
    largest = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    assert largest * INIT_SCALE > 2 * FP16_MAX, largest

    model = tiny_model(device)
    opt = optimizer(model, "fp16")
    scaler = grad_scaler("fp16", device)
    start = params(model)
    torch.manual_seed(3)
    train_step(model, [batch], crit, opt, scaler, precision="fp16", device=device)
    assert scaler.get_scale() == INIT_SCALE / 2
    assert torch.equal(params(model), start) and not opt.state  # skipped: no update, no momentum buffers
    for _ in range(16):
        scale = scaler.get_scale()
        torch.manual_seed(3)
        train_step(model, [batch], crit, opt, scaler, precision="fp16", device=device)
        if scaler.get_scale() == scale:
            break
        assert scaler.get_scale() == scale / 2 and torch.equal(params(model), start)
    moved = params(model) - start
    assert torch.isfinite(moved).all() and moved.abs().max() > 0 and len(opt.state) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_skipped_fp16_step_leaves_the_optimizer_as_it_was(device):
    """Two steps, the first overflowing: train.py's fp16 optimizer ends where stock SGD after the second step alone
    does. (torch's fused SGD does not: it keeps the skipped step's momentum buffers, measured on the CPU as 3e33.)"""
    device = torch.device(device)
    torch.manual_seed(0)
    start = nn.Linear(64, 64).to(device)
    x = torch.randn(8, 64, device=device)
    ends = {}
    for name in ("train.py", "stock"):
        model = nn.Linear(64, 64).to(device)
        model.load_state_dict(start.state_dict())
        opt = (optimizer(model, "fp16") if name == "train.py" else
               torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=False))
        scaler = grad_scaler("fp16", device)
        for factor in ((1e30, 1.0) if name == "train.py" else (1.0,)):
            opt.zero_grad(set_to_none=True)
            with autocast("fp16", device):
                y = model(x)
            scaler.scale(y.float().square().mean() * factor).backward()  # x1e30: the fp16 gradients overflow
            scaler.step(opt)
            scaler.update()
            if factor != 1.0:
                assert scaler.get_scale() == INIT_SCALE / 2 and not opt.state
                assert torch.equal(model.weight, start.weight.to(device))
        ends[name] = [p.detach() for p in model.parameters()]
    for a, b in zip(ends["train.py"], ends["stock"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
