"""Cost of the one-pass scale-set sweep against evaluating the union of its scales once, and against one run per
combination (what the original needed).

    python -m scripts.bench.sweep                                      # CPU, tiny model, under a minute
    python -m scripts.bench.sweep --device cuda --model hmsa_ocrnet_hrnet_w48 --options "{}" \
        --size 1024 2048 --images 8 --batch 1 --precision bf16

Images and labels are random (the cost does not depend on them). Prints a markdown table: seconds (CPU seconds of
this process on a CPU, wall-clock on a GPU), network passes per image and the cost relative to evaluating the union
once (with the mirrored pass when the sweep flips).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import yaml

import network
from utils.config import ModelConfig
from utils.engine import evaluate
from utils.inference import Inference, sweep_combos



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hmsa_deeplabv3plus")
    p.add_argument("--options", default=None, help="model options as YAML (default: the demo model's)")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--sets", default="[[1.0],[0.5,1.0],[0.5,1.0,2.0],[0.25,0.5,1.0,2.0]]", help="YAML list")
    p.add_argument("--fusions", default="[attention,average,max]", help="YAML list")
    p.add_argument("--flips", default="[false,true]", help="YAML list")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (the fastest is reported)")
    p.add_argument("--separate", action="store_true", help="also time one evaluation per combination (slow)")
    return p.parse_args(argv)


def timed(fns: dict[str, Callable[[], object]], device: torch.device, repeat: int) -> dict[str, float]:
    """Fastest of `repeat` runs of each function, the functions interleaved so that a busy machine slows all alike.

    On a GPU: wall-clock seconds. On a CPU: this process's CPU seconds, so that time spent waiting for a core that
    other jobs hold does not count (contention for memory bandwidth still does).
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = clock()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], clock() - t0)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    options = ModelConfig().options if args.options is None else (yaml.safe_load(args.options) or {})
    model = network.build_model(args.model, args.classes, **options).to(device).eval()
    g = torch.Generator().manual_seed(0)
    h, w = args.size
    loader = []
    for i in range(0, args.images, args.batch):
        n = min(args.batch, args.images - i)
        loader.append({"image": torch.randn(n, 3, h, w, generator=g).to(device),
                       "mask": torch.randint(0, args.classes, (n, h, w), generator=g).to(device),
                       "name": [f"img{i + j}" for j in range(n)]})
    sets, fusions, flips = (yaml.safe_load(x) for x in (args.sets, args.fusions, args.flips))
    combos = sweep_combos(sets, fusions, flips, model)
    union = sorted({s for c in combos for s in c.scales})
    flip_any = any(c.flip for c in combos)

    def run(scales, fusion="attention", flip=False, sweep=False):
        how = Inference.make(scales, fusion, flip, precision=args.precision,
                             **(dict(sweep_sets=sets, sweep_fusions=fusions, sweep_flips=flips) if sweep else {}))
        return evaluate(model, loader, args.classes, 255, how, device)

    run([1.0])  # warm-up (allocator, cuDNN autotuning)
    fns = {"union": lambda: run(union, flip=flip_any), "sweep": lambda: run(union, flip=flip_any, sweep=True)}
    if args.separate:
        fns["separate"] = lambda: [run(c.scales, None if c.fusion == "none" else c.fusion, c.flip) for c in combos]
    t = timed(fns, device, args.repeat)
    passes = len(union) * (2 if flip_any else 1)
    rows = [
        {"what": f"union {union} once{' + flip' if flip_any else ''}", "combos": 1, "passes": passes,
         "seconds": t["union"]},
        {"what": "one-pass sweep", "combos": len(combos), "passes": passes, "seconds": t["sweep"]},
    ]
    if args.separate:
        rows.append({"what": "one evaluation per combination", "combos": len(combos),
                     "passes": sum(len(c.scales) * (2 if c.flip else 1) for c in combos), "seconds": t["separate"]})
    t_union = t["union"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model} {options}, {args.images} images {h}x{w}, batch {args.batch}, {args.precision}, {name},"
          f" {torch.get_num_threads()} threads")
    print(f"| what | combinations | network passes per image | {'seconds' if device.type == 'cuda' else 'CPU seconds'}"
          " | vs union |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        r["relative"] = r["seconds"] / t_union
        print(f"| {r['what']} | {r['combos']} | {r['passes']} | {r['seconds']:.3f} | {r['relative']:.3f} |")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
