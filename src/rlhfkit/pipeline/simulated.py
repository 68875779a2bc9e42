"""A simulated annotator: a scripted labeller that ranks a model's own samples by a rule.

It stands in for people in the demo so the whole pipeline (sample K answers -> rank them ->
rank lists -> reward model) runs on any machine in minutes. It is NOT human feedback and the
report says so. The rule here is a small sentiment lexicon: an answer's score is the number
of positive words minus the number of negative words, per 100 words (ties allowed, reported
as ties).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlhfkit.data.types import PreferenceExample

POSITIVE = frozenset(
    """good great excellent love loved lovely wonderful amazing fantastic perfect best happy delighted superb
    recommend recommended enjoy enjoyed beautiful comfortable reliable sturdy impressive pleasant nice awesome
    fast easy solid brilliant outstanding favorite favourite glad satisfied worth quality durable""".split()
)
NEGATIVE = frozenset(
    """bad terrible awful hate hated poor worst broke broken disappointing disappointed horrible useless cheap
    flimsy waste refund return returned slow difficult annoying ugly uncomfortable unreliable problem problems
    sadly unfortunately fail failed failure defective noisy regret mediocre""".split()
)
_WORD = re.compile(r"[a-zA-Z']+")

NAME = "simulated annotator (sentiment lexicon rule)"

# The simulated team of ``rounds:`` pipelines (rlhfkit.annotate.team): people differ, so do these. Each adds
# Gaussian noise of std ``noise`` to the rule's score of an answer, and ``length_bias`` points per 100 words.
DEFAULT_TEAM = (
    {"name": "sim-careful", "noise": 0.5, "length_bias": 0.0},
    {"name": "sim-hasty", "noise": 3.0, "length_bias": 0.0},
    {"name": "sim-verbose", "noise": 0.5, "length_bias": 8.0},
)


def lexicon_score(text: str) -> float:
    """(#positive - #negative) words per 100 words; 0 for an empty text."""
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return 0.0
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    return 100.0 * (pos - neg) / max(len(words), 1)


@dataclass
class LabelStats:
    n_prompts: int = 0
    n_lists: int = 0
    n_no_preference: int = 0  # every answer scored the same: nothing to learn, reported
    n_with_ties: int = 0
    n_duplicate_answers: int = 0


def rank_samples(prompts: list[str], samples: list[list[str]], rule=None) -> tuple[list[PreferenceExample], LabelStats]:
    """Rank each prompt's K samples by ``rule`` (default: the lexicon score), best first;
    equal scores tie. ``rule(prompts, responses) -> list[float]`` scores one list at a time.

    Lists whose answers all score the same carry no preference and are left out, counted in
    ``LabelStats.n_no_preference`` (the report shows the count). Duplicate answers within a
    list are merged first (and counted).
    """
    stats = LabelStats(n_prompts=len(prompts))
    out: list[PreferenceExample] = []
    for i, (prompt, answers) in enumerate(zip(prompts, samples)):
        unique = list(dict.fromkeys(a for a in answers if a.strip()))
        stats.n_duplicate_answers += len(answers) - len(unique)
        if len(unique) < 2:
            stats.n_no_preference += 1
            continue
        values = [float(v) for v in (rule or lexicon_reward)([prompt] * len(unique), unique)]
        scored = sorted(zip(values, unique), key=lambda t: -t[0])
        levels = sorted({s for s, _ in scored}, reverse=True)
        if len(levels) == 1:
            stats.n_no_preference += 1
            continue
        ranks = tuple(levels.index(s) for s, _ in scored)
        stats.n_with_ties += int(len(levels) < len(scored))
        out.append(PreferenceExample(prompt, tuple(a for _, a in scored), ranks, source=f"simulated:{i + 1}"))
    stats.n_lists = len(out)
    return out, stats


def lexicon_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The labeller's rule as a reward function (``rlhfkit.pipeline.simulated:lexicon_reward``),
    for checking how well the learned reward model tracks its teacher."""
    return [lexicon_score(r) for r in responses]
