"""Typed configuration: a tree of frozen dataclasses, YAML recipes and dotted CLI overrides.

Merge order: schema defaults -> YAML (with at most one level of ``base:``) -> ``key.sub=value`` overrides.
The schema defaults are the embedded demo: ``python train.py`` with no arguments trains on generated data.
Nothing here reads global state; a loaded ``Config`` is immutable.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

Criterion = Literal["ce", "bce", "rmi", "wce"]
Fusion = Literal["attention", "average", "max"]


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


@dataclass(frozen=True)
class SyntheticConfig:
    # Procedurally generated Cityscapes-layout data (datasets/synthetic.py), written on first use.
    num_train: int = 160
    num_val: int = 24
    height: int = 128
    width: int = 256
    seed: int = 0
    num_extra: int = 0  # unlabelled train_extra images with coarse polygon labels (gtCoarse); 0: none


@dataclass(frozen=True)
class AugmentConfig:
    # Training crops: random scale, crop, flip and the image-only (photometric) transforms.
    crop_size: tuple[int, int] = (128, 128)  # (height, width)
    scale_min: float = 0.5
    scale_max: float = 2.0
    long_edge: int = 0  # the random scale is relative to this long edge (0: the image's own size)
    hflip: bool = True
    color_jitter: float = 0.25
    gaussian_blur: bool = True
    bilateral_blur: bool = False  # takes precedence over gaussian_blur
    rand_augment: tuple[int, ...] = ()  # (N, M): N RandAugment ops of magnitude M/30 on image+mask; () off
    crop_placement: Literal["original", "uniform"] = "original"  # original: small images centred, clipped crops
    photometric: Literal["original", "opencv"] = "original"  # jitter + blur: original (Pillow/skimage) | opencv


@dataclass(frozen=True)
class ClassUniformConfig:
    pct: float = 0.0  # fraction of each epoch's samples cropped around class centroids (0: off)
    tile: int = 1024  # centroid tile size (pixels)
    # all_classes: int(n * pct / K) class-centred samples per class, an epoch shorter than n when a class has no
    # centroids (the original). present_classes: K = the classes that have centroids, every epoch n samples.
    share: Literal["all_classes", "present_classes"] = "all_classes"
    snap: bool = False  # move a centroid that is not a pixel of its class (ring) to the nearest one
    cache_dir: str = ""  # centroid cache folder ('': $XDG_CACHE_HOME/hmsa/centroids)


@dataclass(frozen=True)
class CoarseConfig:
    # Cityscapes coarse (train_extra) data and its autolabels.
    boost_classes: tuple[int, ...] = ()  # train ids whose coarse data is added (class-uniform crops)
    autolabel_threshold: float = 0.0  # > 0: autolabelled masks instead of gtCoarse; lower-probability pixels ignored
    dropout_classes: tuple[int, ...] = ()  # train ids whose human gtCoarse pixels join the autolabels
    mask_out: bool = False  # autolabels: the Cityscapes ego-vehicle and border regions become ignore
    autolabel_dir: str = "autolabelled"  # autolabel folder (relative to root unless absolute)
    # original: human dropout-class pixels unioned in, then the threshold (which can drop them); centroids from
    # the raw autolabel. threshold_first: threshold, then the human pixels on top; centroids from that mask.
    order: Literal["original", "threshold_first"] = "original"
    last_epoch: int = 150  # coarse data is used in epochs below this one only


@dataclass(frozen=True)
class CustomConfig:
    # Folder and custom datasets.
    classes: str = ""  # class-list YAML (or a Mapillary config.json); '' with folder: the Cityscapes classes
    image_dir: str = "images/{split}"  # custom dataset: image folder under root ({split} is replaced)
    mask_dir: str = "masks/{split}"  # custom dataset: mask folder under root
    mask_suffix: str = ".png"  # custom dataset: mask file = image stem + this


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"  # synthetic: generated at `root` from data.synthetic.* on first use (the demo)
    root: str = "data/synthetic_cityscapes"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    train_split: str = "train"
    val_split: str = "val"
    cv: int = 0
    batch_size: int = 8  # per process
    val_batch_size: int = 4
    num_workers: int = 2
    # pil: Pillow's resize values (antialiased), as the original | opencv: faster, aliased
    resample: Literal["pil", "opencv"] = "pil"
    eval_size: int = 0  # val: long edge resized to this (Mapillary 2177); 0: augment.long_edge, or native if 0 too
    eval_native_labels: bool = False  # with eval_size: keep masks at native size (predictions resized back)
    map_crop_val: bool = False  # val: resize the height to eval_size (bicubic), then the original's CenterCropPad
    skip_bad: bool = False  # log and skip unreadable samples instead of stopping
    verify: bool = False  # decode every image and mask of each split before work starts (parallel, num_workers)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    class_uniform: ClassUniformConfig = field(default_factory=ClassUniformConfig)
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    custom: CustomConfig = field(default_factory=CustomConfig)

    @classmethod
    def make(cls, **fields: Any) -> "DataConfig":
        """The flat keyword form for code and tests: a sub-section's field by its own name (crop_size=, pct=)."""
        return DataConfig().updated(**fields)

    def updated(self, **fields: Any) -> "DataConfig":
        """A copy with `fields` changed; a sub-section's field by its own name (the names are unique)."""
        top = {f.name for f in dataclasses.fields(self)}
        changes = {}
        for name, value in fields.items():
            owner = [s for s in _DATA_SECTIONS if name in {f.name for f in dataclasses.fields(getattr(self, s))}]
            if name not in top and not owner:
                raise TypeError(f"DataConfig has no field {name!r}")
            changes[name if name in top else f"{owner[0]}.{name}"] = value
        return replaced(self, changes)


_DATA_SECTIONS = ("augment", "class_uniform", "coarse", "custom")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "hmsa_deeplabv3plus"
    # Keyword options of the model factory, validated against its signature by network.build_model.
    options: dict[str, Any] = field(
        default_factory=lambda: {
            "trunk": "resnet10t",
            "aspp_ch": 64,
            "fine_ch": 32,
            "head_ch": 64,
            "attn_ch": 64,
        }
    )
    norm: Literal["bn", "syncbn"] = "bn"  # (syncbn is converted when the world has more than one process)
    pretrained: str = ""  # ImageNet trunk weights file ('' keeps the random initialisation)
    snapshot: str = ""  # full-model weights loaded before training or evaluation (ours or the original's)


@dataclass(frozen=True)
class LossConfig:
    # Each term's function: ce (softmax CE) | bce (sigmoid BCE) | rmi (0.5·BCE + 0.5·RMI) | wce (per-image
    # class-weighted CE). The original's --rmi_loss recipe is main=rmi, aux=bce, scale=bce.
    main: Criterion = "ce"  # criterion of the fused prediction
    aux: Criterion = "ce"  # criterion of the auxiliary output (models that have one)
    aux_weight: float = 0.4
    scale: Criterion = "ce"  # criterion of each scale's own prediction (pred_{s}x, upsampled to the label size)
    scale_weight: float = 0.0
    wce_upper_bound: float = 1.0  # wce class weight: (class present)·bound·(1 − frequency) + 1


@dataclass(frozen=True)
class TrainConfig:
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_exp: float = 1.0
    lr_step: Literal["iter", "epoch"] = "iter"  # iter: poly stepped per iteration | epoch: the original's per-epoch step
    max_iter: int = 500  # > 0: iteration budget; 0: use max_epoch
    max_epoch: int = 0
    log_interval: int = 10
    ckpt_interval: int = 250  # iterations between checkpoints (and one at the end)
    val_interval: int = 0  # iterations between validations (0: only at the end)
    val_epochs: int = 0  # validate after every this many epochs (the original: 1); 0: off
    seed: int = 0
    accum_steps: int = 1  # batches per optimizer step (gradient accumulation); global batch = batch·this·GPUs
    compile: bool = False  # torch.compile the training model (first steps are slower: compilation)


@dataclass(frozen=True)
class RunConfig:
    # Shared by training and evaluation: where the run lives, and how the model runs.
    output_dir: str = "runs"  # a run lives in output_dir/name
    name: str = "demo"  # the run's folder under output_dir (a relative path without '..')
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = True  # NHWC memory layout of model and images, fp32 rounding: faster convolutions (GPU tensor cores without transposes; CPU oneDNN without reorders)
    cpu_tuning: bool = False  # fp32 training on a CPU: convolution weight gradients by the kernel fastest for their shape (utils/runtime/cpu_tuning.py); nothing on a GPU
    dist_timeout: int = 600  # seconds a collective (or the start-up rendezvous) may wait before the run stops


@dataclass(frozen=True)
class EvalConfig:
    scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    flip: bool = False
    fusion: Fusion = "attention"  # attention (hierarchical) | average | max of the per-scale logits
    window: tuple[int, ...] = ()  # (height, width): sliding-window inference at every scale; () whole images
    overlap: float = 0.25  # minimum overlap of neighbouring sliding windows, as a fraction of the window
    # Scale-set sweep in one pass: every set x sweep_fusions x sweep_flips; () evaluates eval.scales only.
    scale_sets: tuple[tuple[float, ...], ...] = ()
    sweep_fusions: tuple[Fusion, ...] = ("attention", "average", "max")
    sweep_flips: tuple[bool, ...] = (False, True)
    num_dump: int = 8  # N of the dump selection
    dump: Literal["none", "first", "all", "every", "worst"] = "first"  # images with pictures: none | first (N) | all | every (N-th) | worst (N by IoU)
    dump_dir: str = "eval"  # training's final evaluation; a folder inside the run folder (relative, no '..')
    video_attention: bool = False  # video mode: attention heat maps side by side with the overlay
    # bytes (int) or a size like "12GiB": evaluation is planned to fit; "": the CUDA device's free memory, no limit
    # on a CPU
    memory_budget: Any = ""
    # exact: only schedules with the unconstrained run's predictions | any: also approximate ones (sliding windows,
    # half precision), each reported with its measured difference
    memory_fallback: Literal["exact", "any"] = "exact"


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Old key names (the original's, and earlier versions of this schema) -> their place now. Recipes, overrides and
# the configs stored in checkpoints are read through this table; an old name in a recipe or override warns.
ALIASES: dict[str, str] = {
    "train.precision": "run.precision",
    "train.channels_last": "run.channels_last",
    "train.output_dir": "run.output_dir",
    "train.run_name": "run.name",
    "train.dist_timeout": "run.dist_timeout",
    **{f"data.{k}": f"data.augment.{k}"
       for k in ("crop_size", "scale_min", "scale_max", "hflip", "rand_augment", "crop_placement", "photometric")},
    "data.pre_size": "data.augment.long_edge",
    "data.color_aug": "data.augment.color_jitter",
    "data.gblur": "data.augment.gaussian_blur",
    "data.bblur": "data.augment.bilateral_blur",
    "data.class_uniform_pct": "data.class_uniform.pct",
    "data.class_uniform_tile": "data.class_uniform.tile",
    "data.class_uniform_share": "data.class_uniform.share",
    "data.centroid_snap": "data.class_uniform.snap",
    "data.centroid_dir": "data.class_uniform.cache_dir",
    "data.coarse_boost_classes": "data.coarse.boost_classes",
    "data.custom_coarse_prob": "data.coarse.autolabel_threshold",
    "data.custom_coarse_dropout_classes": "data.coarse.dropout_classes",
    "data.mask_out_cityscapes": "data.coarse.mask_out",
    "data.autolabel_dir": "data.coarse.autolabel_dir",
    "data.autolabel_order": "data.coarse.order",
    "data.max_cu_epoch": "data.coarse.last_epoch",
    **{f"data.{k}": f"data.custom.{k}" for k in ("classes", "image_dir", "mask_dir", "mask_suffix")},
}

# Keys removed from the schema -> what to use instead. A recipe or an override that sets one is refused with this
# hint; a checkpoint that stores one (written before the removal) resumes, the key ignored.
REMOVED: dict[str, str] = {
    "run.host_memory": "the allocator's settings in the environment (what 'retain' did: GLIBC_TUNABLES="
                       "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647; or LD_PRELOAD of tcmalloc); "
                       "CPU-only kernel tuning is run.cpu_tuning",
}

_log = logging.getLogger(__name__)


def _rename_aliases(values: dict[str, Any], source: str, renamed: list[str] | None = None) -> dict[str, Any]:
    """`values` (a nested dict) with every old key moved to its new place; a key set under both names is an error.
    Each move is noted in `renamed`, when given, for a warning."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for old, new in ALIASES.items():
        section, name = old.split(".")
        if not isinstance(out.get(section), dict) or name not in out[section]:
            continue
        value = out[section].pop(name)
        parts = new.split(".")
        node = out
        for p in parts[:-1]:
            node[p] = dict(node[p]) if isinstance(node.get(p), dict) else {}
            node = node[p]
        if parts[-1] in node:
            raise ConfigError(f"{source}: '{old}' and '{new}' are the same key (the old and the new name); keep '{new}'")
        node[parts[-1]] = value
        if renamed is not None:
            renamed.append(f"{source}: config key '{old}' is now '{new}' (the old name still works)")
    return out


def choices(key: str) -> tuple[Any, ...]:
    """The allowed values of a dotted key whose annotation is a Literal (or a tuple of one); () for any other."""
    tp: Any = Config
    for name in key.split("."):
        tp = typing.get_type_hints(tp)[name]
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


# ----------------------------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in the schema's representation."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and isinstance(value, type(choices[0])):
            return value
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {list(value)!r}")
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    else:
        raise TypeError(f"unsupported annotation {tp} at {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _unknown_key(key: str, name: str, valid: list[str]) -> ConfigError:
    if f"{key}.{name}" in REMOVED:
        return ConfigError(f"config key '{key}.{name}' was removed: use {REMOVED[f'{key}.{name}']}")
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    where = f"{key}.{name}" if key else name
    hint = f"; did you mean '{(key + '.') if key else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{where}'{hint} (valid keys here: {', '.join(valid)})")


def _build(cls: type, values: dict[str, Any], key: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in hints:
            raise _unknown_key(key, str(name), names)
        sub = f"{key}.{name}" if key else name
        kwargs[name] = _coerce(value, hints[name], sub)
    return cls(**kwargs)


def _check_scales(key: str, scales: tuple[float, ...]) -> None:
    if any(not s > 0 for s in scales):
        raise ConfigError(f"{key}: every scale must be positive, got {list(scales)}")
    if 1.0 not in scales:
        raise ConfigError(f"{key}: the scale list must contain 1.0 (the output resolution), got {list(scales)}")


def _seed_range(value: int) -> bool:
    return 0 <= value < 2**32


# The range of each single value that a type cannot express, as (dotted key, test, the rule in the message).
# Checked at load, so that a value torch or numpy would refuse fails before the run folder exists, naming the key.
_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("train.ckpt_interval", lambda v: v >= 1, "at least 1"),
    ("train.log_interval", lambda v: v >= 1, "at least 1"),
    ("data.batch_size", lambda v: v >= 1, "at least 1"),
    ("data.val_batch_size", lambda v: v >= 1, "at least 1"),
    ("train.val_interval", lambda v: v >= 0, ">= 0 (0: off)"),
    ("train.val_epochs", lambda v: v >= 0, ">= 0 (0: off)"),
    ("data.num_workers", lambda v: v >= 0, ">= 0 (0: off)"),
    ("train.lr", lambda v: v > 0, "> 0"),
    ("train.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0 (0: off)"),
    ("train.poly_exp", lambda v: v >= 0, ">= 0 (0: a constant learning rate)"),  # negative: 0 ** -p at the end
    ("train.seed", _seed_range, "in [0, 2**32) (the seeds numpy takes)"),
    ("data.synthetic.seed", _seed_range, "in [0, 2**32) (the seeds numpy takes)"),
    ("loss.aux_weight", lambda v: v >= 0, ">= 0 (0: off)"),
    ("loss.scale_weight", lambda v: v >= 0, ">= 0 (0: off)"),
    ("loss.wce_upper_bound", lambda v: v >= 0, ">= 0"),
    ("data.augment.scale_min", lambda v: v > 0, "> 0"),
    ("data.augment.color_jitter", lambda v: 0 <= v <= 0.5, "in [0, 0.5] (0: off)"),
)

# model.options that are channel counts, whatever the model: aspp_ch, mid_ch, ..., width(s), stem_width(s).
_WIDTH_OPTION = re.compile(r".+_ch|(.+_)?widths?")


def _check_finite(values: Any, key: str) -> None:
    """Refuse nan and infinity anywhere (a float key parses '.nan', 'inf'): no range check would catch them all."""
    if isinstance(values, dict):
        for name, value in values.items():
            _check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            _check_finite(value, f"{key}[{i}]")
    elif isinstance(values, float) and not math.isfinite(values):
        raise ConfigError(f"{key} must be a finite number, got {values}")


def validate(cfg: Config) -> Config:
    """Checks across fields that a type cannot express; the error names the dotted key."""
    if cfg.train.max_iter < 0 or cfg.train.max_epoch < 0:
        raise ConfigError("train.max_iter and train.max_epoch must be >= 0")
    if cfg.train.max_iter == 0 and cfg.train.max_epoch == 0:
        raise ConfigError("set train.max_iter or train.max_epoch to a positive number")
    if cfg.train.accum_steps < 1:
        raise ConfigError(f"train.accum_steps must be at least 1, got {cfg.train.accum_steps}")
    if cfg.run.dist_timeout <= 0:
        raise ConfigError(f"run.dist_timeout must be a positive number of seconds, got {cfg.run.dist_timeout}")
    if any(c <= 0 for c in cfg.data.augment.crop_size):
        raise ConfigError(f"data.augment.crop_size: must be positive, got {list(cfg.data.augment.crop_size)}")
    _check_finite(to_dict(cfg), "")
    for key, allowed, rule in _RANGES:
        value = functools.reduce(getattr, key.split("."), cfg)
        if not allowed(value):
            raise ConfigError(f"{key} must be {rule}, got {value}")
    for key, path, inside, instead in (
        ("run.name", cfg.run.name, "run.output_dir", "use a plain folder name, or set run.output_dir to put the run "
                                                     "elsewhere"),
        ("eval.dump_dir", cfg.eval.dump_dir, "the run folder", "outside it, it could overwrite another run's "
                                                               "results; use a folder name such as 'eval'"),
    ):
        if os.path.isabs(path) or ".." in path.split("/"):
            raise ConfigError(f"{key} must be a relative path inside {inside} without '..', got {path!r}: {instead}")
    for name, value in cfg.model.options.items():
        if _WIDTH_OPTION.fullmatch(str(name)) and not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1
                for v in (value if isinstance(value, (list, tuple)) else [value])):
            raise ConfigError(f"model.options.{name} is a number of channels: it must be a whole number >= 1, "
                              f"got {value!r}")
    _validate_data(cfg.data)
    _validate_eval(cfg.eval)
    fixed = cfg.model.options.get("scales")  # explicit attention (network/attnscale.py): one channel per scale
    if isinstance(fixed, (list, tuple)) and sorted(float(s) for s in fixed) != sorted(cfg.eval.scales):
        raise ConfigError(f"eval.scales {list(cfg.eval.scales)} differs from model.options.scales {list(fixed)}: "
                          f"a model with a fixed scale set is evaluated at that set; set eval.scales={list(fixed)}")
    return cfg


def _validate_data(d: DataConfig) -> None:
    """The data settings that depend on each other (a transform checks its value ranges again when it is built)."""
    if d.augment.scale_min > d.augment.scale_max:
        raise ConfigError(f"data.augment.scale_min ({d.augment.scale_min}) must be <= data.augment.scale_max "
                          f"({d.augment.scale_max})")
    if d.map_crop_val and not (d.eval_size or d.augment.long_edge) > 0:
        raise ConfigError("data.map_crop_val needs data.eval_size (or data.augment.long_edge) > 0: the crop size")
    if d.map_crop_val and d.eval_native_labels:
        raise ConfigError("data.map_crop_val crops the labels too: it cannot be combined with data.eval_native_labels")
    ra = d.augment.rand_augment
    if ra and (len(ra) != 2 or ra[0] < 1 or not 0 <= ra[1] <= 30):
        raise ConfigError(f"data.augment.rand_augment must be [] or [N, M] (N >= 1 ops, magnitude M in 0..30), "
                          f"got {list(ra)}")
    if not 0 <= d.class_uniform.pct <= 1:
        raise ConfigError(f"data.class_uniform.pct must be in [0, 1], got {d.class_uniform.pct}")
    if not 0 <= d.coarse.autolabel_threshold < 1:
        raise ConfigError(f"data.coarse.autolabel_threshold must be in [0, 1) (0: human gtCoarse labels), "
                          f"got {d.coarse.autolabel_threshold}")


def _validate_eval(e: EvalConfig) -> None:
    """Every eval.* value that the final validation, the dumps or eval.py use: checked at load, not after training."""
    for key, scales in [("eval.scales", e.scales)] + [(f"eval.scale_sets[{i}]", s) for i, s in enumerate(e.scale_sets)]:
        _check_scales(key, scales)
        if len(set(scales)) != len(scales):
            raise ConfigError(f"{key}: scales must be distinct, got {list(scales)}")
    if not e.sweep_fusions:
        raise ConfigError(f"eval.sweep_fusions must not be empty (values among {list(typing.get_args(Fusion))})")
    if e.scale_sets and not e.sweep_flips:
        raise ConfigError("eval.sweep_flips must not be empty (use [false], [true] or [false, true])")
    if e.window and (len(e.window) != 2 or any(w <= 0 for w in e.window)):
        raise ConfigError(f"eval.window must be [] (whole image) or [height, width] > 0, got {list(e.window)}")
    if not 0 <= e.overlap < 1:
        raise ConfigError(f"eval.overlap must be in [0, 1), got {e.overlap}")
    if e.num_dump < 0:
        raise ConfigError(f"eval.num_dump must be >= 0, got {e.num_dump}")
    if e.dump == "every" and e.num_dump == 0:
        raise ConfigError("eval.dump=every needs eval.num_dump >= 1 (the step between dumped images)")
    try:
        parse_bytes(e.memory_budget)
    except ValueError as err:
        raise ConfigError(str(err)) from None


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str | None, key: str = "eval.memory_budget") -> int | None:
    """A byte count from an int or a string such as '12GiB', '800 MB', '1.5G' (powers of 1024 for KiB/MiB/GiB/TiB,
    of 1000 otherwise); None and "" (no budget given) give None. A one-line error naming `key` for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected a byte count or a size such as '12GiB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{key} must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if m is None or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{key}: expected a byte count or a size such as '12GiB' or '800MB', got {value!r}")
    unit = _UNITS[m.group(2).lower()]
    count = float(m.group(1)) * unit
    if count < 1 or (unit == 1 and not count.is_integer()):  # 0.5 would become a budget of 0 bytes
        raise ValueError(f"{key}: {value!r} is not a whole number of bytes >= 1 (a number without a unit counts "
                         "bytes): write a size such as '8GiB' or '800MB'")
    return int(count)


def to_dict(obj: Any) -> Any:
    """Plain dict/list representation (tuples become lists), suitable for YAML and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def replaced(obj: Any, changes: dict[str, Any]) -> Any:
    """`dataclasses.replace` through dotted paths: replaced(data_cfg, {"augment.crop_size": (64, 64), "root": r})."""
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = replaced(getattr(obj, head), sub)
    return dataclasses.replace(obj, **direct)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def from_dict(values: dict[str, Any]) -> Config:
    """Build a Config from a (possibly partial) nested dict; missing keys take the schema defaults.

    Old key names (`ALIASES`, e.g. in a checkpoint written by an earlier version) are read at their new place;
    removed keys (`REMOVED`) are dropped."""
    values = _rename_aliases(values, "config")
    for key in REMOVED:
        section, name = key.split(".")
        if isinstance(values.get(section), dict):
            values[section].pop(name, None)
    return validate(_build(Config, _merge(to_dict(Config()), values)))


# ----------------------------------------------------------------------------------------------- merging


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML would keep the last one without a word."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)


def _refuse_duplicate_keys(node: yaml.Node, key: str, seen: set[int]) -> None:
    """Walk the composed document (before merge keys are applied: `<<` may be overridden on purpose)."""
    if id(node) in seen:  # an alias: its anchor was walked already (and a recursive one would never end)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{key}[{i}]", seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Mark] = {}
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge" or not isinstance(k, yaml.ScalarNode):
                continue
            dotted = f"{key}.{k.value}" if key else k.value
            if (k.tag, k.value) in first:
                at = first[(k.tag, k.value)]
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{dotted}' (also at line {at.line + 1}, column {at.column + 1}; only "
                    "one would be kept): keep one", k.start_mark)
            first[(k.tag, k.value)] = k.start_mark
            _refuse_duplicate_keys(v, dotted, seen)


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """PyYAML's report of several lines as one: 'line L, column C: what' (`text`: the document it read)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark, what = e.problem_mark, e.problem or "invalid"
        if e.context:
            at = e.context_mark
            what += f" ({e.context}" + (f" at line {at.line + 1}, column {at.column + 1})" if at else ")")
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    if isinstance(e, yaml.reader.ReaderError):
        line = text.count("\n", 0, e.position) + 1
        return f"line {line}: unacceptable character #x{e.character:04x} ({e.reason})"
    return " ".join(str(e).split())


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}, line {line}: {raw[e.start:e.start + 1]!r}); "
                          "save the file as UTF-8") from e
    try:
        data = yaml.load(text, Loader=_RecipeLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML at {_yaml_problem(e, text)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_yaml_values(path: str, renamed: list[str] | None = None) -> dict[str, Any]:
    """Values of a recipe, with its `base:` (one level, relative to the recipe) merged underneath. Its old key names
    are noted in `renamed`, when given (for the caller to warn once the config is valid), or logged as warnings."""
    notes: list[str] = []
    data = _read_yaml(path)
    base = data.pop("base", None)
    data = _rename_aliases(data, path, notes)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: 'base:' must name one recipe file (a path relative to this one), "
                              f"got {type(base).__name__} {base!r}")
        base_path = os.path.join(os.path.dirname(path), base)
        parent = _read_yaml(base_path)
        if "base" in parent:
            raise ConfigError(f"{base_path}: only one level of 'base:' is allowed (it names {parent['base']!r})")
        data = _merge(_rename_aliases(parent, base_path, notes), data)
    if renamed is None:
        for note in notes:
            _log.warning(note)
    else:
        renamed.extend(notes)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=5e-3' -> (['train', 'lr'], '5e-3'): the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.load(raw, Loader=_RecipeLoader) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML at {_yaml_problem(e, raw)}") from e
    return key.split("."), value


def _set_path(values: dict[str, Any], parts: list[str], value: Any) -> None:
    node = values
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults, then the YAML recipe at `path` (if any), then dotted `overrides`."""
    # A recipe's model.options replaces the defaults' as a whole; an override edits the merged result in place.
    renamed: list[str] = []  # old key names, warned about once the config is valid (a refusal stays one line)
    values = _merge(to_dict(Config()), load_yaml_values(path, renamed) if path else {})
    given: dict[str, str] = {}  # each key set by an override -> the name it was given as
    for text in overrides:
        parts, value = parse_override(text)
        name, old = ".".join(parts), ".".join(parts[:2])
        if old in ALIASES:
            renamed.append(f"override {text}: config key '{old}' is now '{ALIASES[old]}' (the old name still works)")
            parts = ALIASES[old].split(".") + parts[2:]
        key = ".".join(parts)
        if given.setdefault(key, name) != name:  # as in a recipe: which of the two was meant would be a guess
            raise ConfigError(f"overrides: '{given[key]}' and '{name}' are the same key (the old and the new name); "
                              f"keep '{key}'")
        _set_path(values, parts, value)
    cfg = validate(_build(Config, values))
    for note in renamed:
        _log.warning(note)
    return cfg


# Keys that do not change the weights a run produces: a resume (or a rerun of a pipeline stage) may change them.
RESULT_NEUTRAL = ("eval.", "run.name:", "run.output_dir:", "run.channels_last:", "run.cpu_tuning:")


def unknown_keys(values: dict[str, Any]) -> list[str]:
    """Dotted keys of a stored config (a checkpoint's) that this version's schema does not have, old names of
    renamed keys and of `REMOVED` aside (those changed no number): settings of a newer version, or of an older one
    that were removed since."""
    out: list[str] = []

    def walk(x: Any, schema: Any, key: str) -> None:
        if not isinstance(x, dict) or not isinstance(schema, dict) or key == "model.options":
            return
        for k, v in x.items():
            dotted = f"{key}.{k}" if key else str(k)
            if k in schema:
                walk(v, schema[k], dotted)
            elif dotted not in REMOVED:  # a removed key set nothing this version would differ in
                out.append(dotted)

    walk(_rename_aliases(values, "checkpoint"), to_dict(Config()), "")
    return sorted(out)


def training_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """`diff_configs` without the keys of RESULT_NEUTRAL: what would make a resumed run another run."""
    return [d for d in diff_configs(saved, cfg) if not d.startswith(RESULT_NEUTRAL)]


def diff_configs(a: Config | dict[str, Any], b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs (for resume checks).

    `a` may be the plain dict a checkpoint stores, written by another version of the schema: its keys that this
    schema does not have are left out (`unknown_keys` lists them), keys it lacks take the defaults.
    """
    out: list[str] = []

    def walk(x: Any, y: Any, key: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            keys = set(y) if not key.endswith("options") else set(x) | set(y)
            for k in sorted(keys):
                walk(x.get(k), y.get(k), f"{key}.{k}" if key else k)
        elif x != y:
            out.append(f"{key}: {x!r} -> {y!r}")

    saved = _merge(to_dict(Config()), _rename_aliases(a, "checkpoint")) if isinstance(a, dict) else to_dict(a)
    walk(saved, to_dict(b), "")
    return out
