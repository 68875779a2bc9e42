"""The KL of best-of-n to the policy it samples from: used by ``ppo-eval``'s best-of-n rows and by
``rlhfkit eval --best-of N``."""

from __future__ import annotations

import math

__all__ = ["best_of_n_kl"]


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n of pi || pi) in nats per response, the analytic value ``log n - (n - 1) / n``.

    Stiennon et al. 2020 (arXiv:2009.01325, appendix G.3) derive it; it is exact when no two
    answers tie in score and otherwise an upper bound (Beirami et al. 2024, arXiv:2401.01879),
    so it needs no samples and has no sampling error. ``n = 1`` gives 0.
    """
    if n < 1:
        raise ValueError(f"best_of_n_kl: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n  # arXiv:2009.01325, appendix G.3
