"""Train a segmentation model: `python train.py [--config RECIPE.yaml] [key.sub=value ...] [--resume auto]`.

With no arguments it runs the embedded demo: it generates a small synthetic Cityscapes-layout dataset, trains
the multi-scale attention model on the CPU, evaluates it with scales 0.5, 1.0, 2.0 and writes the results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

import network
from datasets import build_dataset, build_loader
from loss import build_criterion
from utils.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_trunk_weights,
    read_checkpoint,
    rng_state,
    save_run_checkpoint,
    set_rng_state,
)
from utils.config import Config, ConfigError, diff_configs, from_dict, load_config, to_dict, to_yaml
from utils.dist import DistInfo, cleanup, init_distributed
from utils.engine import Progress, RunLogger, TrainState, evaluate, poly_lambda, train_one_epoch, unwrap
from utils.metrics import compute_metrics, format_table
from utils.precision import grad_scaler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML recipe (default: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=5e-3 eval.scales=[0.5,1.0]")
    p.add_argument("--resume", default="auto", help="'auto' (continue the run folder if it has a checkpoint), "
                   "'none' (refuse to reuse a folder with checkpoints) or a checkpoint path")
    p.add_argument("--force-resume", action="store_true", help="resume even if the config differs from the run's")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def resume_source(args: argparse.Namespace, cfg: Config, run_dir: str) -> tuple[str, dict] | None:
    """The checkpoint to resume from, after checking that its config matches this command's."""
    if args.resume == "none":
        if latest_checkpoint(run_dir) is not None:
            raise SystemExit(f"{run_dir} already holds checkpoints; use --resume auto or another train.run_name")
        return None
    found = latest_checkpoint(run_dir) if args.resume == "auto" else (args.resume, read_checkpoint(args.resume))
    if found is None:
        return None
    path, ckpt = found
    differ = diff_configs(from_dict(ckpt["config"]), cfg) if "config" in ckpt else []
    if differ and not args.force_resume:
        raise SystemExit(
            f"refusing to resume {path}: the config differs from the run's:\n  " + "\n  ".join(differ)
            + "\n(use --force-resume to continue anyway, or another train.run_name)"
        )
    return path, ckpt


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from e
    dist: DistInfo = init_distributed()
    seed_everything(cfg.train.seed + dist.rank)
    run_dir = os.path.join(cfg.train.output_dir, cfg.train.run_name)
    resume = resume_source(args, cfg, run_dir)
    log = RunLogger(run_dir, enabled=dist.is_main, purge_step=resume[1]["state"]["iteration"] if resume else None)
    if dist.is_main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        log.info(f"run folder {run_dir}; {dist.world_size} process(es) on {dist.device}")

    # Data.
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    train_loader = build_loader(train_set, cfg.data, True, dist.rank, dist.world_size, cfg.train.seed)
    val_loader = build_loader(val_set, cfg.data, False, dist.rank, dist.world_size, cfg.train.seed)
    num_classes, ignore = train_set.num_classes, train_set.ignore_index

    # Model, loss, optimisation.
    model = network.build_model(cfg.model.name, num_classes, **cfg.model.options)
    if cfg.model.pretrained:
        log.info(load_trunk_weights(model.backbone, cfg.model.pretrained).summary())
    if cfg.model.snapshot and resume is None:
        log.info(load_checkpoint(model, cfg.model.snapshot, strict=False).summary())
    model.to(dist.device)
    if dist.distributed:
        if cfg.model.norm == "syncbn":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    criterion = build_criterion(cfg.loss, num_classes, ignore)
    optimizer = build_optimizer(cfg, model)
    iters_per_epoch = len(train_loader)
    if iters_per_epoch == 0:
        raise SystemExit(f"the training split has {len(train_set)} images, fewer than one batch of {cfg.data.batch_size}")
    max_iter = cfg.train.max_iter if cfg.train.max_iter > 0 else cfg.train.max_epoch * iters_per_epoch
    if max_iter <= 0:
        raise SystemExit("config error: set train.max_iter or train.max_epoch to a positive number")
    per_iter = cfg.train.lr_step == "iter"
    sched_len = max_iter if per_iter else math.ceil(max_iter / iters_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(sched_len, cfg.train.poly_exp))
    scaler = grad_scaler(cfg.train.precision, dist.device)
    state = TrainState()

    if resume is not None:
        path, ckpt = resume
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["state"])
        set_rng_state(ckpt["rng"][dist.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        log.info(f"resumed from {path} at iteration {state.iteration}")

    def checkpoint() -> None:
        if dist.is_main:
            payload = {
                "format": "hmsa",
                "arch": cfg.model.name,
                "num_classes": num_classes,
                "config": to_dict(cfg),
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "state": vars(state).copy(),
                "rng": rng_state(),
            }
            log.info(f"checkpoint {save_run_checkpoint(run_dir, state.iteration, payload)}")

    def validate(final: bool) -> dict:
        dump_dir = os.path.join(run_dir, cfg.eval.dump_dir) if final else None
        result = evaluate(
            model, val_loader, num_classes, ignore, cfg.eval.scales, dist.device, cfg.train.precision,
            flip=cfg.eval.flip, dump_dir=dump_dir, num_dump=cfg.eval.num_dump if final else 0,
            palette=val_set.palette, rank=dist.rank,
        )
        metrics = compute_metrics(result.hist, val_set.class_names)
        metrics["loss"] = result.loss
        log.scalars("val", state.iteration, {k: metrics[k] for k in ("miou", "acc", "acc_cls", "fwavacc", "loss")})
        log.info(f"validation at iteration {state.iteration}, scales {list(cfg.eval.scales)}"
                 f"{' + flip' if cfg.eval.flip else ''}:\n" + format_table(metrics))
        if metrics["miou"] > state.best_miou:
            state.best_miou, state.best_iteration = metrics["miou"], state.iteration
        model.train()
        return metrics

    progress = Progress(max_iter, state.iteration, log.info)

    def on_step(scalars: dict[str, float]) -> bool:
        it = state.iteration
        if not all(math.isfinite(v) for v in scalars.values()):
            raise FloatingPointError(f"non-finite loss at iteration {it}: {scalars}")
        if it % cfg.train.log_interval == 0 or it == max_iter:
            progress.update(it, {**scalars, "epoch": state.epoch})
            log.scalars("train", it, scalars)
        if cfg.train.val_interval > 0 and it % cfg.train.val_interval == 0 and it < max_iter:
            validate(final=False)
        if it % cfg.train.ckpt_interval == 0 and it < max_iter:
            checkpoint()
        return True

    start = time.time()
    while state.iteration < max_iter:
        epoch_start = state.epoch * iters_per_epoch
        train_loader.sampler.set_epoch(state.epoch, skip=(state.iteration - epoch_start) * cfg.data.batch_size)
        train_one_epoch(model, train_loader, criterion, optimizer, scheduler, scaler, state, max_iter,
                        dist.device, cfg.train.precision, on_step, step_lr_per_iter=per_iter)
        if state.iteration >= epoch_start + iters_per_epoch:
            state.epoch += 1
            if not per_iter:
                scheduler.step()
    log.info(f"training finished: {max_iter} iterations in {time.time() - start:.0f} s")
    metrics = validate(final=True)
    checkpoint()
    if dist.is_main:
        os.makedirs(os.path.join(run_dir, cfg.eval.dump_dir), exist_ok=True)
        results = {"iteration": state.iteration, "scales": list(cfg.eval.scales), "flip": cfg.eval.flip, **metrics}
        with open(os.path.join(run_dir, cfg.eval.dump_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        log.info(f"mIoU {100 * metrics['miou']:.2f} -> {os.path.join(run_dir, cfg.eval.dump_dir)}")
    log.close()
    cleanup()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
