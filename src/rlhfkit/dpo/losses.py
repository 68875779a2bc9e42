"""The DPO family on rank lists: pure functions of sequence log-probabilities.

Layout (one row = one list of responses to one prompt; lists of different lengths are
padded to a common ``K``), the same as the reward-model losses in :mod:`rlhfkit.losses`:

- ``logprobs (B, K)``: ``log pi_theta(y | x)`` of each response, summed over its tokens.
- ``ref_logprobs (B, K)``: the same under the frozen reference policy.
- ``ranks (B, K)`` integers, 0 = best; equal ranks are a tie and give no pair.
- ``list_mask (B, K)``: 1 = real response slot. Values in padded slots are ignored and
  padded slots get exactly zero gradient.

Every loss reads the log-ratio ``h = log pi_theta(y|x) - log pi_ref(y|x)``; ``beta * h`` is
the implicit reward (Rafailov et al. 2023, arXiv:2305.18290, eq. 5). Each returns per-list
losses ``(B,)`` for ``reduction="none"`` (0 for a list with no comparison: all tied, or one
real slot) and, for ``"mean"``, the mean over the lists that have one, each list weighted
equally whatever its ``K``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhfkit.losses import pair_mask
from rlhfkit.ops import masked_mean, masked_sum

__all__ = [
    "DPOLossName",
    "DPO_LOSSES",
    "implicit_rewards",
    "dpo_loss",
    "ipo_loss",
    "listwise_dpo_loss",
    "list_losses",
    "pair_margins",
    "best_mask",
]

DPOLossName = Literal["dpo", "ipo", "listwise"]
DPO_LOSSES = get_args(DPOLossName)


def _real(fn: str, logprobs: Tensor, ref_logprobs: Tensor, ranks: Tensor, list_mask: Tensor) -> Tensor:
    """Check the ``(B, K)`` layout; return ``list_mask`` as bool."""
    if logprobs.dim() != 2:
        raise ValueError(f"{fn}: logprobs must be (B, K), one row per list; got shape {tuple(logprobs.shape)}")
    for name, t in (("ref_logprobs", ref_logprobs), ("ranks", ranks), ("list_mask", list_mask)):
        if t.shape != logprobs.shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(t.shape)} but logprobs has {tuple(logprobs.shape)}; both must be (B, K)"
            )
    return list_mask.to(torch.bool)


def _log_ratios(logprobs: Tensor, ref_logprobs: Tensor, real: Tensor) -> Tensor:
    """``h = logprobs - ref_logprobs`` (B, K), 0 in padded slots: a nan there reaches neither the loss nor the gradient."""
    h = logprobs - ref_logprobs.to(logprobs.dtype)
    return torch.where(real, h, torch.zeros((), dtype=h.dtype, device=h.device))


def _reduce(per_list: Tensor, has_comparison: Tensor, reduction: str, fn: str) -> Tensor:
    if reduction == "none":
        return per_list
    if reduction == "mean":
        return masked_mean(per_list, has_comparison)  # each list weighs the same
    raise ValueError(f"{fn}: reduction={reduction!r} is not supported; use 'mean' or 'none'")


def implicit_rewards(logprobs: Tensor, ref_logprobs: Tensor, list_mask: Tensor, beta: float) -> Tensor:
    """``beta * (log pi - log pi_ref)`` (B, K), 0 in padded slots (arXiv:2305.18290, eq. 5)."""
    real = list_mask.to(torch.bool)
    return beta * _log_ratios(logprobs, ref_logprobs, real)


def dpo_loss(
    logprobs: Tensor, ref_logprobs: Tensor, ranks: Tensor, list_mask: Tensor, beta: float, reduction: str = "mean"
) -> Tensor:
    """DPO over every ordered pair of each list (Rafailov et al. 2023, arXiv:2305.18290, eq. 7).

    Per list: ``-1/|P| * sum_{(w,l) in P} log sigmoid(beta * (h_w - h_l))``, ``P`` the pairs
    with ``ranks[w] < ranks[l]`` (``C(K, 2)`` for a strict list; an n-choose-1 row gives its
    ``K - 1`` pairs of the chosen response against each other). For a pair this is the
    paper's loss; a list averages its pairs, so it weighs as much as a pair.

    Plain loop this function vectorises::

        for b in range(B):
            h = [logprobs[b][k] - ref_logprobs[b][k] for k in range(K)]
            pairs = [(w, l) for w in range(K) for l in range(K)
                     if list_mask[b][w] and list_mask[b][l] and ranks[b][w] < ranks[b][l]]
            loss[b] = mean(-logsigmoid(beta * (h[w] - h[l])) for w, l in pairs) if pairs else 0.0
    """
    real = _real("dpo_loss", logprobs, ref_logprobs, ranks, list_mask)
    h = _log_ratios(logprobs, ref_logprobs, real)
    pairs = pair_mask(ranks, real)  # (B, K, K): [b, w, l] = w ranked above l
    diff = h.unsqueeze(2) - h.unsqueeze(1)  # (B, K, K): h_w - h_l
    per_pair = -F.logsigmoid(beta * diff)  # arXiv:2305.18290 eq. 7
    per_list = masked_mean(per_pair, pairs, dim=(1, 2))
    return _reduce(per_list, pairs.flatten(1).any(dim=1), reduction, "dpo_loss")


def ipo_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    ranks: Tensor,
    list_mask: Tensor,
    beta: float,
    response_lengths: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """IPO over every ordered pair of each list (Azar et al. 2023, arXiv:2310.12036, eq. 17).

    Per pair: ``(h_w / n_w - h_l / n_l - 1 / (2 * tau))**2`` with ``tau = beta`` and ``n`` the
    response's token count; a list averages its pairs. Dividing each log-ratio by its length
    is TRL's reading of the paper (its ``loss_type="ipo"``, confirmed with the IPO authors:
    the paper's results use it); without it the squared loss grows with response length and
    no single ``beta`` fits short and long data.

    Plain loop this function vectorises::

        for b in range(B):
            h = [(logprobs[b][k] - ref_logprobs[b][k]) / response_lengths[b][k] for k in range(K)]
            pairs = [(w, l) for w in range(K) for l in range(K)
                     if list_mask[b][w] and list_mask[b][l] and ranks[b][w] < ranks[b][l]]
            loss[b] = mean((h[w] - h[l] - 1 / (2 * beta)) ** 2 for w, l in pairs) if pairs else 0.0

    Args:
        response_lengths: ``(B, K)`` response tokens in each log-probability (>= 1 in real slots).
    """
    real = _real("ipo_loss", logprobs, ref_logprobs, ranks, list_mask)
    if response_lengths.shape != logprobs.shape:
        raise ValueError(
            f"ipo_loss: response_lengths has shape {tuple(response_lengths.shape)}; it must be (B, K) like logprobs"
        )
    h = _log_ratios(logprobs, ref_logprobs, real) / response_lengths.to(logprobs.dtype).clamp(
        min=1
    )  # per-token log-ratio
    pairs = pair_mask(ranks, real)  # (B, K, K)
    diff = h.unsqueeze(2) - h.unsqueeze(1)  # (B, K, K)
    per_pair = (diff - 1.0 / (2.0 * beta)) ** 2  # arXiv:2310.12036 eq. 17
    per_list = masked_mean(per_pair, pairs, dim=(1, 2))
    return _reduce(per_list, pairs.flatten(1).any(dim=1), reduction, "ipo_loss")


def listwise_dpo_loss(
    logprobs: Tensor, ref_logprobs: Tensor, ranks: Tensor, list_mask: Tensor, beta: float, reduction: str = "mean"
) -> Tensor:
    """DPO under the Plackett-Luce model of the whole ranking (Rafailov et al. 2023, arXiv:2305.18290, appendix A.3).

    With ``r = beta * h`` and the real slots best first, the negative log-likelihood of the
    ranking is ``sum_k [logsumexp(r_(k), ..., r_(n)) - r_(k)]``. Ties (equal ranks) follow
    Breslow's rule for tied events in Cox's partial likelihood (Breslow 1974, Biometrics
    30(1)): every response of a tied group is chosen from the pool of all responses ranked
    no better than it, tied partners included, and a response with nothing ranked below it
    adds no term. So a strict list gives exactly Plackett-Luce, an n-choose-1 row the
    softmax cross-entropy of its choice, an all-tied list nothing. Each list is divided by
    its number of terms (``n - 1`` for a strict list), as rlhfkit's reward-model
    ``plackett-luce`` loss is, so the scale does not grow with ``K`` (the paper's sum is that
    many times this); at ``K = 2`` it is exactly :func:`dpo_loss`.

    Plain loop this function vectorises::

        for b in range(B):
            r = [beta * (logprobs[b][k] - ref_logprobs[b][k]) for k in range(K)]
            real = [k for k in range(K) if list_mask[b][k]]
            terms = [logsumexp([r[j] for j in real if ranks[b][j] >= ranks[b][i]]) - r[i]
                     for i in real if any(ranks[b][j] > ranks[b][i] for j in real)]
            loss[b] = mean(terms) if terms else 0.0
    """
    real = _real("listwise_dpo_loss", logprobs, ref_logprobs, ranks, list_mask)
    r = beta * _log_ratios(logprobs, ref_logprobs, real)  # (B, K)
    both = real.unsqueeze(2) & real.unsqueeze(1)  # (B, K, K)
    pool = both & (
        ranks.unsqueeze(1) >= ranks.unsqueeze(2)
    )  # (B, K, K): [b, i, j] = j still in the pool when i is chosen
    chosen = (pair_mask(ranks, real)).any(dim=2)  # (B, K): i is ranked above someone, so it is a choice
    pool = pool | torch.eye(r.shape[1], dtype=torch.bool, device=r.device)  # a padded row is never all -inf
    logits = r.unsqueeze(1).expand(-1, r.shape[1], -1).masked_fill(~pool, float("-inf"))  # (B, K, K)
    nll = torch.logsumexp(logits, dim=2) - r  # (B, K): -log P(i chosen from its pool), Plackett-Luce
    per_list = masked_mean(nll, chosen, dim=1)
    return _reduce(per_list, chosen.any(dim=1), reduction, "listwise_dpo_loss")


def list_losses(
    loss: str,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    ranks: Tensor,
    list_mask: Tensor,
    beta: float,
    response_lengths: Tensor | None = None,
) -> Tensor:
    """Per-list losses ``(B,)`` of the loss named ``loss`` (one of :data:`DPO_LOSSES`)."""
    if loss == "dpo":
        return dpo_loss(logprobs, ref_logprobs, ranks, list_mask, beta, reduction="none")
    if loss == "ipo":
        if response_lengths is None:
            raise ValueError("loss 'ipo' needs response_lengths (B, K)")
        return ipo_loss(logprobs, ref_logprobs, ranks, list_mask, beta, response_lengths, reduction="none")
    if loss == "listwise":
        return listwise_dpo_loss(logprobs, ref_logprobs, ranks, list_mask, beta, reduction="none")
    raise ValueError(f"unknown DPO loss {loss!r}; use one of {', '.join(DPO_LOSSES)}")


@torch.no_grad()
def pair_margins(values: Tensor, ranks: Tensor, list_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum over ordered pairs of values[w] - values[l], number of pairs)``, both 0-d: sums,
    not a mean, so batches add up before dividing (no host sync). ``values (B, K)``."""
    pairs = pair_mask(ranks, list_mask.to(torch.bool))  # (B, K, K)
    diff = values.unsqueeze(2) - values.unsqueeze(1)  # (B, K, K)
    return masked_sum(diff, pairs), pairs.sum()


def best_mask(ranks: Tensor, list_mask: Tensor) -> Tensor:
    """``(B, K)`` bool: the real slots holding the best rank of their list (the 'chosen' responses)."""
    real = list_mask.to(torch.bool)
    best = ranks.masked_fill(~real, torch.iinfo(ranks.dtype).max).min(dim=1, keepdim=True).values  # (B, 1)
    return real & (ranks == best)
