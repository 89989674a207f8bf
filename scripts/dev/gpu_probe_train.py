"""train.py as the GPU check runs it (scripts/gpu_check.sh): 2 ranks on one device under torchrun, gloo, SyncBN,
channels-last, the tiny demo model for a few iterations; on a GPU, both ranks share cuda:0 (NCCL refuses two ranks
on one device, so the group is gloo: HMSA_DIST_BACKEND=gloo, read by utils/runtime/dist.py `init_distributed`).

    python -m scripts.dev.gpu_probe_train straight --precision bf16 --root DIR --json OUT
    python -m scripts.dev.gpu_probe_train preempt --precision fp16 --root DIR --json OUT
        # SIGUSR1 to rank 0 after iteration 3: checkpoint, exit 75; then the same command resumes it

Each launch's ranks report what they run on (backend, SyncBN modules, layout) and check that SyncBN really
synchronises (a layer fed half a batch per rank equals BatchNorm2d on the whole batch). The driver then checks the
run: every iteration logged once in metrics.jsonl, the preemption's checkpoint, the resume from it. It writes one
JSON and exits 1 naming each problem. The worker role (`worker [signal-at=K] -- OVERRIDES`) is what torchrun runs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ITERS, SIGNAL_AT = 5, 3  # 2 steps per epoch (8 images, 2 per rank): the signal comes mid-epoch
RANKS = 2
# The tiny run of tests/fixtures.py (TINY_RUN) with 2 images per rank, a checkpoint only at the end (so that a
# resume can only come from the preemption's checkpoint), no dumps and a short collective timeout.
DATA = (8, 2, 64, 128)  # num_train, num_val, height, width
TINY_MODEL = "{trunk: resnet18, aspp_ch: 8, fine_ch: 8, head_ch: 8, attn_ch: 8}"


def overrides(root: Path, name: str, precision: str) -> list[str]:
    n_train, n_val, height, width = DATA
    return [f"data.root={root}/data", f"run.output_dir={root}/runs", f"run.name={name}",
            f"data.synthetic.num_train={n_train}", f"data.synthetic.num_val={n_val}",
            f"data.synthetic.height={height}", f"data.synthetic.width={width}", "data.augment.crop_size=[64,64]",
            "data.batch_size=2", "data.val_batch_size=1", "data.num_workers=0", f"model.options={TINY_MODEL}",
            f"train.max_iter={ITERS}", "train.ckpt_interval=100", "train.log_interval=1", "eval.scales=[0.5,1.0]",
            "eval.num_dump=0", f"run.precision={precision}", "run.channels_last=true", "model.norm=syncbn",
            "run.dist_timeout=60"]


# ----------------------------------------------------------------------------------------------- worker


def syncbn_difference(device: Any) -> float:
    """Largest |difference| between SyncBN fed this rank's half of a batch and BatchNorm2d fed the whole batch, on
    this rank's half (output and running mean). A layer that did not synchronise (plain batch norm on the half)
    differs by ~0.1 or more here; a synchronised one by float rounding."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from network.layers import sync_batchnorm

    rank = dist.get_rank()
    whole = torch.randn(2 * RANKS, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    ref = nn.BatchNorm2d(4).train()
    expected = ref(whole)[2 * rank:2 * rank + 2]
    synced = sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), device).train()
    out = synced(whole[2 * rank:2 * rank + 2].to(device)).cpu()
    mean = synced[0].running_mean.cpu()
    return max((out - expected).abs().max().item(), (mean - ref.running_mean).abs().max().item())


def worker(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    import train
    from network.layers import CpuSyncBatchNorm
    from utils.cli import run_cli

    signal_at = None
    if argv and argv[0].startswith("signal-at="):  # not an option: torchrun would take it for one of its own
        signal_at, argv = int(argv[0].split("=")[1]), argv[1:]
    assert argv[:1] == ["--"], argv
    rank = int(os.environ.get("RANK", "0"))
    wanted = os.environ.get("HMSA_DIST_BACKEND", "")

    real_init = dist.init_process_group

    def init(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
        if wanted and backend != wanted:  # a named failure, not NCCL's "Duplicate GPU detected" later
            raise SystemExit(f"gpu_probe_train: init_distributed chose backend {backend!r} although "
                             f"HMSA_DIST_BACKEND={wanted}: utils/runtime/dist.py does not honour the override")
        return real_init(backend, *args, **kwargs)

    dist.init_process_group = init

    real_place = train.place_model

    def place(net: nn.Module, cfg: Any, info: Any) -> Any:
        net, model = real_place(net, cfg, info)
        convs = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d)]
        facts = {"rank": rank, "backend": dist.get_backend() if dist.is_initialized() else None,
                 "world_size": info.world_size, "device": str(info.device),
                 "param_devices": sorted({p.device.type for p in net.parameters()}),
                 "syncbn_modules": sum(isinstance(m, (nn.SyncBatchNorm, CpuSyncBatchNorm)) for m in net.modules()),
                 "plain_bn_modules": sum(type(m) is nn.BatchNorm2d for m in net.modules()),
                 "channels_last": all(w.is_contiguous(memory_format=torch.channels_last) for w in convs),
                 "syncbn_difference": syncbn_difference(info.device) if info.distributed else None}
        run_dir = Path(cfg.run.output_dir) / cfg.run.name
        with open(run_dir / f"probe_rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(facts) + "\n")
        return net, model

    train.place_model = place
    if signal_at is not None:
        real_step, done = train.train_step, [0]

        def step(*args: Any, **kwargs: Any) -> Any:
            out = real_step(*args, **kwargs)
            done[0] += 1
            if done[0] == signal_at and rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's warning signal: checkpoint, exit 75
            return out

        train.train_step = step
    run_cli(train.main, argv[1:])


# ----------------------------------------------------------------------------------------------- driver


def launch(root: Path, name: str, precision: str, signal_at: int | None) -> dict[str, Any]:
    """One torchrun of RANKS processes; returns its exit code, seconds and output (the last lines)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HMSA_DIST_BACKEND=os.environ.get("HMSA_DIST_BACKEND", "gloo"), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    event = [f"signal-at={signal_at}"] if signal_at is not None else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
           "-m", "scripts.dev.gpu_probe_train", "worker", *event, "--", *overrides(root, name, precision)]
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    print(output[-3000:], flush=True)
    return {"rc": done.returncode, "seconds": round(time.time() - start, 1), "output": output}


def check_facts(run: Path, launches: int, device: str, problems: list[str]) -> list[dict]:
    facts = []
    for r in range(RANKS):
        path = run / f"probe_rank{r}.jsonl"
        rows = [json.loads(line) for line in open(path)] if path.exists() else []
        if len(rows) != launches:
            problems.append(f"rank {r} reported {len(rows)} model placements, expected {launches}")
        facts += rows
    for f in facts:
        where = f"rank {f['rank']}"
        if f["backend"] != "gloo" or f["world_size"] != RANKS:
            problems.append(f"{where}: backend {f['backend']}, world size {f['world_size']} (wanted gloo, {RANKS})")
        if f["param_devices"] != [device]:
            problems.append(f"{where}: parameters on {f['param_devices']}, not {device}")
        if f["syncbn_modules"] == 0 or f["plain_bn_modules"] != 0:
            problems.append(f"{where}: {f['syncbn_modules']} SyncBN and {f['plain_bn_modules']} plain BatchNorm2d "
                            "modules (model.norm=syncbn converts every one)")
        if not f["channels_last"]:
            problems.append(f"{where}: conv weights not channels-last (run.channels_last=true)")
        if f["syncbn_difference"] is None or f["syncbn_difference"] > 1e-4:
            problems.append(f"{where}: SyncBN differs from BatchNorm2d on the whole batch by "
                            f"{f['syncbn_difference']} (it did not synchronise across the ranks)")
    return facts


def train_rows(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [row["iteration"] for row in map(json.loads, open(path)) if row.get("split") == "train"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("straight", "preempt"))
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), required=True)
    p.add_argument("--root", type=Path, required=True, help="folder for the generated data and the runs")
    p.add_argument("--json", type=Path, required=True, help="where the result goes")
    args = p.parse_args(argv)
    import torch

    from datasets.synthetic import generate_synthetic_cityscapes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # generated here once, so that the two ranks never generate it at the same time
    generate_synthetic_cityscapes(str(args.root / "data"), *DATA, 0)
    name = f"{args.mode}_{args.precision}"
    run = args.root / "runs" / name
    problems: list[str] = []
    launches = []
    if args.mode == "preempt":
        first = launch(args.root, name, args.precision, SIGNAL_AT)
        launches.append(first)
        log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
        if first["rc"] == 0 or f"stopped by a preemption signal at iteration {SIGNAL_AT}/{ITERS}" not in log:
            problems.append(f"SIGUSR1 after iteration {SIGNAL_AT}: exit code {first['rc']}, and train.log "
                            f"{'does not say' if 'stopped by a preemption' not in log else 'says otherwise'} "
                            f"that it stopped at {SIGNAL_AT}/{ITERS}")
        if "exitcode  : 75" not in first["output"]:
            problems.append("no rank exited with 75 (the requeue code) after SIGUSR1")
        if not (run / f"ckpt_{SIGNAL_AT:08d}.pth").exists():
            problems.append(f"no checkpoint ckpt_{SIGNAL_AT:08d}.pth after the signal")
    final = launch(args.root, name, args.precision, None)
    launches.append(final)
    if final["rc"] != 0:
        problems.append(f"train.py {'resumed ' if args.mode == 'preempt' else ''}exited with {final['rc']}")
    log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
    if args.mode == "preempt" and f"ckpt_{SIGNAL_AT:08d}.pth at iteration {SIGNAL_AT}" not in log:
        problems.append(f"the second launch did not resume from ckpt_{SIGNAL_AT:08d}.pth at iteration {SIGNAL_AT}")
    iterations = train_rows(run)
    if iterations != list(range(1, ITERS + 1)):
        problems.append(f"metrics.jsonl holds the training iterations {iterations}, not each of 1..{ITERS} once")
    facts = check_facts(run, len(launches), device, problems)
    result = {"mode": args.mode, "precision": args.precision, "device": device, "ranks": RANKS,
              "iterations": iterations, "signal_at": SIGNAL_AT if args.mode == "preempt" else None,
              "launches": [{k: v for k, v in x.items() if k != "output"} for x in launches], "facts": facts,
              "problems": problems}
    args.json.write_text(json.dumps(result, indent=1))
    for problem in problems:
        print(f"gpu_probe_train: {problem}", file=sys.stderr)
    print(f"gpu_probe_train {name} on {device}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.path.insert(0, str(ROOT))
        worker(sys.argv[2:])
    else:
        sys.exit(main())
