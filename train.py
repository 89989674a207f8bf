"""Train a segmentation model: `python train.py [--config RECIPE.yaml] [key.sub=value ...] [--resume auto]`.

With no arguments it runs the embedded demo: it generates a small synthetic Cityscapes-layout dataset, trains
the multi-scale attention model on the CPU, evaluates it with scales 0.5, 1.0, 2.0 and writes the results.
Under torchrun or srun (one task per GPU) it trains data-parallel; see docs/distributed.md.
On SIGUSR1, SIGTERM or Ctrl-C it checkpoints at the next step and exits with code 75 (the sbatch script requeues
it); a second Ctrl-C stops at once.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

import network
from network.layers import sync_batchnorm
from datasets import build_dataset, build_loader
from datasets.agree import agree_on_samples
from datasets.base import DataError
from loss import build_criterion
from utils.checkpoint import (
    LAYOUT_KEYS,
    BatchLayout,
    CheckpointError,
    layout_refusal,
    saved_layout,
    best_record,
    checkpoint_paths as checkpoint_files,
    latest_checkpoint,
    load_checkpoint,
    load_state_dict_checked,
    load_trunk_weights,
    read_checkpoint,
    remove_orphaned_temps,
    rng_state,
    save_best,
    save_run_checkpoint,
    set_rng_state,
)
from utils.cli import CliError, debug_enabled, ensure_writable_dir, load_and_start, one_line_errors, run_cli
from utils.config import Config, ConfigError, to_dict, to_yaml, training_differences, unknown_keys
from utils.engine import TrainBatches, TrainState, evaluate, poly_lambda, reduce_scalars, train_step
from utils.files import atomic_write_text
from utils.folders import claim_run_folder
from utils.evaluation.metrics import compute_metrics, format_table
from utils.inference import Inference
from utils.inference.memory import check_eval_memory, check_train_memory, largest_input_size
from utils.log import MetricsWriter, Progress, run_logging
from utils.runtime.dist import (
    DistConfigError,
    DistInfo,
    DistributedError,
    all_gather_objects,
    barrier,
    broadcast_object,
    cleanup,
    collective_errors,
)
from utils.runtime.cpu_tuning import tune_for_cpu
from utils.runtime.layout import place_model as place_on_device
from utils.runtime.precision import grad_scaler
from utils.runtime.preempt import EXIT_PREEMPTED, Preemption


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML recipe (default: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=5e-3 eval.scales=[0.5,1.0]")
    p.add_argument("--resume", default="auto", help="'auto' (continue the run folder if it has a checkpoint), "
                   "'none' (refuse to reuse a folder with checkpoints) or a checkpoint path")
    p.add_argument("--force-resume", action="store_true", help="resume even if the config differs from the run's")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: HMSA_DEBUG=1)")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_intermixed_args(argv)  # options may come between the overrides


# Expected failures: each becomes one line `error: ...` and exit code 2 (utils/cli.py).
EXPECTED_ERRORS = (ConfigError, CheckpointError, DataError, DistConfigError, DistributedError, FloatingPointError,
                   ValueError)
log = logging.getLogger("train")
PREEMPT_CHECK_STEPS = 10
RESUMABLE = {"model", "optimizer", "scheduler", "state", "rng"}  # what a resume restores (Training.payload)  # at most this many steps between two agreements on a preemption signal


def step_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One step of the learning-rate schedule. The schedule follows the iterations, skipped fp16 steps included (as
    the original's did), so torch's warning that a step came before any optimizer.step() is moot after an fp16 run's
    first steps overflowed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer")
        scheduler.step()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32 bits; a resumed rank's seed adds 100003 per iteration
    torch.manual_seed(seed)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        # The fused kernel (CUDA) gives the same update in one launch, but not under fp16 loss scaling: on a step
        # the scaler skips (gradients overflowed, as the first steps at the initial scale do) it still creates or
        # advances the momentum buffers, and the next step applies them (tests/utils/test_precision_steps.py).
        fused = any(p.is_cuda for p in params) and cfg.run.precision != "fp16"
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=fused)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """torch's load_state_dict restores each group's options, the kernel choice (fused, foreach) among them: a CUDA
    run resumed from a CPU checkpoint would keep the CPU's kernel. The choice build_optimizer made here stays."""
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, chosen in zip(optimizer.param_groups, kernels):
        group.update(chosen)


def resume_source(args: argparse.Namespace, cfg: Config, run_dir: str, dist: DistInfo,
                  log_warn: list[str]) -> tuple[str, dict] | None:
    """The checkpoint to resume from, after checking that its config matches this command's.

    Rank 0 chooses the file (the newest readable one) and every rank reads that same file. Newer files that did not
    read back are reported in `log_warn` (logged once the run's logger exists).
    """
    if args.resume == "auto":
        found, error = None, None
        if dist.is_main:
            try:
                found = latest_checkpoint(run_dir)
            except CheckpointError as e:
                error = str(e)
        path, error = broadcast_object(((found.path if found else None), error) if dist.is_main else None)
        if error is not None:
            raise CheckpointError(error)  # on every rank, so that all of them stop
        if path is None:
            return None
        if found:
            log_warn.extend(f"skipped unreadable checkpoint {p}: {why}" for p, why in found.skipped)
        ckpt = found.ckpt if found else read_checkpoint(path)
    elif args.resume == "none":
        if broadcast_object(bool(checkpoint_files(run_dir)) if dist.is_main else None):
            raise CliError(f"{run_dir} already holds checkpoints (--resume none); use --resume auto to continue "
                           "it, or another run.name to start a new run")
        return None
    else:
        path, ckpt = args.resume, read_checkpoint(args.resume)
    if not RESUMABLE <= set(ckpt):
        raise CliError(f"--resume {path}: not a checkpoint of a training run (it holds "
                       f"{', '.join(sorted(map(str, ckpt))[:6]) or 'nothing'}; weights only, as the original's "
                       "snapshots): --resume continues a run from one of its ckpt_*.pth; to start a new run from "
                       f"these weights, use model.snapshot={path}")
    saved_config = ckpt["config"] if isinstance(ckpt.get("config"), dict) else {}
    unknown = unknown_keys(saved_config)
    if unknown and not args.force_resume:
        raise CliError(f"refusing to resume {path}: its config has settings this version does not know "
                       f"({', '.join(unknown[:8])}): it was written by a newer version (update this one), or an older "
                       "one whose settings were removed since; --force-resume continues without them")
    differ = training_differences(saved_config, cfg) if saved_config else []
    now = BatchLayout(cfg.data.batch_size, cfg.train.accum_steps, dist.world_size)
    refusal = layout_refusal(path, saved_layout(ckpt), now)
    if refusal is None:  # another split of the same global batch: the same run
        differ = [d for d in differ if not d.startswith(LAYOUT_KEYS)]
    elif not args.force_resume:
        raise CliError(refusal)
    if differ and not args.force_resume:
        raise CliError(
            f"refusing to resume {path}: training settings differ from the run's: " + "; ".join(differ)
            + " (evaluation settings eval.*, run.name, run.output_dir, run.channels_last and run.cpu_tuning do not "
            "count; use --force-resume to continue anyway, or another run.name for a new run)"
        )
    return path, ckpt


def restore(resume: tuple[str, dict], parts: tuple, cfg: Config, dist: DistInfo, run_dir: str) -> TrainState:
    """Load optimizer, scheduler, grad scaler and data position (`parts`, in that order) and the random streams
    from the checkpoint; returns the progress to continue from."""
    path, ckpt = resume
    for part, key in zip(parts, ("optimizer", "scheduler", "scaler", "state")):
        if key == "scaler" and part.is_enabled() and not ckpt[key]:
            # saved by a run without loss scaling (fp32/bf16), resumed in fp16 with --force-resume
            log.warning(f"{path} holds no loss-scaler state (saved without fp16): the fp16 loss scale starts afresh")
            continue
        if key == "optimizer":
            load_optimizer_state(part, ckpt[key])
        else:
            part.load_state_dict(ckpt[key])
    state = TrainState(**{k: v for k, v in ckpt["state"].items() if k in TrainState.__dataclass_fields__})
    restore_rng(ckpt, cfg, dist)
    log.info(f"resumed from {path} at iteration {state.iteration}")
    # A validation after the last checkpoint may have saved a better best.pth: its record wins, so that a worse
    # model never replaces it.
    best = broadcast_object(best_record(run_dir) if dist.is_main else None)
    if best is not None and best["miou"] > state.best_miou:
        state.best_miou, state.best_iteration = best["miou"], best["iteration"]
        log.info(f"best so far: mIoU {100 * best['miou']:.2f} at iteration {best['iteration']} (best.pth)")
    return state


def restore_rng(ckpt: dict, cfg: Config, dist: DistInfo) -> None:
    """Each rank continues its own random streams; a run resumed on another process count cannot."""
    saved = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if len(saved) != dist.world_size:
        log.info(f"resumed on {dist.world_size} process(es) from a checkpoint of {len(saved)}: the samples continue "
                 "in the same order (augmentation is seeded per sample); ranks below "
                 f"{min(len(saved), dist.world_size)} continue their random streams, others start new ones")
    if dist.rank < len(saved):
        set_rng_state(saved[dist.rank])
    else:
        seed_everything(cfg.train.seed + dist.rank + 100003 * ckpt["state"]["iteration"])


def prepare_output(run_dir: str, dump_dir: str, dist: DistInfo) -> list[str]:
    """Create and check the output folders now, so that a typo in a path fails before any work, not at the first
    checkpoint or the final dump; remove temporary files of killed checkpoint writes. Returns warnings to log."""
    if not dist.is_main:
        return []
    ensure_writable_dir(dump_dir, "eval.dump_dir")
    return [f"removed {p}, left by an interrupted checkpoint write" for p in remove_orphaned_temps(run_dir)]


def place_model(net: torch.nn.Module, cfg: Config, dist: DistInfo) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module itself, for checkpoints and evaluation; what a training step calls: DDP / compiled)."""
    # Fixed crop sizes: let cuDNN pick the fastest kernels once (as the original did).
    torch.backends.cudnn.benchmark = dist.device.type == "cuda"
    place_on_device(net, dist.device, cfg.run.channels_last)
    if cfg.run.cpu_tuning:
        log.info(tune_for_cpu(net, dist.device))
    model: torch.nn.Module = net
    if dist.distributed:
        if cfg.model.norm == "syncbn":
            net = sync_batchnorm(net, dist.device)
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    if cfg.train.compile:
        model = torch.compile(model)
    return net, model


def schedule(cfg: Config, optimizer: torch.optim.Optimizer, batches: TrainBatches,
             steps_per_epoch: int) -> tuple[int, torch.optim.lr_scheduler.LambdaLR]:
    """The iteration budget and the poly learning rate (stepped per iteration, or per epoch as the original)."""
    if cfg.train.max_iter > 0:
        max_iter = cfg.train.max_iter
    else:  # epochs may differ in length (coarse data switched off at data.coarse.last_epoch)
        max_iter = sum(batches.epoch_steps(e) for e in range(cfg.train.max_epoch))
    if cfg.train.lr_step == "iter":
        length = max_iter
    else:
        length = math.ceil(max_iter / steps_per_epoch) if cfg.train.max_iter > 0 else cfg.train.max_epoch
    return max_iter, torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(length, cfg.train.poly_exp))


@dataclass
class Training:
    """What a checkpoint saves and a resume restores, and where it goes."""

    cfg: Config
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    batches: TrainBatches
    state: TrainState
    run_dir: str
    dist: DistInfo
    metrics: MetricsWriter
    saved_at: int  # the iteration of the last checkpoint (-1: none in this process)

    def payload(self) -> dict | None:
        """Everything a resume restores (on rank 0; None elsewhere). Collective: every rank calls it."""
        rngs = all_gather_objects(rng_state())  # every rank's streams, restored rank by rank
        if not self.dist.is_main:
            return None
        return {
            "format": "hmsa",
            "config": to_dict(self.cfg),
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": {**vars(self.state), **self.batches.state_dict(), "world_size": self.dist.world_size},
            "rng": rngs,  # one entry per rank
        }

    def checkpoint(self) -> None:
        content = self.payload()
        if self.dist.is_main:
            log.info(f"checkpoint {save_run_checkpoint(self.run_dir, self.state.iteration, content)}")
        barrier()  # nobody moves on (or exits) before the file is complete
        self.saved_at = self.state.iteration

    def save_best(self, miou: float) -> None:
        """best.pth: the whole checkpoint with its mIoU, iteration and epoch."""
        self.state.best_miou, self.state.best_iteration = miou, self.state.iteration
        content = self.payload()
        if self.dist.is_main:
            content["best"] = {"miou": miou, "iteration": self.state.iteration, "epoch": self.batches.epoch}
            log.info(f"best mIoU {100 * miou:.2f} at iteration {self.state.iteration}: "
                          f"{save_best(self.run_dir, content)}")
        barrier()


@dataclass
class Validation:
    """The validation split and how it is evaluated (the final validation also writes the dumps)."""

    loader: torch.utils.data.DataLoader
    dataset: torch.utils.data.Dataset
    inference: Inference
    dump_dir: str


def validate(run: Training, v: Validation, preempt: Preemption, final: bool) -> dict | None:
    """Metrics of the validation split; None when a preemption signal cut it short (on every rank).

    A new best mIoU is saved as best.pth. The model is left in eval mode."""
    e = run.cfg.eval
    result = evaluate(
        run.net, v.loader, v.dataset.num_classes, v.dataset.ignore_index, v.inference, run.dist.device,
        dump_dir=v.dump_dir if final else None, dump=e.dump, num_dump=e.num_dump if final else 0,
        palette=v.dataset.palette, should_stop=preempt.batch_check(len(v.loader)),
    )
    it = run.state.iteration
    if result.stopped:
        log.info(f"validation at iteration {it} interrupted by a preemption signal")
        return None
    if result.images_skipped:
        log.warning(f"validation at iteration {it}: {result.images_skipped} unreadable image(s) left out "
                    "(data.skip_bad=true)")
    metrics = compute_metrics(result.hist, v.dataset.class_names)
    metrics["loss"] = result.loss
    run.metrics.scalars("val", it, {k: metrics[k] for k in ("miou", "acc", "acc_cls", "fwavacc", "loss")})
    log.info(f"validation at iteration {it} (epoch {run.batches.epoch}), scales {list(e.scales)}"
                 f"{' + flip' if e.flip else ''}:\n" + format_table(metrics))
    if metrics["miou"] > run.state.best_miou:
        run.save_best(metrics["miou"])
    log.info(f"best so far: mIoU {100 * run.state.best_miou:.2f} at iteration {run.state.best_iteration}")
    return metrics


MIN_LOSS_SCALE = 1.0  # fp16: a scale halved below this by step after step means the loss itself diverged


def check_finite(values: dict[str, float], bad: int, it: int, world: int) -> None:
    """A logging step whose loss was not finite on `bad` of `world` ranks (the same answer on every rank). Under
    fp16 the loss scaler skipped that step on every rank (DDP shared the overflowed gradients): logged, not fatal,
    until the scale collapses. Otherwise every rank stops."""
    where = f"iteration {it} on {bad} of {world} process(es)"
    scale = values.get("loss_scale")
    if scale is not None and scale >= MIN_LOSS_SCALE:
        log.warning(f"non-finite loss at {where}: the fp16 loss scaler skipped the step (scale now {scale:g})")
        return
    raise FloatingPointError(f"non-finite loss at {where}: {values} (lower train.lr, or use run.precision=fp32; "
                             "the last checkpoint is kept)")


def stop_for_preemption(run: Training, max_iter: int) -> None:
    """Checkpoint (unless this iteration has one), then leave with the requeue exit code, all ranks together."""
    if run.saved_at != run.state.iteration:
        run.checkpoint()
    log.info(f"stopped by a preemption signal at iteration {run.state.iteration}/{max_iter}; exit code "
                 f"{EXIT_PREEMPTED}: SLURM or train.sbatch requeues the job; after scancel, run the same command again "
                 "to resume")
    barrier()  # leave together: srun --kill-on-bad-exit ends the others as soon as one task exits 75
    raise SystemExit(EXIT_PREEMPTED)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with one_line_errors(args.debug or debug_enabled(), EXPECTED_ERRORS):
        cfg, dist = load_and_start(args)
        run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
        try:
            with Preemption(rank=dist.rank) as preempt, collective_errors(dist, f"{run_dir}/logs/rank*.log"), \
                    claim_run_folder(run_dir, dist), contextlib.ExitStack() as outputs:
                return train(args, cfg, dist, run_dir, preempt, outputs)
        finally:
            cleanup()


def train(args: argparse.Namespace, cfg: Config, dist: DistInfo, run_dir: str, preempt: Preemption,
          outputs: contextlib.ExitStack) -> dict:
    seed_everything(cfg.train.seed + dist.rank)
    dump_dir = os.path.join(run_dir, cfg.eval.dump_dir)
    notices = prepare_output(run_dir, dump_dir, dist)
    resume = resume_source(args, cfg, run_dir, dist, notices)

    # Data. Each process loads data.batch_size images per batch; a step takes train.accum_steps batches.
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    for dataset in (train_set, val_set):  # one sample list on every rank, or one line naming the file
        agree_on_samples(dataset, all_gather_objects)
    train_loader = build_loader(train_set, cfg.data, True, dist.rank, dist.world_size, cfg.train.seed)
    val_loader = build_loader(val_set, cfg.data, False, dist.rank, dist.world_size, cfg.train.seed)
    num_classes, ignore = train_set.num_classes, train_set.ignore_index
    accum = cfg.train.accum_steps
    global_batch = cfg.data.batch_size * accum * dist.world_size
    batches = TrainBatches(train_loader, accum, global_batch, dist.world_size)
    steps_per_epoch = batches.epoch_steps(0)
    if steps_per_epoch == 0:
        raise CliError(f"the training split has {len(train_set)} images, fewer than one step of {global_batch} "
                       f"(data.batch_size x train.accum_steps x {dist.world_size} processes): lower data.batch_size")

    # Model: `net` is the module itself (checkpoints, evaluation), `model` what a training step calls.
    net = network.build_model(cfg.model.name, num_classes, **cfg.model.options)
    reports = []
    if cfg.model.pretrained:
        reports.append(load_trunk_weights(net.backbone, cfg.model.pretrained).summary())
    if cfg.model.snapshot and resume is None:
        reports.append(load_checkpoint(net, cfg.model.snapshot, strict=False).summary())
    if resume is not None:
        load_state_dict_checked(net, resume[1]["model"], resume[0], strict=True)
    # The run's files are touched only now: a refused resume, bad data or weights that do not fit change nothing.
    # Until the end of main: the console, train.log and rank logs (every package's logger), metrics.jsonl and tb/.
    outputs.enter_context(run_logging(run_dir, dist.is_main, dist.rank if dist.distributed else None))
    metrics_writer = outputs.enter_context(
        MetricsWriter(run_dir, dist.is_main, resume_iteration=resume[1]["state"]["iteration"] if resume else 0))
    for message in notices:
        log.warning(message)
    log.info(f"run folder {run_dir}; {dist.world_size} process(es) on {dist.device} (launcher: {dist.launcher})"
             + (f"; this is rank {dist.rank} on {socket.gethostname()}" if dist.distributed else ""))
    for report in reports:
        log.info(report)
    criterion = build_criterion(cfg.loss, num_classes, ignore)
    # Refuses a step that cannot fit, now; before placement and DDP, whose memory it predicts itself.
    fits = check_train_memory(cfg, dist.device, lambda: network.build_model(cfg.model.name, num_classes,
                                                                            **cfg.model.options),
                              lambda m: build_optimizer(cfg, m), criterion, dist.world_size)
    if fits:
        log.info(fits)
    # Evaluation settings the device cannot hold (eval.scales) stop here, not after the training.
    dumps = cfg.eval.dump != "none" and (cfg.eval.dump == "all" or cfg.eval.num_dump > 0)
    log.info(check_eval_memory(cfg, dist.device, net, largest_input_size((s.image for s in val_set.samples), cfg.data),
                               dumps=dumps, training=True))
    net, model = place_model(net, cfg, dist)

    inference = replace(Inference.from_config(cfg), sweep_sets=())  # validation: the evaluated setting only
    inference.combo(net)  # a scale set or fusion this model cannot evaluate fails now, not after training
    optimizer = build_optimizer(cfg, net)
    max_iter, scheduler = schedule(cfg, optimizer, batches, steps_per_epoch)
    per_iter = cfg.train.lr_step == "iter"
    scaler = grad_scaler(cfg.run.precision, dist.device)
    state = TrainState()
    if resume is not None:
        state = restore(resume, (optimizer, scheduler, scaler, batches), cfg, dist, run_dir)
    saved_at = state.iteration if resume is not None else -1
    # Written only now: a refused resume or a failed weight load leaves the run's config as it was.
    if dist.is_main:
        atomic_write_text(os.path.join(run_dir, "config.yaml"), to_yaml(cfg))

    run = Training(cfg, net, optimizer, scheduler, scaler, batches, state, run_dir, dist, metrics_writer, saved_at)
    validation = Validation(val_loader, val_set, inference, dump_dir)

    # The loop. Scalars stay on the device except at logging steps; ranks agree on a preemption signal at those
    # steps and every PREEMPT_CHECK_STEPS steps (a collective: not on every step).
    progress = Progress(max_iter, state.iteration, log.info)
    start = time.time()
    while state.iteration < max_iter:
        scalars = train_step(model, batches.next_step(), criterion, optimizer, scaler, precision=cfg.run.precision,
                             device=dist.device, channels_last=cfg.run.channels_last)
        state.iteration += 1
        it = state.iteration
        if per_iter:
            step_schedule(scheduler)
        scalars["lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
        epoch = batches.epoch
        epoch_ended = batches.step_done()
        if it % cfg.train.log_interval == 0 or it == max_iter:
            values, bad = reduce_scalars(scalars, dist.world_size)  # the mean over ranks, as the original logged
            if scaler.is_enabled():  # fp16: halved at each step whose gradients overflowed (a skipped step)
                values["loss_scale"] = scaler.get_scale()
            if bad:
                check_finite(values, bad, it, dist.world_size)
            progress.update(it, {**values, "epoch": epoch})
            metrics_writer.scalars("train", it, values)
        if epoch_ended and not per_iter:
            step_schedule(scheduler)  # the original's per-epoch poly step
        val_epochs = cfg.train.val_epochs
        epoch_val = epoch_ended and val_epochs > 0 and batches.epoch % val_epochs == 0
        if it < max_iter and (epoch_val or (cfg.train.val_interval > 0 and it % cfg.train.val_interval == 0)):
            if validate(run, validation, preempt, final=False) is None:
                stop_for_preemption(run, max_iter)
            model.train()
        if it % cfg.train.ckpt_interval == 0 and it < max_iter:
            run.checkpoint()
        if (it % cfg.train.log_interval == 0 or it % PREEMPT_CHECK_STEPS == 0) and preempt.agreed():
            stop_for_preemption(run, max_iter)
    log.info(f"training finished: {max_iter} iterations in {time.time() - start:.0f} s")
    # The weights are safe before the final validation: a bad val image or dump folder costs the evaluation only,
    # and the same command (after fixing an eval.* value) resumes straight into it.
    if run.saved_at != state.iteration:
        run.checkpoint()
    metrics = validate(run, validation, preempt, final=True)
    if metrics is None:
        stop_for_preemption(run, max_iter)
    if dist.is_main:
        results = {"written_by": "train.py", "iteration": state.iteration, "scales": list(cfg.eval.scales),
                   "flip": cfg.eval.flip,
                   "best_miou": state.best_miou, "best_iteration": state.best_iteration, **metrics}
        atomic_write_text(os.path.join(dump_dir, "results.json"), json.dumps(results, indent=1))
        log.info(f"last: mIoU {100 * metrics['miou']:.2f} at iteration {state.iteration}; best: mIoU "
                 f"{100 * state.best_miou:.2f} at iteration {state.best_iteration} "
                 f"({os.path.join(run_dir, 'best.pth')}); results in {dump_dir}")
    return metrics


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
