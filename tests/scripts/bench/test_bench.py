"""scripts/bench/multiscale.py at a tiny size (not timed): every section fills every column, the optimisation flags keep the
fp32 outputs, and the memory counters count what they claim."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

import network
from network.mscale import fuse_step
from scripts.bench import multiscale as bench
from scripts.bench.memory import LiveTensorBytes, PeakMemory, estimate_peak, tensor_bytes

# A 64x64 crop, not 32x32: at 32x32 HRNet's stride-32 branch is 1x1, where CPU bf16 training gives NaN gradients
# in most runs (nondeterministically), which would make the bf16 row's update error NaN.
TINY = ["--width", "tiny", "--crop", "64x64", "--eval-size", "32x48", "--batch", "2", "--rounds", "1",
        "--warmup", "0", "--data-batches", "1", "--workers", "0"]
TINY_RECIPE = bench.Recipe(width="tiny", train_crops=(((32, 32), 2),), mapillary_eval=(40, 56),
                           cityscapes_eval=(32, 64))
# Columns that have no value in a CPU run: MFU needs a GPU's peak; inference has no parameter update.
MAY_BE_NONE = {"mfu", "update_err", "target_gib"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    results = bench.main(TINY + ["--sections", "train", "infer", "data", "opt", "--out", str(out)])
    setup, _ = bench.parse_args(TINY)
    results["recipe"] = bench.bench_recipe(replace(setup, recipe=TINY_RECIPE))
    return results, json.loads(out.read_text())


def _rows(results):
    yield from (("train", r) for r in results["train"])
    yield from (("infer", r) for r in results["infer"])
    yield from (("data", r) for r in results["data"])
    yield from (("opt", r) for r in results["opt"])
    yield from (("recipe", r) for r in results["recipe"]["flops"] + results["recipe"]["memory"])


@pytest.mark.slow
def test_every_section_fills_every_column(run):
    results, saved = run
    assert saved["machine"]["device"].startswith("CPU") and saved["command"].startswith("python -m scripts.bench.multiscale")
    assert {r["model"] for r in results["train"]} == set(bench.PAIRS)
    assert len(results["infer"]) == len(bench.PAIRS) * len(bench.SCALE_SETS)
    assert {tuple(r["scales"]) for r in results["infer"]} == set(bench.SCALE_SETS)
    assert len(saved["opt"]) == len(results["opt"]) >= 10
    for section, row in _rows(results):
        for key, value in row.items():
            if value is None:
                assert key in MAY_BE_NONE, (section, key)
            elif isinstance(value, float):
                assert math.isfinite(value) and value >= 0, (section, key, value)
    for row in results["train"]:
        assert row["single_ms"] > 0 and row["multi_ms"] > 0 and row["ratio"] > 0
        assert row["flop_ratio"] > 1  # the 0.5x pass adds work
        assert set(row["phases_ms"]) == {"forward", "loss", "backward", "optimizer"}
        assert 0 < row["rmi_share"] < 1 and 0 < row["criterion_share"] < 1
    for row in results["infer"]:
        assert row["nscale_peak_mib"] > 0 and row["predict_peak_mib"] > 0
    for row in results["data"]:
        assert row["data_images_per_s"] > 0 and row["headroom"] > 0


@pytest.mark.slow
def test_tables_have_a_cell_per_column(run):
    results, _ = run
    text = bench.tables(results)
    for title in ("Training step", "n-scale inference", "Data pipeline", "Optimisations", "FLOPs at the recipe",
                  "Peak memory"):
        assert title in text
    header = None  # cells of the current table's header line
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        header = header or line.count("|")
        assert line.count("|") == header, line


@pytest.mark.slow
def test_optimisation_flags_keep_fp32_outputs(run):
    results, _ = run
    rows = {(r["phase"].split()[0], r["variant"]): r for r in results["opt"]}
    for (phase, variant), row in rows.items():
        low = next((p for p in ("bf16", "fp16") if p in variant), None)
        allowed = {"bit-equal", "fp32 rounding"} | ({f"{low} rounding"} if low else set())
        assert row["outputs"] in allowed, (phase, variant, row)
    # these change no arithmetic at all
    for key in [("train", "attention BN statistics of the 0.5x pass only (attn_bn_stats=low)"),
                ("train", "host sync every step"), ("inference", "no_grad instead of inference_mode")]:
        assert rows[key]["outputs"] == "bit-equal", key
    baseline = "baseline (fp32, attention BN statistics of both passes, as the original)"
    assert rows[("train", baseline)]["output_err"] < 1e-4


@pytest.mark.slow
def test_recipe_section_counts_flops_and_memory(run):
    results, _ = run
    flops = {r["model"]: r for r in results["recipe"]["flops"]}
    for row in flops.values():
        assert 1 < row["low_ratio"] < row["ratio"]  # the no_grad 1.0x attention head costs its forward's FLOPs
    memory = results["recipe"]["memory"]
    mapillary = {r["precision"]: r for r in memory if r["case"].startswith("Mapillary")}
    assert mapillary["fp16"]["peak_gib"] < mapillary["fp32"]["peak_gib"]
    assert all(r["peak_gib"] > r["weights_inputs_gib"] > 0 for r in memory)


@pytest.mark.slow
def test_fusion_is_float32_under_autocast():
    torch.manual_seed(0)
    model = network.build_model("hmsa_deeplabv3plus", 5, **bench.model_options("tiny", "hmsa_deeplabv3plus")).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, scales=[0.5, 1.0])
    assert out["pred_1.0x"].dtype == torch.bfloat16 and out["pred"].dtype == torch.float32
    want = fuse_step(out["pred_1.0x"].float(), 0.5, out["pred_0.5x"].float(), out["attn_0.5x"].float())
    assert torch.equal(out["pred"], want)


def test_live_tensor_bytes_counts_each_storage_once_until_freed():
    with LiveTensorBytes() as live:
        a = torch.ones(1000)  # 4000 bytes
        view = a[10:20]
        a.add_(1)  # in place: nothing new
        del a
        assert live.live == 4000  # the view keeps the storage
        b = torch.zeros(500, dtype=torch.float64)  # 4000 more
        del view
        assert live.live == 4000
        del b
    assert (live.live, live.peak) == (0, 8000)
    with PeakMemory(torch.device("cpu")) as mem:
        torch.empty(256, 256).mul(2)
    assert mem.peak == 2 * 256 * 256 * 4  # the input and the product were alive together


@pytest.mark.slow
def test_fake_tensor_estimate_matches_the_real_count():
    name = "hmsa_ocrnet_hrnet_w48"
    options = bench.model_options("tiny", name)

    def build():
        torch.manual_seed(0)
        return network.build_model(name, 7, **options).eval()

    def run(model, x):
        with torch.inference_mode():
            model(x, scales=[0.5, 1.0, 2.0])

    model, x = build(), torch.randn(1, 3, 40, 56)
    with LiveTensorBytes() as live:
        run(model, x)
    est = estimate_peak(build, lambda: (torch.empty(1, 3, 40, 56),), run)
    assert est["static"] == tensor_bytes(model) + x.numel() * 4
    assert est["peak"] - est["static"] == live.peak


def test_bad_arguments_fail_with_the_reason(capsys):
    for argv, reason in ((["--crop", "8x8"], "at least 16x16"), (["--eval-size", "big"], "expected HxW"),
                         (["--batch", "1"], "--batch must be >= 2"), (["--rounds", "0"], "--rounds")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert reason in capsys.readouterr().err, argv
