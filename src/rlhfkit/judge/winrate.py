"""Win rates, their bootstrap intervals and the length-controlled win rate: pure tensor math.

Outcomes are coded per pair (sample ``i`` of A against sample ``i`` of B) as ``1`` (A wins),
``0`` (tie) and ``-1`` (B wins), in a ``(P, n)`` tensor: ``P`` prompts, ``n`` pairs each.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "outcomes_from_scores",
    "rates",
    "bootstrap_indices",
    "percentile_interval",
    "win_rate_ci",
    "fit_length_logistic",
    "lc_win_rate",
    "lc_win_rate_ci",
]

LC_PENALTY = 1e-2  # L2 on the length slope (mean loss): keeps the fit finite when length alone decides


def outcomes_from_scores(score_a: Tensor, score_b: Tensor) -> Tensor:
    """``sign(score_a - score_b)``: the higher score wins, equal scores tie. Any shape; int64."""
    return torch.sign(score_a.double() - score_b.double()).long()


def rates(outcomes: Tensor) -> dict[str, float]:
    """Win, tie and loss rates of A and ``win_rate = (wins + ties / 2) / n`` over every pair."""
    o = outcomes.flatten()
    n = max(o.numel(), 1)
    wins, ties, losses = (o == 1).sum().item(), (o == 0).sum().item(), (o == -1).sum().item()
    return {
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win": wins / n,
        "tie": ties / n,
        "loss": losses / n,
        "win_rate": (wins + ties / 2) / n,
    }


def bootstrap_indices(n_prompts: int, n_resamples: int, seed: int) -> Tensor:
    """``(R, P)`` prompt indices drawn with replacement, one resample per row, from a generator
    seeded with ``seed`` (row by row, so a plain loop with the same seed draws the same rows)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(n_prompts, (n_prompts,), generator=g) for _ in range(n_resamples)])


def percentile_interval(values: Tensor, level: float = 0.95) -> list[float]:
    """The central ``level`` interval of ``values (R,)``, the bootstrap statistics: percentiles, interpolated."""
    lo = (1 - level) / 2
    q = torch.quantile(values.double(), torch.tensor([lo, 1 - lo], dtype=torch.float64))  # linear interpolation
    return [q[0].item(), q[1].item()]


def win_rate_ci(outcomes: Tensor, n_resamples: int = 2000, seed: int = 42, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the win rate, resampling PROMPTS with replacement.

    ``outcomes (P, n)``. Every prompt has ``n`` pairs, so a resample's win rate is the mean of its
    prompts' per-prompt win rates. Plain loop::

        for idx in bootstrap_indices(P, R, seed):
            stats.append(mean(win_rate(outcomes[i]) for i in idx))
        interval = percentiles(stats, 2.5, 97.5)
    """
    per_prompt = ((outcomes == 1).double() + 0.5 * (outcomes == 0).double()).mean(dim=1)  # (P,)
    idx = bootstrap_indices(per_prompt.numel(), n_resamples, seed)  # (R, P)
    return percentile_interval(per_prompt[idx].mean(dim=1), level)


def fit_length_logistic(
    y: Tensor, x: Tensor, weights: Tensor | None = None, iterations: int = 50
) -> tuple[Tensor, Tensor]:
    """Weighted logistic regression ``P(A wins) = sigmoid(a + b * x)`` by Newton's method, batched.

    ``y (R, M)`` targets in ``[0, 1]`` (a tie is ``0.5``: half a win and half a loss), ``x (M,)``
    the standardised length difference, ``weights (R, M)`` (bootstrap counts; default ones).
    Minimises ``sum_m w_m * CE(y_m, p_m) / sum_m w_m + LC_PENALTY / 2 * b^2``. Returns ``a, b``, each ``(R,)``.
    """
    y = y.double()
    w = torch.ones_like(y) if weights is None else weights.double()
    w = w / w.sum(dim=1, keepdim=True)  # (R, M)
    X = torch.stack([torch.ones_like(x), x], dim=1).double()  # (M, 2)
    theta = torch.zeros(y.shape[0], 2, dtype=torch.float64)  # (R, 2)
    ridge = torch.diag(torch.tensor([0.0, LC_PENALTY], dtype=torch.float64))  # the intercept is not penalised
    for _ in range(iterations):
        p = torch.sigmoid(theta @ X.T)  # (R, M)
        grad = (w * (p - y)) @ X + theta @ ridge  # (R, 2)
        hess = torch.einsum("rm,mi,mj->rij", w * p * (1 - p), X, X) + ridge + 1e-10 * torch.eye(2)  # (R, 2, 2)
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)  # (R, 2)
        theta = theta - step.clamp(-5.0, 5.0)  # damped: a far step from 0 cannot overshoot into overflow
        if step.abs().max() < 1e-10:
            break
    return theta[:, 0], theta[:, 1]


def _length_features(outcomes: Tensor, length_diff: Tensor) -> tuple[Tensor, Tensor]:
    y = (outcomes.flatten().double() + 1) / 2  # win 1, tie 0.5, loss 0
    d = length_diff.flatten().double()
    scale = d.pow(2).mean().sqrt()  # standardised without centring, so a length difference of 0 stays 0
    return y, (d / scale if scale > 0 else torch.zeros_like(d))


def lc_win_rate(outcomes: Tensor, length_diff: Tensor) -> dict[str, float]:
    """Length-controlled win rate: the logistic regression of the preference on the length
    difference, read at difference 0, ``sigmoid(a)``. The length term of AlpacaEval's
    length-controlled win rate (Dubois et al. 2024, arXiv:2404.04475, sec. 3), without its instruction terms.

    ``outcomes (P, n)``, ``length_diff (P, n)``: tokens of A minus tokens of B.
    """
    y, x = _length_features(outcomes, length_diff)
    a, b = fit_length_logistic(y.unsqueeze(0), x)
    return {"lc_win_rate": torch.sigmoid(a)[0].item(), "length_coef": b[0].item()}


def lc_win_rate_ci(
    outcomes: Tensor, length_diff: Tensor, n_resamples: int = 2000, seed: int = 42, level: float = 0.95
) -> list[float]:
    """Percentile bootstrap interval of :func:`lc_win_rate`, refitting on each resample of the
    prompts (the same resamples as :func:`win_rate_ci` for the same seed)."""
    P, n = outcomes.shape
    y, x = _length_features(outcomes, length_diff)
    idx = bootstrap_indices(P, n_resamples, seed)  # (R, P)
    counts = torch.zeros(n_resamples, P, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64)
    )
    weights = counts.repeat_interleave(n, dim=1)  # (R, P * n): prompt-major, like the flattened pairs
    a, _ = fit_length_logistic(y.expand(n_resamples, -1), x, weights)
    return percentile_interval(torch.sigmoid(a), level)
