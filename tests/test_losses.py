"""Reward-model losses and ranking metrics against brute force in plain Python floats."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.losses import (
    binary_loss,
    kendall_tau,
    list_exact_match,
    listwise_loss,
    logexp_loss,
    margin_loss,
    mse_loss,
    pairwise_accuracy,
    pairwise_loss,
    plackett_luce_loss,
    token_pairwise_loss,
)

# --------------------------------------------------------------------------- brute force


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def neg_logsigmoid(x: float) -> float:
    return softplus(-x)


def real_slots(mask_row: list) -> list[int]:
    return [k for k, m in enumerate(mask_row) if m]


def bf_pairs(ranks_row: list, mask_row: list) -> list[tuple[int, int]]:
    real = real_slots(mask_row)
    return [(i, j) for i in real for j in real if ranks_row[i] < ranks_row[j]]


def bf_pairwise(scores, ranks, mask, margins=None) -> tuple[list[float], float]:
    """Per-list losses and the mean over lists that have pairs, double loop over pairs."""
    per_list, counted = [], []
    for b in range(len(scores)):
        m = 0.0 if margins is None else margins[b]
        pairs = bf_pairs(ranks[b], mask[b])
        if not pairs:
            per_list.append(0.0)
            continue
        loss = sum(neg_logsigmoid(scores[b][i] - scores[b][j] - m) for i, j in pairs) / len(pairs)
        per_list.append(loss)
        counted.append(loss)
    return per_list, (sum(counted) / len(counted) if counted else 0.0)


def bf_plackett_luce(rewards_row, ranks_row, mask_row) -> float:
    """-log of the explicit product of Plackett-Luce choice probabilities, over n - 1."""
    order = sorted(real_slots(mask_row), key=lambda k: ranks_row[k])
    r = [rewards_row[k] for k in order]
    if len(r) < 2:
        return 0.0
    prob = 1.0
    for k in range(len(r)):
        prob *= math.exp(r[k]) / sum(math.exp(x) for x in r[k:])
    return -math.log(prob) / (len(r) - 1)


def bf_kendall_tau_b(rewards_row, ranks_row, mask_row) -> float:
    real = real_slots(mask_row)
    c = d = n0 = n1 = n2 = 0
    for a in range(len(real)):
        for b in range(a + 1, len(real)):
            i, j = real[a], real[b]
            n0 += 1
            rank_s = (ranks_row[i] < ranks_row[j]) - (ranks_row[i] > ranks_row[j])  # + if i better
            rew_s = (rewards_row[i] > rewards_row[j]) - (rewards_row[i] < rewards_row[j])
            n1 += rank_s == 0
            n2 += rew_s == 0
            c += rank_s * rew_s > 0
            d += rank_s * rew_s < 0
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return (c - d) / denom if denom > 0 else float("nan")


def random_lists(seed: int, b: int = 7, k: int = 5, ties: bool = True, scale: float = 2.0):
    """Random padded lists as Python lists: scores, ranks, mask (lengths 1..k)."""
    rng = random.Random(seed)
    scores, ranks, mask = [], [], []
    for _ in range(b):
        n = rng.randint(1, k)
        row_ranks = list(range(n))
        rng.shuffle(row_ranks)
        if ties and n > 2 and rng.random() < 0.5:
            row_ranks[rng.randrange(n)] = row_ranks[rng.randrange(n)]
        scores.append([rng.gauss(0, scale) for _ in range(n)] + [rng.gauss(0, 50) for _ in range(k - n)])
        ranks.append(row_ranks + [rng.randint(-3, 3) for _ in range(k - n)])  # pad ranks: junk
        mask.append([1] * n + [0] * (k - n))
    return scores, ranks, mask


def as_tensors(scores, ranks, mask):
    return (
        torch.tensor(scores, dtype=torch.float64),
        torch.tensor(ranks, dtype=torch.long),
        torch.tensor(mask, dtype=torch.long),
    )


# --------------------------------------------------------------------------- pairwise family


def test_pairwise_hand_computed():
    r, ranks, mask = as_tensors([[1.0, 0.0, -1.0]], [[0, 1, 2]], [[1, 1, 1]])
    # pairs (0,1): d=1, (0,2): d=2, (1,2): d=1 -> (2 log(1+e^-1) + log(1+e^-2)) / 3
    expected = (2 * math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))) / 3
    assert expected == pytest.approx(0.2511504, abs=1e-7)
    assert pairwise_loss(r, ranks, mask).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_pairwise_matches_brute_force(seed):
    scores, ranks, mask = random_lists(seed)
    per_list, mean = bf_pairwise(scores, ranks, mask)
    r, rk, m = as_tensors(scores, ranks, mask)
    expected = torch.tensor(per_list, dtype=torch.float64)
    torch.testing.assert_close(pairwise_loss(r, rk, m, reduction="none"), expected)
    assert pairwise_loss(r, rk, m).item() == pytest.approx(mean, abs=1e-12)
    assert logexp_loss(r, rk, m).item() == pytest.approx(mean, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_equals_logexp_including_extremes(dtype):
    scores, ranks, mask = random_lists(11, scale=30.0)
    r, rk, m = as_tensors(scores, ranks, mask)
    r = r.to(dtype)
    r[0, :2] = torch.tensor([100.0, -100.0], dtype=dtype)
    r[1, :2] = torch.tensor([-100.0, 100.0], dtype=dtype)
    rk[0, :2] = rk[1, :2] = torch.tensor([0, 1])
    m[0, :2] = m[1, :2] = 1
    a = pairwise_loss(r, rk, m, reduction="none")
    b = logexp_loss(r, rk, m, reduction="none")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # naive log(1 + exp(200)) overflows in float32; softplus does not
    worst = logexp_loss(torch.tensor([[-100.0, 100.0]]), torch.tensor([[0, 1]]), torch.ones(1, 2))
    assert worst.item() == pytest.approx(200.0)


def test_k2_lists_reduce_to_bradley_terry():
    torch.manual_seed(0)
    r = torch.randn(8, 2, dtype=torch.float64)
    ranks = torch.tensor([[0, 1]] * 4 + [[1, 0]] * 4)
    mask = torch.ones(8, 2)
    winner = torch.where(ranks[:, 0] == 0, r[:, 0], r[:, 1])
    loser = torch.where(ranks[:, 0] == 0, r[:, 1], r[:, 0])
    bt = -F.logsigmoid(winner - loser)
    for loss in (pairwise_loss, logexp_loss, plackett_luce_loss):
        torch.testing.assert_close(loss(r, ranks, mask, reduction="none"), bt)
    choice = ranks.argmin(dim=1)
    torch.testing.assert_close(listwise_loss(r, choice, mask, reduction="none"), bt)


def test_padding_changes_nothing_and_gets_zero_gradient():
    r = torch.tensor([[2.0, 0.3, -1.0, float("nan"), float("inf")]], requires_grad=True)
    ranks = torch.tensor([[0, 1, 2, -5, 7]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    unpadded = pairwise_loss(torch.tensor([[2.0, 0.3, -1.0]]), torch.tensor([[0, 1, 2]]), torch.ones(1, 3))
    for loss_fn in (pairwise_loss, logexp_loss, plackett_luce_loss):
        r.grad = None
        loss = loss_fn(r, ranks, mask)
        loss.backward()
        assert torch.isfinite(r.grad).all(), loss_fn.__name__
        assert r.grad[0, 3:].eq(0).all(), loss_fn.__name__
        assert r.grad[0, :3].ne(0).all(), loss_fn.__name__
    assert pairwise_loss(r, ranks, mask).item() == pytest.approx(unpadded.item())
    r.grad = None
    listwise_loss(r, torch.tensor([0]), mask).backward()
    assert torch.isfinite(r.grad).all() and r.grad[0, 3:].eq(0).all()


def test_ties_give_no_pair():
    r = torch.tensor([[1.0, 0.2, -0.3]], dtype=torch.float64)
    ranks = torch.tensor([[0, 1, 1]])  # slots 1 and 2 tied: pairs (0,1), (0,2) only
    expected = (neg_logsigmoid(0.8) + neg_logsigmoid(1.3)) / 2
    assert pairwise_loss(r, ranks, torch.ones(1, 3)).item() == pytest.approx(expected, abs=1e-12)
    # moving the tied scores does not add a pair between them
    r2 = torch.tensor([[1.0, -0.3, 0.2]], dtype=torch.float64)
    assert pairwise_loss(r2, ranks, torch.ones(1, 3)).item() == pytest.approx(expected, abs=1e-12)


def test_all_tied_list_is_zero_and_excluded_from_mean():
    r = torch.tensor([[1.0, 0.0], [3.0, -2.0]])
    ranks = torch.tensor([[0, 1], [0, 0]])
    per_list = pairwise_loss(r, ranks, torch.ones(2, 2), reduction="none")
    assert per_list[1].item() == 0.0
    assert pairwise_loss(r, ranks, torch.ones(2, 2)).item() == pytest.approx(per_list[0].item())
    # a batch with no pair at all gives 0, not nan
    assert pairwise_loss(r, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2)).item() == 0.0


def test_each_list_weighted_equally():
    # a 4-list (6 pairs) and a pair: the mean is over lists, not pairs
    r = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    ranks = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    per_list = pairwise_loss(r, ranks, mask, reduction="none")
    assert pairwise_loss(r, ranks, mask).item() == pytest.approx(per_list.mean().item())


@pytest.mark.parametrize("seed", range(3))
def test_margin_matches_brute_force(seed):
    scores, ranks, mask = random_lists(seed + 100)
    margins = [random.Random(seed).uniform(0, 2) for _ in scores]
    per_list, mean = bf_pairwise(scores, ranks, mask, margins)
    r, rk, m = as_tensors(scores, ranks, mask)
    mg = torch.tensor(margins, dtype=torch.float64)
    expected = torch.tensor(per_list, dtype=torch.float64)
    torch.testing.assert_close(margin_loss(r, rk, m, mg, reduction="none"), expected)
    assert margin_loss(r, rk, m, mg).item() == pytest.approx(mean, abs=1e-12)
    assert pairwise_loss(r, rk, m, margins=mg).item() == pytest.approx(mean, abs=1e-12)
    assert logexp_loss(r, rk, m, margins=mg).item() == pytest.approx(mean, abs=1e-12)


def test_margin_hand_computed():
    r, ranks, mask = torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]]), torch.ones(1, 2)
    got = margin_loss(r, ranks, mask, torch.tensor([0.5])).item()
    assert got == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))), abs=1e-6)


def test_margin_loss_requires_margins():
    r, ranks, mask = torch.zeros(1, 2), torch.tensor([[0, 1]]), torch.ones(1, 2)
    with pytest.raises(ValueError, match=r"margin_loss: margins is None.*use loss 'pairwise'"):
        margin_loss(r, ranks, mask, None)
    with pytest.raises(ValueError, match=r"margins must be one value per list, shape \(1,\)"):
        pairwise_loss(r, ranks, mask, margins=torch.zeros(3))


# --------------------------------------------------------------------------- listwise, PL


@pytest.mark.parametrize("seed", range(3))
def test_listwise_matches_brute_force(seed):
    scores, _, mask = random_lists(seed + 200)
    rng = random.Random(seed)
    choice = [rng.choice(real_slots(m)) for m in mask]
    expected = []
    for b in range(len(scores)):
        real = real_slots(mask[b])
        z = sum(math.exp(scores[b][k]) for k in real)
        expected.append(-math.log(math.exp(scores[b][choice[b]]) / z))
    r = torch.tensor(scores, dtype=torch.float64)
    m, c = torch.tensor(mask), torch.tensor(choice)
    got = listwise_loss(r, c, m, reduction="none")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    counted = [e for e, mk in zip(expected, mask) if sum(mk) >= 2]
    assert listwise_loss(r, c, m).item() == pytest.approx(sum(counted) / len(counted), abs=1e-12)


def test_listwise_hand_computed():
    r = torch.tensor([[0.0, math.log(3.0), 5.0]])
    # choice 0 among the two real slots: -log(1 / (1 + 3)) = log 4
    got = listwise_loss(r, torch.tensor([0]), torch.tensor([[1, 1, 0]])).item()
    assert got == pytest.approx(math.log(4.0), abs=1e-6)


def test_listwise_rejects_choice_on_padding():
    msg = r"list 1 has choice=2, which is not a real slot \(real slots: \[0, 1\]\)"
    with pytest.raises(ValueError, match=msg):
        listwise_loss(torch.zeros(2, 3), torch.tensor([0, 2]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match=r"list 0 has choice=-1"):
        listwise_loss(torch.zeros(1, 3), torch.tensor([-1]), torch.ones(1, 3))


@pytest.mark.parametrize("seed", range(4))
def test_plackett_luce_matches_explicit_product(seed):
    scores, ranks, mask = random_lists(seed + 300, ties=False)
    expected = [bf_plackett_luce(*row) for row in zip(scores, ranks, mask)]
    r, rk, m = as_tensors(scores, ranks, mask)
    got = plackett_luce_loss(r, rk, m, reduction="none")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    counted = [e for e, mk in zip(expected, mask) if sum(mk) >= 2]
    assert plackett_luce_loss(r, rk, m).item() == pytest.approx(sum(counted) / len(counted), abs=1e-12)


def test_plackett_luce_hand_computed():
    # order 2 > 0 > 1 with scores (0, 0, 0): P = 1/3 * 1/2 -> log 6 over 2 choices
    r = torch.zeros(1, 3, dtype=torch.float64)
    got = plackett_luce_loss(r, torch.tensor([[1, 2, 0]]), torch.ones(1, 3)).item()
    assert got == pytest.approx(math.log(6.0) / 2, abs=1e-12)


def test_plackett_luce_rejects_ties():
    with pytest.raises(ValueError, match=r"list 1 has tied ranks \[0, 1, 1\].*strict order"):
        plackett_luce_loss(torch.zeros(2, 3), torch.tensor([[0, 1, 2], [0, 1, 1]]), torch.ones(2, 3))
    # a tie with a padded slot is not a tie
    plackett_luce_loss(torch.zeros(1, 3), torch.tensor([[0, 1, 1]]), torch.tensor([[1, 1, 0]]))


# --------------------------------------------------------------------------- pointwise


def test_binary_and_mse_match_brute_force():
    torch.manual_seed(1)
    r = torch.randn(9, dtype=torch.float64)
    y = torch.randint(0, 2, (9,)).double()
    t = torch.randn(9, dtype=torch.float64)
    bce = [
        -(yi * math.log(1 / (1 + math.exp(-ri))) + (1 - yi) * math.log(1 - 1 / (1 + math.exp(-ri))))
        for ri, yi in zip(r.tolist(), y.tolist())
    ]
    torch.testing.assert_close(binary_loss(r, y, reduction="none"), torch.tensor(bce, dtype=torch.float64))
    assert binary_loss(r, y).item() == pytest.approx(sum(bce) / 9)
    se = [(ri - ti) ** 2 for ri, ti in zip(r.tolist(), t.tolist())]
    torch.testing.assert_close(mse_loss(r, t, reduction="none"), torch.tensor(se, dtype=torch.float64))
    assert mse_loss(r, t).item() == pytest.approx(sum(se) / 9)


def test_binary_rejects_labels_outside_unit_interval():
    with pytest.raises(ValueError, match=r"binary_loss: labels\[1\] = 2.0 is outside \[0, 1\]"):
        binary_loss(torch.zeros(3), torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"mse_loss: scores and targets must both be \(N,\)"):
        mse_loss(torch.zeros(3), torch.zeros(4))


# --------------------------------------------------------------------------- token pairwise


def token_pairwise_loop(rc, rr, ids_c, ids_r, mask_c, mask_r, prompt_lengths) -> list[float]:
    """The plain loop of the docstring, in Python floats."""
    losses = []
    for p in range(len(rc)):
        n_c, n_r = sum(mask_c[p]), sum(mask_r[p])
        end = max(n_c, n_r)
        d = next(t for t in range(prompt_lengths[p], end) if t >= min(n_c, n_r) or ids_c[p][t] != ids_r[p][t])
        terms = [neg_logsigmoid(rc[p][min(t, n_c - 1)] - rr[p][min(t, n_r - 1)]) for t in range(d, end)]
        losses.append(sum(terms) / len(terms))
    return losses


def random_token_pairs(seed: int, p: int = 12, t: int = 10, vocab: int = 3):
    rng = random.Random(seed)
    out = {k: [] for k in ("rc", "rr", "ids_c", "ids_r", "mask_c", "mask_r", "prompt")}
    while len(out["rc"]) < p:
        prompt_len = rng.randint(1, 4)
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        n_c, n_r = rng.randint(prompt_len, t), rng.randint(prompt_len, t)
        resp_c = [rng.randrange(vocab) for _ in range(n_c - prompt_len)]
        if rng.random() < 0.3:  # rejected = a prefix or an extension of chosen
            resp_r = (resp_c + [rng.randrange(vocab) for _ in range(t)])[: n_r - prompt_len]
        else:
            resp_r = [rng.randrange(vocab) for _ in range(n_r - prompt_len)]
        if n_c == n_r and resp_c == resp_r:
            continue  # identical: not learnable, covered by its own test
        pad = lambda seq: seq + [rng.randrange(vocab) for _ in range(t - len(seq))]  # noqa: E731
        out["ids_c"].append(pad(prompt + resp_c))
        out["ids_r"].append(pad(prompt + resp_r))
        out["mask_c"].append([1] * n_c + [0] * (t - n_c))
        out["mask_r"].append([1] * n_r + [0] * (t - n_r))
        out["rc"].append([rng.gauss(0, 2) for _ in range(t)])
        out["rr"].append([rng.gauss(0, 2) for _ in range(t)])
        out["prompt"].append(prompt_len)
    return out


def token_tensors(d):
    return (
        torch.tensor(d["rc"], dtype=torch.float64),
        torch.tensor(d["rr"], dtype=torch.float64),
        torch.tensor(d["ids_c"]),
        torch.tensor(d["ids_r"]),
        torch.tensor(d["mask_c"]),
        torch.tensor(d["mask_r"]),
        torch.tensor(d["prompt"]),
    )


@pytest.mark.parametrize("seed", range(5))
def test_token_pairwise_vectorised_equals_loop(seed):
    d = random_token_pairs(seed)
    expected = token_pairwise_loop(d["rc"], d["rr"], d["ids_c"], d["ids_r"], d["mask_c"], d["mask_r"], d["prompt"])
    got = token_pairwise_loss(*token_tensors(d), reduction="none")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    assert token_pairwise_loss(*token_tensors(d)).item() == pytest.approx(sum(expected) / len(expected))


def test_token_pairwise_hand_computed_and_pad_values_ignored():
    # prompt [7, 8]; chosen response [1, 2, 3], rejected [1, 5]: diverge at t = 3, end = 5
    ids_c = torch.tensor([[7, 8, 1, 2, 3, 0]])
    ids_r = torch.tensor([[7, 8, 1, 5, 0, 0]])
    mask_c = torch.tensor([[1, 1, 1, 1, 1, 0]])
    mask_r = torch.tensor([[1, 1, 1, 1, 0, 0]])
    rc = torch.tensor([[9.0, 9.0, 9.0, 1.0, 2.0, 99.0]], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([[-9.0, -9.0, -9.0, 0.5, -99.0, float("nan")]], dtype=torch.float64, requires_grad=True)
    # t=3: 1.0 - 0.5; t=4: 2.0 - 0.5 (rejected held at its last real token)
    expected = (neg_logsigmoid(0.5) + neg_logsigmoid(1.5)) / 2
    loss = token_pairwise_loss(rc, rr, ids_c, ids_r, mask_c, mask_r, torch.tensor([2]))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert rc.grad[0, [0, 1, 2, 5]].eq(0).all() and rr.grad[0, [0, 1, 2, 4, 5]].eq(0).all()
    assert torch.isfinite(rr.grad).all()


def test_token_pairwise_rejects_identical_and_bad_masks():
    ids = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    ids_r = torch.tensor([[1, 2, 4, 0], [1, 2, 3, 0]])  # pair 1 identical
    r = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"pair 1 has identical chosen and rejected responses"):
        token_pairwise_loss(r, r, ids, ids_r, mask, mask, torch.tensor([1, 1]))
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    with pytest.raises(ValueError, match=r"chosen_mask\[0\] = \[0, 1, 1, 1\] is not right-padded"):
        token_pairwise_loss(r, r, ids, ids_r, left, mask, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"pair 0 has prompt_lengths=4 but only 3 chosen"):
        token_pairwise_loss(r, r, ids, ids_r, mask, mask, torch.tensor([4, 1]))


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_brute_force(seed):
    scores, ranks, mask = random_lists(seed + 400)
    rng = random.Random(seed)
    for row in scores:  # reward ties too
        if len(row) > 2 and rng.random() < 0.5:
            row[1] = row[0]
    correct = total = 0
    exact, taus = [], []
    for b in range(len(scores)):
        pairs = bf_pairs(ranks[b], mask[b])
        ok = [scores[b][i] > scores[b][j] for i, j in pairs]
        correct, total = correct + sum(ok), total + len(ok)
        exact.append(all(ok))
        taus.append(bf_kendall_tau_b(scores[b], ranks[b], mask[b]))
    r, rk, m = as_tensors(scores, ranks, mask)
    c, t = pairwise_accuracy(r, rk, m)
    assert (c.item(), t.item()) == (correct, total)
    assert list_exact_match(r, rk, m).tolist() == exact
    torch.testing.assert_close(kendall_tau(r, rk, m), torch.tensor(taus, dtype=torch.float64), equal_nan=True)


def test_metrics_hand_computed():
    r = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 0.0, 5.0]])
    ranks = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 1]])
    mask = torch.ones(3, 3)
    c, t = pairwise_accuracy(r, ranks, mask)
    assert (c.item(), t.item()) == (3 + 0 + 1, 3 + 3 + 2)
    assert list_exact_match(r, ranks, mask).tolist() == [True, False, False]
    tau = kendall_tau(r, ranks, mask)
    assert tau[0].item() == pytest.approx(1.0) and tau[1].item() == pytest.approx(-1.0)
    # list 2: C - D = 1 - 1 = 0
    assert tau[2].item() == pytest.approx(0.0)
    single = kendall_tau(torch.zeros(1, 2), torch.tensor([[0, 1]]), torch.tensor([[1, 0]]))
    assert math.isnan(single.item())


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise():
    r, ranks, mask = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"reduction='sum' is not supported; use one of mean, none"):
        pairwise_loss(r, ranks, mask, reduction="sum")
    with pytest.raises(ValueError, match=r"ranks has shape \(2, 2\) but scores has \(2, 3\)"):
        pairwise_loss(r, ranks[:, :2], mask)
    with pytest.raises(ValueError, match=r"scores must be \(B, K\) scores"):
        plackett_luce_loss(torch.zeros(3), torch.zeros(3), torch.ones(3))
