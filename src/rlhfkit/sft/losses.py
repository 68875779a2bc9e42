"""The supervised fine-tuning loss: next-token negative log-likelihood on response tokens only.

Pure tensor -> tensor functions; the trainer calls them. ``labels`` follow the Hugging Face
convention: the token id where that token is a target, ``IGNORE_INDEX`` (-100) on prompt
tokens, chat headers and padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhfkit.data.examples import IGNORE_INDEX
from rlhfkit.ops import logprobs_from_logits, masked_sum


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Negative log-likelihood of each next token, and whether it counts.

    Position ``t`` of the result scores token ``t + 1`` under the logits at ``t`` (causal LM
    shift). The plain loop it replaces::

        for b in range(B):
            for t in range(T - 1):
                if labels[b, t + 1] != IGNORE_INDEX:
                    nll[b, t] = -log_softmax(logits[b, t])[labels[b, t + 1]]

    Args:
        logits: ``(B, T, V)``, the model's output for ``input_ids (B, T)``.
        labels: ``(B, T)`` token ids aligned with ``input_ids``; ``IGNORE_INDEX`` = no loss.

    Returns:
        ``nll (B, T-1)`` (0 where not counted) and ``response_mask (B, T-1)`` (1 = a response
        token that is a target).
    """
    targets = labels[:, 1:]  # (B, T-1)
    response_mask = targets != IGNORE_INDEX
    logprobs = logprobs_from_logits(logits[:, :-1], targets.clamp(min=0))  # (B, T-1)
    nll = torch.where(response_mask, -logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device))
    return nll, response_mask


def sft_loss(nll: Tensor, response_mask: Tensor, n_tokens: int | Tensor) -> Tensor:
    """Sum of the response-token NLL divided by ``n_tokens``: a per-token mean over the step.

    Passing the number of response tokens of the whole optimizer step (all micro-batches,
    all processes) rather than of this micro-batch makes gradient accumulation exact: the
    summed micro-batch gradients equal the gradient of the token mean over the step, however
    the step is split. ``nll``, ``response_mask``: ``(B, T-1)`` from :func:`token_nll`.
    """
    return masked_sum(nll, response_mask) / n_tokens
