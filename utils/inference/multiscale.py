"""Multi-scale inference: per-scale network passes (whole image or sliding window) and every fusion of them.

One `MultiScalePass` runs the network once per distinct scale of a batch (and once more per scale on the mirrored
batch when any flip is asked for). Any number of (scale set, fusion rule, flip) combinations are then read from
those per-scale outputs without running the network again: this is what makes the scale-set sweep cost about one
evaluation of the union of its scales. The hierarchical chain of a set is cached by its prefix (scales high to
low), so [0.5, 1.0, 2.0] and [0.25, 0.5, 1.0, 2.0] share their first three links.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from network.layers import rescale, resize
from network.attnscale import ExplicitBase
from network.mscale import FUSION_RULES, MscaleBase, check_scales, fuse_step, scale_key
from utils.config import parse_bytes
from utils.runtime.precision import autocast

from .window import Maps, check_window, sliding_forward


FALLBACKS = ("exact", "any")  # eval.memory_fallback: exact schedules only, or approximate ones too


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or similar) wrapper."""
    return model.module if hasattr(model, "module") else model


def has_attention(model: nn.Module) -> bool:
    """Whether the model predicts per-scale attention (hierarchical, or explicit over its fixed scale set)."""
    return isinstance(unwrap(model), (MscaleBase, ExplicitBase))


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
    # Memory (utils/inference/memory.py): the budget in bytes (None: the CUDA device's free memory, no limit on
    # other devices), whether approximate schedules may be chosen ('any') or only exact ones ('exact'), and a
    # schedule to use whatever the budget (None: planned; tests and benchmarks force one).
    memory_budget: int | None = None
    memory_fallback: str = "exact"
    schedule: "Schedule | None" = None

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
        memory_budget: int | str | None = None,
        memory_fallback: str = "exact",
        schedule: "Schedule | None" = None,
    ) -> "Inference":

        fusion = fusion or "attention"
        if fusion not in FUSION_RULES:
            raise ValueError(f"eval.fusion must be one of {', '.join(FUSION_RULES)}, got {fusion!r}")
        if memory_fallback not in FALLBACKS:
            raise ValueError(f"eval.memory_fallback must be one of {', '.join(FALLBACKS)}, got {memory_fallback!r}")
        sets = tuple(tuple(check_scales(list(s))) for s in sweep_sets)
        return cls(tuple(check_scales(list(scales))), fusion, bool(flip), check_window(window, overlap),
                   float(overlap), precision, sets, tuple(sweep_fusions), tuple(bool(f) for f in sweep_flips),
                   parse_bytes(memory_budget), memory_fallback, schedule)

    @classmethod
    def from_config(cls, cfg: Any) -> "Inference":
        """The inference of a Config: eval.* and the shared precision."""
        e = cfg.eval
        return cls.make(e.scales, e.fusion, e.flip, e.window, e.overlap, cfg.run.precision, e.scale_sets,
                        e.sweep_fusions, e.sweep_flips, e.memory_budget, e.memory_fallback)

    def combo(self, model: nn.Module) -> "Combo":
        """The evaluated (scales, fusion, flip) for `model` (attention falls back to averaging without attention)."""
        check_explicit(model, self)
        return Combo.make(self.scales, resolve_fusion(model, self.fusion), self.flip)

    def sweep(self, model: nn.Module) -> list["Combo"]:
        """The sweep's combinations (with single scale as the reference row), or [] without eval.scale_sets."""
        if not self.sweep_sets:
            return []
        check_explicit(model, self)
        return sweep_combos(list(self.sweep_sets) + [[1.0]], self.sweep_fusions, self.sweep_flips, model)


# ----------------------------------------------------------------------------------------------- per-scale passes


Forward = Callable[..., Maps]  # one network pass: fn(images, attention=True) -> {'pred'[, 'attn']} at their size


def network_fn(model: nn.Module | Forward) -> Forward:
    """The per-scale network pass of `model`: `fn(x, attention=True)`, its 'pred' (and 'attn' for attention models
    unless `attention=False`: the top scale of a chain, whose weight no fusion reads) at the input's size.
    A plain callable is taken as that pass already (the memory planner passes a stand-in)."""
    if not isinstance(model, nn.Module):
        return model
    net = unwrap(model)
    if isinstance(net, MscaleBase):
        def fn(x: torch.Tensor, attention: bool = True) -> Maps:
            out = net.single_forward(x, attention)
            return {"pred": out["pred"], "attn": out["attn"]} if attention else {"pred": out["pred"]}
    else:
        def fn(x: torch.Tensor, attention: bool = True) -> Maps:
            return {"pred": model(x)["pred"]}
    return fn


def scale_forward(fn: Forward, x: torch.Tensor, attention: bool, window: tuple[int, int] | None,
                  overlap: float) -> Maps:
    """One scale's maps: the whole image, or a sliding window over it."""
    if window:
        return sliding_forward(partial(fn, attention=attention), x, window, overlap)
    return fn(x, attention)


def scale_outputs(
    model: nn.Module | Forward,
    images: torch.Tensor,
    scales: Iterable[float],
    window: tuple[int, int] | None = None,
    overlap: float = 0.25,
) -> dict[float, Maps]:
    """{scale: {'pred': logits, 'attn': weight (attention models)}} at each scale's own resolution, in the dtype
    the model produced (half under fp16/bf16 autocast: full-resolution maps of many classes are large). The top
    scale has no 'attn': it starts every chain it is in, so its weight would be read by none."""
    fn = network_fn(model)
    scales = list(scales)
    top = max(scales)
    return {s: scale_forward(fn, rescale(images, s), s != top, window, overlap) for s in scales}


class MultiScalePass:
    """The per-scale outputs of one batch (and of its mirror image) and any fusion of them, cached.

    The network runs in the constructor, under whatever autocast context the caller set; fusion then works in
    the maps' own dtype, as the model's n-scale forward does.
    """

    def __init__(
        self,
        model: nn.Module | Forward,
        images: torch.Tensor,
        scales: Iterable[float],
        flip: bool = False,
        window: tuple[int, int] | None = None,
        overlap: float = 0.25,
    ) -> None:
        self.scales = tuple(check_scales(list(scales)))
        self._cache: dict[tuple, torch.Tensor] = {}
        if isinstance(unwrap(model), ExplicitBase):  # one forward runs every scale (see explicit_outputs)
            self.outputs = explicit_outputs(model, images, self.scales, self._cache, False)
            self.mirrored = explicit_outputs(model, images.flip(-1), self.scales, self._cache, True) if flip else None
            return
        self.outputs = scale_outputs(model, images, self.scales, window, overlap)
        self.mirrored = scale_outputs(model, images.flip(-1), self.scales, window, overlap) if flip else None

    def _chain(self, mirrored: bool, prefix: tuple[float, ...]) -> torch.Tensor:
        key = ("attention", mirrored, prefix)
        if key not in self._cache:
            outs = self.mirrored if mirrored else self.outputs
            prev = self._chain(mirrored, prefix[:-1]) if len(prefix) > 1 else None
            s = prefix[-1]
            self._cache[key] = fuse_step(prev, s, outs[s]["pred"], outs[s].get("attn"))
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
            if "attn" not in outs[scales[-1]]:  # the lowest scale: never the top one, which has no 'attn'
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


# ------------------------------------------- explicit attention over a fixed scale set (network/attnscale.py)
# Its forward runs every scale of its set itself and fuses them with weights predicted jointly: the fused map
# exists for that one set only, so any other set, a sweep or a sliding window is refused before work starts.


def check_explicit(model: nn.Module, how: "Inference") -> None:
    """A one-line error when `how` asks an explicit-attention model for something other than its own scale set."""
    net = unwrap(model)
    if not isinstance(net, ExplicitBase):
        return
    net.check_eval_scales(how.scales)
    if how.window is not None:
        raise ValueError("eval.window: an explicit-attention model fuses whole images; set eval.window=[]")
    if how.sweep_sets:
        raise ValueError("eval.scale_sets: an explicit-attention model is evaluated at its own scale set only; "
                         "set eval.scale_sets=[]")


def explicit_outputs(model: nn.Module, images: torch.Tensor, scales: tuple[float, ...],
                     cache: dict[tuple, torch.Tensor], mirrored: bool) -> dict[float, Maps]:
    """Per-scale maps of one explicit forward; its fused 'pred' goes into `cache` as the set's attention fusion."""
    unwrap(model).check_eval_scales(scales)
    out = model(images)
    cache[("attention", mirrored, scales)] = out["pred"]
    return {s: {"pred": out[scale_key("pred", s)], "attn": out[scale_key("attn", s)]} for s in scales}


# ----------------------------------------------------------------------------------------------- memory schedules


@dataclass(frozen=True)
class Schedule:
    """How a multi-scale pass spends memory (utils/inference/memory.py chooses one against eval.memory_budget).

    The default is the unconstrained `MultiScalePass`: every scale's maps are kept until the fusions are read.
    Exact schedules give the same bits as that pass, in less memory:
    - `stream`: one scale at a time, each folded at once into one running accumulator per fused result (the
      hierarchical chain, the running sum of 'average', the running maximum of 'max');
    - `flip_apart`: the mirrored pass runs after the unmirrored one is complete (else scale by scale beside it);
    - `chunk`: at most this many images per network pass (0: the whole batch);
    - `host`: the accumulators, the fused results and the per-scale maps kept for dumps live in host memory and
      visit the device only to be updated (a no-op when the device is the CPU).
    Approximate ones (eval.memory_fallback=any): a sliding `window` at the scales >= `window_from`, and a lower
    autocast `precision`.
    """

    stream: bool = False
    flip_apart: bool = False
    chunk: int = 0
    host: bool = False
    window: tuple[int, int] | None = None
    window_from: float = 0.0
    precision: str | None = None

    @property
    def exact(self) -> bool:
        return self.window is None and self.precision is None

    @property
    def label(self) -> str:
        parts = []
        if self.stream:
            parts.append("one scale at a time")
        if self.flip_apart:
            parts.append("flip apart")
        if self.chunk:
            parts.append(f"{self.chunk} image{'s' if self.chunk > 1 else ''} per pass")
        if self.host:
            parts.append("maps in host memory")
        if self.window is not None:
            parts.append(f"window {self.window[0]}x{self.window[1]} at scales >= {self.window_from:g}")
        if self.precision is not None:
            parts.append(self.precision)
        return ", ".join(parts) or "unconstrained"


UNCONSTRAINED = Schedule()


def _fold(rule: str, scale: float, out: Maps, acc: torch.Tensor | None, folds: int, size: torch.Size) -> torch.Tensor:
    """`acc` with one more scale folded in, by the same operations in the same order as `MultiScalePass._fuse`
    (so the same bits): `folds` scales are in `acc` already; `size` is the 1.0 (output) size."""
    if rule == "attention":
        return fuse_step(acc, scale, out["pred"], out.get("attn"))
    if rule == "none":
        return out["pred"]
    resized = resize(out["pred"], size)
    if acc is None:
        return resized
    if rule == "average":
        return acc + resized if folds == 1 else acc.add_(resized)
    return torch.maximum(acc, resized) if folds == 1 else torch.maximum(acc, resized, out=acc)


class ScheduledPass:
    """The fused logits of given combinations (and the per-scale maps of `keep`) under an exact or approximate
    `Schedule`, read like a `MultiScalePass` (`logits`, `logits_many`, `maps`), but computed in the constructor:
    a scale's maps are dropped as soon as every accumulator has taken them in."""

    def __init__(
        self,
        model: nn.Module | Forward,
        images: torch.Tensor,
        combos: Iterable[Combo],
        schedule: Schedule,
        keep: Iterable[float] = (),
        window: tuple[int, int] | None = None,
        overlap: float = 0.25,
        store: Callable[[torch.Tensor], torch.Tensor] | None = None,
        load: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.combos = list(dict.fromkeys(combos))
        if not self.combos:
            raise ValueError("a scheduled pass needs at least one combination")
        self.schedule = schedule
        self.keep = tuple(check_scales(list(keep))) if keep else ()
        self.window, self.overlap = window, overlap
        device = images.device
        # The planner passes its own store/load to count host memory apart from device memory.
        self._store = store or ((lambda t: t.to("cpu")) if schedule.host else (lambda t: t))
        self._load = load or (lambda t: t.to(device))
        fn = network_fn(model)
        with autocast(schedule.precision, device) if schedule.precision else nullcontext():
            n = images.shape[0]
            chunk = schedule.chunk if 0 < schedule.chunk < n else n
            if chunk == n:
                self._results, self._maps = self._run(fn, images)
            else:
                self._results, self._maps = {}, {}
                for i in range(0, n, chunk):
                    results, maps = self._run(fn, images[i : i + chunk])
                    self._gather(self._results, results, i, n)
                    self._gather(self._maps, maps, i, n)
                    del results, maps

    @staticmethod
    def _gather(into: dict, part: dict, start: int, total: int) -> None:
        """Copy one chunk's tensors into full-batch tensors allocated where the chunk's are (device or host)."""
        for key, value in part.items():
            if key not in into:
                into[key] = value.new_empty((total, *value.shape[1:]))
            into[key][start : start + value.shape[0]] = value

    def _forward(self, fn: Forward, x: torch.Tensor, scale: float, attention: bool) -> Maps:
        s = self.schedule
        window = s.window if s.window is not None and scale >= s.window_from else self.window
        return scale_forward(fn, x, attention, window, self.overlap)

    def _run(self, fn: Forward, images: torch.Tensor) -> tuple[dict, dict]:
        groups: dict[tuple[tuple[float, ...], str], set[bool]] = {}
        for c in self.combos:
            groups.setdefault((c.scales, c.fusion), {False}).update({True} if c.flip else set())
        scales = sorted({s for c in self.combos for s in c.scales} | set(self.keep), reverse=True)
        mirrors = [False, True] if any(c.flip for c in self.combos) else [False]
        if self.schedule.flip_apart:
            order = [(m, s) for m in mirrors for s in scales]
        else:
            order = [(m, s) for s in scales for m in mirrors]
        size = images.shape[-2:]
        acc: dict[tuple, torch.Tensor] = {}
        folds: dict[tuple, int] = {}
        maps: dict[str, torch.Tensor] = {}
        flipped = None
        for mirrored, s in order:
            if mirrored and flipped is None:
                flipped = images.flip(-1)
            out = self._forward(fn, rescale(flipped if mirrored else images, s), s, s != scales[0])
            for (set_scales, rule), wanted in groups.items():
                if s not in set_scales or mirrored not in wanted or (rule == "none" and s != 1.0):
                    continue
                key = (set_scales, rule, mirrored)
                prev = acc.get(key)
                acc[key] = self._store(_fold(rule, s, out, None if prev is None else self._load(prev),
                                             folds.get(key, 0), size))
                folds[key] = folds.get(key, 0) + 1
                del prev
            if not mirrored and s in self.keep:
                for k, v in out.items():
                    maps[scale_key(k, s)] = self._store(v)
            del out
        for key in acc:
            if key[1] == "average":
                acc[key] = self._store(self._load(acc[key]).div_(folds[key]))
        results: dict[Combo, torch.Tensor] = {}
        for c in self.combos:
            plain = acc[(c.scales, c.fusion, False)]
            if c.flip:  # (mirrored fused, mirrored back + fused) / 2, as MultiScalePass._with_mirror
                mirrored = self._load(acc[(c.scales, c.fusion, True)]).flip(-1)
                results[c] = self._store(mirrored.add_(self._load(plain)).div_(2))
                del mirrored
            else:
                results[c] = plain
        return results, maps

    def logits(self, combo: Combo) -> torch.Tensor:
        """Fused logits [N, K, H, W] at the input size for `combo` (one of the constructor's combinations)."""
        if combo not in self._results:
            raise ValueError(f"{combo.label} was not computed by this pass (computed: "
                             f"{', '.join(c.label for c in self._results)})")
        return self._load(self._results[combo])

    def logits_many(self, combos: Iterable[Combo]) -> Iterator[tuple[Combo, torch.Tensor]]:
        """(combo, logits) for each combination, one on the device at a time."""
        for c in combos:
            yield c, self.logits(c)

    def maps(self, scales: Iterable[float] | None = None) -> Maps:
        """'pred_{s}x' and 'attn_{s}x' of the unmirrored pass for the kept scales, where the schedule keeps them
        (host memory under `host`: dumps copy them to the host anyway)."""
        wanted = self.keep if scales is None else tuple(scales)
        missing = [s for s in wanted if s not in self.keep]
        if missing:
            raise ValueError(f"the maps of scales {missing} were not kept by this pass (kept {list(self.keep)})")
        return {k: v for k, v in self._maps.items() if any(k.endswith(f"_{float(s)}x") for s in wanted)}
