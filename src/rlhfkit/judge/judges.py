"""The judges of ``rlhfkit eval --judge``: who decides whether A's answer beats B's.

Two kinds:

- a **score judge** gives each (prompt, response) a number and the higher wins (equal scores
  tie): a reward-model or one-label classifier folder (:class:`rlhfkit.models.reward.RewardModel`),
  a DPO run (its implicit reward, :class:`rlhfkit.models.implicit_reward.ImplicitReward`) or a
  user's rule ``module:function`` (``fn(prompts, responses) -> list[float]``);
- a **pairwise judge**, ``lm:FOLDER``: a local causal LM shown both answers in
  :data:`PAIRWISE_TEMPLATE` and read at its next token, ``log p("A") - log p("B")``. It is
  asked both ways round (:func:`pairwise_outcomes`): a pair whose two orders contradict each
  other (position bias, not preference) is a tie, counted as ``position_inconsistent``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from rlhfkit.config import ConfigError
from rlhfkit.evaluation.functions import load_function
from rlhfkit.models.hub import resolve_run_folder
from rlhfkit.models.implicit_reward import ImplicitReward, is_dpo_model
from rlhfkit.models.policy import load_policy
from rlhfkit.models.reward import RewardModel

__all__ = [
    "PAIRWISE_TEMPLATE",
    "PairwiseJudge",
    "ScoreJudge",
    "LMPairwiseJudge",
    "load_judge",
    "pairwise_outcomes",
]

PAIRWISE_TEMPLATE = """You are comparing two responses to the same prompt.

Prompt:
{prompt}

Response A:
{first}

Response B:
{second}

Which response is better, A or B? Answer with one letter.
Better response:"""
"""The LM judge's prompt; the judge's answer is its next token, " A" or " B"."""


class PairwiseJudge(Protocol):
    """``margins(prompts, firsts, seconds) -> (N,)``: > 0 when the judge prefers the answer shown
    first (as "A"), < 0 when it prefers the one shown second, 0 when it cannot tell."""

    def margins(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> Tensor: ...


class ScoreJudge:
    """A judge that scores each answer alone: ``judge.scores(prompts, responses) -> (N,)`` float64."""

    def __init__(self, spec: str, kind: str, score_fn: Any, option: str = "--judge"):
        self.spec, self.kind, self._score, self.option = spec, kind, score_fn, option

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        values = self._score(list(prompts), list(responses))
        try:
            out = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(
                f"{self.option} {self.spec}: returned {type(values).__name__}; it must return one float per response"
            ) from None
        if out.numel() != len(responses):
            raise ConfigError(
                f"{self.option} {self.spec}: returned {out.numel()} scores for {len(responses)} responses; "
                "return one each"
            )
        if not torch.isfinite(out).all():
            raise ConfigError(f"{self.option} {self.spec}: returned non-finite scores; scores must be finite numbers")
        return out


class LMPairwiseJudge:
    """A local causal LM as a pairwise judge: ``log p(" A") - log p(" B")`` after :data:`PAIRWISE_TEMPLATE`."""

    def __init__(self, path: str, *, device: Any = None, batch_size: int = 8, template: str = PAIRWISE_TEMPLATE):
        self.model, self.tokenizer = load_policy(path, device=device, option="--judge lm:")
        self.template, self.batch_size = template, batch_size
        self.token_a = self.tokenizer.encode(" A", add_special_tokens=False)[-1]
        self.token_b = self.tokenizer.encode(" B", add_special_tokens=False)[-1]
        if self.token_a == self.token_b:
            raise ConfigError(f"--judge lm:{path}: its tokenizer gives 'A' and 'B' the same token; use another model")

    @torch.no_grad()
    def margins(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> Tensor:
        texts = [self.template.format(prompt=p, first=a, second=b) for p, a, b in zip(prompts, firsts, seconds)]
        out = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True).to(device)
            logits = self.model(**enc).logits[:, -1].float()  # (B, V): left padding, so -1 is the next token
            logp = logits.log_softmax(-1)
            out.append((logp[:, self.token_a] - logp[:, self.token_b]).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def pairwise_outcomes(
    judge: PairwiseJudge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """Ask ``judge`` both ways round. Returns ``outcomes (N,)`` (1: A better, 0: tie, -1: B better)
    and ``inconsistent (N,)`` bool: the two orders picked opposite answers, i.e. the judge chose
    by position, so the pair is a tie (Zheng et al. 2023, arXiv:2306.05685, sec. 3.4: swap positions)."""
    ab = torch.sign(judge.margins(prompts, a, b)).long()  # 1: prefers A (shown first)
    ba = -torch.sign(judge.margins(prompts, b, a)).long()  # 1: prefers A (shown second)
    agree = ab == ba
    inconsistent = (ab != 0) & (ba != 0) & ~agree
    outcomes = torch.where(agree, ab, torch.where(inconsistent, 0, ab + ba))  # one order undecided: the other's call
    return outcomes.clamp(-1, 1), inconsistent


def _is_function_spec(spec: str) -> bool:
    if spec.count(":") != 1 or Path(spec).exists():
        return False
    module = spec.split(":", 1)[0]
    return module.endswith(".py") or bool(re.fullmatch(r"[A-Za-z_][\w.]*", module))


def load_judge(
    spec: str, *, device: Any = None, batch_size: int = 32, option: str = "--judge"
) -> ScoreJudge | LMPairwiseJudge:
    """The judge ``--judge spec`` names (see the module docstring for the kinds). ``option``: the
    flag that named it, for the errors (``eval --checkpoints`` loads its ``--proxy`` here too)."""
    if spec.startswith("lm:"):
        return LMPairwiseJudge(spec[3:], device=device, batch_size=max(1, batch_size // 4))
    if _is_function_spec(spec):
        return ScoreJudge(spec, "function", load_function(spec, option), option)
    folder = Path(resolve_run_folder(str(Path(spec).expanduser())))
    if not folder.exists():
        raise ConfigError(
            f"{option} {spec!r}: no such folder. Give a reward-model or classifier folder, a DPO run, "
            "module:function (or path/to/file.py:function), or lm:FOLDER for a causal LM as a pairwise judge"
        )
    if is_dpo_model(spec):
        model = ImplicitReward.from_pretrained(spec, device=device, option=option)
        kind = "dpo"
    else:
        model = RewardModel.from_pretrained(str(folder), device=device, option=option)
        kind = "reward-model"
    model.eval().requires_grad_(False)
    return ScoreJudge(spec, kind, lambda p, r: model.score(p, r, batch_size=batch_size).float().cpu(), option)
