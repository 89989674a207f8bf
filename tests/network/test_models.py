import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import network
from network.attnscale import ExplicitBase
from network.layers import rescale, scaled_size
from network.mscale import MscaleBase, check_scales, fuse_step, scale_key
from tests.fixtures import model_family, tiny_options

REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "keys")
# The hierarchical multi-scale models (those with the attention-head BatchNorm option).
MSCALE_MODELS = sorted(n for n in network.list_models() if "attn_bn_stats" in network.model_options(n))
# The maps each model family outputs: HRNet-OCR adds its auxiliary head's 'aux' to 'pred'.
FAMILY_MAPS = {"deeplab": ("pred",), "ocrnet": ("pred", "aux")}


def expected_shapes(model: nn.Module, maps: tuple[str, ...], n: int, k: int, h: int, w: int) -> dict:
    """Output name -> shape for an [n, 3, h, w] batch: the fused maps at the input size; a multi-scale model adds
    each scale's maps at that scale's size and each scale's attention (hierarchical: at the scale's size, the
    unused 1.0x one, the top scale, skipped; explicit: at the input size, the trained scale set in both modes)."""
    out = {m: (n, k, h, w) for m in maps}
    if isinstance(model, MscaleBase):
        scales = (model.lo_scale, 1.0)
        attn = {model.lo_scale: scaled_size(h, w, model.lo_scale)}
    elif isinstance(model, ExplicitBase):
        scales = model.scales
        attn = {s: (h, w) for s in scales}
    else:
        return out
    for s in scales:
        out.update({scale_key(m, s): (n, k, *scaled_size(h, w, s)) for m in maps})
    out.update({scale_key("attn", s): (n, 1, *size) for s, size in attn.items()})
    return out


@pytest.mark.parametrize("name", network.list_models())
@pytest.mark.slow
def test_every_model_runs_forward_and_backward_in_training_and_evaluation(name):
    torch.manual_seed(0)
    model = network.build_model(name, 5, **tiny_options(name))
    maps = FAMILY_MAPS[model_family(name)]
    x = torch.randn(2, 3, 64, 96)
    model.train()
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == expected_shapes(model, maps, 2, 5, 64, 96)
    sum(out[m].sum() for m in maps).backward()
    missing = [k for k, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing[:5]
    model.eval()
    with torch.no_grad():
        ev = model(x)
    assert {k: tuple(v.shape) for k, v in ev.items()} == expected_shapes(model, maps, 2, 5, 64, 96)
    assert all(torch.isfinite(v).all() for v in ev.values())


@pytest.mark.slow
def test_nscale_outputs_and_shapes():
    torch.manual_seed(0)
    model = network.build_model("hmsa_deeplabv3plus", 3, **tiny_options("hmsa_deeplabv3plus")).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        out = model(x, scales=[0.25, 0.5, 1.0, 2.0])
    assert out["pred"].shape == (1, 3, 64, 128)
    assert out["pred_2.0x"].shape == (1, 3, 128, 256)
    assert out["pred_0.25x"].shape == (1, 3, 16, 32)
    assert out["attn_0.5x"].shape == (1, 1, 32, 64)
    a = out["attn_1.0x"]
    assert (a > 0).all() and (a < 1).all()
    assert "attn_2.0x" not in out  # the top scale's weight enters no fusion


@pytest.mark.parametrize("name", ["hmsa_deeplabv3plus", "hmsa_ocrnet_hrnet_w48"])
def test_nscale_skips_only_the_top_scale_attention_and_changes_no_bit(name):
    """The chain written out with every scale's attention computed (what the original runs): the same bits, one
    attention-head call fewer, no map of the top scale's attention."""
    torch.manual_seed(0)
    model = network.build_model(name, 4, **tiny_options(name)).eval()
    calls = []
    model.scale_attn.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 3, 48, 64)
    for scales in ([0.5, 1.0, 2.0], [0.5, 1.0], [1.0]):
        order = sorted(scales, reverse=True)
        with torch.no_grad():
            singles = {s: model.single_forward(rescale(x, s)) for s in order}
            calls.clear()
            out = model(x, scales=scales)
        assert len(calls) == len(scales) - 1, scales
        fused = {}
        for key in FAMILY_MAPS[model_family(name)]:
            acc = None
            for s in order:
                acc = fuse_step(acc, s, singles[s][key], singles[s]["attn"])
            fused[key] = acc
            assert torch.equal(out[key], acc), (scales, key)
        assert {k for k in out if k.startswith("attn_")} == {scale_key("attn", s) for s in order[1:]}
        for s in order[1:]:
            assert torch.equal(out[scale_key("attn", s)], singles[s]["attn"])
    model.train()  # training mode runs it, for its BatchNorm running statistics
    before = model.scale_attn.bn0.num_batches_tracked.item()
    calls.clear()
    model(x.repeat(2, 1, 1, 1), scales=[0.5, 1.0])  # two images: BatchNorm of 1x1 maps in training
    assert len(calls) == 2 and model.scale_attn.bn0.num_batches_tracked.item() == before + 2


@pytest.mark.parametrize("name,keys,params", [
    ("deepv3.DeepV3PlusR50", 363, 40_351_040),
    ("mscale.DeepV3R50", 376, 41_642_560),
])
def test_original_key_layout(name, keys, params):
    model = network.build_model(name, 19)
    sd = model.state_dict()
    assert len(sd) == keys
    assert sum(p.numel() for p in model.parameters()) == params
    with open(f"{REF}/{name}.txt") as f:
        ref = dict(line.split("\t")[:2] for line in f if not line.startswith("#"))
    assert {k: str(list(v.shape)) for k, v in sd.items()} == ref


@pytest.mark.slow
def test_resnet_trunk_dilation_pattern():
    model = network.build_model("mscale.DeepV3R50", 19)
    bb = model.backbone
    for layer, d in ((bb.layer3, 2), (bb.layer4, 4)):
        for block in layer:
            assert block.conv2.dilation == (d, d) and block.conv2.padding == (d, d) and block.conv2.stride == (1, 1)
        assert block.conv1.stride == (1, 1)
        assert layer[0].downsample[0].stride == (1, 1)
    s4, high = bb(torch.randn(1, 3, 64, 64))
    assert s4.shape == (1, 256, 16, 16) and high.shape == (1, 2048, 8, 8)
    rates = [f[0].dilation for f in model.aspp.features[1:]]
    assert rates == [(12, 12), (24, 24), (36, 36)]


@pytest.mark.slow
def test_generic_timm_trunk():
    model = network.build_model("hmsa_deeplabv3plus", 4, **tiny_options("hmsa_deeplabv3plus",
                                                                        trunk="mobilenetv3_small_050"))
    out = model.eval()(torch.randn(1, 3, 64, 64), scales=[0.5, 1.0])
    assert out["pred"].shape == (1, 4, 64, 64)


def test_aliases_and_bad_options():
    assert "mscale.DeepV3R50" in network.list_models(include_aliases=True)
    with pytest.raises(ValueError, match="did you mean 'hmsa_deeplabv3plus'"):
        network.build_model("hmsa_deeplabv3plu", 19)
    with pytest.raises(ValueError, match="no option 'atn_ch'.*did you mean 'attn_ch'"):
        network.build_model("hmsa_deeplabv3plus", 19, atn_ch=3)
    with pytest.raises(ValueError, match="fixes trunk='resnet50'"):
        network.build_model("mscale.DeepV3R50", 19, trunk="resnet18")
    with pytest.raises(ValueError, match="unknown trunk"):
        network.build_model("deeplabv3plus", 19, trunk="resnet_does_not_exist")


@pytest.mark.parametrize("scales", [[0.5, 2.0], [0.0, 1.0], [-1.0, 1.0], [1.0, 1.0]])
def test_bad_scale_sets(scales):
    with pytest.raises(ValueError, match="scales"):
        check_scales(scales)


# ------------------------------------------------------------------------ fusion against a hand-written reference


class Toy(MscaleBase):
    """Deterministic per-pixel maps so that the fusion can be checked against explicit formulas."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Conv2d(3, 4, 3, padding=1)
        self.att = nn.Conv2d(3, 1, 3, padding=1)
        self.scale_attn = nn.Sequential(self.att, nn.Sigmoid())
        self.lo_scale = 0.5

    def single_features(self, x):
        return {"pred": self.cls(x), "aux": self.cls(x) * 2}, x


def up(t, size):
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def test_nscale_fusion_matches_hand_written_chain():
    torch.manual_seed(0)
    net = Toy().eval()
    x = torch.randn(2, 3, 37, 50)  # odd sizes: floor(H*s) matters
    H, W = 37, 50
    with torch.no_grad():
        out = net(x, scales=[0.25, 0.5, 1.0, 2.0])
        per = {}
        for s in (2.0, 1.0, 0.5, 0.25):
            xs = x if s == 1.0 else up(x, (math.floor(H * s), math.floor(W * s)))
            per[s] = (net.cls(xs), torch.sigmoid(net.att(xs)))
        p2, _ = per[2.0]
        p1, a1 = per[1.0]
        pred = a1 * p1 + (1 - a1) * up(p2, (H, W))
        for s in (0.5, 0.25):
            p, a = per[s]
            pred = up(a * p, (H, W)) + (1 - up(a, (H, W))) * pred
    assert out["pred_0.25x"].shape[-2:] == (9, 12)
    torch.testing.assert_close(out["pred"], pred, rtol=0, atol=0)
    torch.testing.assert_close(out["aux"].shape, pred.shape)


def test_two_scale_training_matches_formula_and_eval():
    torch.manual_seed(0)
    net = Toy().train()
    x = torch.randn(1, 3, 40, 30)
    out = net(x)
    xs = up(x, (20, 15))
    p_lo, a_lo = net.cls(xs), torch.sigmoid(net.att(xs))
    p_1 = net.cls(x)
    joint = up(a_lo * p_lo, (40, 30)) + (1 - up(a_lo, (40, 30))) * p_1
    torch.testing.assert_close(out["pred"], joint, rtol=0, atol=0)
    torch.testing.assert_close(out["aux"], up(a_lo * 2 * p_lo, (40, 30)) + (1 - up(a_lo, (40, 30))) * 2 * p_1)
    assert set(out) == {"pred", "aux", "pred_0.5x", "pred_1.0x", "aux_0.5x", "aux_1.0x", "attn_0.5x"}
    # evaluation on (0.5, 1.0) is the same computation as the two-scale training forward
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x)["pred"], joint.detach(), rtol=0, atol=0)


@pytest.mark.slow
def test_imagenet_resnet_file_loads_into_the_trunk(tmp_path):
    """A torchvision-layout classification file (conv1/bn1/layer*/fc, no num_batches_tracked) initialises layer0..4."""
    from utils.checkpoint import CheckpointError, load_trunk_weights

    src = network.build_model("deeplabv3plus", 19, **tiny_options("deeplabv3plus")).backbone
    state = {}
    for k, v in src.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        k = k.replace("layer0.0.", "conv1.").replace("layer0.1.", "bn1.")
        state[k] = torch.randn_like(v.float()).to(v.dtype)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(state, tmp_path / "resnet18_imagenet.pth")
    dst = network.build_model("deeplabv3plus", 19, **tiny_options("deeplabv3plus")).backbone
    report = load_trunk_weights(dst, str(tmp_path / "resnet18_imagenet.pth"))
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    assert torch.equal(dst.layer0[0].weight, state["conv1.weight"])
    assert torch.equal(dst.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    del state["layer1.0.conv1.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"broken\.pth.*\n.*layer1\.0\.conv1\.weight"):
        load_trunk_weights(dst, str(tmp_path / "broken.pth"))


# ------------------------------------------------------------------------ attention-head BatchNorm statistics

MOMENTUM = 0.1  # every BatchNorm of the original (BN_MOMENTUM, torch's default)


def test_every_model_has_tiny_options():
    for name in network.list_models():
        assert tiny_options(name), name  # raises for a model of a family without a row in tests/fixtures.py
    for name in MSCALE_MODELS:
        assert isinstance(network.build_model(name, 3, **tiny_options(name)), MscaleBase)


def original_fwd(model, x):
    """The original's `_fwd` written out per architecture: logits, [aux,] and the attention, all computed."""
    if hasattr(model, "heads"):  # HRNet-OCR: the head reads the OCR features
        logits, aux, feats = model.heads(x)
    else:  # DeepLabV3+: the head reads the decoder concat
        logits, feats = model.decode(x)
    return logits, model.scale_attn(feats)


def record_bn_inputs(model):
    """{BN name: [input of each call, in order]} filled while the model runs."""
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            seen[name] = []
            m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach().double()))
    return seen


def expected_running_stats(inputs):
    """torch's (and the original's) update, in float64: r <- (1 - m) r + m stat, from r_mean = 0, r_var = 1,
    with the batch mean and the unbiased batch variance over (N, H, W)."""
    mean, var = 0.0, 1.0
    for t in inputs:
        mean = (1 - MOMENTUM) * mean + MOMENTUM * t.mean(dim=(0, 2, 3))
        var = (1 - MOMENTUM) * var + MOMENTUM * t.var(dim=(0, 2, 3), unbiased=True)
    return mean, var


def train_step(model, x, seed=1):
    torch.manual_seed(seed)  # the same dropout draws in every model
    out = model(x)
    loss = out["pred"].square().mean() + out.get("aux", out["pred"]).mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return out, grads


@pytest.mark.parametrize("name", MSCALE_MODELS)
@pytest.mark.slow
def test_training_step_bn_statistics_match_the_originals_two_scale_forward(name):
    """attn_bn_stats='both' (the default): after one training step every BatchNorm, the attention head's
    included, holds the running statistics of the original's two-scale forward: the whole 0.5x `_fwd`, then
    the whole 1.0x `_fwd` with its (unused) attention."""
    torch.manual_seed(0)
    model = network.build_model(name, 5, **tiny_options(name)).train()
    assert model.attn_bn_stats == "both"
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 48, 40)
    train_step(model, x)

    seen = record_bn_inputs(ref)
    torch.manual_seed(1)  # HRNet-OCR's head reads features after Dropout2d: the same draws as the step
    with torch.no_grad():
        original_fwd(ref, F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False,
                                        recompute_scale_factor=True))
        original_fwd(ref, x)
    bns = {k: m for k, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    ref_bns = dict(ref.named_modules())
    assert any(k.startswith("scale_attn.") for k in bns) and set(bns) == set(seen)
    for k, bn in bns.items():
        assert len(seen[k]) == 2, k  # 0.5x, then 1.0x
        assert bn.num_batches_tracked == 2, k
        # the same nn.BatchNorm2d arithmetic run in the original's order: bit-equal
        assert torch.equal(bn.running_mean, ref_bns[k].running_mean), k
        assert torch.equal(bn.running_var, ref_bns[k].running_var), k
        # the formula in float64; fp32 rounding of a mean/variance over <= 2*48*40 values and two momentum
        # updates stays below 1e-6 relative, while a missing or reordered pass moves a statistic by
        # 0.01-0.1 of the difference between the two scales' batch statistics (checked for the head below)
        mean, var = expected_running_stats(seen[k])
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6, msg=k)
    for k in ("scale_attn.bn0", "scale_attn.bn1"):
        swapped, _ = expected_running_stats(seen[k][::-1])
        low_only, _ = expected_running_stats(seen[k][:1])
        for wrong in (swapped, low_only):
            assert not torch.allclose(bns[k].running_mean.double(), wrong, rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("name", MSCALE_MODELS)
@pytest.mark.slow
def test_attn_bn_stats_changes_only_the_heads_running_statistics(name):
    """'both' and 'low' give bit-identical outputs and gradients; only the attention head's running statistics
    differ, 'low' holding those of the 0.5x pass alone."""
    models = []
    for mode in ("both", "low"):
        torch.manual_seed(0)
        models.append(network.build_model(name, 5, **tiny_options(name, attn_bn_stats=mode)).train())
    ref = copy.deepcopy(models[1])
    x = torch.randn(2, 3, 48, 40)
    (out_both, g_both), (out_low, g_low) = (train_step(m, x) for m in models)
    assert out_both.keys() == out_low.keys()
    for key in out_both:
        assert torch.equal(out_both[key], out_low[key]), key
    assert g_both.keys() == g_low.keys() == {k for k, p in models[0].named_parameters()}
    for key in g_both:
        assert torch.equal(g_both[key], g_low[key]), key
    buffers = [dict(m.named_buffers()) for m in models]
    differ = {k for k in buffers[0] if not torch.equal(buffers[0][k], buffers[1][k])}
    assert differ and all(k.startswith("scale_attn.") for k in differ)
    assert buffers[1]["scale_attn.bn0.num_batches_tracked"] == 1
    seen = record_bn_inputs(ref.scale_attn)
    torch.manual_seed(1)  # HRNet-OCR's head reads features after Dropout2d: the same draws as the step
    with torch.no_grad():
        original_fwd(ref, F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False,
                                        recompute_scale_factor=True))
    for k in ("bn0", "bn1"):
        mean, var = expected_running_stats(seen[k])
        torch.testing.assert_close(buffers[1][f"scale_attn.{k}.running_mean"].double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(buffers[1][f"scale_attn.{k}.running_var"].double(), var, rtol=1e-5, atol=1e-6)


def test_attn_bn_stats_option_is_checked():
    with pytest.raises(ValueError, match="attn_bn_stats must be one of both, low, got 'high'"):
        network.build_model("hmsa_deeplabv3plus", 3, **tiny_options("hmsa_deeplabv3plus", attn_bn_stats="high"))
