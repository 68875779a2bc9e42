"""PPO objectives: clipped policy and value losses, entropy, explained variance.

Shapes: ``(M, N)`` = (prompts or minibatch rows, response tokens). ``response_mask`` is 1
on real response tokens. Every loss is a per-token mean over the real tokens of the batch
(``masked_mean`` with no ``dim``). Stats are detached 0-d tensors: call ``.item()`` only
when logging, since it syncs with the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhfkit.ops import entropy_from_logits, masked_mean, masked_var
from rlhfkit.rl.kl import kl_estimate

__all__ = ["aggregate", "policy_loss", "kl_loss", "value_loss", "entropy_bonus", "explained_variance"]


def _check_same(fn: str, **tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{fn}: tensors must share one (M, N) shape; got {shapes}.")


def aggregate(per_token: Tensor, response_mask: Tensor, aggregation: str = "token") -> Tensor:
    """Reduce ``(M, N)`` per-token losses to a scalar: ``token``, the mean over every real
    token (PPO; Dr. GRPO, arXiv:2503.20783, sec. 3.1), or ``sequence``, the mean over
    sequences of each sequence's token mean (GRPO, arXiv:2402.03300, eq. 3). A row with no real
    token (``--mask-truncated`` zeroes whole rows) counts in neither mean; with none at all the
    loss is 0."""
    real = response_mask.to(torch.bool)
    if aggregation == "token":
        return masked_mean(per_token, real)
    if aggregation == "sequence":
        return masked_mean(masked_mean(per_token, real, dim=1), real.any(dim=1))  # over the non-empty rows
    raise ValueError(f"aggregate: aggregation={aggregation!r}; use 'token' or 'sequence'")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_eps: float,
    aggregation: str = "token",
    clip_eps_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss, masked mean over real tokens (``aggregation``: :func:`aggregate`).

    ``ratio = exp(logprobs - old_logprobs)``;
    ``loss = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps_low, 1 + eps_high))``
    (Schulman et al. 2017, arXiv:1707.06347, eq. 7, negated to be minimised; the decoupled
    ``eps_low``/``eps_high`` are DAPO's clip-higher, Yu et al. 2025, arXiv:2503.14476, eq. 10).

    Args:
        logprobs: ``(M, N)`` log-probs under the current policy (with grad).
        old_logprobs: ``(M, N)`` log-probs under the rollout policy.
        advantages: ``(M, N)`` advantages, usually whitened.
        response_mask: ``(M, N)``, 1 = real response token.
        clip_eps: clip range ``eps`` of the ratio (``eps_low``, and ``eps_high`` too unless given).
        clip_eps_high: upper clip range ``eps_high``; ``None`` = ``clip_eps`` (symmetric PPO).

    Returns:
        ``loss`` (scalar) and stats: ``clipfrac`` (fraction of real tokens where the clipped
        term is the active one) and ``approx_kl`` (k3 estimate of ``KL(old || new)``,
        http://joschu.net/blog/kl-approx.html), both detached.
    """
    _check_same(
        "policy_loss", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, response_mask=response_mask
    )
    real = response_mask.to(torch.bool)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Zero the log-ratio on masked positions first: exp of garbage there could be inf and
    # turn the (masked) gradient into nan.
    log_ratio = torch.where(real, logprobs - old_logprobs, zero)  # (M, N)
    advantages = torch.where(real, advantages, zero)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)  # arXiv:2503.14476 eq. 10
    loss = aggregate(torch.maximum(unclipped, clipped), real, aggregation)  # arXiv:1707.06347 eq. 7, per token
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), real)
        # samples come from the old policy: KL(old || new) with log(new/old) = log_ratio
        approx_kl = masked_mean(kl_estimate(old_logprobs.detach(), logprobs.detach(), "k3"), real)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor, aggregation: str = "token") -> Tensor:
    """The k3 estimate of ``KL(policy || ref)`` as a loss term (GRPO, arXiv:2402.03300, eq. 4:
    ``pi_ref / pi - log(pi_ref / pi) - 1`` per token), reduced like the policy loss.

    Args:
        logprobs: ``(M, N)`` current log-probs (with grad); ref_logprobs ``(M, N)``.
    """
    _check_same("kl_loss", logprobs=logprobs, ref_logprobs=ref_logprobs, response_mask=response_mask)
    real = response_mask.to(torch.bool)
    k3 = kl_estimate(logprobs, ref_logprobs, "k3")  # http://joschu.net/blog/kl-approx.html
    return aggregate(torch.where(real, k3, torch.zeros((), dtype=k3.dtype, device=k3.device)), real, aggregation)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    clip_range: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, token-level masked mean.

    ``v_clip = old_values + clip(values - old_values, -c, c)``;
    ``loss = 0.5 * mean_t max((values - R)^2, (v_clip - R)^2)`` (the value clipping of the
    PPO reference implementation, openai/baselines ppo2; see Engstrom et al. 2020,
    arXiv:2005.12729, sec. 3). ``clip_range=None`` gives the plain ``0.5 * (values - R)^2``.

    Args:
        values: ``(M, N)`` current value predictions (with grad).
        old_values: ``(M, N)`` value predictions of the rollout.
        returns: ``(M, N)`` targets from :func:`rlhfkit.rl.advantages.compute_gae`.
        response_mask: ``(M, N)``, 1 = real response token.
        clip_range: ``c``; ``None`` disables clipping.

    Returns:
        ``loss`` (scalar) and stats: ``vf_clipfrac`` (fraction of real tokens where the
        clipped error is the larger one), detached.
    """
    _check_same("value_loss", values=values, old_values=old_values, returns=returns, response_mask=response_mask)
    real = response_mask.to(torch.bool)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(real, values, zero)
    old_values = torch.where(real, old_values, zero)
    returns = torch.where(real, returns, zero)
    unclipped = (values - returns) ** 2
    if clip_range is None:
        loss = 0.5 * masked_mean(unclipped, real)
        return loss, {"vf_clipfrac": torch.zeros((), dtype=values.dtype, device=values.device)}
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), real)  # baselines ppo2 value clipping
    with torch.no_grad():
        vf_clipfrac = masked_mean((clipped > unclipped).to(values.dtype), real)
    return loss, {"vf_clipfrac": vf_clipfrac}


def entropy_bonus(logits: Tensor, response_mask: Tensor) -> Tensor:
    """Mean policy entropy over real response tokens (per-token mean).

    ``H = -sum_v p_v log p_v`` at each token (via :func:`rlhfkit.ops.entropy_from_logits`).
    A positive number: subtract ``entropy_coef * entropy_bonus(...)`` from the loss to
    encourage exploration (the entropy term ``S`` of PPO, arXiv:1707.06347, eq. 9).

    Args:
        logits: ``(M, N, V)`` policy logits at the response positions.
        response_mask: ``(M, N)``, 1 = real response token.
    """
    return masked_mean(entropy_from_logits(logits), response_mask)


def explained_variance(values: Tensor, returns: Tensor, response_mask: Tensor) -> Tensor:
    """``1 - Var[returns - values] / Var[returns]`` over real tokens.

    1 is a perfect value function, 0 no better than a constant, < 0 worse. ``nan`` when the
    returns have zero variance. Population variances (the ratio makes the correction cancel).

    Args:
        values: ``(M, N)`` value predictions.
        returns: ``(M, N)`` return targets.
        response_mask: ``(M, N)``, 1 = real response token.

    Returns:
        Detached 0-d tensor.
    """
    _check_same("explained_variance", values=values, returns=returns, response_mask=response_mask)
    values, returns = values.detach(), returns.detach()
    var_returns = masked_var(returns, response_mask, unbiased=False)
    var_residual = masked_var(returns - values, response_mask, unbiased=False)
    ratio = var_residual / var_returns  # nan/inf when var_returns == 0, replaced below
    return torch.where(var_returns > 0, 1.0 - ratio, torch.full_like(ratio, float("nan")))
