"""Best-of-n as the policy side of ``rlhfkit eval --best-of N --selector SPEC``: the math.

Best-of-n draws ``N`` answers from a policy and keeps the one a selector (a reward model,
the proxy) scores highest. :func:`pick_best` is that choice, :func:`best_of_n_kl` the KL of
the resulting policy to the one it samples from. Pure tensor functions; the sampling and
scoring are in :mod:`.commands`.
"""

from __future__ import annotations

from torch import Tensor

from rlhfkit.evaluation.best_of import best_of_n_kl

__all__ = ["best_of_n_kl", "pick_best"]


def pick_best(scores: Tensor) -> Tensor:
    """Index of the highest-scored candidate of each row; on a tie the first drawn.

    Args:
        scores: ``(M, N)`` the selector's scores of ``N`` candidates for each of ``M`` slots.

    Returns:
        ``(M,)`` long indices into dim 1. Plain loop::

            for m in range(M):
                best = 0
                for j in range(1, N):
                    if scores[m, j] > scores[m, best]:  # strictly greater: ties keep the earlier
                        best = j
    """
    return scores.argmax(dim=1)  # (M,): torch.argmax returns the first of equal maxima
