"""Multi-scale inference: per-scale network passes (whole image or sliding window) and every fusion of them.

One `MultiScalePass` runs the network once per distinct scale of a batch (and once more per scale on the mirrored
batch when any flip is asked for). Any number of (scale set, fusion rule, flip) combinations are then read from
those per-scale outputs without running the network again: this is what makes the scale-set sweep cost about one
evaluation of the union of its scales. The hierarchical chain of a set is cached by its prefix (scales high to
low), so [0.5, 1.0, 2.0] and [0.25, 0.5, 1.0, 2.0] share their first three links.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from network.layers import rescale, resize
from network.mscale import FUSION_RULES, MscaleBase, check_scales, fuse_step, scale_key

from .window import Maps, check_window, sliding_forward


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or similar) wrapper."""
    return model.module if hasattr(model, "module") else model


def has_attention(model: nn.Module) -> bool:
    """Whether the model predicts per-scale attention (a hierarchical multi-scale attention model)."""
    return isinstance(unwrap(model), MscaleBase)


def resolve_fusion(model: nn.Module, fusion: str | None) -> str:
    """The fusion rule to use: 'attention' (or None) on a model without scale attention means 'average',
    the original's multi-scale inference for such models."""
    fusion = fusion or "attention"
    if fusion not in FUSION_RULES:
        raise ValueError(f"eval.fusion must be one of {', '.join(FUSION_RULES)}, got {fusion!r}")
    if fusion == "attention" and not has_attention(model):
        return "average"
    return fusion


@dataclass(frozen=True)
class Combo:
    """One way to infer: a scale set (high to low), a fusion rule and whether the mirrored pass is averaged in.

    A single-scale set has fusion 'none' (every rule gives the 1.0 logits).
    """

    scales: tuple[float, ...]
    fusion: str
    flip: bool

    @classmethod
    def make(cls, scales: Sequence[float], fusion: str, flip: bool) -> "Combo":
        order = tuple(check_scales(scales))
        if fusion not in FUSION_RULES and fusion != "none":
            raise ValueError(f"unknown fusion rule {fusion!r}; expected one of {', '.join(FUSION_RULES)}")
        return cls(order, "none" if len(order) == 1 else fusion, bool(flip))

    @property
    def set_label(self) -> str:
        return "[" + ",".join(f"{s:g}" for s in sorted(self.scales)) + "]"

    @property
    def label(self) -> str:
        return f"{self.set_label} {self.fusion}{' +flip' if self.flip else ''}"


def sweep_combos(
    scale_sets: Iterable[Sequence[float]], fusions: Sequence[str], flips: Sequence[bool], model: nn.Module
) -> list[Combo]:
    """Every (set, fusion, flip) combination in order, validated, duplicates dropped (after 'attention' became
    'average' on a model without attention, and single-scale sets collapsed to one rule)."""
    sets = [list(s) for s in scale_sets]
    if not sets:
        raise ValueError("eval.scale_sets is empty")
    for s in sets:
        try:
            check_scales(s)
        except ValueError as e:
            raise ValueError(f"eval.scale_sets entry {s}: {e}") from e
    if not fusions or not flips:
        raise ValueError(f"eval.sweep_fusions and eval.sweep_flips must not be empty, got {fusions!r}, {flips!r}")
    rules = [resolve_fusion(model, f) for f in fusions]
    out: list[Combo] = []
    for s in sets:
        for rule in rules:
            for flip in flips:
                c = Combo.make(s, rule, flip)
                if c not in out:
                    out.append(c)
    return out


@dataclass(frozen=True)
class Inference:
    """How to infer, validated once and passed whole to evaluation, prediction, video and export: the scales
    (high to low), the fusion rule, flip, the sliding window and its overlap, the precision, and the scale-set
    sweep's extra combinations. Build it with `make` (checks every value) or `from_config`."""

    scales: tuple[float, ...]
    fusion: str = "attention"
    flip: bool = False
    window: tuple[int, int] | None = None  # sliding window (height, width) at every scale; None: whole images
    overlap: float = 0.25
    precision: str = "fp32"
    sweep_sets: tuple[tuple[float, ...], ...] = ()  # eval.scale_sets: also evaluated in the same pass
    sweep_fusions: tuple[str, ...] = FUSION_RULES
    sweep_flips: tuple[bool, ...] = (False, True)

    @classmethod
    def make(
        cls,
        scales: Sequence[float],
        fusion: str | None = "attention",
        flip: bool = False,
        window: Sequence[int] = (),
        overlap: float = 0.25,
        precision: str = "fp32",
        sweep_sets: Iterable[Sequence[float]] = (),
        sweep_fusions: Sequence[str] = FUSION_RULES,
        sweep_flips: Sequence[bool] = (False, True),
    ) -> "Inference":
        fusion = fusion or "attention"
        if fusion not in FUSION_RULES:
            raise ValueError(f"eval.fusion must be one of {', '.join(FUSION_RULES)}, got {fusion!r}")
        sets = tuple(tuple(check_scales(list(s))) for s in sweep_sets)
        return cls(tuple(check_scales(list(scales))), fusion, bool(flip), check_window(window, overlap),
                   float(overlap), precision, sets, tuple(sweep_fusions), tuple(bool(f) for f in sweep_flips))

    @classmethod
    def from_config(cls, cfg: Any) -> "Inference":
        """The inference of a Config: eval.* and the shared precision."""
        e = cfg.eval
        return cls.make(e.scales, e.fusion, e.flip, e.window, e.overlap, cfg.train.precision, e.scale_sets,
                        e.sweep_fusions, e.sweep_flips)

    def combo(self, model: nn.Module) -> "Combo":
        """The evaluated (scales, fusion, flip) for `model` (attention falls back to averaging without attention)."""
        return Combo.make(self.scales, resolve_fusion(model, self.fusion), self.flip)

    def sweep(self, model: nn.Module) -> list["Combo"]:
        """The sweep's combinations (with single scale as the reference row), or [] without eval.scale_sets."""
        if not self.sweep_sets:
            return []
        return sweep_combos(list(self.sweep_sets) + [[1.0]], self.sweep_fusions, self.sweep_flips, model)


# ----------------------------------------------------------------------------------------------- per-scale passes


def scale_outputs(
    model: nn.Module,
    images: torch.Tensor,
    scales: Iterable[float],
    window: tuple[int, int] | None = None,
    overlap: float = 0.25,
) -> dict[float, Maps]:
    """{scale: {'pred': logits, 'attn': weight (attention models)}} at each scale's own resolution, in the dtype
    the model produced (half under fp16/bf16 autocast: full-resolution maps of many classes are large)."""
    net = unwrap(model)
    if isinstance(net, MscaleBase):
        def fn(x: torch.Tensor) -> Maps:
            out = net.single_forward(x)
            return {"pred": out["pred"], "attn": out["attn"]}
    else:
        def fn(x: torch.Tensor) -> Maps:
            return {"pred": model(x)["pred"]}
    out = {}
    for s in scales:
        x = rescale(images, s)
        out[s] = sliding_forward(fn, x, window, overlap) if window else fn(x)
    return out


class MultiScalePass:
    """The per-scale outputs of one batch (and of its mirror image) and any fusion of them, cached.

    The network runs in the constructor, under whatever autocast context the caller set; fusion then works in
    the maps' own dtype, as the model's n-scale forward does.
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        scales: Iterable[float],
        flip: bool = False,
        window: tuple[int, int] | None = None,
        overlap: float = 0.25,
    ) -> None:
        self.scales = tuple(check_scales(list(scales)))
        self.outputs = scale_outputs(model, images, self.scales, window, overlap)
        self.mirrored = scale_outputs(model, images.flip(-1), self.scales, window, overlap) if flip else None
        self._cache: dict[tuple, torch.Tensor] = {}

    def _chain(self, mirrored: bool, prefix: tuple[float, ...]) -> torch.Tensor:
        key = ("attention", mirrored, prefix)
        if key not in self._cache:
            outs = self.mirrored if mirrored else self.outputs
            prev = self._chain(mirrored, prefix[:-1]) if len(prefix) > 1 else None
            s = prefix[-1]
            self._cache[key] = fuse_step(prev, s, outs[s]["pred"], outs[s]["attn"])
        return self._cache[key]

    def _fuse(self, mirrored: bool, scales: tuple[float, ...], rule: str) -> torch.Tensor:
        outs = self.mirrored if mirrored else self.outputs
        if outs is None:
            raise ValueError("a flip combination needs a pass built with flip=True")
        missing = [s for s in scales if s not in outs]
        if missing:
            raise ValueError(f"scales {missing} were not run in this pass (ran {list(self.scales)})")
        if len(scales) == 1 or rule == "none":
            return outs[1.0]["pred"]
        if rule == "attention":
            if "attn" not in outs[1.0]:
                raise ValueError("attention fusion on a model without scale attention")
            return self._chain(mirrored, scales)
        # Not cached: a few element-wise ops over the cached resized logits, and a fused map per set and rule would
        # hold much memory at full resolution (K x H x W each). In place after the first op: a fresh tensor.
        resized = [self._at_input_size(mirrored, s) for s in scales]
        if rule == "average":
            fused = resized[0] + resized[1]
            for r in resized[2:]:
                fused.add_(r)
            return fused.div_(len(resized))
        fused = torch.maximum(resized[0], resized[1])
        for r in resized[2:]:
            torch.maximum(fused, r, out=fused)
        return fused

    def _at_input_size(self, mirrored: bool, scale: float) -> torch.Tensor:
        """A scale's logits resized to the 1.0 size, once for all the sets that use it."""
        key = ("resized", mirrored, scale)
        if key not in self._cache:
            outs = self.mirrored if mirrored else self.outputs
            self._cache[key] = resize(outs[scale]["pred"], outs[1.0]["pred"].shape[-2:])
        return self._cache[key]

    def logits(self, combo: Combo) -> torch.Tensor:
        """Fused logits [N, K, H, W] at the input size for `combo`."""
        fused = self._fuse(False, combo.scales, combo.fusion)
        return self._with_mirror(fused, combo) if combo.flip else fused

    def _with_mirror(self, fused: torch.Tensor, combo: Combo) -> torch.Tensor:
        """(fused + mirrored fused, mirrored back) / 2, in the one new tensor that flip() allocates."""
        return self._fuse(True, combo.scales, combo.fusion).flip(-1).add_(fused).div_(2)

    def logits_many(self, combos: Iterable[Combo]) -> Iterator[tuple[Combo, torch.Tensor]]:
        """(combo, logits) for each combination, grouped by (scales, fusion) so that each group is fused once for
        both flips; a map is released once the caller moves on (holding one full-size map per combination of a
        sweep would take much memory)."""
        groups: dict[tuple[tuple[float, ...], str], list[Combo]] = {}
        for c in combos:
            groups.setdefault((c.scales, c.fusion), []).append(c)
        for (scales, rule), members in groups.items():
            fused = self._fuse(False, scales, rule)
            for c in members:
                yield c, self._with_mirror(fused, c) if c.flip else fused

    def maps(self, scales: Iterable[float] | None = None) -> Maps:
        """'pred_{s}x' and 'attn_{s}x' of the unmirrored pass (each at its scale's resolution)."""
        out: Maps = {}
        for s in scales if scales is not None else self.scales:
            for key, value in self.outputs[s].items():
                out[scale_key(key, s)] = value
        return out
