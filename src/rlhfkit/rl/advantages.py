"""Generalised advantage estimation over right-padded response tokens.

Shapes: ``(M, N)`` = (prompts, response tokens). ``response_mask`` is 1 on real response
tokens (EOS included) and 0 after EOS and on padding; real tokens come first in each row.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "compute_gae",
    "rloo_advantages",
    "grpo_advantages",
    "equal_score_groups",
    "discounted_returns",
    "broadcast_to_tokens",
]


def _check_right_padded(response_mask: Tensor, fn: str) -> None:
    """Raise if a row of ``response_mask (M, N)`` has a 0 followed by a 1."""
    real = response_mask.to(torch.bool)
    holes = (real[:, 1:] & ~real[:, :-1]).any(dim=1)
    if bool(holes.any()):
        i = int(holes.nonzero()[0])
        raise ValueError(
            f"{fn}: response_mask[{i}] = {real[i].int().tolist()} has a 0 followed by a 1; "
            "response masks must be right-padded (real tokens first, then zeros). "
            "Mask left padding out of the response before calling."
        )


def compute_gae(
    values: Tensor,
    rewards: Tensor,
    response_mask: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns (Schulman et al. 2016, arXiv:1506.02438, sec. 3).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = sum_l (gamma * lam)^l delta_{t+l}``,
    where the episode ends after the last real token of each row (``V = 0`` beyond it).
    Values and rewards on masked positions are ignored; advantages and returns there are 0.
    ``returns = advantages + values`` on real tokens.

    The backward loop runs over ``N`` and is vectorised over ``M``. Plain loop it replaces::

        for i in range(M):
            n = int(response_mask[i].sum())
            for t in range(n):
                adv[i][t] = 0.0
                for l in range(n - t):
                    next_v = values[i][t + l + 1] if t + l + 1 < n else 0.0
                    delta = rewards[i][t + l] + gamma * next_v - values[i][t + l]
                    adv[i][t] += (gamma * lam) ** l * delta

    Args:
        values: ``(M, N)`` value estimates ``V(s_t)`` of the rollout.
        rewards: ``(M, N)`` per-token rewards (see :func:`rlhfkit.rl.rewards.compute_rewards`).
        response_mask: ``(M, N)``, 1 = real response token, right-padded.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``advantages (M, N)`` and ``returns (M, N)``.

    Raises:
        ValueError: shapes differ, or a row of ``response_mask`` is not right-padded.
    """
    if values.shape != rewards.shape or values.shape != response_mask.shape or values.dim() != 2:
        raise ValueError(
            f"compute_gae: values {tuple(values.shape)}, rewards {tuple(rewards.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must all be (M, N)."
        )
    _check_right_padded(response_mask, "compute_gae")
    real = response_mask.to(torch.bool)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # Zero the masked positions so garbage there (even nan) cannot leak in through 0 * x.
    values = torch.where(real, values, zero)
    rewards = torch.where(real, rewards.to(values.dtype), zero)
    cont = real.to(values.dtype)  # 1 while the episode goes on

    n = values.shape[1]
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(values[:, 0])  # (M,)
    for t in reversed(range(n)):
        # masked values are 0, so V_{t+1} after the last real token is 0: the episode ends
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD residual, arXiv:1506.02438 sec. 3
        next_cont = cont[:, t + 1] if t + 1 < n else torch.zeros_like(last_gae)
        # A_t = delta_t + gamma * lam * A_{t+1}, arXiv:1506.02438 sec. 3
        last_gae = delta + gamma * lam * next_cont * last_gae
        advantages[:, t] = last_gae * cont[:, t]
    returns = torch.where(real, advantages + values, zero)
    return advantages, returns


# --------------------------------------------------------------------------- critic-free
# Rows are prompt-major: the K samples of prompt g are rows g*K .. g*K + K - 1.


def _groups(scores: Tensor, k: int, fn: str) -> Tensor:
    if scores.dim() != 1 or k < 1 or scores.numel() % k:
        raise ValueError(
            f"{fn}: scores must be (M,) with M a multiple of the group size K={k}; got {tuple(scores.shape)}"
        )
    return scores.view(-1, k)  # (G, K)


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out: each sample's score minus the mean score of the other K - 1
    samples of its prompt (Ahmadian et al. 2024, arXiv:2402.14740, eq. 5; Kool et al. 2019).

    Plain loop::

        for g in range(G):
            for i in range(K):
                others = [scores[g * K + j] for j in range(K) if j != i]
                adv[g * K + i] = scores[g * K + i] - sum(others) / (K - 1)

    Args:
        scores: ``(M,)`` sequence-level rewards, ``M = G * K``, prompt-major.
        k: the group size ``K >= 2``.

    Returns:
        ``(M,)`` advantages.
    """
    if k < 2:
        raise ValueError("rloo_advantages: a leave-one-out baseline needs K >= 2 samples per prompt")
    grouped = _groups(scores, k, "rloo_advantages")  # (G, K)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # mean of the other K-1
    return (grouped - baseline).flatten()


def grpo_advantages(scores: Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages: ``(r - mean_group) / (std_group + eps)`` (Shao et al. 2024,
    arXiv:2402.03300, sec. 4.1.2, outcome supervision); ``scale=False`` drops the division, the
    unbiased variant of Dr. GRPO (Liu et al. 2025, arXiv:2503.20783, sec. 3.1).

    ``std`` is the sample standard deviation (``K - 1`` in the denominator), as TRL's
    ``GRPOTrainer``. A group whose K scores are equal gets advantage 0: no learning signal.

    Plain loop::

        for g in range(G):
            group = scores[g * K:(g + 1) * K]
            mean = sum(group) / K
            std = (sum((x - mean) ** 2 for x in group) / (K - 1)) ** 0.5
            for i in range(K):
                adv[g * K + i] = (group[i] - mean) / (std + eps) if scale else group[i] - mean
    """
    if k < 2:
        raise ValueError("grpo_advantages: a group baseline needs K >= 2 samples per prompt")
    grouped = _groups(scores, k, "grpo_advantages")  # (G, K)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def equal_score_groups(scores: Tensor, k: int) -> Tensor:
    """``(G,)`` bool: the groups whose K scores are all equal (no learning signal for GRPO/RLOO)."""
    grouped = _groups(scores, k, "equal_score_groups")
    return (grouped == grouped[:, :1]).all(dim=1)


def discounted_returns(rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """``G_t = sum_{l >= 0} gamma^l r_{t+l}`` over real tokens of each row (0 after the last).

    The REINFORCE return with per-token rewards (REINFORCE++, Hu 2025, arXiv:2501.03262,
    eq. 4-5: the score at the last token and ``-beta * KL`` at every token). Plain loop::

        for i in range(M):
            n = int(response_mask[i].sum())
            for t in range(n):
                returns[i][t] = sum(gamma ** l * rewards[i][t + l] for l in range(n - t))
    """
    _check_right_padded(response_mask, "discounted_returns")
    real = response_mask.to(torch.bool)
    rewards = torch.where(real, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (M,)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return torch.where(real, returns, torch.zeros_like(returns))


def broadcast_to_tokens(sequence_values: Tensor, response_mask: Tensor) -> Tensor:
    """``(M,)`` per-sequence values -> ``(M, N)`` on every real token (0 elsewhere)."""
    return sequence_values.unsqueeze(1).to(torch.float32) * response_mask.to(torch.float32)
