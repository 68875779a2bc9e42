"""Reward functions for ``rl_vs_trl.py``: deterministic functions of the response text, the
same Python function on both sides.

rlhfkit calls them as ``--reward benchmarks/rl_rewards.py:NAME`` with ``(prompts, responses)``;
TRL calls its reward functions with keywords (``prompts=``, ``completions=``,
``completion_ids=``, ...), which :func:`for_trl` adapts. Both sides hand over the response
decoded without special tokens (rlhfkit: cut before the first EOS; TRL: ``batch_decode(...,
skip_special_tokens=True)`` of the tokens up to and including EOS), i.e. the same string. The
prompts differ in form (rlhfkit: the prompt line; TRL: the chat-templated string), so these
functions ignore them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["lowercase_share", "positive_words", "REWARDS", "for_trl"]


def lowercase_share(prompts: list[str], responses: list[str]) -> list[float]:
    """The share of the response's letters that are lowercase, in [0, 1]; 0 without letters."""
    out = []
    for text in responses:
        letters = [c for c in text if c.isalpha()]
        out.append(sum(c.islower() for c in letters) / len(letters) if letters else 0.0)
    return out


POSITIVE = frozenset(
    """good great excellent love loved lovely amazing awesome perfect nice wonderful fantastic
happy best recommend comfortable sturdy reliable beautiful easy fast pleased""".split()
)
CAP = 3  # more positive words than this earn nothing: the reward cannot grow by listing them


def positive_words(prompts: list[str], responses: list[str]) -> list[float]:
    """``min(count, 3) / 3`` of the response's words in a small positive-word list (case-insensitive)."""
    return [min(sum(w in POSITIVE for w in re.findall(r"[a-z]+", text.lower())), CAP) / CAP for text in responses]


REWARDS: dict[str, Callable[[list[str], list[str]], list[float]]] = {
    "lowercase_share": lowercase_share,
    "positive_words": positive_words,
}


def for_trl(
    fn: Callable[[list[str], list[str]], list[float]], on_call: Callable[[list[float], list], None] | None = None
):
    """``fn`` with TRL's reward-function signature; ``on_call(scores, completion_ids)`` sees every batch."""

    def reward(prompts, completions, completion_ids=None, **kwargs):
        scores = fn(list(prompts), list(completions))
        if on_call is not None:
            on_call(scores, completion_ids)
        return scores

    reward.__name__ = fn.__name__  # TRL names its reward metrics after the function
    return reward
