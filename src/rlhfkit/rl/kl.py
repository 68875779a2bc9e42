"""KL estimators and KL-coefficient controllers for PPO with a reference model.

The estimators are pure per-token functions. The controllers hold one float (the current
``kl_coef``) and can be saved and restored with ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["KL_ESTIMATORS", "kl_estimate", "AdaptiveKLController", "FixedKLController"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of ``KL(policy || ref)`` from tokens sampled from the policy.

    With ``log_ratio = ref_logprobs - logprobs`` (J. Schulman, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html):

    - ``"k1"``: ``-log_ratio = logprobs - ref_logprobs``; unbiased, high variance, can be < 0.
    - ``"k2"``: ``0.5 * log_ratio**2``; biased, low variance, >= 0.
    - ``"k3"``: ``exp(log_ratio) - 1 - log_ratio``; unbiased, low variance, >= 0.

    Args:
        logprobs: ``(M, N)`` log-probabilities of the sampled tokens under the policy.
        ref_logprobs: ``(M, N)`` log-probabilities of the same tokens under the reference.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``(M, N)`` per-token estimates; padded positions are not masked here.
    """
    log_ratio = ref_logprobs - logprobs  # log(ref / policy), http://joschu.net/blog/kl-approx.html
    if estimator == "k1":
        return -log_ratio  # k1 = -log r
    if estimator == "k2":
        return 0.5 * log_ratio**2  # k2 = (log r)^2 / 2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio  # k3 = (r - 1) - log r, expm1 for precision near 0
    raise ValueError(
        f"kl_estimate: estimator={estimator!r} is not known; use one of {', '.join(KL_ESTIMATORS)} "
        "(see http://joschu.net/blog/kl-approx.html)."
    )


def _load(obj: Any, state: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in state]
    extra = [k for k in state if k not in keys]
    if missing or extra:
        raise ValueError(
            f"{type(obj).__name__}.load_state_dict: expected keys {list(keys)}, got "
            f"{sorted(state)} (missing {missing}, unexpected {extra}); was the state saved "
            "by a different controller?"
        )
    for k in keys:
        setattr(obj, k, type(getattr(obj, k))(state[k]))


class AdaptiveKLController:
    """Adapt ``kl_coef`` so that the measured KL tracks ``target``.

    Ziegler et al. 2019 (arXiv:1909.08593, sec. 2.2): ``e = clip(KL / target - 1, -0.2, 0.2)``
    and ``kl_coef <- kl_coef * (1 + e * n_steps / horizon)``; ``n_steps / horizon`` plays
    the role of the paper's ``K_beta``.

    Args:
        init_kl_coef: starting coefficient, > 0.
        target: KL (nats per sequence, as the caller measures it) to steer towards, > 0.
        horizon: number of samples over which the error is corrected, > 0.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        for name, v in (("init_kl_coef", init_kl_coef), ("target", target), ("horizon", horizon)):
            if not v > 0:
                raise ValueError(
                    f"AdaptiveKLController: {name}={v!r} must be > 0; use FixedKLController for a constant coefficient."
                )
        self.kl_coef = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Move ``kl_coef`` after ``n_steps`` samples whose mean KL was ``current_kl``.

        Returns the new ``kl_coef``.
        """
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # arXiv:1909.08593 sec. 2.2
        self.kl_coef *= 1.0 + error * n_steps / self.horizon
        return self.kl_coef

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load(self, state, ("kl_coef", "target", "horizon"))


class FixedKLController:
    """A constant ``kl_coef``; ``update`` does nothing. Same interface as the adaptive one."""

    def __init__(self, kl_coef: float):
        if not kl_coef >= 0:
            raise ValueError(f"FixedKLController: kl_coef={kl_coef!r} must be >= 0.")
        self.kl_coef = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        return self.kl_coef

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load(self, state, ("kl_coef",))
