"""HRNetV2 trunk, OCR block and the HRNet-OCR models against the original's layout and numerics."""
from __future__ import annotations

import json
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import network
import network.hrnet as hrnet
from network import build_model
from network.hrnet import BilinearFuseModule, HRNetTrunk
from network.ocr import OCRBlock
from tests.fixtures import tiny_options

# The original's key lists: vendored under tests/data/keys, else the shared copy.
KEYS_DIRS = (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "keys"), "/work/shared/reference/keys")


def read_key_file(name: str) -> list[dict]:
    paths = [os.path.join(d, f"{name}.txt") for d in KEYS_DIRS]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        pytest.skip(f"reference key list not available: {paths}")
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, dtype, kind, mean, std = line.rstrip("\n").split("\t")
            rows.append({"key": key, "shape": tuple(json.loads(shape)), "dtype": dtype, "kind": kind,
                         "mean": float(mean), "std": None if std == "-" else float(std)})
    return rows


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("arch", ["ocrnet.HRNet", "ocrnet.HRNet_Mscale"])
@pytest.mark.slow
def test_keys_shapes_and_kinds_equal_the_original(arch):
    with torch.device("meta"):  # layout only: no memory, no init
        model = build_model(arch, 19)
    ref = read_key_file(arch)
    params = {k for k, _ in model.named_parameters()}
    ours = [(k, tuple(v.shape), str(v.dtype), "param" if k in params else "buffer")
            for k, v in model.state_dict().items()]
    assert ours == [(r["key"], r["shape"], r["dtype"], r["kind"]) for r in ref]


@pytest.mark.parametrize(
    "arch,num_classes,keys,params",
    [
        ("ocrnet.HRNet_Mscale", 19, 1903, 72_143_430),
        ("ocrnet.HRNet_Mscale", 65, 1903, 72_200_194),
        ("ocrnet.HRNet", 19, 1890, 70_372_678),
        ("hmsa_ocrnet_hrnet_w48", 19, 1903, 72_143_430),
        ("ocrnet_hrnet_w48", 65, 1890, 70_372_678 + 46 * (512 + 1 + 720 + 1)),
    ],
)
@pytest.mark.slow
def test_key_and_parameter_counts(arch, num_classes, keys, params):
    with torch.device("meta"):
        model = build_model(arch, num_classes)
    assert len(model.state_dict()) == keys
    assert param_count(model) == params
    assert param_count(model.backbone) == 65_325_120
    assert model.backbone.out_channels == 720


def test_aliases_pin_the_w48_trunk():
    assert {"ocrnet_hrnet_w48", "hmsa_ocrnet_hrnet_w48"} <= set(network.list_models())
    assert {"ocrnet.HRNet", "ocrnet.HRNet_Mscale"} <= set(network.list_models(include_aliases=True))
    with pytest.raises(ValueError, match="hrnet_w48"):
        build_model("ocrnet.HRNet_Mscale", 19, trunk="hrnet_w18_small")
    with pytest.raises(ValueError, match="unknown HRNet trunk 'hrnet_w47'"):
        HRNetTrunk("hrnet_w47")


@pytest.fixture(scope="module")
def w48() -> nn.Module:
    torch.manual_seed(0)
    return build_model("ocrnet.HRNet_Mscale", 19)


@pytest.mark.slow
def test_initialisation_matches_the_original_statistics(w48):
    """conv normal(0.001) / BN 1,0 in the trunk, PyTorch defaults in OCR and attention (key file columns)."""
    state = w48.state_dict()
    bad = []
    for r in read_key_file("ocrnet.HRNet_Mscale"):
        t = state[r["key"]]
        if r["std"] is None:  # num_batches_tracked
            if t.item() != 0:
                bad.append(r["key"])
            continue
        t = t.double()
        n = t.numel()
        mean, std = t.mean().item(), (t.std().item() if n > 1 else 0.0)
        if r["std"] == 0:
            ok = std == 0 and mean == r["mean"]
        else:
            tol = r["std"] / math.sqrt(n)  # both sides are samples: generous multiples of the standard error
            ok = abs(std - r["std"]) <= 6 * tol and abs(mean - r["mean"]) <= 8 * tol
        if not ok:
            bad.append(f"{r['key']}: mean {mean:.3g} std {std:.3g} vs {r['mean']:.3g} {r['std']:.3g}")
    assert not bad, bad[:10]


@pytest.mark.slow
def test_w48_trunk_output_is_720_channels_at_stride_4(w48):
    w48.eval()
    with torch.no_grad():
        feats = w48.backbone(torch.randn(1, 3, 64, 96))
    assert feats.shape == (1, 720, 16, 24)


# ----------------------------------------------------------------------------------------------- numerics


def reference_fuse(module: BilinearFuseModule, x: list[torch.Tensor]) -> list[torch.Tensor]:
    """The original HighResolutionModule.forward, written out: bilinear upsampling to branch i's exact size."""
    x = [module.branches[i](t) for i, t in enumerate(x)]
    out = []
    for i in range(len(module.fuse_layers)):
        y = x[0] if i == 0 else module.fuse_layers[i][0](x[0])
        for j in range(1, len(x)):
            if j == i:
                y = y + x[j]
            elif j > i:
                conv, bn = module.fuse_layers[i][j]
                up = F.interpolate(bn(conv(x[j])), size=x[i].shape[-2:], mode="bilinear", align_corners=False)
                y = y + up
            else:
                y = y + module.fuse_layers[i][j](x[j])
        out.append(F.relu(y))
    return out


def branch_inputs(channels: list[int], height: int, width: int) -> list[torch.Tensor]:
    """Inputs at the sizes a stride-2 3x3 conv chain gives: ceil(h / 2) per level."""
    out = []
    for c in channels:
        out.append(torch.randn(2, c, height, width))
        height, width = (height + 1) // 2, (width + 1) // 2
    return out


@pytest.fixture()
def timm_stage4():
    torch.manual_seed(0)
    net = timm.create_model("hrnet_w18_small", features_only=True, feature_location="")
    for m in net.modules():  # non-trivial BN statistics, so that a wrong term shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval().stage4[-1]


@pytest.mark.parametrize("size", [(32, 48), (35, 45)])
@pytest.mark.slow
def test_fuse_is_bilinear_to_the_exact_branch_size(timm_stage4, size):
    ours = BilinearFuseModule(timm_stage4.branches, timm_stage4.fuse_layers).eval()
    x = branch_inputs(list(timm_stage4.num_in_chs), *size)
    with torch.no_grad():
        got = ours(list(x))
        want = reference_fuse(ours, list(x))
    assert [t.shape for t in got] == [t.shape for t in x]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_fuse_differs_from_timms_nearest_upsampling(timm_stage4):
    x = branch_inputs(list(timm_stage4.num_in_chs), 32, 48)
    with torch.no_grad():
        nearest = timm_stage4(list(x))
        ours = BilinearFuseModule(timm_stage4.branches, timm_stage4.fuse_layers).eval()(list(x))
    torch.testing.assert_close(ours[3], nearest[3])  # the coarsest output has no upsampled term
    assert (ours[0] - nearest[0]).abs().max() > 1e-3


def reference_trunk(trunk: HRNetTrunk, x: torch.Tensor) -> torch.Tensor:
    """The original HighResolutionNet.forward, written out, with reference_fuse for every module."""
    x = F.relu(trunk.bn1(trunk.conv1(x)))
    x = F.relu(trunk.bn2(trunk.conv2(x)))
    ys = [trunk.layer1(x)]
    for transition, stage in ((trunk.transition1, trunk.stage2), (trunk.transition2, trunk.stage3),
                              (trunk.transition3, trunk.stage4)):
        xs = []
        for i, t in enumerate(transition):
            if isinstance(t, nn.Identity):
                xs.append(ys[i])
            else:
                xs.append(t(ys[i] if i < len(ys) else ys[-1]))
        for module in stage:
            xs = reference_fuse(module, xs)
        ys = xs
    size = ys[0].shape[-2:]
    ups = [F.interpolate(y, size=size, mode="bilinear", align_corners=False) for y in ys[1:]]
    return torch.cat([ys[0]] + ups, 1)


@pytest.mark.slow
def test_trunk_forward_matches_the_original_at_odd_sizes():
    torch.manual_seed(0)
    trunk = HRNetTrunk("hrnet_w18_small")
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.1)  # 0.001 would leave nothing but zeros to compare
    trunk.eval()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        got = trunk(x)
        want = reference_trunk(trunk, x)
    assert got.shape == (2, trunk.out_channels, 18, 23)
    assert trunk.out_channels == sum(trunk.branch_channels) == 16 + 32 + 64 + 128
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ocr_block_matches_the_formulas():
    torch.manual_seed(0)
    k, c_in, mid, key = 5, 12, 16, 8
    ocr = OCRBlock(c_in, k, mid_ch=mid, key_ch=key)
    for m in ocr.modules():
        if isinstance(m, nn.Conv2d):  # peaked regions and attention, so that every step matters
            nn.init.normal_(m.weight, std=2 / math.sqrt(m.weight[0].numel()))
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    ocr.eval()
    x = torch.randn(2, c_in, 6, 7)
    with torch.no_grad():
        logits, aux, ocr_feats = ocr(x)
        feats = ocr.conv3x3_ocr(x)
        want_aux = ocr.aux_head(x)
        region = F.softmax(want_aux.flatten(2), dim=2)  # [N, K, HW]
        centres = torch.einsum("nkp,ncp->nck", region, feats.flatten(2))[..., None]  # [N, C, K, 1]
        block = ocr.ocr_distri_head.object_context_block
        q = block.f_pixel(feats).flatten(2)  # [N, key, HW]
        kk = block.f_object(centres).flatten(2)  # [N, key, K]
        v = block.f_down(centres).flatten(2)
        sim = F.softmax(torch.einsum("ncp,nck->npk", q, kk) / math.sqrt(key), dim=2)
        context = block.f_up(torch.einsum("npk,nck->ncp", sim, v).reshape(2, key, 6, 7))
        want_feats = ocr.ocr_distri_head.conv_bn_dropout(torch.cat([context, feats], 1))
        want_logits = ocr.cls_head(want_feats)
    torch.testing.assert_close(aux, want_aux)
    torch.testing.assert_close(ocr_feats, want_feats, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    assert ocr.ocr_distri_head.conv_bn_dropout[2].p == 0.05


# ----------------------------------------------------------------------------------------------- models


@pytest.mark.slow
def test_mscale_training_outputs_fuse_pred_and_aux():
    torch.manual_seed(0)
    model = build_model("hmsa_ocrnet_hrnet_w48", 7, **tiny_options("hmsa_ocrnet_hrnet_w48")).train()
    out = model(torch.randn(2, 3, 64, 80))
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {
        "pred": (2, 7, 64, 80), "aux": (2, 7, 64, 80),
        "pred_0.5x": (2, 7, 32, 40), "aux_0.5x": (2, 7, 32, 40), "attn_0.5x": (2, 1, 32, 40),
        "pred_1.0x": (2, 7, 64, 80), "aux_1.0x": (2, 7, 64, 80),
    }
    a = out["attn_0.5x"]
    assert 0 < a.min() and a.max() < 1
    up = lambda t: F.interpolate(t, size=(64, 80), mode="bilinear", align_corners=False)  # noqa: E731
    for key in ("pred", "aux"):
        want = up(a * out[f"{key}_0.5x"]) + (1 - up(a)) * out[f"{key}_1.0x"]
        torch.testing.assert_close(out[key], want)
    (out["pred"].mean() + 0.4 * out["aux"].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]
    assert model.scale_attn.conv0.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_mscale_nscale_inference_shapes():
    torch.manual_seed(0)
    model = build_model("hmsa_ocrnet_hrnet_w48", 7, **tiny_options("hmsa_ocrnet_hrnet_w48")).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 67, 91), scales=[0.25, 0.5, 1.0, 2.0])
    sizes = {0.25: (16, 22), 0.5: (33, 45), 1.0: (67, 91), 2.0: (134, 182)}
    want = {"pred": (1, 7, 67, 91), "aux": (1, 7, 67, 91)}
    for s, hw in sizes.items():
        want.update({f"pred_{s}x": (1, 7, *hw), f"aux_{s}x": (1, 7, *hw)})
        if s != 2.0:  # the top scale's attention weights nothing and is not computed
            want[f"attn_{s}x"] = (1, 1, *hw)
    assert {k: tuple(v.shape) for k, v in out.items()} == want


@pytest.mark.slow
def test_single_scale_outputs_pred_and_aux_at_input_size():
    model = build_model("ocrnet_hrnet_w48", 7, **tiny_options("ocrnet_hrnet_w48"))
    assert not hasattr(model, "scale_attn")
    for train in (True, False):
        model.train(train)
        with torch.set_grad_enabled(train):
            out = model(torch.randn(2, 3, 50, 70))
        assert {k: tuple(v.shape) for k, v in out.items()} == {"pred": (2, 7, 50, 70), "aux": (2, 7, 50, 70)}


def test_timm_weights_only_when_asked(monkeypatch):
    calls = []
    real = timm.create_model

    def fake(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        net = real(name, pretrained=False, **kwargs)
        nn.init.constant_(net.conv1.weight, 0.5)  # stands in for downloaded weights
        return net

    monkeypatch.setattr(hrnet.timm, "create_model", fake)
    assert HRNetTrunk("hrnet_w18_small").conv1.weight.std() > 0  # re-initialised the original's way
    assert (HRNetTrunk("hrnet_w18_small", timm_pretrained=True).conv1.weight == 0.5).all()  # kept
    assert calls == [False, True]

    def offline(name, pretrained=False, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(hrnet.timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="pretrained 'hrnet_w18_small' weights"):
        HRNetTrunk("hrnet_w18_small", timm_pretrained=True)
