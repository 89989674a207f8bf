"""The combined criterion: term functions, weights, per-scale terms, class-weighted CE, errors."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from loss import TERM_FUNCTIONS, build_criterion
from loss.cross_entropy import cross_entropy, image_class_weights, image_weighted_cross_entropy
from loss.rmi import RMILoss
from utils.config import LossConfig, from_dict

K, IGNORE = 5, 255
RECIPE = LossConfig(main="rmi", aux="bce", aux_weight=0.4, scale="bce", scale_weight=0.05)


def make_target(n: int = 2, h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, K, (n, h, w), generator=g)
    target[:, :3] = IGNORE
    return target


def make_outputs(n: int = 2, h: int = 24, w: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    """A multi-scale OCR model's training output dict (contracts: pred, aux, pred_{s}x, aux_{s}x, attn_{s}x)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_(True)  # noqa: E731
    return {
        "pred": r(n, K, h, w),
        "aux": r(n, K, h, w),
        "pred_0.5x": r(n, K, h // 2, w // 2),
        "pred_1.0x": r(n, K, h, w),
        "aux_0.5x": r(n, K, h // 2, w // 2),
        "aux_1.0x": r(n, K, h, w),
        "attn_0.5x": torch.rand(n, 1, h // 2, w // 2, generator=g),
    }


def hand_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax CE over valid pixels, element by element."""
    logp = torch.log_softmax(logits.double(), 1)
    valid = target != IGNORE
    picked = torch.gather(logp, 1, torch.where(valid, target, 0)[:, None])[:, 0]
    return -(picked * valid).sum() / valid.sum()


def hand_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE against one-hot labels, summed over classes and valid pixels, / (valid + 1)."""
    valid = target != IGNORE
    onehot = F.one_hot(torch.where(valid, target, 0), K).permute(0, 3, 1, 2).double()
    p = torch.sigmoid(logits.double())
    per = -(onehot * torch.log(p) + (1 - onehot) * torch.log(1 - p)).sum(1)
    return (per * valid).sum() / (valid.sum() + 1)


def up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def test_defaults_are_plain_ce_for_the_demo():
    cfg = LossConfig()
    assert (cfg.main, cfg.aux, cfg.scale) == ("ce", "ce", "ce")
    assert (cfg.aux_weight, cfg.scale_weight) == (0.4, 0.0)
    assert from_dict({"loss": {"main": "rmi", "wce_upper_bound": 2}}).loss.wce_upper_bound == 2.0


@pytest.mark.slow
def test_ce_golden_value_of_the_original():
    from tests.loss.test_rmi import golden_inputs

    logits, labels = golden_inputs()
    assert abs(cross_entropy(logits, labels, 4, 255).item() - 1.9160163) < 1e-6


def test_default_criterion_terms_and_total():
    outputs, target = make_outputs(), make_target()
    total, terms = build_criterion(LossConfig(), K, IGNORE)(outputs, target)
    assert set(terms) == {"main", "aux"}  # scale_weight 0: no per-scale terms
    main, aux = hand_ce(outputs["pred"], target), hand_ce(outputs["aux"], target)
    assert terms["main"].item() == pytest.approx(main.item(), rel=1e-5)
    assert terms["aux"].item() == pytest.approx(0.4 * aux.item(), rel=1e-5)
    assert total.item() == pytest.approx(main.item() + 0.4 * aux.item(), rel=1e-5)
    assert all(not v.requires_grad for v in terms.values())
    total.backward()
    assert outputs["pred"].grad is not None and outputs["aux"].grad is not None
    assert outputs["pred_0.5x"].grad is None and outputs["aux_0.5x"].grad is None


def test_recipe_reproduces_the_original_combination():
    # The original's combination: 0.4·BCE(aux) + [0.5·BCE + 0.5·RMI](pred) + 0.05·BCE(up(p_0.5x)) + 0.05·BCE(p_1.0x)
    outputs, target = make_outputs(), make_target()
    total, terms = build_criterion(RECIPE, K, IGNORE)(outputs, target)
    assert list(terms) == ["main", "aux", "scale_0.5x", "scale_1.0x"]
    expected = {
        "main": RMILoss(K, IGNORE)(outputs["pred"], target).item(),
        "aux": 0.4 * hand_bce(outputs["aux"], target).item(),
        "scale_0.5x": 0.05 * hand_bce(up(outputs["pred_0.5x"], target), target).item(),
        "scale_1.0x": 0.05 * hand_bce(outputs["pred_1.0x"], target).item(),
    }
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-5)
    total.backward()
    assert outputs["pred_0.5x"].grad.abs().sum() > 0 and outputs["pred_1.0x"].grad.abs().sum() > 0


def test_mapillary_recipe_and_models_without_aux():
    outputs, target = make_outputs(), make_target()
    cfg = dataclasses.replace(RECIPE, scale_weight=0.0)
    _, terms = build_criterion(cfg, K, IGNORE)(outputs, target)
    assert list(terms) == ["main", "aux"]
    single = {"pred": outputs["pred"]}
    total, terms = build_criterion(RECIPE, K, IGNORE)(single, target)
    assert list(terms) == ["main"] and total.item() == pytest.approx(terms["main"].item())
    _, terms = build_criterion(dataclasses.replace(RECIPE, aux_weight=0.0), K, IGNORE)(outputs, target)
    assert "aux" not in terms


def test_each_term_chooses_its_function():
    outputs, target = make_outputs(), make_target()
    cfg = LossConfig(main="bce", aux="rmi", aux_weight=0.5, scale="wce", scale_weight=0.25)
    _, terms = build_criterion(cfg, K, IGNORE)(outputs, target)
    assert terms["main"].item() == pytest.approx(hand_bce(outputs["pred"], target).item(), rel=1e-5)
    assert terms["aux"].item() == pytest.approx(0.5 * RMILoss(K)(outputs["aux"], target).item(), rel=1e-5)
    wce = image_weighted_cross_entropy(up(outputs["pred_0.5x"], target), target, K, IGNORE)
    assert terms["scale_0.5x"].item() == pytest.approx(0.25 * wce.item(), rel=1e-5)
    assert set(TERM_FUNCTIONS) == {"ce", "bce", "rmi", "wce"}


def test_scale_terms_follow_the_keys_present():
    target = make_target()
    outputs = make_outputs()
    outputs["pred_2.0x"] = torch.randn(2, K, 48, 64)  # larger than the target: resized down
    outputs["pred_0.25x"] = torch.randn(2, K, 6, 8)
    cfg = LossConfig(scale_weight=1.0)
    _, terms = build_criterion(cfg, K, IGNORE)(outputs, target)
    assert [n for n in terms if n.startswith("scale_")] == ["scale_0.25x", "scale_0.5x", "scale_1.0x", "scale_2.0x"]
    assert terms["scale_2.0x"].item() == pytest.approx(hand_ce(up(outputs["pred_2.0x"], target), target).item(),
                                                       rel=1e-5)


def test_criterion_under_autocast_equals_fp32():
    outputs, target = make_outputs(), make_target()
    criterion = build_criterion(RECIPE, K, IGNORE)
    low = {k: v.detach().bfloat16() for k, v in outputs.items()}
    expected, _ = criterion({k: v.float() for k, v in low.items()}, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = criterion(low, target)
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
    assert total.item() == pytest.approx(expected.item(), rel=1e-4)


# -------------------------------------------------------------------------------------- class-weighted CE


def test_class_weights_are_per_image():
    target = torch.tensor([[[0, 0, 0, 1]], [[1, 1, 1, 1]]])  # [2,1,4]
    w = image_class_weights(target, 3, upper_bound=1.0)
    # image 0: p = (0.75, 0.25, 0) -> w = (1.25, 1.75, 1); image 1: p = (0, 1, 0) -> w = (1, 1, 1)
    assert torch.allclose(w, torch.tensor([[1.25, 1.75, 1.0], [1.0, 1.0, 1.0]]))
    assert torch.allclose(image_class_weights(target, 3, upper_bound=2.0)[0], torch.tensor([1.5, 2.5, 1.0]))
    ignored = torch.tensor([[[0, 255, 255, 1]]])
    assert torch.allclose(image_class_weights(ignored, 3)[0], torch.tensor([1.5, 1.5, 1.0]))


def test_weighted_ce_sums_per_image_weighted_means():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 1, 4, generator=g)
    target = torch.tensor([[[0, 0, 0, 1]], [[1, 1, 1, 255]]])
    got = image_weighted_cross_entropy(logits, target, 3, IGNORE, upper_bound=1.0)
    logp = torch.log_softmax(logits.double(), 1)[:, :, 0]  # [2,3,4]
    w0 = torch.tensor([1.25, 1.25, 1.25, 1.75], dtype=torch.float64)
    img0 = -(w0 * logp[0, [0, 0, 0, 1], torch.arange(4)]).sum() / w0.sum()
    img1 = -logp[1, 1, :3].mean()  # a single class present: its weight is 1·(1 − 1) + 1
    assert got.item() == pytest.approx((img0 + img1).item(), rel=1e-6)
    # the original's batch-wide weights (p = 3/7, 4/7, 0 over the 7 valid pixels) would give another value
    batch_w = torch.tensor([1 + 4 / 7, 1 + 3 / 7, 1.0], dtype=torch.float64)
    wb = batch_w[[0, 0, 0, 1]]
    img0_batch = -(wb * logp[0, [0, 0, 0, 1], torch.arange(4)]).sum() / wb.sum()
    assert abs(got.item() - (img0_batch + img1).item()) > 1e-4


def test_all_ignored_crop_is_finite_for_every_function():
    target = torch.full((2, 16, 16), IGNORE)
    for name in TERM_FUNCTIONS:
        logits = torch.randn(2, K, 16, 16, requires_grad=True)
        total, _ = build_criterion(LossConfig(main=name), K, IGNORE)({"pred": logits}, target)
        total.backward()
        assert torch.isfinite(total) and torch.isfinite(logits.grad).all(), name
        if name != "rmi":
            assert total.item() == 0.0, name


# ------------------------------------------------------------------------------------------------- errors


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="loss.aux: unknown loss function 'softmax'"):
        build_criterion(LossConfig(aux="softmax"), K, IGNORE)
    with pytest.raises(ValueError, match="ignore_index=3"):
        build_criterion(LossConfig(), K, 3)
    with pytest.raises(ValueError, match="loss.scale_weight"):
        build_criterion(LossConfig(scale_weight=-1.0), K, IGNORE)
    criterion = build_criterion(RECIPE, K, IGNORE)
    target = make_target()
    with pytest.raises(ValueError, match="no 'pred'"):
        criterion({"aux": torch.randn(2, K, 24, 32)}, target)
    with pytest.raises(ValueError, match=r"outputs\['pred'\].*spatial size"):
        criterion({"pred": torch.randn(2, K, 24, 30)}, target)
    with pytest.raises(ValueError, match=r"outputs\['aux'\].*6 channels.*num_classes=5"):
        criterion({"pred": torch.randn(2, K, 24, 32), "aux": torch.randn(2, 6, 24, 32)}, target)
    for name in TERM_FUNCTIONS:
        with pytest.raises(ValueError, match="channels"):
            build_criterion(LossConfig(main=name), K, IGNORE)({"pred": torch.randn(2, 4, 24, 32)}, target)
