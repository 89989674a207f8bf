"""The RMI/BCE loss on channels-last logits (the default model layout): its gradient keeps that layout, without a
copy, and agrees with the contiguous computation to fp32 rounding."""
from __future__ import annotations

import torch

from loss.rmi import RMILoss


def _grad(logits: torch.Tensor, target: torch.Tensor, do_rmi: bool) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    value = RMILoss(19)(leaf, target, do_rmi)
    value.backward()
    return value.detach(), leaf.grad


def test_channels_last_logits_keep_their_layout_and_values():
    torch.manual_seed(0)
    x = torch.randn(2, 19, 37, 45)
    target = torch.randint(0, 19, (2, 37, 45))
    target[0, :3] = 255  # ignored rows: no gradient there from the BCE's label term
    for do_rmi in (True, False):
        v_ref, g_ref = _grad(x, target, do_rmi)
        v_cl, g_cl = _grad(x.contiguous(memory_format=torch.channels_last), target, do_rmi)
        assert g_cl.is_contiguous(memory_format=torch.channels_last) and not g_cl.is_contiguous()
        assert g_ref.is_contiguous()
        # element-wise kernels round some elements differently by position in memory: fp32 rounding, no more
        assert abs(v_cl - v_ref) <= 1e-6 * abs(v_ref)
        assert ((g_cl - g_ref).norm() / g_ref.norm()).item() < 1e-6
        # the label term: -1/(valid + 1) at each valid pixel's label channel, the sigmoid elsewhere
        s = torch.sigmoid(x)
        valid = (target != 255).sum()
        bce_only = _grad(x.contiguous(memory_format=torch.channels_last), target, False)[1]
        want = s / (valid + 1)
        mask = target != 255
        idx = target.clamp(max=18)
        want.scatter_add_(1, idx.unsqueeze(1), -torch.ones_like(s[:, :1]) / (valid + 1))
        want = want * mask.unsqueeze(1)
        assert ((bce_only - want).norm() / want.norm()).item() < 1e-6
