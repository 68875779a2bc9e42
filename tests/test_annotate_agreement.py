"""Agreement metrics against brute force and known values."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from rlhfkit.annotate.agreement import agreement_report, kendall_tau, pairwise_agreement


def tau_b_matrix(a, b):
    """Kendall's tau-b as the cosine of the two sign matrices sign(a_i - a_j), sign(b_i - b_j)."""
    sa = np.sign(np.subtract.outer(a, a))  # (K, K)
    sb = np.sign(np.subtract.outer(b, b))
    denominator = math.sqrt((sa * sa).sum() * (sb * sb).sum())
    return None if denominator == 0 else float((sa * sb).sum() / denominator)


def agreement_matrix(a, b):
    sa, sb = np.sign(np.subtract.outer(a, a)), np.sign(np.subtract.outer(b, b))
    upper = np.triu_indices(len(a), k=1)
    return float((sa[upper] == sb[upper]).mean())


def test_known_values():
    assert kendall_tau([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert kendall_tau([0, 1, 2, 3], [3, 2, 1, 0]) == -1.0
    assert kendall_tau([0, 1, 2], [0, 2, 1]) == pytest.approx(1 / 3)
    assert pairwise_agreement([0, 1, 2, 3], [3, 2, 1, 0]) == 0.0
    assert pairwise_agreement([0, 1, 2], [0, 2, 1]) == pytest.approx(2 / 3)
    # Ties: a tie agrees only with a tie; tau-b's denominator drops tied pairs.
    assert pairwise_agreement([0, 0, 1], [0, 0, 1]) == 1.0
    assert pairwise_agreement([0, 0, 1], [0, 1, 2]) == pytest.approx(2 / 3)
    assert kendall_tau([0, 0, 1], [0, 1, 2]) == pytest.approx(2 / math.sqrt(2 * 3))
    assert kendall_tau([0, 0, 0], [0, 1, 2]) is None


@pytest.mark.parametrize("seed", range(5))
def test_loops_match_the_sign_matrix_formulas(seed):
    rng = random.Random(seed)
    for _ in range(200):
        k = rng.randint(2, 7)
        a = [rng.randint(0, k - 1) for _ in range(k)]  # with ties
        b = [rng.randint(0, k - 1) for _ in range(k)]
        assert pairwise_agreement(a, b) == pytest.approx(agreement_matrix(a, b))
        expected = tau_b_matrix(a, b)
        got = kendall_tau(a, b)
        assert (got is None and expected is None) or got == pytest.approx(expected)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="same K >= 2"):
        kendall_tau([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="same K >= 2"):
        pairwise_agreement([0], [0])


def test_report_groups_by_set_and_annotator_pair():
    rankings = [
        (1, "alice", (0, 1, 2)),
        (1, "bob", (0, 2, 1)),
        (1, "carol", (2, 1, 0)),
        (2, "alice", (0, 1, 2)),
        (2, "bob", (0, 1, 2)),
    ]
    report = agreement_report(rankings)
    pairs = {(p["annotator_a"], p["annotator_b"]): p for p in report["pairs"]}
    assert set(pairs) == {("alice", "bob"), ("alice", "carol"), ("bob", "carol")}
    assert pairs[("alice", "bob")]["shared_sets"] == 2
    assert pairs[("alice", "bob")]["kendall_tau"] == pytest.approx((1 / 3 + 1) / 2)
    assert pairs[("alice", "carol")]["kendall_tau"] == -1.0
    assert report["overall"]["shared_sets"] == 2 and report["overall"]["compared_pairs"] == 4
    assert agreement_report([])["overall"]["pairwise_agreement"] is None
