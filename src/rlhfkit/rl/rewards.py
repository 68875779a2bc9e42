"""Per-token PPO rewards (score plus KL penalty) and running score statistics.

Shapes: ``(M, N)`` = (prompts, response tokens). ``response_mask`` is 1 on real response
tokens (EOS included) and 0 after EOS and on padding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rlhfkit.rl.kl import kl_estimate

__all__ = ["compute_rewards", "overlong_penalty", "RunningMoments"]


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    kl_coef: float | Tensor,
    estimator: str = "k1",
    score_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty at every real token, the score at the last one.

    ``rewards[i, t] = -kl_coef * kl[i, t] + [t == last_i] * scores[i]`` where ``last_i`` is the
    last index with ``response_mask[i] == 1`` (InstructGPT, arXiv:2203.02155, eq. 2:
    ``r(x, y) - beta * log(pi_RL / pi_SFT)``, spread over tokens). The mask may have any
    shape of zeros after the last real token (all ones, trailing zeros, a single token).
    Pass detached log-probs: this function does not detach.

    Args:
        scores: ``(M,)`` reward-model scores of the full responses.
        logprobs: ``(M, N)`` policy log-probs of the sampled response tokens.
        ref_logprobs: ``(M, N)`` reference-model log-probs of the same tokens.
        response_mask: ``(M, N)``, 1 = real response token.
        kl_coef: KL penalty coefficient (``beta``), e.g. ``controller.kl_coef``.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``, see :func:`rlhfkit.rl.kl.kl_estimate`.
        score_clip: clip scores to ``[-score_clip, score_clip]`` first; ``None`` = no clip.

    Returns:
        ``rewards (M, N)`` and ``kl (M, N)``, both 0 on masked positions.

    Raises:
        ValueError: a row of ``response_mask`` has no real token (nowhere to put its score).
    """
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != response_mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"compute_rewards: logprobs {tuple(logprobs.shape)}, ref_logprobs "
            f"{tuple(ref_logprobs.shape)} and response_mask {tuple(response_mask.shape)} must "
            "all be (M, N)."
        )
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(
            f"compute_rewards: scores must be one value per response, shape "
            f"({logprobs.shape[0]},); got {tuple(scores.shape)}."
        )
    real = response_mask.to(torch.bool)
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)  # (M, N)
    last = torch.where(real, positions, -1).amax(dim=1)  # (M,), -1 = no real token
    if bool((last < 0).any()):
        i = int((last < 0).nonzero()[0])
        raise ValueError(
            f"compute_rewards: response_mask[{i}] has no real token, so score {i} has no "
            "token to land on; drop empty responses or keep at least the EOS token in the mask."
        )
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(real, kl_estimate(logprobs, ref_logprobs, estimator), zero)  # (M, N)
    rewards = -kl_coef * kl  # arXiv:2203.02155 eq. 2, KL penalty per token
    at_last = positions == last.unsqueeze(1)  # (M, N), one True per row
    rewards = rewards + torch.where(at_last, scores.to(rewards.dtype).unsqueeze(1), zero)
    return rewards, kl


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, sec. 3.4, eq. 13),
    added to the score: 0 up to ``max_length - buffer`` tokens, then falling linearly to
    ``-penalty`` at ``max_length``::

        0                                          if |y| <= L_max - L_cache
        (L_max - L_cache - |y|) / L_cache * P      if L_max - L_cache < |y| <= L_max
        -P                                         if |y| > L_max

    Plain loop::

        for i in range(M):
            over = lengths[i] - (max_length - buffer)
            out[i] = -penalty * min(over, buffer) / buffer if over > 0 else 0.0

    Args:
        lengths: ``(M,)`` response lengths ``|y|`` in tokens (EOS included).
        max_length: ``L_max``, the longest response sampling can give (``--max-new-tokens``).
        buffer: ``L_cache``, the length of the punishment interval, ``1 <= buffer <= max_length``.
        penalty: ``P >= 0``, the penalty at ``L_max`` (the paper's is 1, its rewards' scale).

    Returns:
        ``(M,)`` float penalties in ``[-penalty, 0]``.
    """
    if not 1 <= buffer <= max_length:
        raise ValueError(f"overlong_penalty: buffer must be in [1, max_length={max_length}]; got {buffer}")
    over = (lengths.to(torch.float32) - (max_length - buffer)).clamp(min=0, max=buffer)  # (M,) tokens into the buffer
    return -penalty * over / buffer  # arXiv:2503.14476 eq. 13


class RunningMoments:
    """Running mean and standard deviation of a stream of scores.

    Merges each batch with the parallel update of Chan, Golub & LeVeque (1979, "Updating
    formulae and a pairwise algorithm for computing sample variances"), which reduces to
    Welford's (1962) update for batches of one. Statistics are float64 Python floats.

    ``std`` is the unbiased sample standard deviation; it is 1.0 until two values have been
    seen, so ``(scores - m.mean) / m.std`` is the identity-like scaling at the start.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, scores: Tensor) -> None:
        """Fold the values of ``scores`` (any shape, all real) into the running moments."""
        x = scores.detach().to(torch.float64).flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        total = self.count + n_b
        delta = mean_b - self.mean
        # Chan, Golub & LeVeque 1979: merge (n_a, mean_a, M2_a) with (n_b, mean_b, M2_b)
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta**2 * self.count * n_b / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = ("count", "mean", "m2")
        if sorted(state) != sorted(keys):
            raise ValueError(
                f"RunningMoments.load_state_dict: expected keys {list(keys)}, got {sorted(state)}; "
                "was the state saved by RunningMoments.state_dict()?"
            )
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
