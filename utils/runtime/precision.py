"""Mixed precision from one setting: fp32 | bf16 | fp16."""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """Autocast context for the forward pass (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of fp32, bf16, fp16; got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 has fp32's range); its state goes into checkpoints."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
