"""Auto-labelling end to end: teacher -> auto-labels of the unlabelled split -> student, and a fine-only model.

    python -m scripts.experiments.autolabel --out DIR [--config RECIPE] [--teacher CKPT] [--seeds 0,1] [key=value ...]

Stages (each skipped when its outputs exist and were made from the same inputs, and resumed when interrupted):
  teacher    trains the recipe on the fine data (or, with --teacher CKPT, takes that checkpoint and scores it)
  autolabel  labels every image of the unlabelled split (Cityscapes train_extra; custom: images/train_extra) at
             the teacher's eval.scales (with eval.flip), writing label-id and probability PNGs in the layout the
             SOTA recipe reads (train_extra/<city>/<name>_leftImg8bit.png and _leftImg8bit_prob.png), the per-class
             share of pixels kept by the threshold and a page of samples (autolabel_page.py)
  student    trains on fine + auto-labelled data with data.coarse.* (threshold, boost and dropout classes,
             mask-out; the SOTA recipe's values unless the recipe or an override sets them)
  fine_only  the same budget on the fine data alone, for comparison (the teacher's run when it is the same)
Overrides apply to every stage; `teacher.KEY=VALUE` to the teacher only, `student.KEY=VALUE` to the student and
the fine-only model (their budget, e.g. student.train.max_iter=300). DIR/report.json holds the teacher's, the
student's and the fine-only model's val mIoU (0-1), the number of auto-labelled images and the share of their
pixels kept by the threshold. `--stage NAME` runs one stage (the sbatch chain, scripts/slurm/autolabel.sh), the
earlier ones having finished; `--stage report` writes report.json from finished stages.

Each stage's folder is named after a hash of its config (run paths left out) and of its inputs' fingerprints
(the teacher checkpoint's SHA-256, the auto-labels' stage hash), so other inputs never reuse or overwrite a
finished stage: DIR/train_<hash>/ (run folders), DIR/autolabel_<hash>/; DIR/stages/<stage>.json says which.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import eval as evaluate_cli
import network
import train
from datasets import build_loader
from datasets.base import (
    IMAGE_EXTENSIONS,
    DataError,
    DataNotFoundError,
    Sample,
    SegmentationDataset,
    read_image,
    read_mask,
)
from datasets.cityscapes import IMAGE_SUFFIX, find_extra_layout
from datasets.custom import read_class_list
from datasets.folder import class_source
from transforms import build_transforms
from utils.checkpoint import checkpoint_paths, load_checkpoint
from utils.cli import CliError, debug_enabled, one_line_errors, run_cli
from utils.config import Config, ConfigError, load_config, load_yaml_values, to_dict, to_yaml
from utils.engine import evaluate
from utils.files import atomic_write_text
from utils.evaluation.visualize import write_images
from scripts.experiments.autolabel_page import ThresholdStats, sample_pictures, write_autolabel_page
from utils.evaluation.dumps import LabelIdWriter, train_to_label_lut
from utils.inference import Inference
from utils.runtime.dist import barrier, cleanup, init_distributed

STAGES = ("teacher", "autolabel", "student", "fine_only", "report")
# The SOTA recipe's coarse settings: the student's unless the recipe or an override sets data.coarse.* itself.
SOTA_COARSE = {"boost_classes": [3, 4, 6, 7, 9, 11, 12, 13, 14, 15, 16, 17, 18], "dropout_classes": [14, 15, 16],
               "autolabel_threshold": 0.5, "mask_out": True}
EXTRA_SPLIT = "train_extra"
EXTRA_PER_TRAIN = 1  # synthetic data without data.synthetic.num_extra: unlabelled images per fine one
NUM_SAMPLES = 6  # images shown on the auto-label page
PATH_KEYS = (("run", "output_dir"), ("run", "name"), ("eval", "dump_dir"), ("data", "coarse", "autolabel_dir"))


class StageError(RuntimeError):
    """A stage failed; the message names it and says what to do."""


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="pipeline folder (stages, run folders, report.json)")
    p.add_argument("--config", default=None, help="YAML recipe (default: the embedded demo)")
    p.add_argument("overrides", nargs="*", help="key=value for every stage; teacher.key=value, student.key=value")
    p.add_argument("--teacher", default=None, help="teacher checkpoint: no teacher training")
    p.add_argument("--seeds", type=seed_list, default=None,
                   help="comma-separated train.seed values of the student and fine-only runs, e.g. 0,1 (default: "
                        "the recipe's); several give the noise between seeds")
    p.add_argument("--stage", choices=STAGES + ("all",), default="all", help="run one stage (default: all)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: HMSA_DEBUG=1)")
    return p.parse_intermixed_args(argv)


# ----------------------------------------------------------------------------------------------- configs


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """{'all': [...], 'teacher': [...], 'student': [...]} by the prefix of each key."""
    out: dict[str, list[str]] = {"all": [], "teacher": [], "student": []}
    for text in overrides:
        key = text.split("=", 1)[0]
        head, _, rest = key.partition(".")
        if head in ("teacher", "student") and rest:
            out[head].append(text[len(head) + 1:])
        else:
            out["all"].append(text)
    return out


def recipe_sets_coarse(config: str | None, overrides: list[str]) -> set[str]:
    """data.coarse.* keys that the recipe or the overrides set (the rest take the SOTA recipe's values)."""
    values = load_yaml_values(config) if config else {}
    found = set((values.get("data") or {}).get("coarse") or {})
    for text in overrides:
        key = text.split("=", 1)[0]
        if key.startswith("data.coarse."):
            found.add(key.split(".")[2])
    return found


def stage_hash(cfg_dict: dict, inputs: dict) -> str:
    """Hash of a stage's config without its output paths, and of its inputs' fingerprints."""
    values = json.loads(json.dumps(cfg_dict))
    for path in PATH_KEYS:
        node = values
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    text = json.dumps({"config": values, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Plan:
    """The configs of every stage (overrides as command-line text, for train.py / eval.py) and their folders."""

    out: str
    config: str | None
    teacher_ckpt: str | None
    seeds: list[int]
    common: list[str]
    teacher: list[str]
    student: list[str]

    def load(self, overrides: list[str]) -> Config:
        return load_config(self.config, overrides)

    def teacher_overrides(self) -> list[str]:
        # The teacher learns from the fine data alone, whatever coarse data the recipe uses.
        return self.common + ["data.coarse.boost_classes=[]"] + self.teacher

    def student_overrides(self, seed: int, autolabel_dir: str) -> list[str]:
        coarse = recipe_sets_coarse(self.config, self.common + self.student)
        extra = [f"data.coarse.{k}={json.dumps(v)}" for k, v in SOTA_COARSE.items() if k not in coarse]
        return self.common + extra + self.student + [f"data.coarse.autolabel_dir={autolabel_dir}",
                                                      f"train.seed={seed}"]

    def fine_only_overrides(self, seed: int) -> list[str]:
        return self.common + self.student + ["data.coarse.boost_classes=[]", f"train.seed={seed}"]


# ----------------------------------------------------------------------------------------------- records


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def finished(folder: str, h: str) -> dict | None:
    """The report of a stage finished in `folder` with hash `h` (None: not finished)."""
    done = read_json(os.path.join(folder, "done.json"))
    return done if done is not None and done.get("hash") == h else None


def record(out: str, stage: str, folder: str, h: str, report: dict) -> dict:
    """DIR/stages/<stage>.json: which folder and hash the stage's results are in, and its short report."""
    entry = {"stage": stage, "folder": folder, "hash": h, **report}
    if is_main():
        write_json(os.path.join(out, "stages", f"{stage}.json"), entry)
    return entry


def is_main() -> bool:
    """Rank 0 of a torchrun / srun launch (or a single process): the one that writes the stage records."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def log(message: str) -> None:
    print(f"[autolabel {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- training


def run_training(plan: Plan, stage: str, overrides: list[str], extra: dict | None = None) -> dict:
    """Train (or skip, or resume) one run; returns its stage entry with the final val mIoU (and `extra`)."""
    extra = extra or {}
    cfg = plan.load(overrides)
    h = stage_hash(to_dict(cfg), {"stage": "train", **extra})
    folder = os.path.join(plan.out, f"train_{h}")
    done = finished(folder, h)
    if done is None:
        log(f"{stage}: training {cfg.train.max_iter} iterations in {folder}")
        start = time.time()
        argv = (["--config", plan.config] if plan.config else []) + overrides + [
            f"run.output_dir={plan.out}", f"run.name=train_{h}"]
        call(train.main, argv, stage)
        results = read_json(os.path.join(folder, cfg.eval.dump_dir, "results.json"))
        if results is None:
            raise StageError(f"stage {stage}: train.py finished without {folder}/{cfg.eval.dump_dir}/results.json")
        done = {"hash": h, "miou": results["miou"], "iterations": results["iteration"],
                "batch_size": cfg.data.batch_size, "eval_scales": results["scales"],
                "seconds": round(time.time() - start, 1), **extra}
        if is_main():
            write_json(os.path.join(folder, "report.json"), done)
            write_json(os.path.join(folder, "done.json"), done)
    else:
        log(f"{stage}: done already ({folder}, mIoU {100 * done['miou']:.2f})")
    return record(plan.out, stage, folder, h, {k: v for k, v in done.items() if k != "hash"})


def call(main: Callable[[list[str]], Any], argv: list[str], stage: str) -> Any:
    """Run train.py / eval.py's main in this process; its one-line error (or exit) becomes a StageError."""
    try:
        return main(argv)
    except CliError as e:
        raise StageError(f"stage {stage}: {e.message}") from e
    except SystemExit as e:
        if e.code in (0, None):
            return None
        raise StageError(f"stage {stage}: stopped with exit code {e.code}") from e


def teacher_stage(plan: Plan) -> dict:
    if plan.teacher_ckpt is None:
        entry = run_training(plan, "teacher", plan.teacher_overrides())
        found = checkpoint_paths(entry["folder"])
        if not found:
            raise StageError(f"stage teacher: no checkpoint in {entry['folder']}")
        entry["checkpoint"] = found[0]
        return record(plan.out, "teacher", entry["folder"], entry["hash"],
                      {k: v for k, v in entry.items() if k not in ("stage", "folder", "hash")})
    ckpt = os.path.abspath(plan.teacher_ckpt)
    if not os.path.isfile(ckpt):
        raise StageError(f"stage teacher: --teacher {plan.teacher_ckpt}: no such file (give a checkpoint, or leave "
                         "--teacher out to train the teacher)")
    cfg = plan.load(plan.teacher_overrides())
    h = stage_hash(to_dict(cfg), {"stage": "teacher_checkpoint", "checkpoint": file_sha256(ckpt)})
    folder = os.path.join(plan.out, f"teacher_{h}")
    done = finished(folder, h)
    if done is None:
        log(f"teacher: scoring {ckpt} on {cfg.data.val_split}")
        start = time.time()
        argv = (["--config", plan.config] if plan.config else []) + plan.teacher_overrides() + [
            "--checkpoint", ckpt, "--out", os.path.join(folder, "eval"), "eval.dump=none"]
        summary = call(evaluate_cli.main, argv, "teacher")
        done = {"hash": h, "miou": summary["miou"], "checkpoint": ckpt, "eval_scales": summary["scales"],
                "seconds": round(time.time() - start, 1)}
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        if is_main():
            write_json(os.path.join(folder, "report.json"), done)
            write_json(os.path.join(folder, "done.json"), done)
    return record(plan.out, "teacher", folder, h, {k: v for k, v in done.items() if k != "hash"})


# ----------------------------------------------------------------------------------------------- auto-labels


def extra_images(data) -> list[tuple[str, str]]:
    """(image path, output name) of every image of the unlabelled split; the output name is the path of the
    label file without .png under the auto-label folder, in the layout the coarse-data reader takes."""
    if data.dataset in ("cityscapes", "synthetic"):
        image_dir, _ = find_extra_layout(data.root)
        out = []
        for city in sorted(os.listdir(image_dir)):
            for f in sorted(os.listdir(os.path.join(image_dir, city))):
                if f.endswith(IMAGE_SUFFIX):
                    out.append((os.path.join(image_dir, city, f), f"{EXTRA_SPLIT}/{city}/{f[:-len('.png')]}"))
        return out
    if data.dataset == "custom":
        folder = os.path.join(data.root, data.custom.image_dir.format(split=EXTRA_SPLIT))
        if not os.path.isdir(folder):
            raise DataNotFoundError(f"no unlabelled split to auto-label: {folder} does not exist "
                                    f"(data.custom.image_dir with {{split}} = {EXTRA_SPLIT})")
        out = []
        for d, _, files in os.walk(folder):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(d, f), folder)
                    out.append((os.path.join(d, f), os.path.splitext(rel)[0]))
        return sorted(out)
    raise StageError(f"auto-labelling needs an unlabelled split: data.dataset={data.dataset} has none "
                     "(cityscapes, synthetic and custom do)")


def autolabel_stage(plan: Plan, teacher: dict) -> dict:
    cfg = plan.load(plan.teacher_overrides())
    # The labels depend on the teacher and its inference settings; the threshold only on what is counted, so
    # another threshold recounts the written labels without labelling again.
    h = stage_hash(to_dict(cfg), {"stage": "autolabel", "teacher": teacher["hash"]})
    folder = os.path.join(plan.out, f"autolabel_{h}")
    done = finished(folder, h)
    if done is not None and done["threshold"] != student_threshold(plan):
        done = None
    if done is None:
        log(f"autolabel: labelling the {EXTRA_SPLIT} images with {teacher['checkpoint']} at scales "
            f"{list(cfg.eval.scales)}{' + flip' if cfg.eval.flip else ''} -> {folder}/labels")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        start = time.time()
        done = {"hash": h, **label_images(cfg, teacher["checkpoint"], folder, student_threshold(plan))}
        done["seconds"] = round(time.time() - start, 1)
        if is_main():
            write_json(os.path.join(folder, "report.json"), done)
            write_json(os.path.join(folder, "done.json"), done)
    else:
        log(f"autolabel: done already ({folder}, {done['images']} images)")
    return record(plan.out, "autolabel", folder, h, {k: v for k, v in done.items() if k != "hash"})


def student_threshold(plan: Plan) -> float:
    """The threshold the student will apply (the auto-label stage counts the pixels it keeps)."""
    return plan.load(plan.student_overrides(plan.seeds[0], "")).data.coarse.autolabel_threshold


def label_images(cfg, checkpoint: str, folder: str, threshold: float) -> dict:
    """Write the teacher's label-id and probability PNGs of every unlabelled image under folder/labels (resumed:
    written files are skipped), then count the pixels the threshold keeps and write the sample page."""
    if cfg.data.dataset == "custom":
        classes, table = read_class_list(cfg.data.custom.classes)
    else:
        classes, table = class_source("")
    images = extra_images(cfg.data)
    if not images:
        raise StageError(f"stage autolabel: the {EXTRA_SPLIT} split of {cfg.data.root} holds no images")
    dist = init_distributed(timeout=cfg.run.dist_timeout)
    try:
        transform = build_transforms(cfg.data, False, classes.ignore_index)
        lut = train_to_label_lut(table.id_to_train, classes.num_classes)
        writer = LabelIdWriter(os.path.join(folder, "labels"), lut, with_prob=True)
        todo = [Sample(path, None, name) for path, name in images if not writer.done(name)]
        barrier()
        if todo:
            ds = SegmentationDataset(todo, classes, table, transform, cfg.data.skip_bad, f"{EXTRA_SPLIT} (autolabel)")
            model = network.build_model(cfg.model.name, classes.num_classes, **cfg.model.options)
            load_checkpoint(model, checkpoint, strict=True)
            model.to(dist.device)
            loader = build_loader(ds, cfg.data, False, dist.rank, dist.world_size, cfg.train.seed)
            evaluate(model, loader, classes.num_classes, classes.ignore_index, Inference.from_config(cfg),
                     dist.device, dump="none", label_writer=writer)
        barrier()
    finally:
        cleanup()
    log(f"autolabel: {len(todo)} images labelled, {len(images) - len(todo)} were already")
    if not is_main():  # rank 0 counts and writes the page
        return {"images": len(images)}
    stats = ThresholdStats(classes.num_classes, threshold)
    samples = []
    picks = set(np.linspace(0, len(images) - 1, min(NUM_SAMPLES, len(images))).round().astype(int).tolist())
    unlabelled = 0
    for i, (image_path, name) in enumerate(images):
        label_path, prob_path = writer.paths(name)
        if not (os.path.isfile(label_path) and os.path.isfile(prob_path)):  # unreadable, skipped (data.skip_bad)
            unlabelled += 1
            continue
        train_ids = table(read_mask(label_path), label_path)
        prob = read_mask(prob_path)
        stats.add(train_ids, prob)
        if i in picks:
            pictures = sample_pictures(read_image(image_path), train_ids, prob, threshold, classes.palette)
            files = write_images(os.path.join(folder, "page"), name.replace("/", "_"), pictures)
            samples.append({"name": name, "files": files})
    if unlabelled:
        log(f"autolabel: {unlabelled} unreadable image(s) have no auto-label (skipped: data.skip_bad=true)")
    page = write_autolabel_page(os.path.join(folder, "page", "index.html"),
                                f"auto-labels of {cfg.data.dataset}/{EXTRA_SPLIT}, threshold {threshold:g}", stats,
                                list(classes.names), samples)
    per_class = {r["name"]: {"pixels": r["pixels"], "kept": r["kept"],
                             "kept_share": None if math.isnan(r["kept_share"]) else round(r["kept_share"], 4)}
                 for r in stats.per_class(list(classes.names))}
    return {"images": len(images), "labelled_now": len(todo), "labels": writer.out_dir, "threshold": threshold,
            "kept_share": stats.kept_share(), "kept_per_class": per_class, "page": page,
            "scales": list(cfg.eval.scales), "flip": cfg.eval.flip, "checkpoint": checkpoint}


# ----------------------------------------------------------------------------------------------- the pipeline


def stage_entry(out: str, stage: str, needed_by: str) -> dict:
    entry = read_json(os.path.join(out, "stages", f"{stage}.json"))
    if entry is None:
        raise StageError(f"stage {needed_by} needs the {stage} stage, which has not finished in {out} "
                         f"(run --stage {stage} first, or --stage all)")
    return entry


def write_report(plan: Plan) -> dict:
    teacher = stage_entry(plan.out, "teacher", "report")
    auto = stage_entry(plan.out, "autolabel", "report")
    students = [stage_entry(plan.out, f"student_s{s}", "report") for s in plan.seeds]
    fine = [stage_entry(plan.out, f"fine_only_s{s}", "report") for s in plan.seeds]
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    report = {
        "teacher_miou": teacher["miou"],
        "student_miou": mean([s["miou"] for s in students]),
        "fine_only_miou": mean([f["miou"] for f in fine]),
        "autolabelled_images": auto["images"],
        "kept_share": auto["kept_share"],
        "threshold": auto["threshold"],
        "seeds": plan.seeds,
        "student_miou_per_seed": [s["miou"] for s in students],
        "fine_only_miou_per_seed": [f["miou"] for f in fine],
        "stages": {e["stage"]: e["folder"] for e in [teacher, auto, *students, *fine]},
        "autolabel_page": auto["page"],
        "seconds": {e["stage"]: e.get("seconds") for e in [teacher, auto, *students, *fine]},
    }
    write_json(os.path.join(plan.out, "report.json"), report)
    return report


def run(plan: Plan, stage: str) -> dict | None:
    if stage in ("teacher", "all"):
        teacher_stage(plan)
    if stage in ("autolabel", "all"):
        autolabel_stage(plan, stage_entry(plan.out, "teacher", "autolabel"))
    if stage in ("fine_only", "all"):
        for seed in plan.seeds:
            run_training(plan, f"fine_only_s{seed}", plan.fine_only_overrides(seed))
    if stage in ("student", "all"):
        auto = stage_entry(plan.out, "autolabel", "student")
        for seed in plan.seeds:
            run_training(plan, f"student_s{seed}", plan.student_overrides(seed, auto["labels"]),
                         {"autolabels": auto["hash"], "autolabelled_images": auto["images"]})
    if stage in ("report", "all"):
        report = write_report(plan)
        log(f"report {os.path.join(plan.out, 'report.json')}: teacher {100 * report['teacher_miou']:.2f}, student "
            f"{100 * report['student_miou']:.2f}, fine-only {100 * report['fine_only_miou']:.2f} mIoU; "
            f"{report['autolabelled_images']} auto-labelled images, {100 * report['kept_share']:.1f}% of their "
            "pixels kept by the threshold")
        return report
    return None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    with one_line_errors(args.debug or debug_enabled(), (StageError, ConfigError, DataError, ValueError)):
        if args.stage == "all" and world_size() > 1:
            raise CliError("several processes run one stage at a time (--stage NAME, as scripts/slurm/autolabel.sh "
                           "does): each stage reads what the previous one's rank 0 wrote")
        parts = split_overrides(args.overrides)
        plan = Plan(os.path.abspath(args.out), args.config, args.teacher, [], parts["all"], parts["teacher"],
                    parts["student"])
        try:
            base = plan.load(plan.common + plan.student)
        except ConfigError as e:
            raise CliError(f"config error: {e}") from e
        plan.seeds = args.seeds if args.seeds is not None else [base.train.seed]
        s = base.data.synthetic
        if base.data.dataset == "synthetic" and s.num_extra == 0:
            # The generated data gets its unlabelled split: EXTRA_PER_TRAIN images per fine training image.
            plan.common.append(f"data.synthetic.num_extra={EXTRA_PER_TRAIN * s.num_train}")
        os.makedirs(plan.out, exist_ok=True)
        return run(plan, args.stage)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
