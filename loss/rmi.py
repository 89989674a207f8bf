"""Region Mutual Information loss (Zhao et al., NeurIPS 2019) as the original HMSA code computes it.

    loss = 0.5·BCE + 0.5·RMI                                               (the original's --rmi_loss)

BCE is sigmoid binary cross-entropy summed over classes and valid pixels, divided by (valid pixels + 1). RMI pools
labels and sigmoid probabilities (average, kernel 4, stride 4, padding 2), takes the 3x3 neighbourhood of every
pooled point as a 9-vector, and for each image and class computes
    0.5·logdet(Σ_L − Σ_LP (Σ_P + αI)^-1 Σ_LPᵀ + αI),   α = 5e-4,
with covariances summed (not averaged) over the points; the result is averaged over the batch, divided by 9 and
summed over classes. Pixels whose label is outside [0, K) are ignored.

How this differs from a literal port of the original, at equal values:
- Full resolution (the bulk of the memory traffic): one sigmoid serves both the BCE and the probabilities, no
  one-hot tensor is built, and a hand-written backward gives the logits' gradient in a few in-place passes.
- The pooled one-hot labels are window counts made by one scatter-add (kernel == stride, so each pixel lies in
  at most one window): exact integers / 16, as the average pool of a one-hot map.
- Only the pooled maps (16x smaller) go to float64, where the Schur complement needs it: it subtracts terms of
  size ~M/4 (M points) and must keep ~α, which float32 cannot do at large M.
- The three covariances come from one unfold and two products, with a hand-written backward (one product and a
  fold); Cholesky factorisations and a triangular solve replace the explicit inverse. Both factorised matrices
  are ≥ αI in exact arithmetic and float64 rounding moves them by far less than α, so the factorisations succeed
  and the logdet and its gradient stay finite when a class is absent, fills the crop, or every pixel is ignored.
- Autocast is disabled inside: under fp16/bf16 training the loss is computed from float32 logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loss.cross_entropy import check_inputs

RMI_RADIUS = 3  # neighbourhood side: vectors of RMI_RADIUS² = 9 values
POOL_SIZE = 4  # average-pool kernel and stride
POOL_PAD = POOL_SIZE // 2
POS_ALPHA = 5e-4  # added to the diagonal of both matrices that are factorised
CLIP_MIN = 1e-6  # added to the probabilities before pooling
LOG_EPS = 1e-8  # added to the Cholesky diagonal before the log (as the original)
LAMBDA = 0.5  # loss = LAMBDA·BCE + (1 − LAMBDA)·RMI
_PROD_CHUNK = 64  # classes multiplied before a log: each factor is in [0.5, 1], 0.5^64 is far from underflow


class _SigmoidBCE(torch.autograd.Function):
    """(BCE, sigmoid(x)·valid + CLIP_MIN) from logits [N,K,H,W], in-range labels [N,H,W] and the valid mask.

    BCE = Σ_valid Σ_k [softplus(x_k) − x_k·y_k] / (valid + 1) with one-hot y. Per pixel that is
    Σ_k relu(x_k) + Σ_k log(1 + e^-|x_k|) − x_label, and 1 + e^-|x| = 1 / max(s, 1 − s) for s = sigmoid(x), so the
    sigmoid needed for the probabilities also gives the BCE with one log per pixel (per 64 classes).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, valid: Tensor, with_probs: bool):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        s = torch.sigmoid(logits)
        weight = valid.to(logits.dtype)
        near_one = 1 - s
        torch.maximum(near_one, s, out=near_one)  # sigmoid(|x|), in [0.5, 1]
        log_terms = sum(torch.log(chunk.prod(1)) for chunk in near_one.split(_PROD_CHUNK, dim=1))
        del near_one
        picked = torch.gather(logits, 1, labels.unsqueeze(1)).squeeze(1)
        per_pixel = logits.clamp(min=0).sum(1) - log_terms - picked
        count = weight.sum()
        # float64 accumulation: a float32 sum over ~1e6 pixels would cost ~1e-7 of the value
        bce = (torch.sum(per_pixel * weight, dtype=torch.float64) / (count + 1)).to(logits.dtype)
        ctx.save_for_backward(s, labels, weight, count)
        if not with_probs:
            return bce, None
        probs = torch.addcmul(s.new_full((), CLIP_MIN), s, weight.unsqueeze(1))
        return bce, probs

    @staticmethod
    def backward(ctx, grad_bce: Tensor | None, grad_probs: Tensor | None):  # type: ignore[override]
        s, labels, weight, count = ctx.saved_tensors
        if grad_probs is not None:  # d(s·valid)/dx = s(1 − s)·valid
            grad = (1 - s).mul_(s).mul_(grad_probs).mul_(weight.unsqueeze(1))
        else:
            grad = torch.zeros_like(s)
        if grad_bce is not None:  # dBCE/dx_k = (s_k − y_k)·valid / (valid + 1)
            per_pixel = weight * (grad_bce / (count + 1))
            grad = grad.addcmul_(s, per_pixel.unsqueeze(1))
            # −per_pixel at each pixel's label channel, by a 1-d scatter-add (deterministic on CUDA too) into the
            # gradient's storage: NCHW or, for channels-last logits (the default layout), NHWC; one index per pixel
            n, k, h, w = grad.shape
            batch = torch.arange(n, device=grad.device).view(n, 1, 1)
            pixel = torch.arange(h * w, device=grad.device).view(h, w)
            if grad.is_contiguous():
                storage, index = grad.view(-1), (batch * k + labels) * (h * w) + pixel
            else:
                grad = grad.contiguous(memory_format=torch.channels_last)  # no copy for channels-last logits
                storage, index = grad.permute(0, 2, 3, 1).view(-1), (batch * (h * w) + pixel) * k + labels
            storage.scatter_add_(0, index.view(-1), -per_pixel.reshape(-1))
        return grad, None, None, None


def _prepare(logits: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """(float32 logits, labels clamped into [0, K) as int64, valid mask)."""
    valid = (labels >= 0) & (labels < num_classes)
    return logits.float(), torch.where(valid, labels, 0).long(), valid


def bce_loss(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Sigmoid BCE against the one-hot labels, summed over classes and valid pixels, / (valid pixels + 1)."""
    check_inputs(logits, labels, num_classes, where="bce")
    with torch.autocast(logits.device.type, enabled=False):
        return _SigmoidBCE.apply(*_prepare(logits, labels, num_classes), False)[0]


def _pooled_onehot(labels: Tensor, valid: Tensor, num_classes: int, out_h: int, out_w: int) -> Tensor:
    """avg_pool2d(one_hot(labels)·valid, 4, 4, 2) [N,K,h,w] (count_include_pad) without building the one-hot map."""
    n, h, w = labels.shape
    dev = labels.device
    cy = torch.div(torch.arange(h, device=dev) + POOL_PAD, POOL_SIZE, rounding_mode="floor")
    cx = torch.div(torch.arange(w, device=dev) + POOL_PAD, POOL_SIZE, rounding_mode="floor")
    # the last rows/columns fall outside every window when (size + 2·pad − kernel) is not a multiple of the stride
    inside = (cy < out_h)[:, None] & (cx < out_w)[None, :]
    cell = cy[:, None] * out_w + cx[None, :]  # [H,W] index of the pixel's window
    cells = out_h * out_w
    batch = torch.arange(n, device=dev)[:, None, None] * (num_classes * cells)
    size = n * num_classes * cells
    index = torch.where(valid & inside, batch + labels * cells + cell, size)  # the rest goes to a spare bin
    counts = torch.zeros(size + 1, dtype=torch.float32, device=dev)
    counts.scatter_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.float32, device=dev))
    return (counts[:size] / (POOL_SIZE * POOL_SIZE)).view(n, num_classes, out_h, out_w)


class _RegionCovariance(torch.autograd.Function):
    """Σ_L, Σ_LP, Σ_P [B,9,9] of the 3x3 neighbourhood vectors of label and probability maps [B,h,w] (float64).

    The vectors are the rows of unfold(·, 3) (y-major shifts, as the original stacks them); covariances are summed
    over the M = (h−2)(w−2) points. Each map's mean is removed first (covariance is shift invariant), so the raw
    moments X·Xᵀ − s·sᵀ/M hold values ≤ M and lose at most ~M²·1e-16 (5e-7 at M = 65k), far below α.
    Only the probabilities get a gradient.
    """

    @staticmethod
    def forward(ctx, labels: Tensor, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        d = RMI_RADIUS * RMI_RADIUS
        maps = torch.stack([labels, probs], 1)
        maps -= maps.mean((2, 3), keepdim=True)
        vectors = F.unfold(maps, RMI_RADIUS)  # [B,18,M]: 9 label rows, then 9 probability rows
        points = vectors.shape[2]
        sums = vectors.sum(2, keepdim=True)  # [B,18,1]
        with_probs = vectors @ vectors[:, d:].transpose(1, 2) - sums @ sums[:, d:].transpose(1, 2) / points
        cov_l = vectors[:, :d] @ vectors[:, :d].transpose(1, 2) - sums[:, :d] @ sums[:, :d].transpose(1, 2) / points
        ctx.save_for_backward(vectors, sums)
        ctx.size = probs.shape[1:]
        return cov_l, with_probs[:, :d], with_probs[:, d:]

    @staticmethod
    def backward(ctx, grad_l: Tensor, grad_lp: Tensor, grad_p: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        vectors, sums = ctx.saved_tensors
        # d/dPr of <G_LP, Σ_LP> + <G_P, Σ_P> = [G_LPᵀ | G_P + G_Pᵀ] · (vectors − their means)
        coeff = torch.cat([grad_lp, grad_p + grad_p.transpose(1, 2)], 1).transpose(1, 2).contiguous()
        grad_cols = coeff @ vectors
        grad_cols -= coeff @ sums / vectors.shape[2]
        return None, F.fold(grad_cols, ctx.size, RMI_RADIUS).squeeze(1)


def rmi_lower_bound(pooled_labels: Tensor, pooled_probs: Tensor) -> Tensor:
    """Σ_k mean_n 0.5·logdet(posterior covariance)/9 from pooled maps [N,K,h,w] (computed in float64)."""
    n, k, h, w = pooled_labels.shape
    d = RMI_RADIUS * RMI_RADIUS
    if h < RMI_RADIUS or w < RMI_RADIUS:
        raise ValueError(
            f"rmi: the pooled map {h}x{w} is smaller than the {RMI_RADIUS}x{RMI_RADIUS} neighbourhood; "
            f"the input must be at least {POOL_SIZE * (RMI_RADIUS - 1)} pixels on each side"
        )
    cov_l, cov_lp, cov_p = _RegionCovariance.apply(
        pooled_labels.double().reshape(n * k, h, w), pooled_probs.double().reshape(n * k, h, w)
    )
    eye = torch.eye(d, dtype=cov_p.dtype, device=cov_p.device)
    chol_p, _ = torch.linalg.cholesky_ex(cov_p + POS_ALPHA * eye)
    half = torch.linalg.solve_triangular(chol_p, cov_lp.transpose(1, 2), upper=False)  # L_P^-1 Σ_PL
    posterior = cov_l - half.transpose(1, 2) @ half + POS_ALPHA * eye
    chol, _ = torch.linalg.cholesky_ex(posterior)
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1) + LOG_EPS).sum(-1)  # [N·K]
    return (0.5 * logdet).view(n, k).mean(0).div(d).sum().float()


class RMILoss(nn.Module):
    """`RMILoss(K, ignore_index)(logits [N,K,H,W], labels [N,H,W], do_rmi=True)`.

    With do_rmi=False it returns the BCE part alone, unweighted (the original's auxiliary and per-scale terms).
    `ignore_index` is kept for the interface; every label outside [0, K) is ignored.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, labels: Tensor, do_rmi: bool = True) -> Tensor:
        check_inputs(logits, labels, self.num_classes, where="rmi")
        with torch.autocast(logits.device.type, enabled=False):
            logits, labels, valid = _prepare(logits, labels, self.num_classes)
            bce, probs = _SigmoidBCE.apply(logits, labels, valid, do_rmi)
            if not do_rmi:
                return bce
            probs = F.avg_pool2d(probs, POOL_SIZE, POOL_SIZE, POOL_PAD)
            pooled_labels = _pooled_onehot(labels, valid, self.num_classes, probs.shape[2], probs.shape[3])
            return LAMBDA * bce + (1 - LAMBDA) * rmi_lower_bound(pooled_labels, probs)
