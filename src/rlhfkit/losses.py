"""Reward-model losses and ranking metrics: pure tensor functions.

Layout shared by the list losses and the metrics (one row = one list of responses to one
prompt; lists of different lengths are right- or arbitrarily padded to a common ``K``):

- ``scores (B, K)``: the reward model's score of each response.
- ``ranks (B, K)`` integers: 0 = best. Equal ranks are a tie and give no pair.
- ``list_mask (B, K)``: 1 = real response slot, 0 = padding. Values in padded slots of
  ``scores`` and ``ranks`` are ignored, and padded slots get exactly zero gradient.

Each loss returns per-list losses ``(B,)`` for ``reduction="none"`` and, for the default
``reduction="mean"``, the mean over lists with each list weighted equally (a list of 6
responses counts as much as a pair). Lists that carry no comparison (all tied, or one real
slot) are 0 under ``"none"`` and left out of the ``"mean"``; a batch with none gives 0.

Commands pick a loss by its ``--loss`` name through :mod:`rlhfkit.rm.objective`, the one registry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhfkit.ops import masked_mean, masked_sum

__all__ = [
    "pairwise_loss",
    "logexp_loss",
    "margin_loss",
    "listwise_loss",
    "plackett_luce_loss",
    "binary_loss",
    "mse_loss",
    "token_pairwise_loss",
    "pair_mask",
    "pairwise_accuracy",
    "list_exact_match",
    "kendall_tau",
    "weighted_list_sum",
]

REDUCTIONS = ("mean", "none")


# --------------------------------------------------------------------------- helpers


def _reduce(per_item: Tensor, include: Tensor, reduction: str, fn: str) -> Tensor:
    """``"none"``: ``per_item`` as is; ``"mean"``: mean over the items where ``include``."""
    if reduction == "none":
        return per_item
    if reduction == "mean":
        return masked_mean(per_item, include)  # per-list mean: each list weighs the same
    raise ValueError(f"{fn}: reduction={reduction!r} is not supported; use one of {', '.join(REDUCTIONS)}.")


def weighted_list_sum(per_list: Tensor, weights: Tensor, scale: float) -> Tensor:
    """One micro-batch's share of a step's weighted mean of per-list losses.

    per_list (B,): the micro-batch's per-list losses (``reduction="none"``). weights (B,): each
    list's ``PreferenceExample.weight``. ``scale`` is ``world_size / W``, with ``W`` the sum of the
    weights of every list of the optimizer step (all micro-batches, all processes). Summing the
    returned values over the micro-batches, and averaging over processes as DDP does, gives the
    step loss ``sum_i w_i l_i / sum_i w_i`` whatever the split: the weighted mean that
    ``torch.nn.functional.cross_entropy(weight=...)`` takes with ``reduction="mean"``. A list of
    weight 2 counts exactly as that list twice in the step; scaling every weight by ``c``
    changes nothing. With every weight 1 it is bit for bit ``per_list.sum() * world_size / B``
    (``x * 1.0 == x``). The plain loop::

        sum(w * loss for w, loss in zip(weights, per_list)) * scale
    """
    return (per_list * weights.to(per_list.dtype)).sum() * scale  # (B,) -> ()


def _check_lists(fn: str, scores: Tensor, list_mask: Tensor, ranks: Tensor | None = None) -> Tensor:
    """Validate the ``(B, K)`` list layout and return ``list_mask`` as bool."""
    if scores.dim() != 2:
        raise ValueError(
            f"{fn}: scores must be (B, K) scores, one row per list; got shape "
            f"{tuple(scores.shape)}. Reshape flat pairs to (num_pairs, 2)."
        )
    named = {"list_mask": list_mask} if ranks is None else {"ranks": ranks, "list_mask": list_mask}
    for name, t in named.items():
        if t.shape != scores.shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(t.shape)} but scores has {tuple(scores.shape)}; both must be (B, K)."
            )
    return list_mask.to(torch.bool)


def _sanitize(scores: Tensor, real: Tensor) -> Tensor:
    # Zero the padded slots first so a nan/inf there cannot reach the loss or the gradient.
    return torch.where(real, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))


def pair_mask(ranks: Tensor, real: Tensor) -> Tensor:
    """``(B, K, K)`` bool, ``[b, i, j]`` true when slot i is ranked strictly above slot j."""
    better = ranks.unsqueeze(2) < ranks.unsqueeze(1)  # (B, K, K)
    return better & real.unsqueeze(2) & real.unsqueeze(1)


def _pair_diffs(scores: Tensor, margins: Tensor | None, fn: str) -> Tensor:
    """``(B, K, K)`` with ``[b, i, j] = r_i - r_j - margin_b``."""
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # (B, K, K)
    if margins is None:
        return diff
    if margins.shape != scores.shape[:1]:
        raise ValueError(
            f"{fn}: margins must be one value per list, shape ({scores.shape[0]},); got {tuple(margins.shape)}."
        )
    return diff - margins.to(scores.dtype)[:, None, None]


# --------------------------------------------------------------------------- list losses


def pairwise_loss(
    scores: Tensor,
    ranks: Tensor,
    list_mask: Tensor,
    margins: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Bradley-Terry loss over every ordered pair of each list.

    Per list: ``-1/|P| * sum_{(i,j) in P} log sigmoid(r_i - r_j - margin)`` where ``P`` is the
    set of pairs with ``ranks[i] < ranks[j]`` (``C(K, 2)`` pairs for a strict list), so each
    list is normalised by its own pair count (InstructGPT, arXiv:2203.02155, eq. 1). Lists
    with no pair (all tied, or one real slot) give 0 and are excluded from the mean.

    Args:
        scores: ``(B, K)`` scores.
        ranks: ``(B, K)`` integer ranks, 0 = best; equal ranks give no pair.
        list_mask: ``(B, K)``, 1 = real slot.
        margins: ``(B,)`` per-list margin subtracted inside the sigmoid (Llama 2,
            arXiv:2307.09288, eq. 2), or ``None`` for no margin.
        reduction: ``"mean"`` (over lists) or ``"none"`` (``(B,)``).
    """
    real = _check_lists("pairwise_loss", scores, list_mask, ranks)
    scores = _sanitize(scores, real)
    pairs = pair_mask(ranks, real)  # (B, K, K)
    diff = _pair_diffs(scores, margins, "pairwise_loss")
    per_pair = -F.logsigmoid(diff)  # InstructGPT eq. 1, stable for any |diff|
    per_list = masked_mean(per_pair, pairs, dim=(1, 2))  # mean over the pairs of each list
    return _reduce(per_list, pairs.flatten(1).any(dim=1), reduction, "pairwise_loss")


def logexp_loss(
    scores: Tensor,
    ranks: Tensor,
    list_mask: Tensor,
    margins: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Anthropic's preference-model loss ``log(1 + exp(r_worse - r_better))`` per pair.

    Askell et al. 2021 (arXiv:2112.00861, sec. 4), computed as ``softplus`` so that
    ``exp`` never overflows. Identical in value to :func:`pairwise_loss` (same pairs, same
    per-list normalisation, same margin convention); kept as its own name because configs
    and papers use it.

    Args: as :func:`pairwise_loss`.
    """
    real = _check_lists("logexp_loss", scores, list_mask, ranks)
    scores = _sanitize(scores, real)
    pairs = pair_mask(ranks, real)  # (B, K, K)
    diff = _pair_diffs(scores, margins, "logexp_loss")
    per_pair = F.softplus(-diff)  # log(1 + exp(r_l - r_w + m)), arXiv:2112.00861 sec. 4
    per_list = masked_mean(per_pair, pairs, dim=(1, 2))
    return _reduce(per_list, pairs.flatten(1).any(dim=1), reduction, "logexp_loss")


def margin_loss(
    scores: Tensor,
    ranks: Tensor,
    list_mask: Tensor,
    margins: Tensor | None,
    reduction: str = "mean",
) -> Tensor:
    """:func:`pairwise_loss` with a margin taken from the data (Llama 2, arXiv:2307.09288 eq. 2).

    ``-log sigmoid(r_i - r_j - margin_b)``; ``margins (B,)`` is required.

    Raises:
        ValueError: ``margins`` is ``None``.
    """
    if margins is None:
        raise ValueError(
            "margin_loss: margins is None, but this loss needs one margin per list, shape "
            "(B,); give the data a 'margin' field, or use loss 'pairwise' for no margin."
        )
    return pairwise_loss(scores, ranks, list_mask, margins=margins, reduction=reduction)


def listwise_loss(
    scores: Tensor,
    choice: Tensor,
    list_mask: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """n-choose-1 softmax cross-entropy over the real slots of each list.

    Per list: ``logsumexp_{j real} r_j - r_choice`` (the negative log-likelihood of the
    chosen response under a softmax over the list; Ziegler et al. 2019, arXiv:1909.08593,
    eq. 1). Padded slots enter the softmax as ``-inf``. A list with one real slot gives
    0 and is excluded from the mean.

    Args:
        scores: ``(B, K)`` scores.
        choice: ``(B,)`` integer index of the chosen slot; must be a real slot.
        list_mask: ``(B, K)``, 1 = real slot.
        reduction: ``"mean"`` (over lists) or ``"none"`` (``(B,)``).
    """
    real = _check_lists("listwise_loss", scores, list_mask)
    if choice.shape != scores.shape[:1]:
        raise ValueError(
            f"listwise_loss: choice must hold one index per list, shape ({scores.shape[0]},); "
            f"got {tuple(choice.shape)}."
        )
    choice = choice.long()
    in_range = (choice >= 0) & (choice < scores.shape[1])
    chose_real = in_range & real.gather(1, choice.clamp(0, scores.shape[1] - 1).unsqueeze(1)).squeeze(1)
    if not bool(chose_real.all()):
        b = int((~chose_real).nonzero()[0])
        raise ValueError(
            f"listwise_loss: list {b} has choice={int(choice[b])}, which is not a real slot "
            f"(real slots: {real[b].nonzero().flatten().tolist()}); choice must index a "
            "response that exists in that list."
        )
    scores = _sanitize(scores, real)
    logits = scores.masked_fill(~real, float("-inf"))  # (B, K), pads drop out of the softmax
    chosen = scores.gather(1, choice.unsqueeze(1)).squeeze(1)  # (B,)
    per_list = torch.logsumexp(logits, dim=1) - chosen  # cross-entropy, arXiv:1909.08593 eq. 1
    return _reduce(per_list, real.sum(dim=1) >= 2, reduction, "listwise_loss")


def _check_no_ties(fn: str, ranks: Tensor, real: Tensor) -> None:
    k = ranks.shape[1]
    off_diag = ~torch.eye(k, dtype=torch.bool, device=ranks.device)
    tied = (ranks.unsqueeze(2) == ranks.unsqueeze(1)) & real.unsqueeze(2) & real.unsqueeze(1) & off_diag
    has_tie = tied.flatten(1).any(dim=1)
    if bool(has_tie.any()):
        b = int(has_tie.nonzero()[0])
        raise ValueError(
            f"{fn}: list {b} has tied ranks {ranks[b][real[b]].tolist()}; Plackett-Luce needs "
            "a strict order. Use loss 'pairwise' (ties give no pair) or break the ties in the data."
        )


def plackett_luce_loss(
    scores: Tensor,
    ranks: Tensor,
    list_mask: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Negative log-likelihood of each full ranking under the Plackett-Luce model.

    With the real slots sorted best first, ``r_(1), ..., r_(n)``:
    ``-log P(order) = sum_{k=1}^{n-1} [logsumexp(r_(k), ..., r_(n)) - r_(k)]``
    (Plackett 1975; Luce 1959; the K-wise reward-model MLE of Zhu et al. 2023,
    arXiv:2301.11270). The last term (``k = n``) is always 0 and is left out. Each list
    is divided by its ``n - 1`` choices, so the scale matches the per-pair loss: for
    ``n = 2`` this is exactly Bradley-Terry ``-log sigmoid(r_w - r_l)``. Lists with one real slot give 0 and
    are excluded from the mean.

    Plain loop this function vectorises::

        for b in range(B):
            order = sorted((k for k in range(K) if list_mask[b][k]), key=lambda k: ranks[b][k])
            r = [scores[b][k] for k in order]
            n = len(r)
            nll = sum(logsumexp(r[k:]) - r[k] for k in range(n - 1))
            loss[b] = nll / (n - 1) if n > 1 else 0.0

    Args:
        scores: ``(B, K)`` scores.
        ranks: ``(B, K)`` integer ranks, 0 = best, no ties among the real slots.
        list_mask: ``(B, K)``, 1 = real slot.
        reduction: ``"mean"`` (over lists) or ``"none"`` (``(B,)``).

    Raises:
        ValueError: two real slots of a list share a rank.
    """
    real = _check_lists("plackett_luce_loss", scores, list_mask, ranks)
    _check_no_ties("plackett_luce_loss", ranks, real)
    scores = _sanitize(scores, real)
    k = scores.shape[1]
    # Sort real slots best first; padded slots go last.
    key = ranks.long().masked_fill(~real, torch.iinfo(torch.long).max)
    order = torch.argsort(key, dim=1, stable=True)  # (B, K)
    sorted_r = scores.gather(1, order)  # (B, K)
    sorted_real = real.gather(1, order)  # (B, K), real slots first
    pos = torch.arange(k, device=scores.device)
    # still[b, k, j]: slot j is still available at choice k. A padded position k keeps
    # itself so its (unused) row is never all -inf.
    eye = torch.eye(k, dtype=torch.bool, device=scores.device)
    still = (pos[None, :] >= pos[:, None]) & (sorted_real.unsqueeze(1) | eye)  # (B, K, K)
    pool = sorted_r.unsqueeze(1).expand(-1, k, -1).masked_fill(~still, float("-inf"))  # (B, K, K)
    # -log P(r_(k) picked first among the remaining), Plackett-Luce
    nll_k = torch.logsumexp(pool, dim=2) - sorted_r  # (B, K)
    n_real = real.sum(dim=1, keepdim=True)  # (B, 1)
    choices = sorted_real & (pos[None, :] < n_real - 1)  # the n-1 choices, last one dropped
    per_list = masked_mean(nll_k, choices, dim=1)  # normalised by n - 1
    return _reduce(per_list, n_real.squeeze(1) >= 2, reduction, "plackett_luce_loss")


# --------------------------------------------------------------------------- pointwise


def binary_loss(scores: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy with logits: the reward is the logit of "good".

    ``-(y log sigmoid(r) + (1 - y) log sigmoid(-r))``.

    Args:
        scores: ``(N,)`` scores.
        labels: ``(N,)`` in ``[0, 1]`` (0/1 labels; soft labels are accepted).
        reduction: ``"mean"`` or ``"none"`` (``(N,)``).
    """
    if scores.shape != labels.shape or scores.dim() != 1:
        raise ValueError(
            f"binary_loss: scores and labels must both be (N,); got {tuple(scores.shape)} and {tuple(labels.shape)}."
        )
    labels = labels.to(scores.dtype)
    bad = (labels < 0) | (labels > 1) | torch.isnan(labels)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"binary_loss: labels[{i}] = {float(labels[i])} is outside [0, 1]; binary labels "
            "must be 0 (bad) or 1 (good). For real-valued targets use loss 'mse'."
        )
    per_item = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
    return _reduce(per_item, torch.ones_like(per_item, dtype=torch.bool), reduction, "binary_loss")


def mse_loss(scores: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error ``(r - target)^2`` against a scalar label.

    Args:
        scores: ``(N,)`` scores.
        targets: ``(N,)`` target scores.
        reduction: ``"mean"`` or ``"none"`` (``(N,)``).
    """
    if scores.shape != targets.shape or scores.dim() != 1:
        raise ValueError(
            f"mse_loss: scores and targets must both be (N,); got {tuple(scores.shape)} and {tuple(targets.shape)}."
        )
    per_item = (scores - targets.to(scores.dtype)) ** 2
    return _reduce(per_item, torch.ones_like(per_item, dtype=torch.bool), reduction, "mse_loss")


# --------------------------------------------------------------------------- token-level pairs


def _check_right_padded(fn: str, name: str, mask: Tensor) -> None:
    holes = (mask[:, 1:] & ~mask[:, :-1]).any(dim=1)  # a 0 followed by a 1
    if bool(holes.any()):
        p = int(holes.nonzero()[0])
        raise ValueError(
            f"{fn}: {name}[{p}] = {mask[p].int().tolist()} is not right-padded (a 0 is "
            "followed by a 1); pad sequences on the right (tokenizer.padding_side = 'right')."
        )


def token_pairwise_loss(
    chosen_token_scores: Tensor,
    rejected_token_scores: Tensor,
    chosen_input_ids: Tensor,
    rejected_input_ids: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    prompt_lengths: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Per-token Bradley-Terry loss from the point where chosen and rejected diverge.

    The variant of trlx, DeepSpeed-Chat and LLaMA-Factory, which score every token with the
    value head. For pair ``p`` with ``n_c``, ``n_r`` real tokens (prompt included):

    - the divergence index ``d`` is the first ``t >= prompt_lengths[p]`` at which the ids
      differ or one sequence has ended (``t >= min(n_c, n_r)``);
    - the loss is ``mean_{t = d}^{max(n_c, n_r) - 1} -log sigmoid(rc[t] - rr[t])``
      (Bradley-Terry per token, InstructGPT arXiv:2203.02155 eq. 1);
    - past its own end a side's reward stays at its last real token's value:
      ``rc[t] = chosen_token_scores[p, min(t, n_c - 1)]`` (same for ``rr``). Values in
      padded positions are never read, and prompt tokens never enter the loss.

    Plain loop this function vectorises::

        for p in range(P):
            n_c, n_r = int(chosen_mask[p].sum()), int(rejected_mask[p].sum())
            end = max(n_c, n_r)
            d = next(t for t in range(prompt_lengths[p], end)
                     if t >= min(n_c, n_r) or chosen_input_ids[p][t] != rejected_input_ids[p][t])
            rc = lambda t: chosen_token_scores[p][min(t, n_c - 1)]
            rr = lambda t: rejected_token_scores[p][min(t, n_r - 1)]
            loss[p] = mean(-logsigmoid(rc(t) - rr(t)) for t in range(d, end))

    Args:
        chosen_token_scores: ``(P, T)`` per-token scores of the chosen sequence.
        rejected_token_scores: ``(P, T)`` per-token scores of the rejected sequence.
        chosen_input_ids: ``(P, T)`` token ids (prompt + response), right-padded.
        rejected_input_ids: ``(P, T)`` token ids, right-padded.
        chosen_mask: ``(P, T)``, 1 = real token, right-padded.
        rejected_mask: ``(P, T)``, 1 = real token, right-padded.
        prompt_lengths: ``(P,)`` number of prompt tokens at the start of both sequences.
        reduction: ``"mean"`` (over pairs) or ``"none"`` (``(P,)``).

    Raises:
        ValueError: a mask is not right-padded, a prompt is longer than one of its
            sequences, or chosen and rejected are identical after the prompt (nothing to learn).
    """
    fn = "token_pairwise_loss"
    tensors = {
        "rejected_token_scores": rejected_token_scores,
        "chosen_input_ids": chosen_input_ids,
        "rejected_input_ids": rejected_input_ids,
        "chosen_mask": chosen_mask,
        "rejected_mask": rejected_mask,
    }
    if chosen_token_scores.dim() != 2:
        raise ValueError(f"{fn}: chosen_token_scores must be (P, T); got {tuple(chosen_token_scores.shape)}.")
    for name, t in tensors.items():
        if t.shape != chosen_token_scores.shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(t.shape)} but chosen_token_scores has "
                f"{tuple(chosen_token_scores.shape)}; pad chosen and rejected to the same length T."
            )
    if prompt_lengths.shape != chosen_token_scores.shape[:1]:
        raise ValueError(
            f"{fn}: prompt_lengths must be one count per pair, shape ({chosen_token_scores.shape[0]},); "
            f"got {tuple(prompt_lengths.shape)}."
        )
    c_real, r_real = chosen_mask.to(torch.bool), rejected_mask.to(torch.bool)
    _check_right_padded(fn, "chosen_mask", c_real)
    _check_right_padded(fn, "rejected_mask", r_real)
    n_c = c_real.sum(dim=1, keepdim=True)  # (P, 1)
    n_r = r_real.sum(dim=1, keepdim=True)  # (P, 1)
    n_min, n_max = torch.minimum(n_c, n_r), torch.maximum(n_c, n_r)
    prompt = prompt_lengths.long().unsqueeze(1)  # (P, 1)
    too_long = (prompt > n_min).squeeze(1) | (n_min.squeeze(1) < 1)
    if bool(too_long.any()):
        p = int(too_long.nonzero()[0])
        raise ValueError(
            f"{fn}: pair {p} has prompt_lengths={int(prompt[p])} but only {int(n_c[p])} chosen "
            f"and {int(n_r[p])} rejected real tokens; each sequence must hold its prompt "
            "(raise the max length or drop the pair)."
        )

    t = torch.arange(chosen_token_scores.shape[1], device=chosen_token_scores.device).unsqueeze(0)  # (1, T)
    diverged = (t >= n_min) | (chosen_input_ids != rejected_input_ids)
    candidate = (t >= prompt) & (t < n_max) & diverged  # (P, T)
    found = candidate.any(dim=1)
    if not bool(found.all()):
        p = int((~found).nonzero()[0])
        raise ValueError(
            f"{fn}: pair {p} has identical chosen and rejected responses, so no token can "
            "tell them apart; drop pairs whose two responses are equal."
        )
    d = candidate.int().argmax(dim=1, keepdim=True)  # (P, 1), first divergent index
    window = (t >= d) & (t < n_max)  # (P, T)

    def extend(token_scores: Tensor, n: Tensor, real: Tensor) -> Tensor:
        last = token_scores.gather(1, n - 1)  # (P, 1), reward at the last real token
        return torch.where(real, token_scores, last)  # (P, T)

    rc = extend(chosen_token_scores, n_c, c_real)
    rr = extend(rejected_token_scores, n_r, r_real)
    per_token = -F.logsigmoid(rc - rr)  # per-token Bradley-Terry, arXiv:2203.02155 eq. 1
    per_pair = masked_mean(per_token, window, dim=1)  # mean over the divergent span
    return _reduce(per_pair, torch.ones_like(found), reduction, fn)


# --------------------------------------------------------------------------- metrics


@torch.no_grad()
def pairwise_accuracy(scores: Tensor, ranks: Tensor, list_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Count the ordered pairs whose scores agree with the ranks.

    A pair ``(i, j)`` with ``ranks[i] < ranks[j]`` is correct when ``r_i > r_j`` strictly (an
    exact reward tie counts as wrong). Tied ranks give no pair. Counts, not a ratio, so
    batches can be summed before dividing; both are 0-d int64 tensors (no host sync).

    Args:
        scores, ranks, list_mask: ``(B, K)`` as in :func:`pairwise_loss`.

    Returns:
        ``(correct, total)``.
    """
    real = _check_lists("pairwise_accuracy", scores, list_mask, ranks)
    pairs = pair_mask(ranks, real)  # (B, K, K)
    correct = pairs & (scores.unsqueeze(2) > scores.unsqueeze(1))
    return correct.sum(), pairs.sum()


@torch.no_grad()
def list_exact_match(scores: Tensor, ranks: Tensor, list_mask: Tensor) -> Tensor:
    """Whether the scores reproduce each list's whole order.

    True when every pair with ``ranks[i] < ranks[j]`` has ``r_i > r_j`` strictly; tied
    ranks impose nothing (a tie is satisfied by any scores). A list with no pair is True.

    Args:
        scores, ranks, list_mask: ``(B, K)`` as in :func:`pairwise_loss`.

    Returns:
        ``(B,)`` bool.
    """
    real = _check_lists("list_exact_match", scores, list_mask, ranks)
    pairs = pair_mask(ranks, real)  # (B, K, K)
    wrong = pairs & ~(scores.unsqueeze(2) > scores.unsqueeze(1))
    return ~wrong.flatten(1).any(dim=1)


@torch.no_grad()
def kendall_tau(scores: Tensor, ranks: Tensor, list_mask: Tensor) -> Tensor:
    """Kendall's tau-b between each list's scores and its ranks (higher reward = better).

    ``tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2))`` over the unordered pairs of real slots:
    ``C``/``D`` concordant/discordant pairs, ``n0`` all pairs, ``n1`` pairs tied in rank,
    ``n2`` pairs tied in reward (Kendall 1945, "The treatment of ties in ranking problems").
    tau-b rather than tau-a because ties in ranks are legal; it is 1 for a perfect order.
    ``nan`` where undefined (fewer than 2 real slots, or every pair tied on one side),
    as in ``scipy.stats.kendalltau``; aggregate with ``nanmean``.

    Args:
        scores, ranks, list_mask: ``(B, K)`` as in :func:`pairwise_loss`.

    Returns:
        ``(B,)`` float, in ``[-1, 1]`` or ``nan``.
    """
    real = _check_lists("kendall_tau", scores, list_mask, ranks)
    k = scores.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(diagonal=1)
    both = upper & real.unsqueeze(2) & real.unsqueeze(1)  # (B, K, K), each unordered pair once
    rank_sign = torch.sign(ranks.unsqueeze(1) - ranks.unsqueeze(2)).to(scores.dtype)  # + if i ranked above j
    reward_sign = torch.sign(scores.unsqueeze(2) - scores.unsqueeze(1))  # + if r_i > r_j
    c_minus_d = masked_sum(rank_sign * reward_sign, both, dim=(1, 2))  # C - D
    n0 = both.sum(dim=(1, 2)).to(scores.dtype)
    n1 = (both & (rank_sign == 0)).sum(dim=(1, 2)).to(scores.dtype)
    n2 = (both & (reward_sign == 0)).sum(dim=(1, 2)).to(scores.dtype)
    denom = torch.sqrt((n0 - n1) * (n0 - n2))
    return torch.where(denom > 0, c_minus_d / denom, torch.full_like(denom, float("nan")))
