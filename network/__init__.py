"""Model registry: `build_model(name, num_classes, **options)` and `list_models()`.

Our names are registered with `register_model`; the original code base's `--arch` names are aliases that may
pin some options (e.g. `mscale.DeepV3R50` is `hmsa_deeplabv3plus` with the resnet50 trunk).
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}


def register_model(name: str, aliases: dict[str, dict[str, Any]] | None = None):
    """Decorator registering a model factory (a class or function taking num_classes first)."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' registered twice")
        _REGISTRY[name] = factory
        for alias, pinned in (aliases or {}).items():
            _ALIASES[alias] = (name, dict(pinned))
        return factory

    return wrap


def list_models(include_aliases: bool = False) -> list[str]:
    names = sorted(_REGISTRY)
    return names + sorted(_ALIASES) if include_aliases else names


def resolve_name(name: str) -> tuple[str, dict[str, Any]]:
    """Registered name and pinned options for a name or alias; a clear error for an unknown one."""
    if name in _REGISTRY:
        return name, {}
    if name in _ALIASES:
        return _ALIASES[name]
    known = list_models(include_aliases=True)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"unknown model '{name}'{hint} (registered: {', '.join(known)})")


def model_options(name: str) -> list[str]:
    """Keyword options the factory of `name` accepts (besides num_classes)."""
    factory = _REGISTRY[resolve_name(name)[0]]
    params = inspect.signature(factory).parameters
    return [p for p in params if p not in ("self", "num_classes")]


def option_defaults(name: str) -> dict[str, Any]:
    """The value each option of `name` takes when a config does not set it (an alias's pinned values included)."""
    target, pinned = resolve_name(name)
    params = inspect.signature(_REGISTRY[target]).parameters
    defaults = {p: params[p].default for p in model_options(target) if params[p].default is not inspect.Parameter.empty}
    return {**defaults, **pinned}


def build_model(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build a registered model; unknown options fail with the closest valid one."""
    target, pinned = resolve_name(name)
    valid = model_options(target)
    for key, value in options.items():
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"model '{name}' has no option '{key}'{hint} (options: {', '.join(valid)})")
        if key in pinned and pinned[key] != value:
            raise ValueError(f"model '{name}' fixes {key}={pinned[key]!r}; got {value!r} (use '{target}' instead)")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _REGISTRY[target](num_classes, **{**options, **pinned})


def _register_builtin() -> None:
    from .attnscale import ExplicitDeepV3Plus, ExplicitOCRNet
    from .deeplab import DeepV3Plus, MscaleDeepV3Plus
    from .ocrnet import MscaleOCRNet, OCRNet

    register_model("deeplabv3plus", aliases={"deepv3.DeepV3PlusR50": {"trunk": "resnet50"}})(DeepV3Plus)
    register_model("hmsa_deeplabv3plus", aliases={"mscale.DeepV3R50": {"trunk": "resnet50"}})(MscaleDeepV3Plus)
    register_model("ocrnet_hrnet_w48", aliases={"ocrnet.HRNet": {"trunk": "hrnet_w48"}})(OCRNet)
    register_model("hmsa_ocrnet_hrnet_w48", aliases={"ocrnet.HRNet_Mscale": {"trunk": "hrnet_w48"}})(MscaleOCRNet)
    # explicit attention over a fixed scale set (Table 3's baseline); the aliases are the original's layouts,
    # raw attention logits included
    original = {"trunk": "resnet50", "attn_norm": "none"}
    register_model("attnscale_deeplabv3plus", aliases={
        "attnscale.DeepV3R50": {**original, "attn_head": "plain", "attn_ch": 512},
        "attnscale.DeepV3R50B": {**original, "attn_head": "bn", "attn_ch": 256},
    })(ExplicitDeepV3Plus)
    register_model("attnscale_ocrnet_hrnet_w48")(ExplicitOCRNet)


_register_builtin()
