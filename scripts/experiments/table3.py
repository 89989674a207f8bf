"""The paper's Table 3 in one command: single scale, average and max pooling, explicit and hierarchical attention.

    python -m scripts.experiments.table3 --out DIR [--config RECIPE] [key=value ...] [--stage STAGE] [--rounds N]

RECIPE (with the overrides) is the training recipe of the hierarchical model (model.name hmsa_deeplabv3plus or
hmsa_ocrnet_hrnet_w48, or its single-scale / explicit sibling): the three models of the table are trained with it,
same data, loss, schedule and budget, only model.name (and the options each accepts) changing:

    single        deeplabv3plus / ocrnet_hrnet_w48            train 1.0
    explicit      attnscale_deeplabv3plus / ..._hrnet_w48     train = eval 0.5, 1.0, 2.0 (network/attnscale.py)
    hierarchical  hmsa_deeplabv3plus / hmsa_ocrnet_hrnet_w48  train 0.5, 1.0

and evaluated on data.val_split: single scale; average and max pooling of 0.5/1/2 (the single-scale checkpoint,
one pass for the three rows); explicit 0.5/1/2; hierarchical 0.5/1/2 and 0.25/0.5/1/2 (one pass).
Written to DIR: table3.json (a list of rows: method, train_scales, eval_scales, miou 0-1, flops_ratio and
step_time_ratio relative to single scale, peak training memory, per-class IoU and its gain over single scale),
table3.md, table3.png, and runs/, eval/, configs/, logs/ and state.json (what is done, timings, load average).

FLOPs are counted (torch.utils.flop_counter) on one training step (forward, loss, backward) of a crop-size batch;
step time is the median of --rounds interleaved training steps of the three models on the same batch, in this
process; peak training memory is torch.cuda.max_memory_allocated of those steps on a GPU, the peak resident
memory of the training process on a CPU. Rerun with the same arguments, it continues: a trained model, the
measurements and every row already in table3.json are reused (a model trained by another launcher in
DIR/runs/KEY is continued, i.e. only validated again). --stage runs one part: configs (writes
DIR/configs/{single,explicit,hierarchical}.yaml, each a train.py recipe; scripts/slurm/table3.sbatch trains them
as array tasks), train-single, train-explicit, train-hierarchical, measure, eval (measure included), all.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

import network
from utils.checkpoint import checkpoint_paths
from utils.cli import CliError, debug_enabled, ensure_writable_dir, one_line_errors, run_cli
from utils.config import Config, ConfigError, load_config, training_differences, to_dict, to_yaml
from utils.files import atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = ("single", "explicit", "hierarchical")
EXPLICIT_SCALES = (0.5, 1.0, 2.0)
# model.name of each family member; a recipe may name any of the three
FAMILIES = {
    "deeplabv3plus": {"single": "deeplabv3plus", "explicit": "attnscale_deeplabv3plus",
                      "hierarchical": "hmsa_deeplabv3plus"},
    "ocrnet": {"single": "ocrnet_hrnet_w48", "explicit": "attnscale_ocrnet_hrnet_w48",
               "hierarchical": "hmsa_ocrnet_hrnet_w48"},
}
STAGES = ("all", "configs", "train-single", "train-explicit", "train-hierarchical", "measure", "eval")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: which model, how it is evaluated."""

    key: str
    method: str
    model: str
    eval_scales: tuple[float, ...]
    fusion: str


ROWS = (
    Row("single", "baseline single scale", "single", (1.0,), "none"),
    Row("average", "baseline average pooling", "single", (0.5, 1.0, 2.0), "average"),
    Row("max", "baseline max pooling", "single", (0.5, 1.0, 2.0), "max"),
    Row("explicit", "explicit attention (Chen et al.)", "explicit", EXPLICIT_SCALES, "attention"),
    Row("hierarchical", "hierarchical attention (ours)", "hierarchical", (0.5, 1.0, 2.0), "attention"),
    Row("hierarchical_4", "hierarchical attention (ours)", "hierarchical", (0.25, 0.5, 1.0, 2.0), "attention"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (a rerun with the same folder continues)")
    p.add_argument("--config", default=None, help="training recipe (default: the schema defaults, the demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, e.g. train.max_iter=100")
    p.add_argument("--stage", default="all", choices=STAGES, help="run one part only (default: all)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per model (default 5)")
    args = p.parse_intermixed_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


# ----------------------------------------------------------------------------------------------- configs


def family_of(name: str) -> dict[str, str]:
    for members in FAMILIES.values():
        if name in members.values():
            return members
    target = network.resolve_name(name)[0]  # an alias (mscale.DeepV3R50, ...) names a family member too
    for members in FAMILIES.values():
        if target in members.values():
            return members
    known = sorted(n for m in FAMILIES.values() for n in m.values())
    raise CliError(f"model.name={name!r}: Table 3 needs a model with single-scale, explicit and hierarchical "
                   f"versions, one of {', '.join(known)}")


def model_configs(cfg: Config, out: str) -> tuple[dict[str, Config], float]:
    """The training config of each model: the recipe with model.name, its options and the run folder changed.

    Options a model does not accept (attn_ch for the single-scale one, lo_scale for the explicit) are dropped; the
    training's final validation is the cheapest setting the model allows (the table's rows come from eval.py).
    Also returns the hierarchical model's low training scale."""
    members = family_of(cfg.model.name)
    options = dict(cfg.model.options)
    lo = float(options.get("lo_scale", 0.5))
    out_cfgs = {}
    for key in MODELS:
        name = members[key]
        valid = network.model_options(name)
        opts = {k: v for k, v in options.items() if k in valid}
        if key == "explicit":
            opts["scales"] = list(EXPLICIT_SCALES)
        scales = EXPLICIT_SCALES if key == "explicit" else (1.0,)
        out_cfgs[key] = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, name=name, options=opts),
            run=dataclasses.replace(cfg.run, output_dir=os.path.join(out, "runs"), name=key),
            eval=dataclasses.replace(cfg.eval, scales=scales, scale_sets=(), dump="none", fusion="attention"),
        )
    return out_cfgs, lo


def train_scales(key: str, lo: float) -> list[float]:
    return {"single": [1.0], "explicit": list(EXPLICIT_SCALES), "hierarchical": [lo, 1.0]}[key]


# ----------------------------------------------------------------------------------------------- state


class State:
    """DIR/state.json: the recipe, what is done (trainings, measurements) and the time each part took."""

    def __init__(self, out: str, cfg: Config) -> None:
        self.path = os.path.join(out, "state.json")
        self.data: dict[str, Any] = {"config": to_dict(cfg), "trained": {}, "measure": None, "timings": {}}
        if os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as e:
                raise CliError(f"{self.path} is unreadable ({e}): remove it to start the table again") from e
            differ = training_differences(saved.get("config", {}), cfg)
            if differ:
                raise CliError(f"{out} holds a Table 3 of another recipe ({'; '.join(differ)}): use another --out, "
                               "or the recipe and overrides it was started with")
            self.data.update(saved)
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1))

    def timed(self, name: str, seconds: float) -> None:
        load = os.getloadavg()
        self.data["timings"][name] = {"seconds": round(seconds, 1), "load_avg_1_5_15": [round(x, 2) for x in load],
                                      "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
        self.save()


def read_rows(out: str) -> list[dict[str, Any]]:
    path = os.path.join(out, "table3.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError) as e:
        raise CliError(f"{path} is unreadable ({e}): remove it and rerun to evaluate the rows again") from e
    if not isinstance(rows, list):
        raise CliError(f"{path}: expected a list of rows; remove it and rerun")
    return rows


def write_json(path: str, value: Any) -> None:
    """Standard JSON (an IoU of a class absent from labels and predictions, NaN, is written null), atomically."""
    atomic_write_text(path, json.dumps(_no_nan(value), indent=1))


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


# ----------------------------------------------------------------------------------------------- subprocesses


def run_logged(cmd: list[str], log_path: str, what: str) -> int:
    """Run `cmd` with its output in `log_path`; returns the peak resident memory (kB) of the process."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"[table3] {what}: {' '.join(cmd[1:])}  (log {log_path})", flush=True)
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own rusage (ru_maxrss in kB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = [line.strip() for line in f.readlines()[-3:]]
        raise CliError(f"{what} failed (exit code {proc.returncode}; {log_path}): {' / '.join(tail)}")
    return int(usage.ru_maxrss)


def write_config(cfg: Config, out: str, key: str) -> str:
    """DIR/configs/KEY.yaml, atomically: the array tasks of table3.sbatch each write all three while the others'
    train.py may be reading theirs."""
    path = os.path.join(out, "configs", f"{key}.yaml")
    atomic_write_text(path, to_yaml(cfg))
    return path


def train_model(key: str, cfg: Config, out: str, state: State) -> None:
    """Train (or continue training) one model; train.py resumes its own run folder."""
    done = state.data["trained"].get(key)
    if done:  # recorded only once train.py finished the run
        print(f"[table3] {key}: trained ({done['checkpoint']})", flush=True)
        return
    path = write_config(cfg, out, key)
    start = time.time()
    peak_kb = run_logged([sys.executable, os.path.join(ROOT, "train.py"), "--config", path],
                         os.path.join(out, "logs", f"train_{key}.log"), f"training {key} ({cfg.model.name})")
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    with open(os.path.join(run_dir, cfg.eval.dump_dir, "results.json")) as f:
        iterations = json.load(f)["iteration"]
    state.data["trained"][key] = {"checkpoint": newest_checkpoint(run_dir), "iterations": iterations,
                                  "peak_rss_mb": peak_kb / 1024}
    state.timed(f"train-{key}", time.time() - start)


def newest_checkpoint(run_dir: str) -> str:
    found = checkpoint_paths(run_dir)
    if not found:
        raise CliError(f"{run_dir} holds no checkpoint after training")
    return found[0]


# ----------------------------------------------------------------------------------------------- measurements


def measure(cfgs: dict[str, Config], rounds: int, state: State) -> dict[str, dict[str, float]]:
    """Training FLOPs, median step time and (on a GPU) peak memory of each model, timed interleaved."""
    if state.data.get("measure"):
        return state.data["measure"]
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    from loss import build_criterion  # noqa: PLC0415
    from utils.engine import train_step  # noqa: PLC0415
    from utils.runtime.precision import grad_scaler  # noqa: PLC0415

    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = cfgs["single"]
    num_classes, ignore = class_count(base)
    torch.manual_seed(base.train.seed)
    h, w = base.data.augment.crop_size
    n = base.data.batch_size
    batch = [{"image": torch.randn(n, 3, h, w), "mask": torch.randint(0, num_classes, (n, h, w))}]
    criterion = build_criterion(base.loss, num_classes, ignore)
    parts = {}
    for key in MODELS:
        c = cfgs[key]
        model = network.build_model(c.model.name, num_classes, **c.model.options).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=c.train.momentum)
        parts[key] = (model, opt, grad_scaler(c.run.precision, device), c.run.precision)

    def step(key: str) -> float:
        model, opt, scaler, precision = parts[key]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        scalars = train_step(model, batch, criterion, opt, scaler, precision=precision, device=device)
        float(scalars["loss"])  # wait for the step
        return time.perf_counter() - t

    results: dict[str, dict[str, float]] = {}
    for key in MODELS:
        model = parts[key][0]
        images, target = batch[0]["image"].to(device), batch[0]["mask"].to(device)
        with FlopCounterMode(display=False) as counter:
            total, _ = criterion(model(images), target)
            total.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step(key)  # warm-up (and the GPU memory peak of a step)
        results[key] = {"train_gflops": counter.get_total_flops() / 1e9, "times": []}
        if device.type == "cuda":
            results[key]["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    for r in range(rounds):  # interleaved, the order rotating: a slow spell of the machine hits every model
        order = MODELS[r % 3:] + MODELS[:r % 3]
        for key in order:
            results[key]["times"].append(step(key))
    for key in MODELS:
        results[key]["step_s"] = statistics.median(results[key]["times"])
    state.data["measure"] = {"device": str(device), "batch": [n, 3, h, w], "rounds": rounds, **results}
    state.timed("measure", time.time() - start)
    return state.data["measure"]


def class_count(cfg: Config) -> tuple[int, int]:
    from datasets import build_dataset  # noqa: PLC0415

    ds = build_dataset(cfg.data, cfg.data.val_split, train=False)
    return ds.num_classes, ds.ignore_index


# ----------------------------------------------------------------------------------------------- evaluation


def eval_overrides(key: str) -> list[str]:
    """One eval.py pass per model: every row of that model from the same per-scale network outputs."""
    if key == "single":  # rows 1-3 from the one checkpoint
        return ["eval.scales=[1.0]", "eval.scale_sets=[[0.5,1.0,2.0]]", "eval.sweep_fusions=[average,max]",
                "eval.sweep_flips=[false]"]
    if key == "explicit":
        return [f"eval.scales=[{','.join(str(s) for s in EXPLICIT_SCALES)}]"]
    return ["eval.scales=[0.25,0.5,1.0,2.0]", "eval.scale_sets=[[0.5,1.0,2.0],[0.25,0.5,1.0,2.0]]",
            "eval.sweep_fusions=[attention]", "eval.sweep_flips=[false]"]


def evaluate_model(key: str, cfg: Config, out: str, state: State) -> dict[tuple[tuple[float, ...], str], dict]:
    """{(eval scales ascending, fusion): {'miou', 'iou' per class, 'classes'}} of one model's eval.py pass."""
    trained = state.data["trained"].get(key)
    if not trained:
        raise CliError(f"the {key} model is not trained yet: run the stage train-{key} (or all) first")
    eval_dir = os.path.join(out, "eval", key)
    results_path = os.path.join(eval_dir, "results.json")
    if not os.path.isfile(results_path):
        path = write_config(cfg, out, key)
        start = time.time()
        run_logged([sys.executable, os.path.join(ROOT, "eval.py"), "--config", path, "--checkpoint",
                    trained["checkpoint"], "--out", eval_dir, "eval.dump=none", *eval_overrides(key)],
                   os.path.join(out, "logs", f"eval_{key}.log"), f"evaluating {key}")
        state.timed(f"eval-{key}", time.time() - start)
    with open(results_path) as f:
        res = json.load(f)
    classes = [c["name"] for c in res["per_class"]]
    found = {(tuple(sorted(res["scales"])), res["fusion"] if len(res["scales"]) > 1 else "none"):
             {"miou": res["miou"], "iou": [c["iou"] for c in res["per_class"]], "classes": classes}}
    if "sweep" in res:
        with open(res["sweep"]) as f:
            sweep = json.load(f)
        for r in sweep["rows"]:
            found[(tuple(sorted(r["scales"])), r["fusion"])] = {"miou": r["miou"], "iou": r["iou"],
                                                                 "classes": sweep["classes"]}
    return found


def build_rows(cfgs: dict[str, Config], lo: float, out: str, state: State, measured: dict) -> list[dict[str, Any]]:
    rows = {r["key"]: r for r in read_rows(out)}
    evaluated: dict[str, dict] = {}
    base_flops, base_time = measured["single"]["train_gflops"], measured["single"]["step_s"]
    for row in ROWS:
        if row.key in rows:
            continue
        if row.model not in evaluated:
            evaluated[row.model] = evaluate_model(row.model, cfgs[row.model], out, state)
        found = evaluated[row.model].get((tuple(sorted(row.eval_scales)), row.fusion))
        if found is None:
            raise CliError(f"eval.py gave no result for {row.method} at {list(row.eval_scales)} ({row.fusion})")
        m = measured[row.model]
        rows[row.key] = {
            "key": row.key, "method": row.method, "model": cfgs[row.model].model.name,
            "train_scales": train_scales(row.model, lo), "eval_scales": list(row.eval_scales), "fusion": row.fusion,
            "miou": found["miou"], "flops_ratio": m["train_gflops"] / base_flops,
            "step_time_ratio": m["step_s"] / base_time, "train_gflops": m["train_gflops"], "step_s": m["step_s"],
            "peak_train_memory_mb": peak_memory(row.model, state, measured),
            "memory_kind": "gpu_allocated" if "peak_gpu_mb" in m else "cpu_process_rss",
            "classes": found["classes"], "iou": found["iou"],
        }
        write_json(os.path.join(out, "table3.json"), [rows[r.key] for r in ROWS if r.key in rows])  # row by row
    ordered = [rows[r.key] for r in ROWS]
    base = rows["single"]
    for r in ordered:  # gains over single scale, in IoU points
        r["miou_gain"] = 100 * (r["miou"] - base["miou"])
        r["gain"] = [100 * (_num(a) - _num(b)) for a, b in zip(r["iou"], base["iou"])]
    write_json(os.path.join(out, "table3.json"), ordered)
    return ordered


def peak_memory(key: str, state: State, measured: dict) -> float:
    if "peak_gpu_mb" in measured[key]:
        return measured[key]["peak_gpu_mb"]
    return state.data["trained"][key]["peak_rss_mb"]


# ----------------------------------------------------------------------------------------------- reports


def scales_label(scales: list[float]) -> str:
    return "/".join(f"{s:g}" for s in sorted(scales))


def write_markdown(rows: list[dict[str, Any]], path: str, state: State) -> None:
    mem = "peak train GPU MB" if rows[0]["memory_kind"] == "gpu_allocated" else "peak train RSS MB"
    lines = [f"| method | train scales | eval scales | mIoU | gain | FLOPs (train) | step time | {mem} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {scales_label(r['train_scales'])} | {scales_label(r['eval_scales'])} | "
                     f"{100 * r['miou']:.2f} | {r['miou_gain']:+.2f} | {r['flops_ratio']:.2f}x | "
                     f"{r['step_time_ratio']:.2f}x ({r['step_s']:.2f} s) | {r['peak_train_memory_mb']:.0f} |")
    lines += ["", "Per-class IoU (%) and gain over single scale (IoU points):", ""]
    classes = rows[0]["classes"]
    lines += ["| row | " + " | ".join(classes) + " |", "| --- |" + " --- |" * len(classes)]
    for r in rows:
        cells = [("-" if i is None or i != i else f"{100 * i:.1f}") + ("" if g != g else f" ({g:+.1f})")
                 for i, g in zip(r["iou"], r["gain"])]
        lines.append(f"| {r['method']} {scales_label(r['eval_scales'])} | " + " | ".join(cells) + " |")
    timings = state.data["timings"]
    total = sum(t["seconds"] for t in timings.values())
    lines += ["", f"Time: {total / 60:.1f} min in all (" + ", ".join(
        f"{k} {v['seconds']:.0f} s at load {v['load_avg_1_5_15'][0]:.2f}" for k, v in timings.items()) + ")."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(rows: list[dict[str, Any]], path: str) -> None:
    """mIoU of every row against its training cost (FLOPs ratio): matplotlib if installed, else cv2 drawing."""
    labels = [f"{r['method'].replace('baseline ', '')} {scales_label(r['eval_scales'])}" for r in rows]
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        _cv2_bars(rows, labels, path)
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(range(len(rows)), [100 * r["miou"] for r in rows])
    ax.set_yticks(range(len(rows)), [f"{lab} ({r['flops_ratio']:.2f}x)" for lab, r in zip(labels, rows)])
    ax.invert_yaxis()
    ax.set_xlabel("mIoU (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cv2_bars(rows: list[dict[str, Any]], labels: list[str], path: str) -> None:
    import cv2  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    width, left, bar_h, gap = 900, 330, 34, 14
    height = 60 + len(rows) * (bar_h + gap)
    img = np.full((height, width, 3), 255, np.uint8)
    lo = max(0.0, min(100 * r["miou"] for r in rows) - 5)
    hi = max(100 * r["miou"] for r in rows) + 2
    span = width - left - 150
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, f"mIoU (%), bars from {lo:.0f}; training FLOPs and step time vs single scale", (10, 24), font,
                0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        y = 44 + i * (bar_h + gap)
        x1 = left + int(span * (100 * r["miou"] - lo) / max(hi - lo, 1e-6))
        colour = (60, 140, 230) if r["fusion"] != "attention" else (80, 170, 60)
        cv2.rectangle(img, (left, y), (max(x1, left + 1), y + bar_h), colour, -1)
        cv2.putText(img, lab[:42], (10, y + 22), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{100 * r['miou']:.2f}  {r['flops_ratio']:.2f}x  {r['step_time_ratio']:.2f}x",
                    (x1 + 8, y + 22), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(path, img):
        raise CliError(f"cannot write {path}")


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | None:
    args = parse_args(argv)
    from datasets.base import DataError  # noqa: PLC0415

    with one_line_errors(debug_enabled(), (ConfigError, DataError, ValueError)):
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            raise CliError(f"config error: {e}") from e
        return run(args, cfg)


def run(args: argparse.Namespace, cfg: Config) -> list[dict[str, Any]] | None:
    out = os.path.abspath(args.out)
    ensure_writable_dir(out, "--out")
    cfgs, lo = model_configs(cfg, out)
    state = State(out, cfg)
    if args.stage == "configs":  # for a launcher of its own (scripts/slurm/table3.sbatch): train.py --config FILE
        for key in MODELS:
            print(write_config(cfgs[key], out, key))
        return None
    for key in MODELS:
        if args.stage in ("all", f"train-{key}"):
            train_model(key, cfgs[key], out, state)
    if args.stage in ("train-single", "train-explicit", "train-hierarchical"):
        return None
    measured = measure(cfgs, args.rounds, state)
    if args.stage == "measure":
        return None
    rows = build_rows(cfgs, lo, out, state, measured)
    write_markdown(rows, os.path.join(out, "table3.md"), state)
    write_plot(rows, os.path.join(out, "table3.png"))
    with open(os.path.join(out, "table3.md")) as f:
        print(f.read(), end="")
    print(f"[table3] written: {out}/table3.json, table3.md, table3.png", flush=True)
    return rows


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
