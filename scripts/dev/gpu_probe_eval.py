"""eval.py under a planned memory schedule, its measured peak against the planner's prediction (scripts/gpu_check.sh).

    python -m scripts.dev.gpu_probe_eval --root DIR --json OUT [--size 512x1024] [--precision fp16]

The tiny demo model (random weights: memory does not depend on them) evaluates generated images at eval.scales
0.5, 1.0, 2.0 with eval.memory_budget set just below the unconstrained schedule's predicted peak, so the planner
(utils/inference/memory.py `choose_schedule`) must pick a cheaper exact schedule. The planner's call is recorded
(its batch shape, budget, chosen schedule and predicted peak); on CUDA `torch.cuda.max_memory_allocated` over
the whole of eval.py's run is the measured peak. The JSON holds both and their ratio (measured / predicted); the
planner leaves out kernel workspaces and allocator rounding, so a ratio somewhat above 1 is expected. Exits 1
when eval.py fails or did not run under a non-trivial planned schedule. On a CPU there is no allocator counter:
the measured peak is null.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = {"trunk": "resnet18", "aspp_ch": 8, "fine_ch": 8, "head_ch": 8, "attn_ch": 8}  # tests/fixtures.py
BATCH = 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--size", default="512x1024", help="HxW of the generated validation images")
    p.add_argument("--precision", default="fp16", choices=("fp32", "bf16", "fp16"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import eval as eval_script
    import network
    from datasets.synthetic import generate_synthetic_cityscapes
    from utils.config import load_config
    from utils.inference import Inference
    from utils.inference import memory
    from utils.inference.multiscale import UNCONSTRAINED

    height, width = (int(v) for v in args.size.split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generate_synthetic_cityscapes(str(args.root / "data"), 1, BATCH, height, width, 0)
    options = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_MODEL.items()) + "}"
    overrides = [f"data.root={args.root}/data", "data.synthetic.num_train=1", f"data.synthetic.num_val={BATCH}",
                 f"data.synthetic.height={height}", f"data.synthetic.width={width}", f"data.val_batch_size={BATCH}",
                 "data.num_workers=0", f"model.options={options}", f"run.output_dir={args.root}/runs",
                 "eval.scales=[0.5,1.0,2.0]", "eval.dump=none", f"run.precision={args.precision}"]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = network.build_model(cfg.model.name, 19, **cfg.model.options).eval()
    checkpoint = args.root / "tiny.pth"
    torch.save({"model": model.state_dict()}, checkpoint)

    # The budget: the first schedule of the ladder that the unconstrained one does not fit into.
    how = Inference.from_config(cfg)
    shape = (BATCH, 3, height, width)
    plan = memory.plan_eval(model, shape, [how.combo(model)], how, device, every=True)
    cheaper = [r for r in plan.rows[1:] if r.peak < plan.rows[0].peak]
    problems: list[str] = []
    if not cheaper:
        problems.append("no schedule of the ladder is planned below the unconstrained one")
    budget = cheaper[0].peak if cheaper else plan.rows[0].peak
    del model

    calls: list[dict[str, Any]] = []  # the planner's calls inside eval.py
    real_plan = memory.plan_eval

    def recorded(*a: Any, **k: Any) -> Any:
        out = real_plan(*a, **k)
        calls.append({"shape": list(out.shape), "budget": out.budget,
                      "schedule": out.chosen.schedule.label if out.chosen else None,
                      "unconstrained": out.chosen is not None and out.chosen.schedule == UNCONSTRAINED,
                      "exact": out.chosen.exact if out.chosen else None,
                      "predicted_peak": out.chosen.peak if out.chosen else None, "first_row_peak": out.rows[0].peak})
        return out

    memory.plan_eval = recorded
    measured = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        summary = eval_script.main(overrides + ["--checkpoint", str(checkpoint), f"eval.memory_budget={budget}"])
    except SystemExit as e:  # eval.py's one-line error
        summary = None
        problems.append(f"eval.py failed: {e}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        measured = torch.cuda.max_memory_allocated(device) - base
    if summary is not None and not calls:
        problems.append("eval.py did not plan its schedule (no plan_eval call under eval.memory_budget)")
    if any(c["unconstrained"] or c["schedule"] is None for c in calls):
        problems.append(f"the planned schedule is not a constrained one: {calls}")
    predicted = max((c["predicted_peak"] or 0 for c in calls), default=None)
    ratio = measured / predicted if measured is not None and predicted else None
    result = {"device": str(device), "precision": args.precision, "image_size": [height, width],
              "scales": [0.5, 1.0, 2.0], "budget": budget, "planner_calls": calls, "predicted_peak": predicted,
              "measured_peak": measured, "measured_over_predicted": ratio,
              "measured_how": "torch.cuda.max_memory_allocated over eval.py's run" if measured is not None else None,
              "ladder": [{"schedule": r.schedule.label, "exact": r.exact, "peak": r.peak} for r in plan.rows],
              "problems": problems}
    args.json.write_text(json.dumps(result, indent=1))
    mib = 2**20
    print(f"gpu_probe_eval on {device}: budget {budget / mib:.1f} MiB, schedule "
          f"{calls[0]['schedule'] if calls else None}, predicted peak "
          f"{(predicted or 0) / mib:.1f} MiB, measured {'-' if measured is None else f'{measured / mib:.1f} MiB'}"
          + (f", ratio {ratio:.2f}" if ratio is not None else ""))
    for problem in problems:
        print(f"gpu_probe_eval: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
