"""Every convolution of a multi-scale training step, timed kernel by kernel on the CPU: oneDNN's channels-last weight
gradient against the route `utils.runtime.cpu_tuning` takes (what `run.cpu_tuning` gives on a CPU), and oneDNN in
the contiguous (NCHW) layout, the default before channels-last.

    OMP_NUM_THREADS=1 python -m scripts.bench.conv                        # both full-width models, 256x256 x 2
    python -m scripts.bench.conv --models hmsa_deeplabv3plus --width narrow --top 10 --out conv.json
    python -m scripts.bench.conv --rule avx2       # the routes picked for oneDNN's AVX2 kernels, timed here

The routes follow the rule for the instruction set oneDNN runs here (`--rule auto`); `--rule avx2|avx512` times
the other rule's routes on this machine (ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN itself run its AVX2 kernels).

The convolutions are collected from one training forward pass of the model (both scales, as train.py places it),
grouped by geometry. For each geometry the forward pass, the input gradient and the two weight gradients run in
alternation, `--repeats` times, and the fastest of each is kept; each weight gradient's error is against the
same sum in float64. Per model, the totals weight each geometry by its number of calls per step, and the floor
adds, for each convolution, the fastest of the measured kernels for its forward pass, its input gradient and its
weight gradient (layout conversions not counted): no training step on this machine that computes these
convolutions with these kernels spends less time in them.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import network
from scripts.bench.multiscale import NUM_CLASSES, PAIRS, WIDTHS, parse_size
from utils.runtime.cpu_tuning import onednn_avx512, onednn_backward, weight_grad, weight_grad_route
from utils.runtime.layout import place_model

Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, int], tuple[int, int], tuple[int, int], bool]


def collect(model: nn.Module, images: torch.Tensor) -> Counter:
    """(input shape, weight shape, stride, padding, dilation, input needs a gradient) -> calls in one step."""
    found: Counter = Counter()

    def record(conv: nn.Conv2d, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        if conv.groups == 1 and conv.weight.requires_grad and torch.is_grad_enabled():
            found[(tuple(inputs[0].shape), tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation,
                   inputs[0].requires_grad)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    return found


def _fastest(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """CPU seconds of each call, the fastest of `repeats`, the calls alternating."""
    best = {name: float("inf") for name in calls}
    for f in calls.values():
        f()
    for _ in range(repeats):
        for name, f in calls.items():
            start = time.process_time()
            f()
            best[name] = min(best[name], time.process_time() - start)
    return best


def _rel(ref: torch.Tensor, value: torch.Tensor) -> float:
    return ((value.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def measure(geometry: Geometry, repeats: int, avx512: bool, seed: int = 0) -> dict[str, Any]:
    """Times and errors of one geometry's kernels; the routed weight gradient by the rule for `avx512`."""
    in_shape, w_shape, stride, padding, dilation, input_grad = geometry
    gen = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    x = torch.randn(in_shape, generator=gen).contiguous(memory_format=cl)
    w = (torch.randn(w_shape, generator=gen) / (w_shape[1] * w_shape[2] * w_shape[3]) ** 0.5).contiguous(memory_format=cl)
    grad = torch.randn(F.conv2d(x, w, None, stride, padding, dilation).shape, generator=gen).contiguous(memory_format=cl)

    xc, wc, gc = x.contiguous(), w.contiguous(), grad.contiguous()
    route = weight_grad_route(in_shape, w_shape, grad.shape, stride, padding, dilation, avx512)

    def backward(mask: list[bool], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return onednn_backward(*tensors, stride, padding, dilation, mask)

    calls = {"forward": lambda: F.conv2d(x, w, None, stride, padding, dilation),
             "weight_onednn": lambda: backward([False, True, False], grad, x, w),
             "weight_routed": lambda: weight_grad(grad, x, w, stride, padding, dilation, route),
             "forward_nchw": lambda: F.conv2d(xc, wc, None, stride, padding, dilation),
             "weight_nchw": lambda: backward([False, True, False], gc, xc, wc)}
    if input_grad:
        calls["input"] = lambda: backward([True, False, False], grad, x, w)
        calls["input_nchw"] = lambda: backward([True, False, False], gc, xc, wc)
    times = _fastest(calls, repeats)
    exact = backward([False, True, False], grad.double(), x.double(), w.double())[1]
    flops = 2 * grad.numel() * w_shape[1] * w_shape[2] * w_shape[3]
    return {"input": list(in_shape), "weight": list(w_shape), "stride": list(stride), "padding": list(padding),
            "dilation": list(dilation), "route": route,
            "gflop": flops / 1e9, **{f"{k}_ms": v * 1e3 for k, v in times.items()},
            "input_ms": times.get("input", 0.0) * 1e3, "input_nchw_ms": times.get("input_nchw", 0.0) * 1e3,
            "weight_onednn_err": _rel(exact, calls["weight_onednn"]()[1]),
            "weight_routed_err": _rel(exact, calls["weight_routed"]())}


def bench_model(name: str, width: str, crop: tuple[int, int], batch: int, repeats: int, avx512: bool
                ) -> dict[str, Any]:
    torch.manual_seed(0)
    model = network.build_model(name, NUM_CLASSES, **WIDTHS[width][name]).train()
    place_model(model, torch.device("cpu"), channels_last=True)
    images = torch.randn(batch, 3, *crop).contiguous(memory_format=torch.channels_last)
    rows = []
    for geometry, count in collect(model, images).items():
        rows.append({"calls": count, **measure(geometry, repeats, avx512)})
    totals = {key: sum(r["calls"] * r[f"{key}_ms"] for r in rows) / 1e3
              for key in ("forward", "input", "weight_onednn", "weight_routed", "forward_nchw", "input_nchw",
                          "weight_nchw")}
    totals["floor"] = sum(r["calls"] * floor_ms(r) for r in rows) / 1e3
    return {"model": name, "width": width, "crop": list(crop), "batch": batch, "rule": "avx512" if avx512 else "avx2",
            "rows": rows, "totals_s": totals}


def floor_ms(row: dict[str, Any]) -> float:
    """The fastest measured kernel for each of a convolution's three parts, summed (ms)."""
    return (min(row["forward_ms"], row["forward_nchw_ms"]) + min(row["input_ms"], row["input_nchw_ms"])
            + min(row["weight_onednn_ms"], row["weight_routed_ms"], row["weight_nchw_ms"]))


def table(result: dict[str, Any], top: int) -> str:
    rows = sorted(result["rows"], key=lambda r: -r["calls"] * r["weight_onednn_ms"])
    lines = [f"### {result['model']} ({result['width']}), {result['crop'][0]}x{result['crop'][1]} x {result['batch']}, "
             f"routes for oneDNN's {result['rule'].upper()} kernels",
             "", "| calls | input | weight | stride / pad / dil | GFLOP | forward ms | input grad ms | weight grad: "
             "oneDNN ms | routed ms | speed-up | route | error vs float64 (oneDNN / routed) | NCHW: forward / input / "
             "weight ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows[:top]:
        geo = "/".join("x".join(map(str, r[k])) for k in ("stride", "padding", "dilation"))
        lines.append(f"| {r['calls']} | {'x'.join(map(str, r['input']))} | {'x'.join(map(str, r['weight']))} | {geo} | "
                     f"{r['gflop']:.2f} | {r['forward_ms']:.1f} | {r['input_ms']:.1f} | {r['weight_onednn_ms']:.1f} | "
                     f"{r['weight_routed_ms']:.1f} | {r['weight_onednn_ms'] / r['weight_routed_ms']:.2f}x | "
                     f"{r['route']} | {r['weight_onednn_err']:.1e} / {r['weight_routed_err']:.1e} | "
                     f"{r['forward_nchw_ms']:.1f} / {r['input_nchw_ms']:.1f} / {r['weight_nchw_ms']:.1f} |")
    t = result["totals_s"]
    before = t["forward"] + t["input"] + t["weight_onednn"]
    after = t["forward"] + t["input"] + t["weight_routed"]
    lines += ["", f"Per step, {len(rows)} geometries (the {min(top, len(rows))} costliest above): forward "
              f"{t['forward']:.2f} s, input gradients {t['input']:.2f} s, weight gradients {t['weight_onednn']:.2f} s "
              f"(oneDNN) / {t['weight_routed']:.2f} s (routed): {t['weight_onednn'] / t['weight_routed']:.2f}x on "
              f"the weight gradients, {before / after:.2f}x on the convolutions ({before:.2f} s -> {after:.2f} s).",
              "", f"Contiguous (NCHW) oneDNN: forward {t['forward_nchw']:.2f} s, input gradients {t['input_nchw']:.2f} s, "
              f"weight gradients {t['weight_nchw']:.2f} s ({t['forward_nchw'] + t['input_nchw'] + t['weight_nchw']:.2f} s). "
              f"Floor, the fastest measured kernel for each part of each convolution: {t['floor']:.2f} s per step.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(PAIRS), default=sorted(PAIRS))
    parser.add_argument("--width", choices=sorted(WIDTHS), default="full")
    parser.add_argument("--crop", type=parse_size, default=(256, 256), help="training crop HxW")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per kernel (the fastest is kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=15, help="geometries printed per model")
    parser.add_argument("--rule", choices=("auto", "avx2", "avx512"), default="auto",
                        help="route rule (auto: for the instruction set oneDNN runs here)")
    parser.add_argument("--out", help="JSON file for every row")
    args = parser.parse_args(argv)
    if args.batch < 2:
        parser.error("--batch must be >= 2 (BatchNorm on the 1x1 image-pooling branch needs two values)")
    if min(args.repeats, args.threads, args.top) < 1:
        parser.error("--repeats, --threads and --top must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    here = onednn_avx512()
    avx512 = here if args.rule == "auto" else args.rule == "avx512"
    print(f"# oneDNN kernels here: {'AVX-512' if here else 'AVX2 or older'}; "
          f"torch {torch.__version__}, {args.threads} thread(s)\n", flush=True)
    results = []
    for name in args.models:
        result = bench_model(name, args.width, args.crop, args.batch, args.repeats, avx512)
        print(table(result, args.top), flush=True)
        results.append(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "onednn_avx512": here, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
