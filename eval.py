"""Evaluate a model on a labelled split: `python eval.py --config RUN/config.yaml [--checkpoint CKPT] [key=value ...]`.

The scale set and flip come from the config and can be overridden, e.g. `eval.scales=[0.25,0.5,1.0,2.0]
eval.flip=true`. The checkpoint is, in order: --checkpoint, model.snapshot, the newest checkpoint of the run folder.
Results (per-class table, JSON) and sample images go to --out (default: the run folder's eval dump folder).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import network
from datasets import build_dataset, build_loader
from utils.checkpoint import checkpoint_paths, load_checkpoint
from utils.config import ConfigError, load_config, to_dict
from utils.dist import cleanup, init_distributed
from utils.engine import RunLogger, evaluate
from utils.metrics import compute_metrics, format_table
from network.mscale import check_scales


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML recipe or a run's config.yaml (default: the demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.scales=[0.5,1.0,2.0] eval.flip=true")
    p.add_argument("--checkpoint", default=None, help="weights to evaluate (ours or an original snapshot)")
    p.add_argument("--out", default=None, help="output folder for results and images")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def find_weights(args: argparse.Namespace, run_dir: str, snapshot: str) -> str:
    if args.checkpoint:
        return args.checkpoint
    if snapshot:
        return snapshot
    found = checkpoint_paths(run_dir)
    if not found:
        raise SystemExit(f"no checkpoint given and none in {run_dir}; pass --checkpoint or model.snapshot=...")
    return found[0]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_scales(cfg.eval.scales)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"config error: {e}") from e
    dist = init_distributed()
    run_dir = os.path.join(cfg.train.output_dir, cfg.train.run_name)
    out_dir = args.out or os.path.join(run_dir, cfg.eval.dump_dir)
    weights = find_weights(args, run_dir, cfg.model.snapshot)

    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    loader = build_loader(val_set, cfg.data, False, dist.rank, dist.world_size, cfg.train.seed)
    model = network.build_model(cfg.model.name, val_set.num_classes, **cfg.model.options)
    report = load_checkpoint(model, weights, strict=True)
    model.to(dist.device)

    log = RunLogger(out_dir, enabled=dist.is_main)
    log.info(report.summary())
    result = evaluate(
        model, loader, val_set.num_classes, val_set.ignore_index, cfg.eval.scales, dist.device,
        cfg.train.precision, flip=cfg.eval.flip, dump_dir=out_dir, num_dump=cfg.eval.num_dump,
        palette=val_set.palette, rank=dist.rank,
    )
    metrics = compute_metrics(result.hist, val_set.class_names)
    metrics["loss"] = result.loss
    if dist.is_main:
        log.info(f"{weights} on {cfg.data.dataset}/{cfg.data.val_split}, scales {list(cfg.eval.scales)}"
                 f"{' + flip' if cfg.eval.flip else ''}:\n" + format_table(metrics))
        results = {"checkpoint": weights, "scales": list(cfg.eval.scales), "flip": cfg.eval.flip,
                   "config": to_dict(cfg), **metrics}
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    log.close()
    cleanup()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
