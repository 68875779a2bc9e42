"""The reward model's uncertainty from an ensemble of linear heads, and which candidates to ask about.

An ensemble of E heads on one frozen backbone (fit by
:func:`rlhfkit.models.probe_fit.bootstrap_probes`) gives E scores per text. Where the heads
agree on the order of two responses, a person's ranking of them teaches the reward model
little; where they disagree, it teaches the most. The disagreement on a pair is BALD's mutual
information between the pair's order and the head (Houlsby, Huszar, Ghahramani & Lengyel 2011,
"Bayesian Active Learning for Classification and Preference Learning", arXiv:1112.5745, eq. 3),
with the ensemble standing in for the posterior (Lakshminarayanan et al. 2017; for reward models
Coste et al. 2023, arXiv:2310.02743):

    p_e = sigmoid(s_e,i - s_e,j)                        (Bradley-Terry, one head)
    I_ij = H(mean_e p_e) - mean_e H(p_e)                 (nats; H the binary entropy)

Unlike the total uncertainty p(1 - p) of the mean, it is 0 where every head is unsure in the
same way (two near-identical responses: a coin flip nobody can settle) and large where the heads
are sure of opposite orders. All functions are pure; shapes are in the docstrings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "ensemble_scores",
    "pair_disagreement",
    "text_distance",
    "select_candidates",
    "set_uncertainty",
]


def ensemble_scores(features: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Each head's score of each text: features (N, D), heads (E, D) -> (E, N), float64.

    Bias-free: pairwise (Bradley-Terry) heads do not see a bias, and only differences matter.
    """
    return heads.double() @ features.double().T  # (E, N)


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-12, 1 - 1e-12)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def pair_disagreement(scores: torch.Tensor) -> torch.Tensor:
    """BALD mutual information of the order of every pair of M candidates: scores (E, M) -> (M, M).

    Symmetric, 0 on the diagonal, in [0, log 2] nats. The plain loop it vectorises::

        for i in range(M):
            for j in range(M):
                p = sigmoid(scores[:, i] - scores[:, j])            # (E,)
                out[i, j] = H(p.mean()) - H(p).mean()
    """
    s = scores.double()
    p = torch.sigmoid(s[:, :, None] - s[:, None, :])  # (E, M, M): head e's P(i above j)
    info = _binary_entropy(p.mean(0)) - _binary_entropy(p).mean(0)  # (M, M)
    info = info.clamp(min=0.0).triu(1)  # Jensen: >= 0; clamp the rounding
    return info + info.T  # exactly symmetric (sigmoid(x) and 1 - sigmoid(-x) round apart)


def text_distance(a: str, b: str) -> float:
    """1 - Jaccard similarity of the two texts' lower-cased word sets: 0 for the same words, 1 for none shared.

    A cheap near-duplicate test (Broder 1997, resemblance of documents): responses that differ in
    a word or two of twenty are within 0.1 of each other.
    """
    x, y = set(a.lower().split()), set(b.lower().split())
    if not x and not y:
        return 0.0
    return 1.0 - len(x & y) / len(x | y)


def select_candidates(
    scores: torch.Tensor, k: int, texts: Sequence[str] | None = None, min_distance: float = 0.0
) -> list[int]:
    """The K of M candidates whose ranking the ensemble disputes most: scores (E, M) -> K indices.

    Greedy on the summed pairwise disagreement (:func:`pair_disagreement`) among the chosen: start
    from the most disputed pair, then add the candidate with the largest summed disagreement with
    those already chosen (ties: the lower index). With ``texts``, a candidate within
    ``min_distance`` (:func:`text_distance`) of a chosen one is a near-duplicate and skipped while
    others remain; if fewer than K are far enough apart, the nearest-duplicates fill the rest by
    the same rule, so K are always returned. Returned in the order chosen.
    """
    m = scores.shape[1]
    if not 2 <= k <= m:
        raise ValueError(f"k must be in [2, M={m}], got {k}")
    if texts is not None and len(texts) != m:
        raise ValueError(f"got {len(texts)} texts for {m} candidates")
    info = pair_disagreement(scores)  # (M, M)

    def far_enough(i: int, chosen: list[int]) -> bool:
        return texts is None or all(text_distance(texts[i], texts[c]) >= min_distance for c in chosen)

    chosen: list[int] = []
    while len(chosen) < k:
        rest = [i for i in range(m) if i not in chosen]
        allowed = [i for i in rest if far_enough(i, chosen)] or rest
        if not chosen:  # the most disputed pair that is not a near-duplicate pair
            pairs = [(i, j) for i in allowed for j in allowed if i < j and far_enough(j, [i])]
            if pairs:
                best = max(pairs, key=lambda ij: (float(info[ij]), -ij[0], -ij[1]))
                chosen.extend(best)
                continue
        gains = {i: float(info[i, chosen].sum()) for i in allowed}
        chosen.append(max(allowed, key=lambda i: (gains[i], -i)))
    return chosen[:k]


def set_uncertainty(scores: torch.Tensor) -> float:
    """How much the ensemble disputes one set's order: the mean BALD information over its pairs.

    scores (E, K) of the K responses shown; in [0, log 2] nats. Orders the sets the app serves.
    """
    k = scores.shape[1]
    info = pair_disagreement(scores)  # (K, K)
    return float(info.sum() / (k * (k - 1))) if k > 1 else 0.0
