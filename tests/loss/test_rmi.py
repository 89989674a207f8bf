"""RMI loss: golden values of the original, a direct float64 reference, degenerate inputs, autocast, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss.rmi import RMILoss, _pooled_onehot, _RegionCovariance, _SigmoidBCE, bce_loss


def golden_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The original's golden inputs: N=2, K=4, H=32, W=48."""
    n, k, h, w = 2, 4, 32, 48
    nn_ = torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1)
    c = torch.arange(k, dtype=torch.float64).view(1, k, 1, 1)
    y = torch.arange(h, dtype=torch.float64).view(1, 1, h, 1)
    x = torch.arange(w, dtype=torch.float64).view(1, 1, 1, w)
    logits = (3 * torch.sin(0.3 * x + 0.7 * c + 0.1 * nn_) * torch.cos(0.2 * y - 0.5 * c)).float()
    labels = (torch.arange(w).view(1, 1, w) // 12 + torch.arange(h).view(1, h, 1) // 8
              + torch.arange(n).view(n, 1, 1)) % 4
    labels[:, :4] = 255
    return logits, labels


def reference_rmi(logits: torch.Tensor, labels: torch.Tensor, k: int, do_rmi: bool = True) -> torch.Tensor:
    """The original's formula written as directly as possible, in float64 throughout."""
    x = logits.double()
    mask = (labels < k).double()  # [N,H,W]
    onehot = F.one_hot(labels.clamp(max=k - 1), k).permute(0, 3, 1, 2).double() * mask[:, None]
    bce_map = torch.clamp(x, min=0) - x * onehot + torch.log1p(torch.exp(-x.abs()))
    bce = (bce_map * mask[:, None]).sum() / (mask.sum() + 1)
    if not do_rmi:
        return bce
    probs = torch.sigmoid(x) * mask[:, None] + 1e-6
    la = F.avg_pool2d(onehot, 4, 4, 2)
    pr = F.avg_pool2d(probs, 4, 4, 2)
    n, _, h, w = la.shape
    total = 0.0
    for c in range(k):
        per_image = []
        for i in range(n):
            lv = torch.stack([la[i, c, y:y + h - 2, x_:x_ + w - 2].reshape(-1) for y in range(3) for x_ in range(3)])
            pv = torch.stack([pr[i, c, y:y + h - 2, x_:x_ + w - 2].reshape(-1) for y in range(3) for x_ in range(3)])
            lv = lv - lv.mean(1, keepdim=True)
            pv = pv - pv.mean(1, keepdim=True)
            eye = torch.eye(9, dtype=torch.float64)
            var = lv @ lv.T - (lv @ pv.T) @ torch.linalg.inv(pv @ pv.T + 5e-4 * eye) @ (lv @ pv.T).T
            chol = torch.linalg.cholesky(var + 5e-4 * eye)
            per_image.append(0.5 * 2 * torch.log(torch.diagonal(chol) + 1e-8).sum())
        total = total + torch.stack(per_image).mean() / 9
    return 0.5 * bce + 0.5 * total


def structured_case(n: int, k: int, h: int, w: int, ignore: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocky labels with noise and ignored pixels, and logits loosely correlated with them."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, k, (n, 1, (h + 6) // 7, (w + 6) // 7), generator=g).float()
    labels = F.interpolate(blocks, scale_factor=7, mode="nearest")[:, 0, :h, :w].long()
    noise = torch.rand(n, h, w, generator=g) < 0.1
    labels = torch.where(noise, torch.randint(0, k, (n, h, w), generator=g), labels)
    labels[torch.rand(n, h, w, generator=g) < 0.15] = ignore
    logits = 2 * torch.randn(n, k, h, w, generator=g) + 3 * F.one_hot(labels.clamp(max=k - 1), k).permute(0, 3, 1, 2)
    return logits.float(), labels


# ------------------------------------------------------------------------------------------------ golden values


def test_golden_values_of_the_original():
    logits, labels = golden_inputs()
    loss = RMILoss(num_classes=4, ignore_index=255)
    assert abs(loss(logits, labels, do_rmi=False).item() - 3.7451720) < 1e-6
    assert abs(loss(logits, labels).item() - 2.1377170) < 1e-6
    assert abs(bce_loss(logits, labels, 4).item() - 3.7451720) < 1e-6


def test_reference_reproduces_golden_values():
    # guards the test's own reference, which the cases below trust
    logits, labels = golden_inputs()
    assert abs(reference_rmi(logits, labels, 4, do_rmi=False).item() - 3.7451720) < 1e-6
    assert abs(reference_rmi(logits, labels, 4).item() - 2.1377170) < 1e-6


# ------------------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize(
    "n,k,h,w,ignore",
    [(1, 2, 37, 29, 255), (3, 19, 50, 45, 255), (2, 65, 26, 34, 65), (2, 4, 8, 8, 255)],
)
@pytest.mark.slow
def test_matches_float64_reference(n, k, h, w, ignore):
    logits, labels = structured_case(n, k, h, w, ignore, seed=k + h)
    ours = logits.clone().requires_grad_(True)
    ref = logits.double().requires_grad_(True)
    value = RMILoss(k, ignore)(ours, labels)
    expected = reference_rmi(ref, labels, k)
    value.backward()
    expected.backward()
    assert value.dtype == torch.float32
    assert abs(value.item() - expected.item()) <= 1e-6 * max(1.0, abs(expected.item()))
    assert torch.allclose(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-5 * ref.grad.abs().max().item())
    bce = RMILoss(k, ignore)(logits, labels, do_rmi=False)
    assert abs(bce.item() - reference_rmi(logits, labels, k, do_rmi=False).item()) < 1e-6 * abs(bce.item())


def test_rmi_part_is_nonzero_and_rewards_good_predictions():
    logits, labels = structured_case(2, 5, 40, 40, 255, seed=1)
    good = 8 * F.one_hot(labels.clamp(max=4), 5).permute(0, 3, 1, 2).float() - 4
    loss = RMILoss(5)
    rmi = lambda x: 2 * loss(x, labels) - loss(x, labels, do_rmi=False)  # noqa: E731
    assert rmi(good).item() < rmi(torch.zeros_like(good)).item() - 1.0


def test_pooled_onehot_equals_average_pool_of_one_hot():
    for h, w in [(32, 48), (31, 30), (33, 29), (9, 10)]:
        labels = torch.randint(0, 6, (2, h, w))
        labels[:, 0] = 255
        valid = labels < 5
        onehot = F.one_hot(torch.where(valid, labels, 0), 5).permute(0, 3, 1, 2).float() * valid[:, None]
        expected = F.avg_pool2d(onehot, 4, 4, 2)
        got = _pooled_onehot(torch.where(valid, labels, 0), valid, 5, *expected.shape[2:])
        assert torch.equal(got, expected)


@pytest.mark.slow
def test_hand_written_backwards_pass_gradcheck():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 7, 8, dtype=torch.float64, generator=g)
    probs = torch.rand(3, 7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: _RegionCovariance.apply(maps, p), (probs,))
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (2, 6, 7), generator=g)
    valid = torch.rand(2, 6, 7, generator=g) > 0.2
    assert torch.autograd.gradcheck(lambda v: _SigmoidBCE.apply(v, labels, valid, True), (x,))
    assert torch.autograd.gradcheck(lambda v: _SigmoidBCE.apply(v, labels, valid, False)[0], (x,))


# ------------------------------------------------------------------------------------------------- robustness


def _value_and_grad(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[float, torch.Tensor]:
    x = logits.clone().requires_grad_(True)
    value = RMILoss(k)(x, labels)
    value.backward()
    return value.item(), x.grad


@pytest.mark.parametrize("case", ["all_ignored", "one_class_everywhere", "class_absent", "saturated", "constant"])
def test_degenerate_inputs_give_finite_loss_and_gradient(case):
    k, shape = 4, (2, 33, 30)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, k, 33, 30, generator=g)
    labels = torch.randint(0, k, shape, generator=g)
    if case == "all_ignored":
        labels = torch.full(shape, 255)
    elif case == "one_class_everywhere":
        labels = torch.full(shape, 2)
    elif case == "class_absent":
        labels = labels.clamp(max=1)
    elif case == "saturated":  # sigmoid is exactly 0 or 1: probability maps are constant
        logits = torch.where(F.one_hot(labels, k).permute(0, 3, 1, 2).bool(), 200.0, -200.0)
    elif case == "constant":
        logits = torch.zeros_like(logits)
    value, grad = _value_and_grad(logits, labels, k)
    assert math.isfinite(value)
    assert torch.isfinite(grad).all()
    if case == "all_ignored":
        assert torch.count_nonzero(grad) == 0
        # nothing to learn: BCE is 0 and every posterior covariance is αI, so each class adds
        # 0.5·logdet(αI)/9 = log(√α + 1e-8) (the Cholesky diagonal is √α), and the loss is half their sum
        assert value == pytest.approx(0.5 * k * math.log(math.sqrt(5e-4) + 1e-8), rel=1e-6)


def test_ignored_pixels_get_no_gradient():
    logits, labels = structured_case(2, 3, 24, 28, 255, seed=5)
    _, grad = _value_and_grad(logits, labels, 3)
    assert torch.count_nonzero(grad.permute(0, 2, 3, 1)[labels == 255]) == 0
    assert torch.count_nonzero(grad.permute(0, 2, 3, 1)[labels != 255]) > 0


def test_channels_last_logits_give_the_same_value_and_gradient():
    logits, labels = structured_case(2, 4, 20, 24, 255, seed=9)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().to(memory_format=torch.channels_last).requires_grad_(True)
    va, vb = RMILoss(4)(a, labels), RMILoss(4)(b, labels)
    (va + RMILoss(4)(a, labels, do_rmi=False)).backward()
    (vb + RMILoss(4)(b, labels, do_rmi=False)).backward()
    assert va.item() == pytest.approx(vb.item(), rel=1e-6)
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------- mixed precision


def _autocast_supported(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.nn.functional.conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 1, 1))
        return True
    except (RuntimeError, AssertionError):
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gives_the_fp32_value(dtype):
    if not _autocast_supported(dtype):
        pytest.skip(f"CPU autocast to {dtype} is not supported by this torch build")
    logits, labels = structured_case(2, 6, 36, 40, 255, seed=7)
    head = torch.nn.Conv2d(6, 6, 1)
    loss = RMILoss(6)
    with torch.no_grad():
        reference = loss(logits, labels).item()
        with torch.autocast("cpu", dtype=dtype):
            inside = loss(logits, labels).item()  # float32 logits inside an autocast region
            low = head(logits)  # what a model under autocast hands over
            from_low = loss(low, labels).item()
        assert low.dtype == dtype
        expected_low = loss(low.float(), labels).item()
    assert inside == pytest.approx(reference, rel=1e-4)
    assert from_low == pytest.approx(expected_low, rel=1e-4)


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    loss = RMILoss(4)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="channels"):
        loss(torch.randn(2, 5, 16, 16), labels)
    with pytest.raises(ValueError, match="spatial size"):
        loss(torch.randn(2, 4, 16, 18), labels)
    with pytest.raises(ValueError, match="spatial size"):
        loss(torch.randn(3, 4, 16, 16), labels)
    with pytest.raises(ValueError, match=r"\[N,K,H,W\]"):
        loss(torch.randn(4, 16, 16), labels)
    with pytest.raises(ValueError, match="integer"):
        loss(torch.randn(2, 4, 16, 16), labels.float())
    with pytest.raises(ValueError, match="at least 8 pixels"):
        loss(torch.randn(2, 4, 7, 16), torch.zeros(2, 7, 16, dtype=torch.long))
