"""Inter-annotator agreement on rank lists: pure functions, no storage.

Two annotators agree on a pair of responses (i, j) when they order it the same way: both
prefer i, both prefer j, or both call it a tie. Over a list of K responses:

- pairwise agreement: the fraction of the C(K,2) pairs they agree on (1 = identical
  orders, 0 = every pair flipped);
- Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_a) (n0 - ties_b)), with
  n0 = C(K,2) (Kendall 1945, "The treatment of ties in ranking problems"). It is 1 for
  identical strict orders, -1 for reversed ones, and undefined (None) when one annotator
  tied every response.

Agreement with the consensus: on a set ranked by two or more annotators, each annotator's
Kendall's tau-b against the consensus ranking of the *other* annotators of that set
(leave-one-out, so nobody is compared with themself; with exactly two annotators it is their
pairwise tau). The consensus is the Borda (mean-rank) ranking of
:func:`~rlhfkit.annotate.consensus.consensus_ranks`.

Agreement weights (:func:`annotator_weights`): how much each annotator's rankings count in
training (``rlhfkit annotate export --aggregate weighted``). An annotator's weight is their
mean leave-one-out tau against the others' consensus, floored (``max(tau, floor)``): an
annotator who agrees with the others counts fully, one no better than chance or reversed
counts ``floor``. The others' consensus is itself weighted by the current weights, and the
two are iterated to a fixed point, so a reversed annotator stops dragging down the agreement
of the careful annotators who share sets with them. This estimates each annotator's
reliability jointly with the consensus, as Dawid & Skene (1979, "Maximum likelihood
estimation of observer error-rates using the EM algorithm") do with a full confusion model
and EM; here the model is one number per annotator, their Kendall tau, and the update a
fixed-point iteration rather than EM.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import combinations

from rlhfkit.annotate.consensus import consensus_ranks


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def pairwise_agreement(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> float:
    """Fraction of response pairs ordered the same way (a tie only agrees with a tie)."""
    if len(ranks_a) != len(ranks_b) or len(ranks_a) < 2:
        raise ValueError(f"need two rankings of the same K >= 2 responses, got {len(ranks_a)} and {len(ranks_b)}")
    pairs = list(combinations(range(len(ranks_a)), 2))
    same = sum(_sign(ranks_a[i] - ranks_a[j]) == _sign(ranks_b[i] - ranks_b[j]) for i, j in pairs)
    return same / len(pairs)


def kendall_tau(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> float | None:
    """Kendall's tau-b between two rankings of the same responses (None if undefined)."""
    if len(ranks_a) != len(ranks_b) or len(ranks_a) < 2:
        raise ValueError(f"need two rankings of the same K >= 2 responses, got {len(ranks_a)} and {len(ranks_b)}")
    concordant = discordant = ties_a = ties_b = 0
    for i, j in combinations(range(len(ranks_a)), 2):
        sa, sb = _sign(ranks_a[i] - ranks_a[j]), _sign(ranks_b[i] - ranks_b[j])
        ties_a += sa == 0
        ties_b += sb == 0
        concordant += sa * sb > 0
        discordant += sa * sb < 0
    n0 = len(ranks_a) * (len(ranks_a) - 1) // 2
    denominator = math.sqrt((n0 - ties_a) * (n0 - ties_b))
    return (concordant - discordant) / denominator if denominator else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _by_set(rankings: Iterable[tuple[int, str, Sequence[int]]]) -> dict[int, dict[str, Sequence[int]]]:
    by_set: dict[int, dict[str, Sequence[int]]] = defaultdict(dict)
    for set_id, annotator, ranks in rankings:
        by_set[set_id][annotator] = ranks
    return by_set


def _leave_one_out_taus(
    by_set: dict[int, dict[str, Sequence[int]]], weights: dict[str, float] | None = None
) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Per annotator: the number of shared sets they ranked, and their defined leave-one-out taus.

    On every set ranked by two or more annotators, each annotator's tau-b against the (weighted,
    when ``weights`` is given) Borda consensus of the others of that set.
    """
    sets: dict[str, int] = defaultdict(int)
    taus: dict[str, list[float]] = defaultdict(list)
    for ranked in by_set.values():
        if len(ranked) < 2:
            continue
        for annotator, ranks in ranked.items():
            names = [name for name in ranked if name != annotator]
            others = [ranked[name] for name in names]
            sets[annotator] += 1
            # tau-b (Kendall 1945) of kendall_tau above, against the Borda consensus (Borda 1781)
            consensus = consensus_ranks(others, None if weights is None else [weights[n] for n in names])
            tau = kendall_tau(ranks, consensus)
            if tau is not None:
                taus[annotator].append(tau)
    return sets, taus


def annotator_weights(
    rankings: Iterable[tuple[int, str, Sequence[int]]], floor: float = 0.1, max_rounds: int = 50
) -> dict[str, float]:
    """Each annotator's training weight from their agreement with the others, in ``[floor, 1]``.

    ``rankings`` are ``(set_id, annotator, ranks)``. Start with every weight 1; each round, an
    annotator's weight is ``max(mean tau, floor)``, the mean over the shared sets they ranked
    of their Kendall tau-b against the Borda consensus of the other annotators of the set,
    weighted by the previous round's weights. Rounds repeat until no weight moves by more than
    1e-9, or ``max_rounds`` (``max_rounds=1`` is the plain, unweighted leave-one-out agreement
    of :func:`consensus_agreement`). An annotator with no shared set, or whose taus are all
    undefined (someone tied every response), keeps weight 1: no evidence against them.

    Returns ``{annotator: weight}`` for every annotator in ``rankings``. ``ValueError`` when
    ``floor`` is not in ``(0, 1]`` or ``max_rounds < 1``.
    """
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"floor={floor!r} must be in (0, 1]: the weight of an annotator who agrees with nobody")
    if max_rounds < 1:
        raise ValueError(f"max_rounds={max_rounds!r} must be >= 1")
    by_set = _by_set(rankings)
    weights = {name: 1.0 for ranked in by_set.values() for name in ranked}
    if not weights:  # no rankings: no annotator to weigh
        return {}
    for _ in range(max_rounds):
        _, taus = _leave_one_out_taus(by_set, weights)
        # the weight of one annotator: tau in [-1, 1] -> [floor, 1]; no defined tau -> 1
        new = {name: max(_mean(taus[name]), floor) if taus.get(name) else 1.0 for name in weights}
        moved = max(abs(new[name] - weights[name]) for name in weights)
        weights = new
        if moved <= 1e-9:
            break
    return dict(sorted(weights.items()))


def consensus_agreement(rankings: Iterable[tuple[int, str, Sequence[int]]]) -> dict:
    """Each annotator's Kendall tau-b against the consensus of the other annotators.

    ``rankings`` are ``(set_id, annotator, ranks)``; sets ranked by one annotator are left
    out. Per set and annotator: ``kendall_tau(ranks, consensus_ranks(the others' ranks))``
    (leave-one-out). Returns ``{"annotators": [...], "kendall_tau": overall}``: per
    annotator (sorted by name) ``consensus_sets``, the number of shared sets they ranked,
    and ``consensus_tau``, the mean tau over those sets; ``kendall_tau`` is the mean over
    every (annotator, set). A tau that is undefined (the annotator, or the others'
    consensus, ties every response) is left out of both means; a mean over nothing is None.
    """
    sets, taus = _leave_one_out_taus(_by_set(rankings))
    return {
        "annotators": [
            {"annotator": name, "consensus_sets": sets[name], "consensus_tau": _mean(taus[name])}
            for name in sorted(sets)
        ],
        "kendall_tau": _mean([tau for values in taus.values() for tau in values]),
    }


def agreement_report(rankings: Iterable[tuple[int, str, Sequence[int]]]) -> dict:
    """Agreement between every two annotators who ranked the same generation set, and of
    each annotator with the consensus of the others.

    ``rankings`` are ``(set_id, annotator, ranks)``. Returns ``{"pairs": [...], "consensus":
    [...], "overall": {...}}``: per annotator pair the number of shared sets and the mean
    pairwise agreement and Kendall tau over them; per annotator ``consensus_sets`` and
    ``consensus_tau`` (:func:`consensus_agreement`); overall the pairwise means over every
    (set, annotator pair) and ``consensus_tau``, the mean over every (annotator, set).
    """
    rankings = list(rankings)  # read twice: pairs here, the consensus below
    by_set = _by_set(rankings)
    per_pair: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: {"agree": [], "tau": []})
    for ranked in by_set.values():
        for a, b in combinations(sorted(ranked), 2):
            entry = per_pair[(a, b)]
            entry["agree"].append(pairwise_agreement(ranked[a], ranked[b]))
            tau = kendall_tau(ranked[a], ranked[b])
            if tau is not None:
                entry["tau"].append(tau)
    pairs = [
        {
            "annotator_a": a,
            "annotator_b": b,
            "shared_sets": len(v["agree"]),
            "pairwise_agreement": _mean(v["agree"]),
            "kendall_tau": _mean(v["tau"]),
        }
        for (a, b), v in sorted(per_pair.items())
    ]
    all_agree = [x for v in per_pair.values() for x in v["agree"]]
    all_tau = [x for v in per_pair.values() for x in v["tau"]]
    consensus = consensus_agreement(rankings)
    return {
        "pairs": pairs,
        "consensus": consensus["annotators"],
        "overall": {
            "shared_sets": sum(1 for ranked in by_set.values() if len(ranked) > 1),
            "compared_pairs": len(all_agree),
            "pairwise_agreement": _mean(all_agree),
            "kendall_tau": _mean(all_tau),
            "consensus_tau": consensus["kendall_tau"],
        },
    }
