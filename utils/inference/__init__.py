"""Inference: the one `Inference` value (how to infer), multi-scale passes and fusions (multiscale.py), sliding
windows (window.py), video annotation (video.py) and ONNX export (export.py)."""
from .multiscale import Combo, Inference, MultiScalePass, has_attention, resolve_fusion, scale_outputs, sweep_combos, unwrap
from .window import check_window, sliding_forward, window_starts

__all__ = ["Combo", "Inference", "MultiScalePass", "check_window", "has_attention", "resolve_fusion", "scale_outputs",
           "sliding_forward", "sweep_combos", "unwrap", "window_starts"]
