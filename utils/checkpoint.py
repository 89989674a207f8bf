"""Checkpoints: atomic writes, auto-resume, and loading of ours and the original's snapshots.

Our files hold {'format': 'hmsa', 'config', 'model', 'optimizer', 'scheduler', 'scaler', 'state' (iteration,
data position, best so far, process count), 'rng' (one entry per rank)}: tensors and plain values only, read back
with torch's weights_only loader, and best.pth also 'best' (mIoU, iteration, epoch).
The original's hold {'state_dict': {'module.' + key: tensor}, 'arch', 'num_classes', 'epoch', 'optimizer',
'mean_iu', 'command'}; both load here.
"""
from __future__ import annotations

import glob
import os
import pickle
import random
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.files import atomic_write

# Renames from the original's key layout to ours (prefix -> prefix). Our modules are named after the original's,
# so only wrapper prefixes need handling.
KEY_RENAMES: tuple[tuple[str, str], ...] = (("module.", ""),)

CKPT_PATTERN = "ckpt_{:08d}.pth"
BEST_NAME = "best.pth"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the model; the message names the file."""


TMP_PREFIX, TMP_SUFFIX = ".tmp_", ".pth"  # atomic_save's temporary files (left behind only by a killed write)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A failed write (e.g. a full disk) removes the temporary file, leaves any existing `path` as it was, and raises
    OSError naming `path`: torch's zip writer reports a full disk as a RuntimeError of its own ('unexpected pos')
    over the file's OSError, which `atomic_write` finds (utils/files.py).
    """
    atomic_write(path, lambda f: torch.save(obj, f), True, TMP_PREFIX, TMP_SUFFIX)


def remove_orphaned_temps(run_dir: str) -> list[str]:
    """Delete the temporary files of checkpoint writes that a kill interrupted; returns their paths."""
    found = glob.glob(os.path.join(run_dir, TMP_PREFIX + "*" + TMP_SUFFIX))
    for path in found:
        os.remove(path)
    return found


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds Python objects beyond tensors and plain values: unpickling it could run code."""


TRUST_VARIABLE = "HMSA_TRUST_CHECKPOINT"  # paths (os.pathsep-separated) the user trusts to unpickle in full
# Checkpoints of earlier versions hold numpy's random state: an array, which these rebuild without running code.
_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np._core.multiarray._reconstruct,
                  (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _trusted(path: str) -> bool:
    listed = [p for p in os.environ.get(TRUST_VARIABLE, "").split(os.pathsep) if p]
    return os.path.realpath(path) in {os.path.realpath(p) for p in listed}


def read_checkpoint(path: str, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU, with a clear error for a missing, truncated or foreign file.

    Only tensors and plain values are unpickled (torch's weights_only loader): a file that needs any other object
    is refused, since building it could run code from the file, unless its path is listed in $HMSA_TRUST_CHECKPOINT.
    mmap: map the tensors instead of reading them (to look at the small fields of a large file)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    trusted = _trusted(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(e))
        if found is None:  # any other refusal of the restricted unpickler: not a checkpoint it can read
            raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                                  f"{_first_line(str(e).split('WeightsUnpickler error:')[-1])}") from e
        raise UnsafeCheckpointError(
            f"{path}: holds Python objects beyond tensors and plain values ({found.group(1)}), and loading it could "
            f"run code from the file; if you trust its source, list it in {TRUST_VARIABLE}={path} to load it "
            "anyway") from e
    except (RuntimeError, EOFError, IndexError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    return ckpt


def normalize_key(key: str) -> str:
    for src, dst in KEY_RENAMES:
        if key.startswith(src):
            key = dst + key[len(src):]
    return key


def extract_state_dict(ckpt: dict[str, Any], path: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model weights of our format, the original's ('state_dict', 'module.' prefix) or a bare state dict."""
    for field_name in ("model", "state_dict"):
        if field_name in ckpt and isinstance(ckpt[field_name], dict):
            sd = ckpt[field_name]
            break
    else:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            sd = ckpt
        else:
            raise CheckpointError(f"{path}: no model weights found (keys: {sorted(ckpt)[:10]})")
    return {normalize_key(k): v for k, v in sd.items()}


def _short(keys: list[str], n: int = 8) -> str:
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


@dataclass
class LoadReport:
    """What a load did: keys loaded, and those skipped with the reason."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # "key: file shape vs model shape"

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        lines = [f"{self.path}: loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"  not in the file (kept initialised) [{len(self.missing)}]: {_short(self.missing)}")
        if self.mismatched:
            lines.append(f"  shape differs (skipped) [{len(self.mismatched)}]: {_short(self.mismatched)}")
        if self.unexpected:
            lines.append(f"  not in the model (ignored) [{len(self.unexpected)}]: {_short(self.unexpected)}")
        return "\n".join(lines)


def load_state_dict_checked(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    path: str,
    strict: bool = True,
    min_fraction: float = 0.5,
) -> LoadReport:
    """Copy tensors whose name and shape match.

    strict: every key must match both ways, else CheckpointError listing missing, unexpected, mismatched keys.
    not strict (fine-tuning): load what matches and report the rest; fewer than `min_fraction` of the model's keys
    matching is still an error (a snapshot of another architecture is not a silent no-op).
    """
    own = model.state_dict()
    report = LoadReport(path)
    merged = dict(own)
    for key, tensor in own.items():
        if key not in state:
            report.missing.append(key)
        elif tuple(state[key].shape) != tuple(tensor.shape):
            report.mismatched.append(f"{key}: {tuple(state[key].shape)} vs {tuple(tensor.shape)}")
        else:
            merged[key] = state[key].to(dtype=tensor.dtype)
            report.loaded.append(key)
    report.unexpected = [k for k in state if k not in own]
    if strict and not report.complete:
        raise CheckpointError(
            f"{path} does not match the model ({type(model).__name__}):\n" + report.summary()
            + "\n(for a deliberate partial load, e.g. another class count, load with strict=False)"
        )
    if len(report.loaded) < min_fraction * len(own):
        raise CheckpointError(
            f"{path}: only {len(report.loaded)} of the model's {len(own)} tensors match; "
            f"this is a checkpoint of another architecture:\n" + report.summary()
        )
    model.load_state_dict(merged)
    return report


def load_checkpoint(model: nn.Module, path: str, strict: bool = True) -> LoadReport:
    """Load model weights from our checkpoint or an original snapshot; see `load_state_dict_checked`."""
    ckpt = read_checkpoint(path)
    return load_state_dict_checked(model, extract_state_dict(ckpt, path), path, strict=strict)


# ----------------------------------------------------------------------------------------------- run folders


def checkpoint_paths(run_dir: str) -> list[str]:
    """Our checkpoints in a run folder, newest (highest iteration) first."""
    found = glob.glob(os.path.join(run_dir, "ckpt_*.pth"))

    def iteration(p: str) -> int:
        m = re.search(r"ckpt_(\d+)\.pth$", p)
        return int(m.group(1)) if m else -1

    return sorted((p for p in found if iteration(p) >= 0), key=iteration, reverse=True)


@dataclass
class Latest:
    """The newest readable checkpoint of a run folder, and the newer ones that did not read back (with why)."""

    path: str
    ckpt: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def latest_checkpoint(run_dir: str) -> Latest | None:
    """The newest checkpoint that reads back; None when the folder has none.

    An unreadable newer file (damaged on disk) is skipped and reported in `skipped`. A folder whose checkpoints
    all fail to read is a CheckpointError listing them: starting again from iteration 0 would silently discard
    the run.
    """
    skipped: list[tuple[str, str]] = []
    for path in checkpoint_paths(run_dir):
        try:
            return Latest(path, read_checkpoint(path), skipped)
        except UnsafeCheckpointError:
            raise  # not damage to skip past: someone put it there
        except CheckpointError as e:
            skipped.append((path, str(e).removeprefix(f"{path}: ")))
    if skipped:
        listing = "; ".join(f"{p}: {why}" for p, why in skipped)
        raise CheckpointError(f"none of the {len(skipped)} checkpoint(s) in {run_dir} reads back ({listing}); "
                              "restore a good file, or start a new run with another run.name")
    return None


def best_record(run_dir: str) -> dict[str, Any] | None:
    """The {'miou', 'iteration', 'epoch'} of the run's best.pth, or None; memory-mapped, so the weights stay on disk."""
    path = os.path.join(run_dir, BEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        return read_checkpoint(path, mmap=True).get("best")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; move it away to let the run keep a new best") from e


def save_best(run_dir: str, state: dict[str, Any]) -> str:
    """Write best.pth atomically (the checkpoint of the best validation so far)."""
    path = os.path.join(run_dir, BEST_NAME)
    atomic_save(state, path)
    return path


def save_run_checkpoint(run_dir: str, iteration: int, state: dict[str, Any], keep: int = 2) -> str:
    """Write ckpt_<iteration>.pth atomically and delete all but the newest `keep`."""
    path = os.path.join(run_dir, CKPT_PATTERN.format(iteration))
    atomic_save(state, path)
    for old in checkpoint_paths(run_dir)[keep:]:
        os.remove(old)
    return path


def rng_state() -> dict[str, Any]:
    """This process's random streams: CPU torch, numpy, python, and the CUDA stream of its own device only (a
    process that saved every visible GPU's could not restore them where it sees fewer, or another binding).
    Tensors and plain values only, so that the checkpoint loads without unpickling objects."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       cached], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s streams; the CUDA one goes to this process's current device. A checkpoint of an
    older version holds a list (every GPU the process saw): the entry of the current device when it has one."""
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]  # keys: an int64 tensor, or a uint32 array in older checkpoints
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, keys.astype(np.uint32), *rest))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        index = torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)


def load_trunk_weights(trunk: nn.Module, path: str) -> LoadReport:
    """ImageNet initialisation of a trunk from a classification checkpoint.

    The trunk's `imagenet_key(key) -> key | None` maps the file's names to its own and drops the classifier;
    everything else must match (name and shape), otherwise the error names the file and the keys.
    """
    state = extract_state_dict(read_checkpoint(path), path)
    mapped = {}
    dropped = []
    for key, tensor in state.items():
        new = trunk.imagenet_key(key)
        if new is None:
            dropped.append(key)
        else:
            mapped[new] = tensor
    # Older classification files (e.g. torchvision's) predate BN's num_batches_tracked counter.
    for key, value in trunk.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = value
    report = load_state_dict_checked(trunk, mapped, path, strict=True)
    report.unexpected = dropped  # the classifier keys, dropped by design
    return report


# ----------------------------------------------------------------------------------------------- resume layout

LAYOUT_KEYS = ("data.batch_size:", "train.accum_steps:")  # how the global batch is split, not what it is


@dataclass(frozen=True)
class BatchLayout:
    """How a step's global batch is split: images per batch x batches per step x processes."""

    batch_size: int
    accum_steps: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accum_steps * self.world_size

    def __str__(self) -> str:
        return (f"{self.global_batch} (data.batch_size {self.batch_size} x train.accum_steps {self.accum_steps} x "
                f"{self.world_size} process(es))")


def saved_layout(ckpt: dict[str, Any]) -> BatchLayout:
    """The layout a checkpoint of ours was written with (older files: the process count from their RNG list)."""
    cfg = ckpt.get("config") or {}
    rng = ckpt.get("rng")
    world = ckpt.get("state", {}).get("world_size") or (len(rng) if isinstance(rng, list) else 1)
    return BatchLayout(int(cfg.get("data", {}).get("batch_size", 8)), int(cfg.get("train", {}).get("accum_steps", 1)),
                       int(world))


def layout_refusal(path: str, saved: BatchLayout, now: BatchLayout) -> str | None:
    """Why a resume of `path` cannot continue the same sample order (None: it can). The order is kept when the
    global batch is: the sampler places samples by their global index (datasets/sampler.py)."""
    if saved.global_batch == now.global_batch:
        return None
    fits = []
    for accum in range(1, 65):
        if saved.global_batch == now.batch_size * accum * now.world_size:
            fits.append(f"train.accum_steps={accum}")
            break
    return (f"refusing to resume {path}: it was trained with a global batch of {saved}, this run has {now}; keep "
            f"the global batch ({'e.g. ' + fits[0] if fits else 'data.batch_size x train.accum_steps x processes'}) "
            "to continue the same samples in the same order, or use --force-resume to continue anyway")
