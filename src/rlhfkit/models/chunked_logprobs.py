"""Token log-probabilities and entropy straight from the last hidden states, a chunk of rows at a time.

Today's path builds the response logits ``(B, N, V)``, and autograd keeps them (with
logsumexp's temporaries and, in the backward pass, their gradient) until the update's backward
pass: for a 49k vocabulary at ``8 x 128`` response tokens that is 0.2 GB per copy in fp32.
:func:`logprobs_from_hidden` takes the hidden states ``(B, N, H)`` and the LM head's weight
instead, and runs ``rows x V`` logits for ``chunk_size`` rows at a time; its backward pass
recomputes each chunk's logits rather than keeping them, so only ``(chunk_size, V)`` logits are
ever alive. What it keeps for the backward pass is the hidden states (already kept by the
model), one logsumexp per row and, with entropy, one ``E_p[z]`` per row.

The plain computation it replaces (:func:`rlhfkit.ops.logprobs_from_logits` and
:func:`rlhfkit.ops.entropy_from_logits` on the whole tensor)::

    logits = (hidden @ weight.T + bias) / temperature           # (B, N, V)
    logprobs = logits.gather(-1, labels[..., None])[..., 0] - logits.logsumexp(-1)
    entropy = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)

``tests/test_chunked_logprobs.py`` checks that both give the same values and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["logprobs_from_hidden"]


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, autocast) -> Tensor:
    """fp32 logits ``(c, V)`` of hidden rows ``(c, H)``; under the caller's autocast the matmul
    runs in its dtype (bf16 on a GPU), as the model's own LM head would."""
    device_type, enabled, dtype = autocast
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = logits.float()
    return logits if temperature == 1 else logits / temperature


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward and backward over ``chunk_size`` rows at a time (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk_size, with_entropy):
        device_type = hidden.device.type
        autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        rows = hidden.shape[0]
        logprobs = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        mean_z = torch.empty_like(logprobs) if with_entropy else None  # E_p[z] per row, for the entropy's gradient
        entropy = torch.empty_like(logprobs) if with_entropy else None
        for start in range(0, rows, chunk_size):
            rows_c = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[rows_c], weight, bias, temperature, autocast)  # (c, V)
            lse[rows_c] = torch.logsumexp(z, dim=-1)
            logprobs[rows_c] = z.gather(-1, labels[rows_c].unsqueeze(-1)).squeeze(-1) - lse[rows_c]
            if with_entropy:
                p = torch.exp(z - lse[rows_c].unsqueeze(-1))  # (c, V) softmax
                mean_z[rows_c] = (p * z).sum(-1)
                entropy[rows_c] = lse[rows_c] - mean_z[rows_c]  # H = logsumexp(z) - E_p[z]
            del z
        ctx.save_for_backward(hidden, weight, bias, labels, lse, mean_z)
        ctx.temperature, ctx.chunk_size, ctx.autocast = temperature, chunk_size, autocast
        ctx.mark_non_differentiable(labels)
        ctx.set_materialize_grads(False)  # an unused output (the entropy, when only logged) gets None, not zeros
        return (logprobs, entropy) if with_entropy else (logprobs, torch.zeros(0, device=hidden.device))

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, lse, mean_z = ctx.saved_tensors
        temperature, chunk_size, autocast = ctx.temperature, ctx.chunk_size, ctx.autocast
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        use_entropy = mean_z is not None and grad_entropy is not None
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        for start in range(0, hidden.shape[0], chunk_size):
            rows_c = slice(start, start + chunk_size)
            h = hidden[rows_c]
            z = _chunk_logits(h, weight, bias, temperature, autocast)  # (c, V), recomputed
            p = torch.exp(z - lse[rows_c].unsqueeze(-1))  # (c, V)
            # d logprob / dz = onehot(label) - p
            g = p * (-grad_logprobs[rows_c].unsqueeze(-1))  # (c, V)
            g.scatter_add_(-1, labels[rows_c].unsqueeze(-1), grad_logprobs[rows_c].unsqueeze(-1))
            if use_entropy:  # d H / dz = -p (z - E_p[z])
                g -= grad_entropy[rows_c].unsqueeze(-1) * p * (z - mean_z[rows_c].unsqueeze(-1))
            del p, z
            if temperature != 1:
                g /= temperature  # z = logits / temperature
            if need_h:
                grad_h[rows_c] = (g @ weight.float()).to(hidden.dtype)  # (c, H)
            if need_w:
                grad_w.addmm_(g.t(), h.float())  # (V, H)
            if need_b:
                grad_b += g.sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``labels`` (and entropies) under ``softmax((hidden @ weight.T + bias) / temperature)``,
    never holding more than ``chunk_size x V`` logits.

    Args:
        hidden: ``(B, N, H)`` last hidden states (after the final norm), the state before each label.
        weight: ``(V, H)`` the LM head's weight (a tied embedding is the same tensor).
        labels: ``(B, N)`` token ids in ``[0, V)``; mask ignored positions afterwards.
        bias: ``(V,)`` the LM head's bias, if it has one.
        temperature: the sampling temperature the log-probs are taken at.
        chunk_size: rows of ``B * N`` whose logits are built at once (forward and backward).
        with_entropy: also return the entropy ``(B, N)`` of each position's distribution.

    Returns:
        ``(logprobs (B, N), entropy (B, N) or None)``, float32.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"logprobs_from_hidden: hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree; labels "
            "must be hidden.shape[:-1] (shift labels by one position before calling)."
        )
    if chunk_size < 1:
        raise ValueError(f"logprobs_from_hidden: chunk_size must be at least 1, got {chunk_size}")
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*N, H)
    logprobs, entropy = _ChunkedLogprobs.apply(
        flat, weight, bias, labels.reshape(-1), float(temperature), int(chunk_size), with_entropy
    )
    return logprobs.view(labels.shape), (entropy.view(labels.shape) if with_entropy else None)
