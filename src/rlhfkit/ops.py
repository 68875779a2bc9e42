"""Masked reductions and log-probability helpers shared by the losses and PPO math.

Every function here is a pure tensor -> tensor function. A mask value of 1 (or ``True``)
marks a real element; 0 marks padding. Masks are read as booleans (any non-zero value is
real), so fractional weights are not supported.

Masked reductions select with :func:`torch.where` instead of multiplying by the mask, so a
``nan`` or ``inf`` in a padded slot neither leaks into the result nor into the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "logprobs_from_logits",
    "entropy_from_logits",
    "tempered",
]

Dim = int | tuple[int, ...] | None

# Row-wise float32 upcast for half-precision logits: one (T, V) float32 slice at a time
# instead of a full (B, T, V) copy.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _as_bool_mask(mask: Tensor, x: Tensor, fn: str) -> Tensor:
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"{fn}: mask of shape {tuple(mask.shape)} does not broadcast to x of shape "
            f"{tuple(x.shape)}; pass a mask with the same shape as x (1 = real element)."
        ) from None
    return mask.to(torch.bool).expand_as(x)


def masked_sum(x: Tensor, mask: Tensor, dim: Dim = None) -> Tensor:
    """Sum of the real elements of ``x``.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: broadcastable to ``x``; 1 = real element.
        dim: dimension(s) to reduce; ``None`` reduces everything to a scalar.
    """
    real = _as_bool_mask(mask, x, "masked_sum")
    x = torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Dim = None) -> Tensor:
    """Mean of the real elements of ``x``: ``sum(x * mask) / sum(mask)``.

    A reduced slice with no real element (e.g. a list with no pairs) gives 0, not ``nan``;
    callers that must not count such slices exclude them with a second mask.

    Args:
        x: any shape, e.g. ``(B, T)`` per-token values.
        mask: broadcastable to ``x``; 1 = real element.
        dim: dimension(s) to reduce; ``None`` gives the mean over all real elements (a
            per-token mean over the batch), ``dim=1`` on ``(B, T)`` a per-sequence mean.
    """
    real = _as_bool_mask(mask, x, "masked_mean")
    total = masked_sum(x, real, dim)
    count = real.sum() if dim is None else real.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of all real elements of ``x`` (one scalar over the whole tensor).

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)``.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: broadcastable to ``x``; 1 = real element.

    Raises:
        ValueError: fewer than 2 real elements (``unbiased``) or none at all. Checking the
            count reads it on the host, one sync per call.
    """
    real = _as_bool_mask(mask, x, "masked_var")
    n = int(real.sum())
    needed = 2 if unbiased else 1
    if n < needed:
        raise ValueError(
            f"masked_var: got {n} real element(s) but unbiased={unbiased} needs at least "
            f"{needed}; check that the mask is not all zeros, or pass unbiased=False."
        )
    mean = masked_mean(x, real)
    var = masked_mean((x - mean) ** 2, real)
    if unbiased:
        var = var * (n / (n - 1))  # Bessel's correction
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the real elements of ``x`` to mean 0 and variance 1; padded positions are 0.

    Mean and (unbiased) variance are taken over all real elements of the batch, not per
    sequence. With ``shift_mean=False`` the mean is added back after scaling: the result
    keeps the input's mean and has unit variance.

    Args:
        x: any shape, e.g. ``(M, N)`` advantages.
        mask: broadcastable to ``x``; 1 = real element.
        shift_mean: subtract the mean (``True``) or only divide by the std (``False``).
        eps: added to the variance before the square root.

    Returns:
        Same shape as ``x``.
    """
    real = _as_bool_mask(mask, x, "masked_whiten")
    mean = masked_mean(x, real)
    var = masked_var(x, real, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)  # z-score
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(real, whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


def tempered(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature``: the logits of the distribution sampled at that temperature.

    At temperature 1 the logits themselves (``x / 1`` is ``x`` exactly in IEEE arithmetic), so
    no ``(B, T, V)`` copy is made and no division runs in the backward pass.
    """
    return logits if temperature == 1 else logits / temperature


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under ``softmax(logits)``.

    ``log p(y) = logits[y] - logsumexp(logits)``, so no ``(B, T, V)`` log-softmax tensor is
    materialised for float32/float64 logits. Half-precision logits are upcast to float32 one
    row at a time (logsumexp in bf16 loses too much precision) and give float32 log-probs.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` integer token ids in ``[0, V)``; mask ignored positions afterwards.

    Returns:
        ``(B, T)`` log-probabilities.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logprobs_from_logits: logits {tuple(logits.shape)} and labels "
            f"{tuple(labels.shape)} disagree; labels must be logits.shape[:-1] "
            "(shift labels by one position before calling)."
        )
    if logits.dtype in _LOW_PRECISION:
        rows = [
            torch.log_softmax(row.float(), dim=-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
            for row, lab in zip(logits, labels)
        ]
        return torch.stack(rows)
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` at each position.

    ``H = logsumexp(z) - sum_v softmax(z)_v * z_v`` (equal to ``-sum p log p``). Half-precision
    logits are upcast to float32 one row at a time.

    Args:
        logits: ``(B, T, V)``.

    Returns:
        ``(B, T)`` entropies in nats.
    """
    if logits.dtype in _LOW_PRECISION:
        return torch.stack([entropy_from_logits(row.float()) for row in logits])
    probs = torch.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
