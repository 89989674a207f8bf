"""The memory planner (utils/inference/memory.py) and the schedules it chooses (utils/inference/multiscale.py)."""
from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import network
from datasets.cityscapes import CLASSES as CITYSCAPES
from loss import build_criterion
from scripts.bench.memory import measure_train
from train import build_optimizer
from utils.config import ConfigError, load_config
from utils.engine import evaluate
from utils.inference import Inference
from utils.inference.memory import (
    MemoryPlanError,
    PeakMemory,
    TrainStep,
    check_train_memory,
    parse_bytes,
    plan_eval,
    predict_eval_peak,
    predict_train_peak,
    schedule_ladder,
    tensor_bytes,
    trace_forward,
)
from utils.inference.multiscale import UNCONSTRAINED, MultiScalePass, Schedule, ScheduledPass

CPU = torch.device("cpu")
K = 5


@pytest.fixture(scope="module")
def demo():
    cfg = load_config(None)
    torch.manual_seed(0)
    return cfg, network.build_model(cfg.model.name, K, **cfg.model.options).eval()


def batch(n=2, h=48, w=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g), torch.randint(0, K, (n, h, w), generator=g)


def test_parse_bytes_reads_counts_and_sizes_and_names_the_key():
    assert parse_bytes(1000) == 1000
    assert parse_bytes("12GiB") == 12 * 2**30
    assert parse_bytes("800 MB") == 800 * 10**6
    assert parse_bytes("1.5KiB") == 1536
    assert parse_bytes("") is None and parse_bytes(None) is None
    for bad in ("lots", "12 parsecs", "-3GiB", 0, True):
        with pytest.raises(ValueError, match="eval.memory_budget"):
            parse_bytes(bad)


def test_config_keys_are_validated_at_load_and_reach_the_inference_value():
    cfg = load_config(None, ["eval.memory_budget=2GiB", "eval.memory_fallback=any"])
    how = Inference.from_config(cfg)
    assert (how.memory_budget, how.memory_fallback) == (2 * 2**30, "any")
    assert Inference.from_config(load_config(None)).memory_budget is None
    with pytest.raises(ConfigError, match="eval.memory_budget.*'twelve'"):
        load_config(None, ["eval.memory_budget=twelve"])
    with pytest.raises(ConfigError, match="eval.memory_fallback"):
        load_config(None, ["eval.memory_fallback=sometimes"])


def all_combos(how, model):
    setting = how.combo(model)
    return [setting] + [c for c in how.sweep(model) if c != setting]


@pytest.mark.slow
def test_every_exact_schedule_gives_the_unconstrained_bits(demo):
    """Fusion by every rule, the flip, the sweep's sets and the kept maps: the same bits under one scale at a time,
    the flip apart and host memory; the batch split gives the same labels (CPU convolutions round differently
    at another batch size, about 1e-7)."""
    _, model = demo
    how = Inference.make([0.5, 1.0, 2.0], flip=True, sweep_sets=[[0.5, 1.0], [1.0, 2.0], [0.5, 1.0, 2.0]])
    combos = all_combos(how, model)
    assert {c.fusion for c in combos} == {"attention", "average", "max", "none"}
    images, _ = batch()
    keep = (2.0, 1.0, 0.5)
    schedules = [Schedule(stream=True), Schedule(stream=True, flip_apart=True), Schedule(stream=True, host=True),
                 Schedule(stream=True, flip_apart=True, chunk=1), Schedule(stream=True, chunk=1, host=True)]
    with torch.inference_mode():
        ref = MultiScalePass(model, images, keep, True)
        want = {c: ref.logits(c) for c in combos}
        maps = ref.maps()
        for schedule in schedules:
            run = ScheduledPass(model, images, combos, schedule, keep)
            got = dict(run.logits_many(combos))
            split = schedule.chunk > 0
            for c in combos:
                if split:
                    assert torch.equal(got[c].max(1).indices, want[c].max(1).indices), (schedule.label, c.label)
                    torch.testing.assert_close(got[c], want[c], rtol=0, atol=1e-5)
                else:
                    assert torch.equal(got[c], want[c]), (schedule.label, c.label)
            kept = run.maps()
            assert kept.keys() == maps.keys()
            for k in maps:
                assert torch.equal(kept[k], maps[k]) if not split else torch.allclose(kept[k], maps[k], atol=1e-5)


def test_the_top_scale_trace_leaves_out_the_attention_head(demo):
    _, model = demo
    full = trace_forward(model, (1, 3, 96, 128))
    top = trace_forward(model, (1, 3, 96, 128), attention=False)
    assert [k for k, *_ in full.outputs] == ["pred", "attn"] and [k for k, *_ in top.outputs] == ["pred"]
    assert top.peak <= full.peak  # the peak is in the trunk at this size


def measured_eval(model, how, images, target, **kw):
    loader = [{"image": images, "mask": target, "name": [f"im{i}" for i in range(images.shape[0])]}]
    with PeakMemory(CPU) as mem:
        result = evaluate(model, loader, K, 255, how, CPU, **kw)
    return tensor_bytes(model) + images.numel() * 4 + target.numel() * 8 + mem.peak, result


@pytest.mark.slow
@pytest.mark.parametrize("fallback", ["exact", "any"])
def test_predicted_eval_peak_is_within_10_percent_of_the_measured_count(demo, fallback):
    _, model = demo
    how = Inference.make([0.5, 1.0, 2.0], flip=True)
    combos = all_combos(how, model)
    images, target = batch(h=32, w=48) if fallback == "exact" else batch()
    ladder = schedule_ladder(2, images.shape[-2:], combos, fallback, "fp32", CPU)
    for schedule in ladder if fallback == "exact" else [s for s in ladder if not s.exact]:
        predicted = predict_eval_peak(model, images.shape, combos, how, schedule, (), True, CPU)
        measured, _ = measured_eval(model, replace(how, schedule=schedule), images, target)
        assert abs(predicted / measured - 1) < 0.10, (schedule.label, predicted, measured)


@pytest.mark.slow
def test_a_budget_below_the_unconstrained_peak_picks_an_exact_schedule_that_fits(demo, caplog):
    _, model = demo
    how = Inference.make([0.5, 1.0, 2.0], flip=True)
    images, target = batch(n=1, h=64, w=96)
    plan = plan_eval(model, images.shape, all_combos(how, model), how, CPU, every=True)
    unconstrained, cheaper = plan.rows[0].peak, min(r.peak for r in plan.rows if r.exact)
    assert cheaper < unconstrained
    budget = (unconstrained + cheaper) // 2
    free, free_result = measured_eval(model, how, images, target)
    with caplog.at_level(logging.INFO, logger="utils.inference.memory"):
        used, result = measured_eval(model, replace(how, memory_budget=budget), images, target)
    assert used <= budget < free
    assert torch.equal(result.hist, free_result.hist)
    assert "one scale at a time" in caplog.text and "over the budget" in caplog.text


@pytest.mark.slow
def test_a_budget_below_every_exact_schedule_stops_before_the_first_image(demo):
    _, model = demo
    calls = []  # network passes on real images (the planner's traces run on fake tensors)
    hook = next(model.children()).register_forward_pre_hook(
        lambda _, args: calls.append(1) if not isinstance(args[0], FakeTensor) else None)
    images, target = batch(n=1)
    how = Inference.make([0.5, 1.0, 2.0], flip=True, memory_budget="1MiB")
    try:
        with pytest.raises(MemoryPlanError, match=r"needs .*eval\.memory_fallback=exact.* is 1\.00 MiB"):
            measured_eval(model, how, images, target)
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.slow
def test_approximate_schedules_only_with_fallback_any_and_reported(demo, caplog):
    _, model = demo
    how = Inference.make([0.5, 1.0, 2.0], flip=False, memory_fallback="any")
    images, target = batch(n=1, h=64, w=96)
    combos = all_combos(how, model)
    plan = plan_eval(model, images.shape, combos, how, CPU, every=True)
    exact_min = min(r.peak for r in plan.rows if r.exact)
    approx = [r for r in plan.rows if not r.exact and r.peak < exact_min]
    assert approx, plan.table()
    budget = (approx[0].peak + exact_min) // 2
    with caplog.at_level(logging.INFO, logger="utils.inference.memory"):
        measured_eval(model, replace(how, memory_budget=budget), images, target)
    # The first call also ran the exact reference on the host (here the same memory) for the report.
    used, _ = measured_eval(model, replace(how, memory_budget=budget), images, target)
    assert used <= budget
    assert "approximate" in caplog.text and "agrees with the exact result on" in caplog.text
    with pytest.raises(MemoryPlanError):
        measured_eval(model, replace(how, memory_budget=budget, memory_fallback="exact"), images, target)


def test_sweep_and_dumps_work_under_every_schedule(demo, tmp_path):
    _, model = demo
    how = Inference.make([0.5, 1.0], flip=True, sweep_sets=[[0.5, 1.0], [1.0]], sweep_fusions=("attention", "max"))
    combos = all_combos(how, model)
    images, target = batch(n=2, h=32, w=48)
    results = {}
    for schedule in schedule_ladder(2, images.shape[-2:], combos, "exact", "fp32", CPU) + [Schedule(stream=True,
                                                                                                     host=True)]:
        out = tmp_path / schedule.label.replace(" ", "_").replace(",", "")
        _, r = measured_eval(model, replace(how, schedule=schedule), images, target, dump_dir=str(out), dump="all",
                             num_dump=2, palette=CITYSCAPES.palette)
        assert len(r.images) == 2 and all(any(k.startswith("attn_") for k in e["files"]) for e in r.images)
        results[schedule] = r
    ref = results[UNCONSTRAINED]
    for schedule, r in results.items():
        for (c1, h1), (c2, h2) in zip(ref.sweep, r.sweep):
            assert c1 == c2 and torch.equal(h1, h2), (schedule.label, c1.label)


def builders(cfg):
    """train.py's model, optimizer and criterion for `cfg` (the model at K classes)."""
    return (lambda: network.build_model(cfg.model.name, K, **cfg.model.options), partial(build_optimizer, cfg),
            build_criterion(cfg.loss, K, 255))


@pytest.mark.slow
def test_train_check_refuses_with_predicted_available_and_what_fits(demo):
    cfg, _ = demo
    cfg = replace(cfg, data=replace(cfg.data, batch_size=4, augment=replace(cfg.data.augment, crop_size=(64, 64))))
    step = TrainStep(4, (64, 64), cfg.run.precision, cfg.run.channels_last)
    assert TrainStep.from_config(cfg) == step
    peak = predict_train_peak(*builders(cfg), step)
    half = predict_train_peak(*builders(cfg), replace(step, batch=2))
    assert half < peak
    tight = replace(cfg, eval=replace(cfg.eval, memory_budget=(peak + half) // 2))
    with pytest.raises(MemoryPlanError) as err:
        check_train_memory(tight, CPU, *builders(tight))
    message = str(err.value)
    assert f"({peak} bytes: tensors " in message and f"({(peak + half) // 2} bytes)" in message
    assert "data.batch_size=2 train.accum_steps=2" in message and "\n" not in message
    ok = replace(cfg, eval=replace(cfg.eval, memory_budget=peak))
    assert "needs" in check_train_memory(ok, CPU, *builders(ok))
    assert check_train_memory(cfg, CPU, *builders(cfg)) is None  # a CPU without a budget is not checked


@pytest.mark.slow
def test_predicted_train_peak_is_within_10_percent_of_the_measured_count(demo):
    cfg, _ = demo
    step = TrainStep(2, (64, 64), "fp32")
    predicted, measured = predict_train_peak(*builders(cfg), step), measure_train(cfg, K, step, CPU)
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)
