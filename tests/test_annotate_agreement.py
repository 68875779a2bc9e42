"""Agreement metrics against brute force and known values."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from rlhfkit.annotate.agreement import agreement_report, consensus_agreement, kendall_tau, pairwise_agreement


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


# ------------------------------------------------------------------ agreement with the consensus

# Three annotators on two sets, ties included. Each annotator is compared with the consensus of
# the two others: their ranks made dense, summed per response (Borda: the sum orders as the mean
# does), the sums made dense again. tau-b = (C - D) / sqrt((n0 - ties_a) (n0 - ties_b)).
HAND_RANKINGS = [
    (1, "alice", (0, 1, 2)),
    (1, "bob", (0, 2, 1)),
    (1, "carol", (0, 0, 1)),  # carol ties responses 0 and 1
    (2, "alice", (0, 1, 2, 3)),
    (2, "bob", (0, 0, 1, 2)),  # bob ties responses 0 and 1
    (2, "carol", (1, 0, 3, 2)),
]
# Set 1 (K=3, n0=3):
#  alice vs bob+carol: sums (0+0, 2+0, 1+1) = (0, 2, 2) -> (0, 1, 1). Pairs of (alice | consensus):
#    (0,1) C, (0,2) C, (1,2) tied in the consensus. tau = 2 / sqrt(3 * 2)
#  bob vs alice+carol: sums (0+0, 1+0, 2+1) = (0, 1, 3) -> (0, 1, 2).
#    (0,1) C, (0,2) C, (1,2) D (bob puts 2 above 1). tau = (2 - 1) / sqrt(3 * 3) = 1/3
#  carol vs alice+bob: sums (0+0, 1+2, 2+1) = (0, 3, 3) -> (0, 1, 1).
#    (0,1) tied by carol, (0,2) C, (1,2) tied in the consensus. tau = 1 / sqrt(2 * 2) = 1/2
# Set 2 (K=4, n0=6):
#  alice vs bob+carol: sums (0+1, 0+0, 1+3, 2+2) = (1, 0, 4, 4) -> (1, 0, 2, 2).
#    (0,1) D, (0,2) C, (0,3) C, (1,2) C, (1,3) C, (2,3) tied in the consensus.
#    tau = (4 - 1) / sqrt(6 * 5) = 3 / sqrt(30)
#  bob vs alice+carol: sums (0+1, 1+0, 2+3, 3+2) = (1, 1, 5, 5) -> (0, 0, 1, 1).
#    (0,1) tied by both, (0,2) C, (0,3) C, (1,2) C, (1,3) C, (2,3) tied in the consensus.
#    tau = 4 / sqrt((6 - 1) * (6 - 2)) = 4 / sqrt(20)
#  carol vs alice+bob: sums (0+0, 1+0, 2+1, 3+2) = (0, 1, 3, 5) -> (0, 1, 2, 3).
#    (0,1) D (carol puts 1 first), (0,2) C, (0,3) C, (1,2) C, (1,3) C, (2,3) D.
#    tau = (4 - 2) / 6 = 1/3
HAND_TAUS = {
    "alice": [2 / math.sqrt(6), 3 / math.sqrt(30)],
    "bob": [1 / 3, 4 / math.sqrt(20)],
    "carol": [1 / 2, 1 / 3],
}


def test_consensus_tau_by_hand():
    result = consensus_agreement(HAND_RANKINGS)
    rows = {row["annotator"]: row for row in result["annotators"]}
    assert list(rows) == ["alice", "bob", "carol"]
    for name, taus in HAND_TAUS.items():
        assert rows[name]["consensus_sets"] == 2
        assert rows[name]["consensus_tau"] == pytest.approx(sum(taus) / 2)
    assert rows["carol"]["consensus_tau"] == pytest.approx(5 / 12)
    every = [tau for taus in HAND_TAUS.values() for tau in taus]
    assert result["kendall_tau"] == pytest.approx(sum(every) / 6)
    # agreement_report carries the same numbers beside the pairwise ones
    report = agreement_report(HAND_RANKINGS)
    assert report["consensus"] == result["annotators"]
    assert report["overall"]["consensus_tau"] == pytest.approx(result["kendall_tau"])
    assert len(report["pairs"]) == 3


@pytest.mark.parametrize("seed", range(3))
def test_with_two_annotators_the_consensus_tau_is_the_pairwise_tau(seed):
    rng = random.Random(seed)
    for set_id in range(50):
        k = rng.randint(2, 6)
        a = [rng.randint(0, k - 1) for _ in range(k)]
        b = [rng.randint(0, k - 1) for _ in range(k)]
        rows = consensus_agreement([(set_id, "a", a), (set_id, "b", b)])["annotators"]
        tau = kendall_tau(a, b)
        assert [r["consensus_sets"] for r in rows] == [1, 1]
        for row in rows:
            assert (row["consensus_tau"] is None and tau is None) or row["consensus_tau"] == pytest.approx(tau)


def test_consensus_leaves_out_lone_sets_and_undefined_taus():
    rankings = [
        # alice and carol are exactly reversed, so bob's consensus ties every response: bob's
        # tau on set 1 is undefined and left out of his mean (the set still counts as shared).
        (1, "alice", (0, 1, 2)),
        (1, "bob", (0, 1, 2)),
        (1, "carol", (2, 1, 0)),
        (2, "bob", (0, 2, 1)),
        (2, "dave", (0, 2, 1)),
        (3, "erin", (0, 1, 2)),  # ranked by one annotator: not compared
    ]
    rows = {row["annotator"]: row for row in consensus_agreement(rankings)["annotators"]}
    assert set(rows) == {"alice", "bob", "carol", "dave"}
    assert (rows["bob"]["consensus_sets"], rows["bob"]["consensus_tau"]) == (2, 1.0)  # set 2 only
    # alice vs bob+carol: sums (2, 2, 2): all tied, undefined too; her only set -> None
    assert (rows["alice"]["consensus_sets"], rows["alice"]["consensus_tau"]) == (1, None)
    # carol vs alice+bob: sums (0, 2, 4) -> (0, 1, 2), her exact reverse
    assert rows["carol"]["consensus_tau"] == -1.0 and rows["dave"]["consensus_tau"] == 1.0
    assert consensus_agreement([]) == {"annotators": [], "kendall_tau": None}
