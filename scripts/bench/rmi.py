"""Benchmark loss.rmi.RMILoss against a straightforward port of the original RMI loss.

The baseline below follows the original code step by step (one-hot labels, weighted BCEWithLogits, average pooling
of both maps, 9 stacked shifted views cast to float64, torch.inverse, Cholesky logdet) with its one GPU-only line
(`torch.cuda.DoubleTensor`) replaced by `.double()`, so it runs on any device.

    python -m scripts.bench.rmi                  # CPU, a few sizes, well under a minute
    python -m scripts.bench.rmi --device cuda --sizes 512x1024 1024x1024 1024x2048 --batch 2

Prints a markdown table: time per call (forward; forward+backward), the speed-up and the largest relative
difference of the loss value and of the gradient.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from loss.rmi import RMILoss


def original_port(logits: Tensor, labels: Tensor, num_classes: int, do_rmi: bool = True) -> Tensor:
    """The original RMILoss.forward, float64 from the stacked vectors on, as on the GPU."""
    k = num_classes
    mask = labels < k
    onehot = F.one_hot(labels * mask, k).float() * mask.unsqueeze(3).float()  # [N,H,W,K]
    mask_flat = mask.reshape(-1).float()
    bce = F.binary_cross_entropy_with_logits(
        logits.permute(0, 2, 3, 1).reshape(-1, k),
        onehot.reshape(-1, k),
        weight=mask_flat.unsqueeze(1),
        reduction="sum",
    ) / (mask_flat.sum() + 1.0)
    if not do_rmi:
        return bce
    probs = torch.sigmoid(logits) * mask.unsqueeze(1).float() + 1e-6
    lab = F.avg_pool2d(onehot.permute(0, 3, 1, 2), kernel_size=4, stride=4, padding=2)
    prb = F.avg_pool2d(probs, kernel_size=4, stride=4, padding=2)
    n, c, h, w = lab.shape
    nh, nw = h - 2, w - 2
    la = torch.stack([lab[:, :, y : y + nh, x : x + nw] for y in range(3) for x in range(3)], dim=2)
    pr = torch.stack([prb[:, :, y : y + nh, x : x + nw] for y in range(3) for x in range(3)], dim=2)
    la = la.view(n, c, 9, -1).double()
    pr = pr.view(n, c, 9, -1).double()
    eye = torch.eye(9, dtype=torch.float64, device=logits.device).view(1, 1, 9, 9)
    la = la - la.mean(dim=3, keepdim=True)
    pr = pr - pr.mean(dim=3, keepdim=True)
    la_cov = la @ la.transpose(2, 3)
    pr_cov = pr @ pr.transpose(2, 3)
    pr_cov_inv = torch.inverse(pr_cov + eye * 5e-4)
    la_pr_cov = la @ pr.transpose(2, 3)
    appro_var = la_cov - la_pr_cov @ pr_cov_inv @ la_pr_cov.transpose(2, 3)
    chol = torch.linalg.cholesky(appro_var + eye * 5e-4)
    rmi_now = 0.5 * 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1) + 1e-8).sum(-1)
    rmi = (rmi_now.view(-1, k).mean(0).float() / 9.0).sum()
    return 0.5 * bce + 0.5 * rmi


def _time(fn: Callable[[], object], device: torch.device, min_time: float) -> float:
    """Median seconds per call (robust to a busy machine): one warm-up, then at least 3 calls and `min_time`."""
    fn()
    times: list[float] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    sync(device)
    while len(times) < 3 or sum(times) < min_time:
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(
    n: int, k: int, h: int, w: int, device: torch.device, min_time: float, seed: int = 0
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, k, h, w, generator=gen)).to(device)
    labels = torch.randint(0, k, (n, h, w), generator=gen)
    labels[torch.rand(n, h, w, generator=gen) < 0.1] = 255
    labels = labels.to(device)
    ours = RMILoss(k, 255)

    def forward(fn: Callable[..., Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.no_grad():
                return fn(logits, labels)

        return run

    def forward_backward(fn: Callable[..., Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            x = logits.detach().requires_grad_(True)
            fn(x, labels).backward()
            return x.grad

        return run

    port = lambda x, y: original_port(x, y, k)  # noqa: E731
    grad_ours, grad_port = forward_backward(ours)(), forward_backward(port)()
    value_ours, value_port = forward(ours)().item(), forward(port)().item()
    row = {
        "fwd_port": _time(forward(port), device, min_time),
        "fwd_ours": _time(forward(ours), device, min_time),
        "fb_port": _time(forward_backward(port), device, min_time),
        "fb_ours": _time(forward_backward(ours), device, min_time),
        "value": value_ours,
        "value_diff": abs(value_ours - value_port) / abs(value_port),
        "grad_diff": ((grad_ours - grad_port).abs().max() / grad_port.abs().max()).item(),
    }
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 ...")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--sizes", nargs="+", default=["256x256", "512x512"], help="HxW of the logits")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds spent timing each cell")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"RMILoss (0.5·BCE + 0.5·RMI), N={args.batch}, K={args.classes}, 10% ignored pixels; {name}; "
          f"torch {torch.__version__}\n")
    print("| logits | forward: port | forward: ours | speed-up | fwd+bwd: port | fwd+bwd: ours | speed-up "
          "| loss | value rel. diff | grad rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        h, w = (int(v) for v in size.lower().split("x"))
        r = bench_size(args.batch, args.classes, h, w, device, args.min_time)
        print(
            f"| {args.batch}x{args.classes}x{h}x{w} | {r['fwd_port'] * 1e3:.1f} ms | {r['fwd_ours'] * 1e3:.1f} ms "
            f"| {r['fwd_port'] / r['fwd_ours']:.2f}x | {r['fb_port'] * 1e3:.1f} ms | {r['fb_ours'] * 1e3:.1f} ms "
            f"| {r['fb_port'] / r['fb_ours']:.2f}x | {r['value']:.7f} | {r['value_diff']:.1e} | {r['grad_diff']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
