"""Generalised advantage estimation over right-padded response tokens.

Shapes: ``(M, N)`` = (prompts, response tokens). ``response_mask`` is 1 on real response
tokens (EOS included) and 0 after EOS and on padding; real tokens come first in each row.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_gae"]


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
