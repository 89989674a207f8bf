"""Small building blocks shared by every model: norm factory, conv-bn-relu, heads, resize helpers, the CPU
SyncBatchNorm and the conversion of a built model to SyncBN."""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def norm2d(channels: int, **kwargs) -> nn.Module:
    """The one norm factory. SyncBN is obtained by converting the built model (sync_batchnorm), not here."""
    return nn.BatchNorm2d(channels, **kwargs)


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(norm2d(channels), nn.ReLU(inplace=True))


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize to an exact size (align_corners=False, as every resize of the original)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def resize_as(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return resize(x, ref.shape[-2:])


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """floor(H*s), floor(W*s): what F.interpolate(scale_factor=s, recompute_scale_factor=True) produces."""
    return int(math.floor(height * scale)), int(math.floor(width * scale))


def rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize of an image batch by a factor; identity for 1.0."""
    if scale == 1.0:
        return x
    return resize(x, scaled_size(x.shape[-2], x.shape[-1], scale))


def seg_head(in_ch: int, num_classes: int, bot_ch: int = 256) -> nn.Sequential:
    """Conv3-BN-ReLU, Conv3-BN-ReLU, Conv1 (no biases): the DeepLabV3+ `final` layout of the original."""
    return nn.Sequential(
        nn.Conv2d(in_ch, bot_ch, 3, padding=1, bias=False),
        norm2d(bot_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(bot_ch, bot_ch, 3, padding=1, bias=False),
        norm2d(bot_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(bot_ch, num_classes, 1, bias=False),
    )


def attn_head(in_ch: int, bot_ch: int = 256, out_ch: int = 1) -> nn.Sequential:
    """Scale-attention head (original `make_attn_head`): named layers, sigmoid output in (0, 1)."""
    return nn.Sequential(
        OrderedDict(
            [
                ("conv0", nn.Conv2d(in_ch, bot_ch, 3, padding=1, bias=False)),
                ("bn0", norm2d(bot_ch)),
                ("re0", nn.ReLU(inplace=True)),
                ("conv1", nn.Conv2d(bot_ch, bot_ch, 3, padding=1, bias=False)),
                ("bn1", norm2d(bot_ch)),
                ("re1", nn.ReLU(inplace=True)),
                ("conv2", nn.Conv2d(bot_ch, out_ch, 1, bias=False)),
                ("sig", nn.Sigmoid()),
            ]
        )
    )


def kaiming_init(*modules: nn.Module) -> None:
    """The original's `initialize_weights`: kaiming-normal convs/linears with zero bias, BN weight 1 bias 0."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class _AllReduceSum(torch.autograd.Function):
    """Sum across ranks; the gradient of a sum over ranks is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch across gloo ranks, on the CPU.

    torch's nn.SyncBatchNorm runs only on GPUs (its forward needs CUDA kernels and DDP refuses it on CPU
    modules), so CPU runs, the tests among them, use this: per-channel sum, sum of squares and count are
    all-reduced (differentiably, so the gradients equal those of one process on the global batch). Same
    parameters and buffers as nn.BatchNorm2d, hence the same checkpoints. With one process it is nn.BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # bf16/fp16 activations are normalised in float32, like torch's BN (sums are float64 in any case)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64)
        stats = torch.cat([xf.sum(dims, dtype=torch.float64), (xf * xf).sum(dims, dtype=torch.float64), count])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        inv = torch.rsqrt(var + self.eps).to(xf.dtype)
        y = (xf - mean.to(xf.dtype).view(shape)) * inv.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every nn.BatchNorm2d by nn.SyncBatchNorm (GPU) or CpuSyncBatchNorm (CPU), keeping its state.

    Subclasses of BatchNorm (e.g. a norm fused with an activation) are refused rather than silently converted
    into a plain SyncBatchNorm that would drop their extra behaviour.
    """
    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
            if type(module) is not nn.BatchNorm2d:
                raise ValueError(f"model.norm=syncbn: cannot convert {type(module).__name__} (only BatchNorm2d)")
            cls = nn.SyncBatchNorm if device.type == "cuda" else CpuSyncBatchNorm
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            new.load_state_dict(module.state_dict())
            if module.affine:
                new.weight.requires_grad_(module.weight.requires_grad)
                new.bias.requires_grad_(module.bias.requires_grad)
            new.train(module.training)
            return new.to(module.weight.device if module.affine else device)
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)
