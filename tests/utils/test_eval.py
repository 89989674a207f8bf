"""Inference and evaluation: fusion rules, the one-pass scale-set sweep, sliding windows, preemption."""
import math

import cv2
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from network.mscale import MscaleBase
from tests.fixtures import tiny_model
from utils.engine import evaluate, predict
from utils.inference import Combo, Inference, MultiScalePass, scale_outputs, sweep_combos, window_starts
from utils.evaluation.metrics import confusion_matrix

SETS = [[1.0], [0.5, 1.0], [0.5, 1.0, 2.0], [0.25, 0.5, 1.0, 2.0]]
RULES = ["attention", "average", "max"]


class Pointwise(MscaleBase):
    """Logits and attention from 1x1 convolutions: every output pixel depends on its input pixel only."""

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        self.cls = nn.Conv2d(3, k, 1)
        self.att = nn.Conv2d(3, 1, 1)

    def single_forward(self, x, attention=True):
        return {"pred": self.cls(x), "attn": torch.sigmoid(self.att(x))}


class SmallField(MscaleBase):
    """Two zero-padded 3x3 convolutions: receptive-field radius 2."""

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, k + 1, 3, padding=1))

    def single_forward(self, x, attention=True):
        y = self.body(x)
        return {"pred": y[:, 1:], "attn": torch.sigmoid(y[:, :1])}


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------- fusion rules


def fused_by_the_pass(preds: dict[float, torch.Tensor], scales: list[float], rule: str) -> torch.Tensor:
    """What evaluation computes (MultiScalePass.logits) from given per-scale logits, without running a network."""
    run = MultiScalePass.__new__(MultiScalePass)
    run.scales, run.outputs, run.mirrored, run._cache = tuple(sorted(preds, reverse=True)), \
        {s: {"pred": p} for s, p in preds.items()}, None, {}
    return run.logits(Combo.make(scales, rule, False))


def test_average_and_max_fusion_against_hand_written_reference():
    torch.manual_seed(0)
    p = {0.5: torch.randn(2, 3, 4, 6), 1.0: torch.randn(2, 3, 8, 12), 2.0: torch.randn(2, 3, 16, 24)}
    a, b, c = up(p[0.5], (8, 12)), p[1.0], up(p[2.0], (8, 12))
    assert torch.allclose(fused_by_the_pass(p, [0.5, 1.0, 2.0], "average"), (a + b + c) / 3, atol=1e-6)
    expected_max = torch.where(a > b, a, b)
    expected_max = torch.where(c > expected_max, c, expected_max)
    assert torch.equal(fused_by_the_pass(p, [0.5, 1.0, 2.0], "max"), expected_max)
    assert torch.allclose(fused_by_the_pass(p, [1.0, 2.0], "average"), (b + c) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="unknown fusion rule"):
        fused_by_the_pass(p, [0.5, 1.0], "median")
    with pytest.raises(ValueError, match="contain 1.0"):
        fused_by_the_pass(p, [0.5, 2.0], "average")


def test_pass_fusions_match_references_built_from_the_model():
    torch.manual_seed(0)
    model = Pointwise().eval()
    x = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        run = MultiScalePass(model, x, [0.5, 1.0, 2.0], flip=True)
        per = {s: model.single_forward(F.interpolate(x, size=(int(20 * s), int(28 * s)), mode="bilinear",
                                                     align_corners=False) if s != 1.0 else x)["pred"]
               for s in (0.5, 1.0, 2.0)}
        avg = (up(per[0.5], (20, 28)) + per[1.0] + up(per[2.0], (20, 28))) / 3
        assert torch.allclose(run.logits(Combo.make([0.5, 1.0, 2.0], "average", False)), avg, atol=1e-5)
        mx = torch.stack([up(per[0.5], (20, 28)), per[1.0], up(per[2.0], (20, 28))]).amax(0)
        assert torch.allclose(run.logits(Combo.make([0.5, 1.0, 2.0], "max", False)), mx, atol=1e-6)
        # flip: the mirrored image's fused logits, mirrored back, averaged in
        mirrored = model(x.flip(-1), scales=[0.5, 1.0])["pred"].flip(-1)
        both = (model(x, scales=[0.5, 1.0])["pred"] + mirrored) / 2
        assert torch.allclose(run.logits(Combo.make([0.5, 1.0], "attention", True)), both, atol=1e-6)


@pytest.mark.slow
def test_attention_chain_of_every_subset_equals_the_model_run_on_that_subset():
    model = tiny_model(num_classes=5)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        run = MultiScalePass(model, x, [0.25, 0.5, 1.0, 2.0])
        for scales in SETS + [[1.0, 2.0], [0.25, 1.0]]:
            ref = model(x, scales=scales)["pred"]
            assert torch.equal(run.logits(Combo.make(scales, "attention", False)), ref), scales
            assert torch.equal(predict(model, x, Inference.make(scales))["pred"], ref)


def test_the_pass_runs_the_attention_head_below_the_top_scale_only():
    """No fusion of any subset reads the top scale's weight; every other scale's is computed once per mirror,
    whole-image, windowed or scheduled."""
    from utils.inference.multiscale import Schedule, ScheduledPass

    model = tiny_model(num_classes=5)
    calls = []
    model.scale_attn.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        run = MultiScalePass(model, x, [0.5, 1.0, 2.0], flip=True)
        assert len(calls) == 4
        assert "attn" not in run.outputs[2.0] and "attn" not in run.mirrored[2.0]
        assert set(run.maps()) == {"pred_2.0x", "pred_1.0x", "pred_0.5x", "attn_1.0x", "attn_0.5x"}
        combos = [Combo.make(s, "attention", f) for s in ([0.5, 1.0, 2.0], [0.5, 1.0], [1.0, 2.0]) for f in (0, 1)]
        calls.clear()
        scheduled = ScheduledPass(model, x, combos, Schedule(stream=True), keep=(0.5, 1.0, 2.0))
        assert len(calls) == 4
        for c in combos:
            assert torch.equal(scheduled.logits(c), run.logits(c)), c.label
        calls.clear()
        tiled = scale_outputs(model, x, [0.5, 1.0], window=(32, 40), overlap=0.25)
        assert "attn" not in tiled[1.0] and tiled[0.5]["attn"].shape == (1, 1, 24, 32)
        assert len(calls) == 1  # the 0.5x image (24x32) fits one window


# ----------------------------------------------------------------------------------------------- sweep


def batches(num_classes: int, n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        target = torch.randint(0, num_classes, (2, 48, 64), generator=g)
        target[:, :4] = 255
        out.append({"image": torch.randn(2, 3, 48, 64, generator=g), "mask": target, "name": [f"b{i}a", f"b{i}b"]})
    return out


@pytest.mark.slow
def test_sweep_equals_separate_evaluations_and_runs_each_scale_once():
    model = tiny_model(num_classes=5)
    loader = batches(5)
    combos = sweep_combos(SETS, RULES, [False, True], model)
    assert len(combos) == 2 * (1 + 3 * 3)  # a single-scale set has one rule
    calls = []
    real = model.single_forward
    model.single_forward = lambda x, attention=True: calls.append(tuple(x.shape[-2:])) or real(x, attention)
    how = Inference.make([0.5, 1.0], sweep_sets=SETS, sweep_fusions=RULES, sweep_flips=[False, True])
    assert how.sweep(model) == combos
    swept = evaluate(model, loader, 5, 255, how, torch.device("cpu"))
    # per batch: each distinct scale of the union once, and once mirrored
    assert len(calls) == len(loader) * 4 * 2
    assert sorted(set(calls)) == sorted({(12, 16), (24, 32), (48, 64), (96, 128)})
    model.single_forward = real
    hists = dict(swept.sweep)
    assert set(hists) == set(combos) | {Combo.make([0.5, 1.0], "attention", False)}
    for combo in combos:
        fusion = None if combo.fusion == "none" else combo.fusion
        alone = evaluate(model, loader, 5, 255, Inference.make(combo.scales, fusion, combo.flip), torch.device("cpu"))
        assert torch.equal(hists[combo], alone.hist), combo.label
        if combo.fusion in ("attention", "none") and not combo.flip:  # the model's own n-scale forward
            ref = sum(confusion_matrix(model(b["image"], scales=combo.scales)["pred"].argmax(1), b["mask"], 5)
                      for b in loader)
            assert torch.equal(hists[combo], ref), combo.label
    assert swept.hist.sum() == sum(int((b["mask"] != 255).sum()) for b in loader)


def test_sweep_combos_validate_and_deduplicate():
    with pytest.raises(ValueError, match=r"scale_sets entry \[0.5, 2.0\].*contain 1.0"):
        sweep_combos([[1.0], [0.5, 2.0]], RULES, [False], Pointwise())
    with pytest.raises(ValueError, match="positive"):
        sweep_combos([[0.0, 1.0]], RULES, [False], Pointwise())
    with pytest.raises(ValueError, match="fusion"):
        sweep_combos([[0.5, 1.0]], ["vote"], [False], Pointwise())

    class Plain(nn.Module):
        def forward(self, x):
            return {"pred": x[:, :2]}

    # without scale attention 'attention' means 'average': one row, not two identical ones
    combos = sweep_combos([[0.5, 1.0]], ["attention", "average"], [False], Plain())
    assert combos == [Combo((1.0, 0.5), "average", False)]


def test_should_stop_ends_the_loop_before_the_next_batch():
    model = Pointwise(3).eval()
    loader = batches(3, n=4)
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 2

    result = evaluate(model, loader, 3, 255, Inference.make([1.0]), torch.device("cpu"), should_stop=stop)
    assert result.stopped and len(asked) == 3 and math.isnan(result.loss)
    assert result.hist.sum() == sum(int((b["mask"] != 255).sum()) for b in loader[:2])
    full = evaluate(model, loader, 3, 255, Inference.make([1.0]), torch.device("cpu"), should_stop=lambda: False)
    assert not full.stopped and full.hist.sum() == sum(int((b["mask"] != 255).sum()) for b in loader)


# ----------------------------------------------------------------------------------------------- sliding window


def test_window_starts_cover_the_image_with_the_overlap():
    for length, window, overlap in [(100, 32, 0.25), (97, 40, 0.5), (64, 64, 0.25), (30, 64, 0.25), (33, 32, 0.0)]:
        starts = window_starts(length, window, overlap)
        w = min(window, length)
        covered = torch.zeros(length, dtype=torch.bool)
        for s in starts:
            covered[s : s + w] = True
        assert covered.all() and starts[0] == 0 and starts[-1] + w == length
        assert all(b - a <= w * (1 - overlap) for a, b in zip(starts, starts[1:]))


@pytest.mark.slow
def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    torch.manual_seed(0)
    model = Pointwise().eval()
    x = torch.randn(2, 3, 40, 60)
    with torch.no_grad():
        whole = scale_outputs(model, x, [0.5, 1.0, 2.0])
        tiled = scale_outputs(model, x, [0.5, 1.0, 2.0], window=(16, 24), overlap=0.25)
        for s in whole:
            assert whole[s].keys() == tiled[s].keys() == ({"pred"} if s == 2.0 else {"pred", "attn"})
            for k in whole[s]:
                assert torch.allclose(whole[s][k], tiled[s][k], atol=1e-6), (s, k)
        a = predict(model, x, Inference.make([0.5, 1.0, 2.0], flip=True))["pred"]
        b = predict(model, x, Inference.make([0.5, 1.0, 2.0], flip=True, window=[16, 24], overlap=0.5))["pred"]
        assert torch.allclose(a, b, atol=1e-6)
        # a window larger than the image is one whole-image call
        assert torch.equal(predict(model, x, Inference.make([1.0], window=[64, 64]))["pred"], predict(model, x, Inference.make([1.0]))["pred"])


def test_sliding_window_differs_from_whole_image_only_at_the_seams():
    torch.manual_seed(0)
    model = SmallField().eval()
    x = torch.randn(1, 3, 50, 70)
    window, radius = (24, 32), 2
    with torch.no_grad():
        whole = scale_outputs(model, x, [1.0])[1.0]["pred"]
        tiled = scale_outputs(model, x, [1.0], window=window, overlap=0.34)[1.0]["pred"]
    seam = torch.zeros(50, 70, dtype=torch.bool)
    for y in window_starts(50, window[0], 0.34):
        for x0 in window_starts(70, window[1], 0.34):
            ys, xs = slice(y, y + window[0]), slice(x0, x0 + window[1])
            if y > 0:
                seam[y : y + radius, xs] = True
            if y + window[0] < 50:
                seam[y + window[0] - radius : y + window[0], xs] = True
            if x0 > 0:
                seam[ys, x0 : x0 + radius] = True
            if x0 + window[1] < 70:
                seam[ys, x0 + window[1] - radius : x0 + window[1]] = True
    diff = (whole - tiled).abs().amax(1)[0]
    assert diff[~seam].max() < 1e-5
    assert diff[seam].max() > 1e-4  # the test can see a seam
    assert seam.float().mean() < 0.5
    assert (whole.argmax(1) == tiled.argmax(1)).float().mean() > 0.9


def test_labels_at_native_size_are_scored_and_dumped_at_that_size(tmp_path):
    # data.eval_native_labels: the image was resized for the network, the mask kept its size
    model = Pointwise(3).eval()
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 3, 24, 32, generator=g), "mask": torch.randint(0, 3, (2, 48, 64), generator=g),
             "name": ["x", "y"]}
    result = evaluate(model, [batch], 3, 255, Inference.make([0.5, 1.0]), torch.device("cpu"), dump_dir=str(tmp_path), dump="all",
                      palette=torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0]]).numpy())
    assert result.hist.sum() == 2 * 48 * 64
    logits = F.interpolate(predict(model, batch["image"], Inference.make([0.5, 1.0]))["pred"], size=(48, 64), mode="bilinear",
                           align_corners=False)
    assert torch.equal(result.hist, confusion_matrix(logits.argmax(1), batch["mask"], 3))
    assert {e["name"] for e in result.images} == {"x", "y"}
    assert cv2.imread(str(tmp_path / "x_error.png")).shape[:2] == (48, 64)
    assert cv2.imread(str(tmp_path / "x_attn_0.5x.png")).shape[:2] == (48, 64)
