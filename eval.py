"""Evaluate or run a model: `python eval.py --config RUN/config.yaml [--checkpoint CKPT] [MODE] [key=value ...]`.

Modes (what is read):
    (default)          the labelled split data.val_split: metrics, per-class table, sample pictures
    --split NAME       another split of data.dataset; an unlabelled one (Cityscapes `test`) gives predictions only
    --folder DIR       every image of a folder (no labels): pictures of all of them
    --video FILE       an annotated video (overlay, and attention maps with eval.video_attention=true)
(a folder or a video takes the class list of data.custom.classes, Cityscapes when empty)
and what is written besides pictures:
    --submit           label-id PNGs (Cityscapes ids) for the test server, in OUT/submit
    --autolabel        the same with their probability maps `_prob.png`, in OUT/autolabel
(files are named after the image file, e.g. X_leftImg8bit.png; both skip images whose files exist, so an
interrupted run resumes).

Inference comes from the config: eval.scales (any set containing 1.0), eval.flip, eval.fusion (attention |
average | max), eval.window / eval.overlap (sliding window per scale). eval.scale_sets=[[1.0],[0.5,1.0],...] sweeps
every set x eval.sweep_fusions x eval.sweep_flips in one pass over the data and writes sweep.json / sweep.csv.
Pictures: eval.dump (none | first | all | every | worst) with N = eval.num_dump.
The checkpoint is, in order: --checkpoint, model.snapshot, the newest checkpoint of the run folder. Results go to
--out, by default to a new folder per evaluation inside the run's eval.dump_dir, named after what was evaluated
(e.g. RUN/eval/val_s0.5-1-2_flip; _2, _3, ... is appended when that one holds finished results), so that an
evaluation never writes over the training's results or another evaluation's. An interrupted --submit/--autolabel
run resumes in the same folder.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from dataclasses import replace
from typing import Any

import cv2
from torch.utils.data import Subset

import network
from datasets import build_dataset, build_loader
from datasets.agree import agree_on_samples
from datasets.cityscapes import CLASSES as CITYSCAPES_CLASSES
from datasets.cityscapes import label_map as cityscapes_label_map
from datasets.folder import class_info
from datasets.base import DataError
from transforms import build_transforms
from utils.checkpoint import CheckpointError, checkpoint_paths, load_checkpoint
from utils.cli import CliError, debug_enabled, load_and_start, one_line_errors, run_cli
from utils.config import Config, ConfigError, to_dict
from utils.engine import evaluate
from utils.files import atomic_write_text
from utils.folders import claim_folder, claim_new_folder, decided_by_main, is_run_folder, read_results
from utils.evaluation.dumps import LabelIdWriter, train_to_label_lut
from utils.evaluation.metrics import (
    compute_metrics,
    format_sweep,
    format_table,
    sweep_results,
    write_per_class_csv,
    write_sweep,
)
from utils.evaluation.results_page import write_results_page
from utils.inference import Inference, has_attention
from utils.inference.memory import check_eval_memory, largest_input_size
from utils.inference.video import VideoReader, annotate_video
from utils.log import Progress, run_logging
from utils.runtime.dist import DistConfigError, DistributedError, all_gather_objects, barrier, cleanup
from utils.runtime.layout import place_model

log = logging.getLogger("eval")
TB_MAX_IMAGES = 16  # dumped images whose pictures also go to TensorBoard (the rest stay PNG files only)
TB_KINDS = ("overlay", "error", "conf")  # plus every attn_{s}x


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML recipe or a run's config.yaml (default: the demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.scales=[0.5,1.0,2.0] eval.flip=true")
    p.add_argument("--checkpoint", default=None, help="weights to evaluate (ours or an original snapshot)")
    p.add_argument("--out", default=None, help="output folder for results and images")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--split", default=None, help="split of data.dataset to read (default data.val_split)")
    mode.add_argument("--folder", default=None, help="segment every image of this folder (no labels)")
    mode.add_argument("--video", default=None, help="segment this video file and write an annotated one")
    p.add_argument("--video-out", default=None, help="annotated video path (default OUT/<name>_seg.mp4)")
    p.add_argument("--submit", action="store_true", help="write label-id PNGs for the test server (OUT/submit)")
    p.add_argument("--autolabel", action="store_true", help="write label-id + _prob PNGs (OUT/autolabel)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: HMSA_DEBUG=1)")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.video and (args.submit or args.autolabel):
        p.error("--submit / --autolabel write per-image files; they do not apply to --video")
    if args.video_out and not args.video:
        p.error("--video-out needs --video")
    return args


EXPECTED_ERRORS = (ConfigError, CheckpointError, DataError, DistConfigError, DistributedError, ValueError)


def run_label(args: argparse.Namespace, cfg: Config) -> str:
    """A folder name that says what an evaluation read and how: mode or split, scales, fusion, flip, sweep."""
    if args.video:
        what = "video-" + os.path.splitext(os.path.basename(args.video))[0]
    elif args.folder:
        what = "folder-" + os.path.basename(os.path.normpath(args.folder))
    else:
        what = args.split or cfg.data.val_split
    e = cfg.eval
    parts = [what, "s" + "-".join(f"{s:g}" for s in e.scales)]
    if e.fusion != "attention":
        parts.append(e.fusion)
    if e.flip:
        parts.append("flip")
    if e.scale_sets:
        parts.append("sweep")
    parts += [m for m, on in (("submit", args.submit), ("autolabel", args.autolabel)) if on]
    return "_".join(parts)


def output_dir(args: argparse.Namespace, cfg: Config, run_dir: str, labelled: bool, weights: str,
               folders: contextlib.ExitStack) -> str:
    """--out, checked and locked, or a new folder of the run's eval.dump_dir per evaluation (never one that holds
    finished results or another evaluation at work); held until `folders` closes."""
    if not args.out:
        return claim_new_folder(os.path.join(run_dir, cfg.eval.dump_dir, run_label(args, cfg)), folders)
    if is_run_folder(args.out):
        raise CliError(f"--out {args.out} is a training run's folder: the results would mix with its files; choose "
                       "another --out, or leave it out for a new folder under the run's eval.dump_dir")
    old = read_results(args.out)
    if old is not None:
        source = args.folder or f"{cfg.data.dataset}/{args.split or cfg.data.val_split}"
        same = (old.get("checkpoint"), old.get("source"), old.get("config", {}).get("eval")) == \
            (weights, source, json.loads(json.dumps(to_dict(cfg.eval))))
        if old.get("written_by") == "train.py" or ("miou" in old and not labelled) or not same:
            what = ("a training run" if old.get("written_by") == "train.py" else "a labelled split"
                    if "miou" in old and not labelled else f"another evaluation ({old.get('checkpoint')} on "
                    f"{old.get('source')}, other settings)")
            raise CliError(f"--out {args.out} holds the results of {what} (results.json): choose another --out, or "
                           "leave it out for a new folder in the run")
    claim_folder(args.out, "--out", "evaluates", folders)
    return args.out


def find_weights(args: argparse.Namespace, run_dir: str, snapshot: str) -> str:
    if args.checkpoint:
        return args.checkpoint
    if snapshot:
        return snapshot
    found = checkpoint_paths(run_dir)
    if not found:
        raise CliError(f"no checkpoint given and none in {run_dir}: pass --checkpoint or model.snapshot=...")
    return found[0]


def read_dataset(cfg: Config, args: argparse.Namespace):
    """The dataset to run on: a split of data.dataset, or a folder of images (datasets/folder.py, with the class
    list of data.custom.classes: Cityscapes when empty). A video needs only that class list."""
    if args.video is not None:
        return class_info(cfg.data.custom.classes)
    if args.folder is None:
        dataset = build_dataset(cfg.data, args.split or cfg.data.val_split, train=False)
    else:
        dataset = build_dataset(replace(cfg.data, dataset="folder", root=args.folder), "folder", train=False)
    agree_on_samples(dataset, all_gather_objects)  # every rank evaluates its share of one list
    return dataset


def pending(dataset, writer: LabelIdWriter):
    """The images whose label-id files are not written yet (resume), as a Subset when some are done."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return dataset
    todo = [i for i, s in enumerate(samples) if not writer.done(s.name)]
    return dataset if len(todo) == len(samples) else Subset(dataset, todo)


def label_table(dataset) -> dict[int, int]:
    """Label id -> train id of the dataset; a folder of images takes that of its class list (Cityscapes: the
    official ids; any other list: train ids written as they are)."""
    table = getattr(getattr(dataset, "label_map", None), "id_to_train", None)
    if table is not None:
        return table
    if getattr(dataset, "classes", None) is CITYSCAPES_CLASSES:
        return cityscapes_label_map().id_to_train
    return {i: i for i in range(dataset.num_classes)}


def label_writer(args: argparse.Namespace, dataset, out_dir: str) -> LabelIdWriter | None:
    if not (args.submit or args.autolabel):
        return None
    lut = train_to_label_lut(label_table(dataset), dataset.num_classes)
    folder = os.path.join(out_dir, "autolabel" if args.autolabel else "submit")
    stems = {s.name: os.path.splitext(os.path.basename(s.image))[0] for s in getattr(dataset, "samples", [])}
    return LabelIdWriter(folder, lut, with_prob=args.autolabel, stems=stems)


def log_images(out_dir: str, images: list[dict], step: int = 0) -> None:
    """The first TB_MAX_IMAGES dumped images' overlay, error, confidence and attention pictures to TensorBoard
    (out_dir/tb)."""
    from torch.utils.tensorboard import SummaryWriter  # slow to import: only where pictures were dumped

    with SummaryWriter(os.path.join(out_dir, "tb")) as writer:
        _add_images(writer, images, step)


def _add_images(writer: Any, images: list[dict], step: int) -> None:
    for entry in images[:TB_MAX_IMAGES]:
        for kind, path in entry["files"].items():
            if kind in TB_KINDS or kind.startswith("attn_"):
                bgr = cv2.imread(path, cv2.IMREAD_COLOR)
                if bgr is None:  # written by a rank on another node without a shared file system
                    continue
                writer.add_image(f"eval/{entry['name']}/{kind}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), step,
                                 dataformats="HWC")


def run_video(cfg: Config, args: argparse.Namespace, model, classes, device, out_dir: str) -> dict:
    reader = VideoReader(args.video)
    stem = os.path.splitext(os.path.basename(args.video))[0]
    out_path = args.video_out or os.path.join(out_dir, f"{stem}_seg.mp4")
    if cfg.eval.video_attention and (len(cfg.eval.scales) < 2 or not has_attention(model)):
        log.warning(f"eval.video_attention: no attention map to show (a model with scale attention shows one per scale "
                 f"below the top one of eval.scales, {list(cfg.eval.scales)}); the video has the overlay only")
    frames = annotate_video(
        model, reader, out_path, build_transforms(cfg.data, False, classes.ignore_index), classes.palette, device,
        Inference.from_config(cfg), cfg.eval.video_attention, Progress(reader.frame_count, unit="frames"),
    )
    log.info(f"{args.video}: {frames} frames -> {out_path}")
    return {"video": out_path, "frames": frames}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with one_line_errors(args.debug or debug_enabled(), EXPECTED_ERRORS):
        cfg, dist = load_and_start(args)
        try:
            with contextlib.ExitStack() as folders:  # the output folder's writer lock and log, held to the end
                return run(args, cfg, dist, folders)
        finally:
            cleanup()


def run(args: argparse.Namespace, cfg: Config, dist, folders: contextlib.ExitStack) -> dict:
    if args.video and dist.distributed:
        raise CliError("--video runs in one process; start it without torchrun")
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    weights = find_weights(args, run_dir, cfg.model.snapshot)

    # Everything that can be wrong with the input is found here, before the first image is processed.
    if args.video:
        VideoReader(args.video).close()
    dataset = read_dataset(cfg, args)
    labelled = bool(getattr(dataset, "has_labels", False))
    if cfg.eval.dump == "worst" and not labelled:
        raise CliError("config error: eval.dump=worst ranks images by IoU and needs a labelled split")
    model = network.build_model(cfg.model.name, dataset.num_classes, **cfg.model.options)
    report = load_checkpoint(model, weights, strict=True)
    # Scales the device cannot hold stop here, before the output folder is made and before the first image.
    plan = None if args.video else check_eval_memory(
        cfg, dist.device, model, largest_input_size((s.image for s in getattr(dataset, "samples", [])), cfg.data),
        labelled, dumps=cfg.eval.dump != "none")
    # Created only once the inputs are known to be good.
    out_dir = decided_by_main(dist, lambda: output_dir(args, cfg, run_dir, labelled, weights, folders))
    writer = label_writer(args, dataset, out_dir)
    how = Inference.from_config(cfg)
    combos = how.sweep(model)
    place_model(model, dist.device, cfg.run.channels_last)

    folders.enter_context(run_logging(out_dir, dist.is_main, log_name="eval.log"))
    log.info(report.summary())
    if plan:
        log.info(plan)
    if not has_attention(model) and cfg.eval.fusion == "attention" and len(cfg.eval.scales) > 1:
        log.info(f"{cfg.model.name} has no scale attention: its scales are averaged (eval.fusion=average)")
    if args.video:
        return run_video(cfg, args, model, dataset, dist.device, out_dir)

    # Resume skips finished images on unlabelled data only: on a labelled split every image is evaluated, so that
    # the metrics cover the split (existing label-id files are still not rewritten).
    todo = pending(dataset, writer) if writer is not None and not labelled else dataset
    barrier()  # every rank has listed the pending images before any rank writes
    if writer is not None and len(todo) < len(dataset):
        log.info(f"{len(dataset) - len(todo)} of {len(dataset)} images already have label-id files: skipped")
    loader = build_loader(todo, cfg.data, False, dist.rank, dist.world_size, cfg.train.seed)
    e = cfg.eval
    dump = "all" if args.folder is not None and e.dump == "first" else e.dump  # a folder is run to be looked at
    result = evaluate(model, loader, dataset.num_classes, dataset.ignore_index, how, dist.device, dump_dir=out_dir,
                      dump=dump, num_dump=e.num_dump, palette=dataset.palette, label_writer=writer)
    source = args.folder or f"{cfg.data.dataset}/{args.split or cfg.data.val_split}"
    setting = f"scales {list(e.scales)}, fusion {result.sweep[0][0].fusion}{' + flip' if e.flip else ''}"
    summary: dict[str, Any] = {"checkpoint": weights, "source": source, "scales": list(e.scales),
                               "fusion": result.sweep[0][0].fusion, "flip": e.flip, "images": result.images_seen,
                               "images_skipped": result.images_skipped}
    if result.images_skipped:
        log.warning(f"{result.images_skipped} unreadable image(s) left out of the evaluation (data.skip_bad=true): "
                    f"the results cover {result.images_seen} image(s)")
    metrics = None
    if labelled:
        metrics = compute_metrics(result.hist, dataset.class_names)
        metrics["loss"] = result.loss
        summary.update(metrics)
    sweep = None
    if combos and labelled:
        hists = dict(result.sweep)
        rows = [({"scales": list(c.scales), "fusion": c.fusion, "flip": c.flip}, hists[c]) for c in combos]
        sweep = sweep_results(rows, dataset.class_names)
    if writer is not None:
        summary.update(label_files=writer.out_dir, label_files_written=writer.written)
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
        if metrics is not None:
            log.info(f"{weights} on {source}, {setting}:\n" + format_table(metrics))
            write_per_class_csv(os.path.join(out_dir, "per_class.csv"), metrics)
        if sweep is not None:
            write_sweep(sweep, os.path.join(out_dir, "sweep.json"), os.path.join(out_dir, "sweep.csv"))
            log.info(f"scale-set sweep on {source}, {result.images_seen} images:\n" + format_sweep(sweep))
            summary["sweep"] = os.path.join(out_dir, "sweep.json")
        if result.images:
            page = write_results_page(os.path.join(out_dir, "index.html"), f"{source}: {setting}", result.images,
                                      metrics, sweep)
            log_images(out_dir, result.images)
            log.info(f"{len(result.images)} images dumped; results page {page}")
        atomic_write_text(os.path.join(out_dir, "results.json"),
                          json.dumps({**summary, "written_by": "eval.py", "config": to_dict(cfg)}, indent=1))
    summary["out"] = out_dir
    return summary


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
