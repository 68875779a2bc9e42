"""PPO math and masked ops: brute force, hand-computed values, masking invariances."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhfkit.ops import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from rlhfkit.rl.advantages import compute_gae
from rlhfkit.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rlhfkit.rl.losses import entropy_bonus, explained_variance, policy_loss, value_loss
from rlhfkit.rl.rewards import RunningMoments, compute_rewards


def right_padded_mask(lengths: list[int], n: int) -> torch.Tensor:
    return torch.tensor([[1] * k + [0] * (n - k) for k in lengths])


def garble(x: torch.Tensor, mask: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    """``x`` with every masked position replaced by ``value``."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# --------------------------------------------------------------------------- ops


def test_masked_mean_sum_and_var():
    x = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, float("inf"), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert masked_sum(x, mask).item() == 10.0
    assert masked_mean(x, mask).item() == 2.5  # per token: (1 + 2 + 3 + 4) / 4
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.0]))
    assert masked_mean(x, torch.zeros_like(mask), dim=1).tolist() == [0.0, 0.0]  # empty row -> 0
    assert masked_var(x, mask).item() == pytest.approx(torch.tensor([1.0, 2, 3, 4]).var().item())
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)
    msg = r"masked_var: got 1 real element\(s\) but unbiased=True needs at least 2"
    with pytest.raises(ValueError, match=msg):
        masked_var(x, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not broadcast to x of shape \(2, 4\)"):
        masked_mean(x, torch.ones(3))


def test_whitening_uses_real_tokens_only():
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64) * 3 + 5
    mask = right_padded_mask([7, 3, 1, 5], 7)
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert w[~mask.bool()].eq(0).all()
    torch.testing.assert_close(masked_whiten(garble(x, mask, 1e6), mask), w)
    real = x[mask.bool()]
    torch.testing.assert_close(w[mask.bool()], (real - real.mean()) / (real.var() + 1e-8).sqrt())
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(real.mean().item(), rel=1e-9)  # mean kept
    assert masked_var(kept, mask).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logprobs_and_entropy_from_logits(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 11) * 4).to(dtype)
    labels = torch.randint(0, 11, (3, 5))
    ref = torch.log_softmax(logits.double(), dim=-1)
    tol = {
        torch.float64: {},
        torch.float32: {"atol": 1e-5, "rtol": 1e-5},
        torch.bfloat16: {"atol": 1e-2, "rtol": 1e-2},
    }[dtype]
    got = logprobs_from_logits(logits, labels)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got.double(), ref.gather(-1, labels.unsqueeze(-1)).squeeze(-1), **tol)
    entropy = -(ref.exp() * ref).sum(-1)  # H = -sum p log p
    torch.testing.assert_close(entropy_from_logits(logits).double(), entropy, **tol)
    with pytest.raises(ValueError, match=r"labels must be logits.shape\[:-1\]"):
        logprobs_from_logits(logits, labels[:, :4])


def test_entropy_bonus_is_token_mean_over_real_tokens():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6)
    mask = right_padded_mask([4, 2], 4)
    h = entropy_from_logits(logits)
    expected = (h[0].sum() + h[1, :2].sum()) / 6
    assert entropy_bonus(logits, mask).item() == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------- KL


def test_kl_estimators_match_definitions():
    torch.manual_seed(0)
    logp = torch.randn(4, 6, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(4, 6, dtype=torch.float64)
    for i in range(4):
        for t in range(6):
            lr = ref[i, t].item() - logp[i, t].item()  # log(ref / policy)
            assert kl_estimate(logp, ref, "k1")[i, t].item() == pytest.approx(-lr)
            assert kl_estimate(logp, ref, "k2")[i, t].item() == pytest.approx(0.5 * lr**2)
            assert kl_estimate(logp, ref, "k3")[i, t].item() == pytest.approx(math.exp(lr) - 1 - lr)
    with pytest.raises(ValueError, match=r"estimator='k4' is not known; use one of k1, k2, k3"):
        kl_estimate(logp, ref, "k4")


def test_k2_k3_non_negative_and_estimate_kl():
    torch.manual_seed(0)
    logp = torch.randn(1000, 50) * 3
    ref = logp + torch.randn(1000, 50) * torch.logspace(-8, 1, 50)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    assert kl_estimate(logp, logp, "k3").eq(0).all()
    # all three estimate the same KL between two categoricals when tokens come from the policy
    p_logits, q_logits = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.5, 0.0])
    p, q = torch.log_softmax(p_logits, 0), torch.log_softmax(q_logits, 0)
    true_kl = (p.exp() * (p - q)).sum().item()
    tokens = torch.distributions.Categorical(logits=p_logits).sample((200_000,))
    for est in ("k1", "k3"):  # unbiased
        assert kl_estimate(p[tokens], q[tokens], est).mean().item() == pytest.approx(true_kl, abs=3e-3)


# --------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("lengths", [[5, 5], [3, 1], [1, 5], [4, 2]])
def test_score_lands_on_last_real_token(lengths):
    n = 5
    mask = right_padded_mask(lengths, n)
    scores = torch.tensor([10.0, -7.0])
    logp = torch.zeros(2, n)
    rewards, kl = compute_rewards(scores, logp, logp, mask, kl_coef=0.1)
    for i, k in enumerate(lengths):
        expected = torch.zeros(n)
        expected[k - 1] = scores[i]
        torch.testing.assert_close(rewards[i], expected)
    assert kl.eq(0).all()


def test_compute_rewards_kl_penalty_clip_and_masking():
    torch.manual_seed(0)
    mask = right_padded_mask([4, 2, 3], 4)
    logp, ref = torch.randn(3, 4), torch.randn(3, 4)
    scores = torch.tensor([5.0, -0.5, 1.0])
    rewards, kl = compute_rewards(scores, logp, ref, mask, kl_coef=0.2, estimator="k3", score_clip=2.0)
    expected_kl = torch.where(mask.bool(), kl_estimate(logp, ref, "k3"), torch.zeros(()))
    torch.testing.assert_close(kl, expected_kl)
    expected = -0.2 * expected_kl
    expected[0, 3] += 2.0  # clipped from 5
    expected[1, 1] += -0.5
    expected[2, 2] += 1.0
    torch.testing.assert_close(rewards, expected)
    # post-EOS and pad values change nothing
    again, kl2 = compute_rewards(scores, garble(logp, mask), garble(ref, mask, 3.0), mask, 0.2, "k3", 2.0)
    torch.testing.assert_close(again, rewards)
    torch.testing.assert_close(kl2, kl)
    # a mask with a hole: the score goes to the last 1, never a 0 slot
    holed = torch.tensor([[1, 0, 1, 0]])
    r, _ = compute_rewards(torch.tensor([3.0]), torch.zeros(1, 4), torch.zeros(1, 4), holed, 0.1)
    assert r.tolist() == [[0.0, 0.0, 3.0, 0.0]]


def test_compute_rewards_rejects_empty_response():
    with pytest.raises(ValueError, match=r"response_mask\[1\] has no real token"):
        mask = right_padded_mask([2, 0], 3)
        compute_rewards(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), mask, 0.1)


def test_adaptive_kl_controller_moves_toward_target_and_clips():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    assert ctl.update(current_kl=12.0, n_steps=256) > 0.1  # KL too high -> stronger penalty
    ctl = AdaptiveKLController(0.1, 6.0, 10_000)
    assert ctl.update(current_kl=3.0, n_steps=256) < 0.1
    ctl = AdaptiveKLController(0.1, 6.0, 100)
    assert ctl.update(current_kl=600.0, n_steps=100) == pytest.approx(0.1 * 1.2)  # error clipped at +0.2
    assert ctl.update(current_kl=0.0, n_steps=100) == pytest.approx(0.1 * 1.2 * 0.8)  # and at -0.2
    ctl = AdaptiveKLController(0.1, 6.0, 100)
    assert ctl.update(current_kl=6.6, n_steps=50) == pytest.approx(0.1 * (1 + 0.1 * 0.5))
    # closed loop: a policy whose KL falls as the coefficient rises settles at the target
    ctl = AdaptiveKLController(0.01, target=6.0, horizon=1000)
    for _ in range(400):
        ctl.update(current_kl=0.6 / ctl.kl_coef, n_steps=100)
    assert 0.6 / ctl.kl_coef == pytest.approx(6.0, rel=0.02)


def test_kl_controllers_state_round_trip():
    ctl = AdaptiveKLController(0.05, 4.0, 500)
    ctl.update(7.0, 64)
    resumed = AdaptiveKLController(1.0, 1.0, 1.0)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.state_dict() == ctl.state_dict()
    assert resumed.update(2.0, 64) == ctl.update(2.0, 64)
    fixed = FixedKLController(0.3)
    assert fixed.update(100.0, 10) == 0.3
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.kl_coef == 0.3
    with pytest.raises(ValueError, match=r"AdaptiveKLController.load_state_dict: expected keys.*unexpected"):
        resumed.load_state_dict({"kl_coef": 0.1, "target": 1.0, "horizon": 2.0, "extra": 1})
    with pytest.raises(ValueError, match=r"AdaptiveKLController: target=0 must be > 0"):
        AdaptiveKLController(0.1, 0, 100)


def test_running_moments_match_full_batch_and_round_trip():
    torch.manual_seed(0)
    chunks = [torch.randn(n) * 3 + 1 for n in (1, 7, 32, 2, 100)]
    rm = RunningMoments()
    assert (rm.mean, rm.std) == (0.0, 1.0)
    for c in chunks[:3]:
        rm.update(c)
    resumed = RunningMoments()
    resumed.load_state_dict(rm.state_dict())
    for c in chunks[3:]:
        rm.update(c)
        resumed.update(c)
    everything = torch.cat(chunks).double()
    assert rm.count == everything.numel()
    assert rm.mean == pytest.approx(everything.mean().item(), rel=1e-9)
    assert rm.std == pytest.approx(everything.std().item(), rel=1e-9)
    assert resumed.state_dict() == rm.state_dict()


# --------------------------------------------------------------------------- GAE


def gae_brute_force(values, rewards, mask, gamma, lam):
    """Nested loops per sequence over real tokens only, in Python floats."""
    m, n = len(values), len(values[0])
    adv = [[0.0] * n for _ in range(m)]
    for i in range(m):
        length = sum(mask[i])
        for t in range(length):
            total = 0.0
            for k in range(length - t):
                next_v = values[i][t + k + 1] if t + k + 1 < length else 0.0
                delta = rewards[i][t + k] + gamma * next_v - values[i][t + k]
                total += (gamma * lam) ** k * delta
            adv[i][t] = total
    returns = [[adv[i][t] + values[i][t] if mask[i][t] else 0.0 for t in range(n)] for i in range(m)]
    return adv, returns


@pytest.mark.parametrize("seed", range(6))
def test_gae_matches_brute_force(seed):
    rng = random.Random(seed)
    m, n = 6, 9
    lengths = [n, 1, 0] + [rng.randint(1, n) for _ in range(m - 3)]
    gamma, lam = rng.uniform(0.8, 1.0), rng.uniform(0.5, 1.0)
    values = [[rng.gauss(0, 1) for _ in range(n)] for _ in range(m)]
    rewards = [[rng.gauss(0, 1) for _ in range(n)] for _ in range(m)]
    mask = right_padded_mask(lengths, n)
    adv_bf, ret_bf = gae_brute_force(values, rewards, mask.tolist(), gamma, lam)
    v, r = torch.tensor(values, dtype=torch.float64), torch.tensor(rewards, dtype=torch.float64)
    adv, ret = compute_gae(v, r, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(adv_bf, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor(ret_bf, dtype=torch.float64))
    # post-EOS / pad values and rewards change nothing, even nan
    adv2, ret2 = compute_gae(garble(v, mask), garble(r, mask), mask, gamma, lam)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_gae_hand_computed():
    # one sequence of 2 real tokens, gamma = lam = 1: A_1 = r_1 - V_1, A_0 = r_0 + r_1 - V_0
    v = torch.tensor([[0.5, 2.0, 9.0]])
    r = torch.tensor([[1.0, 3.0, 9.0]])
    adv, ret = compute_gae(v, r, torch.tensor([[1, 1, 0]]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[3.5, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[4.0, 3.0, 0.0]]))


def test_gae_rejects_masks_that_are_not_right_padded():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    msg = r"response_mask\[1\] = \[0, 1, 1\] has a 0 followed by a 1.*right-padded"
    with pytest.raises(ValueError, match=msg):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 3), mask, 1.0, 0.95)


# --------------------------------------------------------------------------- PPO losses


def test_policy_loss_hand_computed():
    # ratios 1.5, 0.5, 1.0 and one pad; eps = 0.2
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0, 50.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0, -50.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # max(-A r, -A clip(r)): -1.2 (clipped), 0.8 (clipped), -2 (unclipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.0)]  # KL(old || new), k3
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 3, abs=1e-6)
    loss.backward()
    # clipped tokens and the pad get no gradient; token 2: d(-A r)/dlogp / 3 = -2/3
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2 / 3, 0.0]]))


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 2.0, 0.0, 7.0]], requires_grad=True)
    old = torch.tensor([[0.0, 2.0, 0.0, float("inf")]])
    returns = torch.tensor([[0.9, 3.0, 1.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: (1 - 0.9)^2 = 0.01 vs (0.2 - 0.9)^2 = 0.49 -> clipped term wins
    assert loss.item() == pytest.approx(0.5 * (0.49 + 1.0 + 1.0) / 3)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert torch.isfinite(values.grad).all() and values.grad[0, 0] == 0 and values.grad[0, 3] == 0
    unclipped, stats = value_loss(values, old, returns, mask, clip_range=None)
    assert unclipped.item() == pytest.approx(0.5 * (0.01 + 1.0 + 1.0) / 3)
    assert stats["vf_clipfrac"].item() == 0.0


def test_ppo_losses_ignore_padding():
    torch.manual_seed(0)
    mask = right_padded_mask([6, 2, 4], 6)
    logp, old, adv = torch.randn(3, 6) * 0.3, torch.randn(3, 6) * 0.3, torch.randn(3, 6)
    values, old_values, returns = torch.randn(3, 6), torch.randn(3, 6), torch.randn(3, 6)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2)
    loss2, stats2 = policy_loss(garble(logp, mask, 1e4), garble(old, mask), garble(adv, mask), mask, 0.2)
    torch.testing.assert_close((loss2, stats2), (loss, stats))
    vl, vs = value_loss(values, old_values, returns, mask, 0.2)
    garbled = garble(values, mask), garble(old_values, mask, 9.0), garble(returns, mask)
    vl2, vs2 = value_loss(*garbled, mask, 0.2)
    torch.testing.assert_close((vl2, vs2), (vl, vs))
    ev = explained_variance(values, returns, mask)
    torch.testing.assert_close(explained_variance(garble(values, mask), garble(returns, mask), mask), ev)


def test_explained_variance():
    torch.manual_seed(0)
    mask = right_padded_mask([5, 3], 5)
    returns = torch.randn(2, 5, dtype=torch.float64)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    values = returns + 0.5 * torch.randn(2, 5, dtype=torch.float64)
    real = mask.bool()
    expected = 1 - (returns - values)[real].var() / returns[real].var()
    assert explained_variance(values, returns, mask).item() == pytest.approx(expected.item())
    assert math.isnan(explained_variance(values, torch.ones(2, 5), mask).item())


def test_tempered_logits_make_no_copy_at_temperature_one():
    from rlhfkit.ops import tempered

    logits = torch.randn(2, 3, 5, requires_grad=True)
    assert tempered(logits, 1.0) is logits  # the same values as logits / 1, without the (B, T, V) copy
    assert torch.equal(logits / 1.0, logits)
    torch.testing.assert_close(tempered(logits, 0.7), logits / 0.7, rtol=0, atol=0)
