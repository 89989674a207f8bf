"""Explicit multi-scale attention (network/attnscale.py): fusion against a hand-written softmax over scales, key
layouts and parameter counts of the original's attnscale models, outputs, loss, and the fixed scale set."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import network
from loss import build_criterion
from network.attnscale import ExplicitBase
from utils.config import LossConfig
from utils.engine import predict
from utils.inference import Inference, MultiScalePass

TINY_DL = {"trunk": "resnet10t", "aspp_ch": 16, "fine_ch": 8, "head_ch": 16, "attn_ch": 16}
TINY_OCR = {"trunk": "hrnet_w18_small", "mid_ch": 16, "key_ch": 8, "attn_ch": 16}
REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "keys")


def tiny(name="attnscale_deeplabv3plus", k=4, **kw):
    torch.manual_seed(0)
    opts = dict(TINY_DL if "deeplab" in name else TINY_OCR, **kw)
    return network.build_model(name, k, **opts)


def up(t, size):
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def reference_fusion(model, x, scales, normalise=True):
    """Chen et al. written out: every scale through the network, decoder features resized to the 1.0 grid and
    concatenated (1.0 first, then the others ascending), one logit per scale, softmax over the scale axis done
    by hand, weights resized to the input, weighted sum of the predictions (each upsampled to its scaled input,
    then resized to the input)."""
    h, w = x.shape[-2:]
    preds, feats = {}, {}
    for s in [1.0] + [s for s in sorted(scales) if s != 1.0]:
        xs = x if s == 1.0 else up(x, (math.floor(h * s), math.floor(w * s)))
        logits, f = model.decode(xs)
        preds[s] = up(up(logits, xs.shape[-2:]), (h, w))  # at the scale's resolution first, as the original
        feats[s] = f if s == 1.0 else up(f, feats[1.0].shape[-2:])
    a = model.scale_attn(torch.cat([feats[s] for s in feats], 1))
    if normalise:
        e = torch.exp(a - a.max(1, keepdim=True).values)
        a = e / e.sum(1, keepdim=True)
    a = up(a, (h, w))
    return sum(preds[s] * a[:, i:i + 1] for i, s in enumerate(sorted(scales)))


@pytest.mark.parametrize("norm", ["softmax", "none"])
def test_fusion_matches_hand_written_softmax_over_scales(norm):
    model = tiny(attn_norm=norm, scales=[2.0, 0.5, 1.0]).eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        out = model(x)
        ref = reference_fusion(model, x, [0.5, 1.0, 2.0], normalise=norm == "softmax")
    torch.testing.assert_close(out["pred"], ref, rtol=1e-4, atol=1e-5)
    weights = torch.cat([out[f"attn_{s}x"] for s in (0.5, 1.0, 2.0)], 1)
    if norm == "softmax":  # bilinear resizing keeps a convex combination: weights in (0, 1), summing to 1
        torch.testing.assert_close(weights.sum(1), torch.ones(2, 48, 80))
        assert (weights > 0).all() and (weights < 1).all()


def test_training_and_eval_outputs_have_the_hierarchical_keys_and_shapes():
    model = tiny().train()
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert set(out) == {"pred", "pred_0.5x", "pred_1.0x", "pred_2.0x", "attn_0.5x", "attn_1.0x", "attn_2.0x"}
    assert out["pred"].shape == (2, 4, 64, 96)
    assert out["pred_0.5x"].shape == (2, 4, 32, 48)  # each scale's own prediction at its own resolution
    assert out["pred_2.0x"].shape == (2, 4, 128, 192)
    assert out["attn_1.0x"].shape == (2, 1, 64, 96)
    model.eval()
    with torch.no_grad():
        ev = model(x, scales=[1.0, 2.0, 0.5])
    assert set(ev) == set(out) and ev["pred"].shape == (2, 4, 64, 96)


@pytest.mark.slow
def test_ocrnet_fuses_class_and_auxiliary_logits_with_the_same_weights():
    model = tiny("attnscale_ocrnet_hrnet_w48", 3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert {"aux", "aux_0.5x", "aux_1.0x", "aux_2.0x"} <= set(out)
    w = [out[f"attn_{s}x"] for s in (0.5, 1.0, 2.0)]
    expect = sum(up(out[f"aux_{s}x"], (64, 64)) * wi for s, wi in zip((0.5, 1.0, 2.0), w))
    torch.testing.assert_close(out["aux"], expect, rtol=1e-4, atol=1e-5)
    assert out["pred"].shape == (1, 3, 64, 64)


def reference_keys(name):
    with open(f"{REF}/{name}.txt") as f:
        return dict(line.split("\t")[:2] for line in f if not line.startswith("#"))


@pytest.mark.parametrize("alias,head", [
    # the original's ASDV3P without / with bn_head, 3 scales, K=19: DeepLabV3+ R50 (363 keys, 40,351,040
    # parameters) plus its scale_attn
    ("attnscale.DeepV3R50", {"scale_attn.0.weight": "[512, 912, 3, 3]", "scale_attn.2.weight": "[3, 512, 1, 1]"}),
    ("attnscale.DeepV3R50B", {"scale_attn.0.weight": "[256, 912, 3, 3]", "scale_attn.3.weight": "[256, 256, 3, 3]",
                              "scale_attn.6.weight": "[3, 256, 1, 1]",
                              **{f"scale_attn.{i}.{b}": "[256]" for i in (1, 4)
                                 for b in ("weight", "bias", "running_mean", "running_var")},
                              "scale_attn.1.num_batches_tracked": "[]", "scale_attn.4.num_batches_tracked": "[]"}),
])
def test_original_attnscale_key_layout_and_parameter_count(alias, head):
    model = network.build_model(alias, 19)
    sd = {k: str(list(v.shape)) for k, v in model.state_dict().items()}
    assert sd == {**reference_keys("deepv3.DeepV3PlusR50"), **head}
    extra = sum(math.prod(eval(s)) for k, s in head.items() if not k.endswith(("running_mean", "running_var"))
                and "num_batches" not in k)
    assert sum(p.numel() for p in model.parameters()) == 40_351_040 + extra
    assert {"attnscale.DeepV3R50": 44_555_072, "attnscale.DeepV3R50B": 43_043_904}[alias] == 40_351_040 + extra
    assert model.attn_norm == "none" and model.scales == (0.5, 1.0, 2.0)


def test_aliases_fix_the_original_layout():
    with pytest.raises(ValueError, match="attnscale.DeepV3R50' fixes attn_norm='none'"):
        network.build_model("attnscale.DeepV3R50", 19, attn_norm="softmax")


@pytest.mark.parametrize("kw,match", [
    ({"scales": [0.5, 2.0]}, "including 1.0"),
    ({"scales": [1.0]}, "at least two"),
    ({"scales": [0.5, 0.5, 1.0]}, "distinct"),
    ({"attn_norm": "sigmoid"}, "attn_norm must be one of softmax, none"),
    ({"attn_head": "deep"}, "attn_head must be one of bn, plain"),
])
def test_bad_options_are_refused_at_build(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_other_scale_set_is_a_clear_error_before_any_forward():
    model = tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    msg = r"built for the scales \[0.5,1,2\] .*eval.scales=\[0.5,1,2\], not \[0.5, 1.0\]"
    with pytest.raises(ValueError, match=msg):
        model(x, scales=[0.5, 1.0])
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"eval.scales=\[0.5,1,2\], not \[1.0\]"):
        Inference.make([1.0]).combo(model)
    with pytest.raises(ValueError, match=r"eval.scales=\[0.5,1,2\], not \[0.25, 0.5, 1.0, 2.0\]"):
        MultiScalePass(model, x, [0.25, 0.5, 1.0, 2.0])
    with pytest.raises(ValueError, match="eval.scale_sets"):
        Inference.make([0.5, 1.0, 2.0], sweep_sets=[[0.5, 1.0, 2.0]]).sweep(model)
    with pytest.raises(ValueError, match="eval.window"):
        Inference.make([0.5, 1.0, 2.0], window=(32, 32)).combo(model)
    assert calls == []  # refused before the network ran


def test_evaluation_path_gives_the_models_own_fusion():
    model = tiny().eval()
    x = torch.randn(2, 3, 40, 56)
    how = Inference.make([2.0, 1.0, 0.5], flip=True)
    with torch.no_grad():
        out = predict(model, x, how)
        own = model(x)["pred"]
        mirrored = model(x.flip(-1))["pred"].flip(-1)
    assert how.combo(model).fusion == "attention"
    torch.testing.assert_close(out["pred"], (own + mirrored) / 2)
    assert out["attn_0.5x"].shape == (2, 1, 40, 56) and out["pred_2.0x"].shape == (2, 4, 80, 112)


def test_loss_supervises_every_scale_and_reaches_the_attention_head():
    model = tiny().train()
    x = torch.randn(2, 3, 48, 48)
    target = torch.randint(0, 4, (2, 48, 48))
    target[:, :4] = 255
    crit = build_criterion(LossConfig(scale_weight=0.05), 4, 255)
    total, terms = crit(model(x), target)
    assert set(terms) == {"main", "scale_0.5x", "scale_1.0x", "scale_2.0x"}
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.scale_attn.parameters())
    assert isinstance(model, ExplicitBase)
