"""The consensus ranking of one generation set ranked by several annotators: a pure function.

Each ranking is ``ranks[i]``, the rank of response i (0 = best, equal ranks are ties), the
layout of :class:`~rlhfkit.data.types.PreferenceExample` and of the annotation store.

The consensus orders the responses by their mean rank across the annotators, which is the
Borda count (Borda 1781, "Mémoire sur les élections au scrutin"; a response's Borda score is
the number of rank levels below it, so a lower mean rank is a higher Borda score). Each
ranking is first made dense (``[0, 2, 2]`` -> ``[0, 1, 1]``), so two rankings that say the
same order count the same. Responses with equal means tie; the result is dense again.
Every annotator ranks the same K responses, so equal means are equal sums and the
comparison is exact integer arithmetic, with no floating-point near-ties.

The plain form, which the test checks on random rankings::

    means = [mean(dense(r)[i] for r in rankings) for i in range(K)]
    levels = sorted(set(means))
    consensus = [levels.index(m) for m in means]

With ``weights`` (one positive number per ranking) it is the weighted Borda count: the
weighted mean rank, ``sum_r w_r dense(r)[i]``, used by
:func:`~rlhfkit.annotate.agreement.annotator_weights` to let trusted annotators count more.
Those sums are floats, so they are rounded to 9 decimals before equal ones tie.
"""

from __future__ import annotations

from collections.abc import Sequence


def dense_ranks(ranks: Sequence[int]) -> tuple[int, ...]:
    """The same order with ranks 0, 1, 2, ... and no gaps (ties stay ties)."""
    levels = {value: level for level, value in enumerate(sorted(set(ranks)))}
    return tuple(levels[value] for value in ranks)


def consensus_ranks(rankings: Sequence[Sequence[int]], weights: Sequence[float] | None = None) -> tuple[int, ...]:
    """The consensus of several rankings of the same K responses (dense ranks, ties kept).

    ``rankings`` has one entry per annotator, each of length K (``ranks[i]`` = rank of
    response i, 0 = best). One ranking gives itself back, made dense. ``weights``, one per
    ranking, makes it the weighted Borda count. ``ValueError`` when there is no ranking,
    their lengths differ, or the weights do not match them.
    """
    if not rankings:
        raise ValueError("consensus_ranks needs at least one ranking")
    k = len(rankings[0])
    if any(len(r) != k for r in rankings):
        raise ValueError(f"every ranking must rank the same K responses, got lengths {[len(r) for r in rankings]}")
    dense = [dense_ranks(r) for r in rankings]
    if weights is None:
        # Borda count: the sum of ranks orders the responses as the mean does (same divisor).
        sums = [sum(r[i] for r in dense) for i in range(k)]
        return dense_ranks(sums)
    if len(weights) != len(rankings) or not all(w > 0 for w in weights):
        raise ValueError(f"need one positive weight per ranking, got {list(weights)} for {len(rankings)} rankings")
    weighted = [round(sum(w * r[i] for w, r in zip(weights, dense)), 9) for i in range(k)]
    return dense_ranks(weighted)
