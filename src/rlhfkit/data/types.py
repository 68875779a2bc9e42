"""The one in-memory shape of preference data.

Every reader turns its format into :class:`PreferenceExample`; every loss, collator and
exporter consumes it. One example is one *list*: K responses to one prompt.

- rank lists / pairs: ``ranks[i]`` is the rank of ``responses[i]`` (0 = best). Strict
  orders have ranks ``0..K-1``; equal ranks are ties and only appear when the source
  format allowed them explicitly.
- n-choose-1: ``choice`` is the index of the chosen response; ``ranks`` is ``0`` for it and
  ``1`` for the others (so pairwise metrics still work on it).
- scalar labels: ``K == 1`` and ``label`` holds the score (``mse``) or 0/1 (``binary``).

``weight`` (positive, finite, default 1) is how much the list counts in a training loss:
``rm train`` and ``dpo`` reduce a batch as ``sum_i w_i loss_i / sum_i w_i`` (a list of weight 2
counts as that list twice), e.g. an annotator's agreement weight from
``rlhfkit annotate export --aggregate weighted``. Evaluation metrics ignore it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rlhfkit.errors import UserError


class DataFormatError(UserError):
    """A malformed input record. The message names the file, the line and what to fix."""

    def __init__(self, source: str, line: int | None, problem: str):
        self.source = source
        self.line = line
        self.problem = problem
        where = f"{source}, line {line}" if line is not None else source
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    responses: tuple[str, ...]
    ranks: tuple[int, ...]
    choice: int | None = None
    label: float | None = None
    margin: float | None = None
    source: str = field(default="", compare=False)  # "file:line", for error messages
    weight: float = 1.0  # how much the list counts in a training loss (positive, finite)

    def __post_init__(self):
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            where = f" ({self.source})" if self.source else ""
            raise ValueError(f"weight={w!r}{where} must be a positive finite number; 1 counts the list once")

    @property
    def k(self) -> int:
        return len(self.responses)

    @property
    def has_ties(self) -> bool:
        return len(set(self.ranks)) != len(self.ranks)

    def ordered_pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) index pairs; ties produce no pair. C(K,2) for a strict list."""
        return [(i, j) for i in range(self.k) for j in range(self.k) if self.ranks[i] < self.ranks[j]]


def strict_ranks(k: int) -> tuple[int, ...]:
    """Ranks of a list given best first with no ties."""
    return tuple(range(k))
