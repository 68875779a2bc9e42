"""Which K of M sampled responses to show: ``rlhfkit annotate --selection uncertainty``.

The reward model's uncertainty comes from an ensemble of linear heads on its frozen backbone
(:func:`rlhfkit.models.probe_fit.bootstrap_probes`), fit on what has been ranked so far: the
store's live rankings, plus an optional preference file (``--selection-data``). That is
InstructGPT's loop: fit on what people ranked, then ask them about what the model does not know.
For each prompt, :class:`UncertaintySelector` scores the M candidates with every head, keeps the
K whose order the heads dispute most (:func:`rlhfkit.evaluation.uncertainty.select_candidates`)
and gives the set its uncertainty as its priority, so the app serves the most informative set
first. The heads are refit after every ``refit_every`` new rankings, and the sets still waiting
for their first annotator are then re-scored (:meth:`UncertaintySelector.refresh`).

Until there is a ranked pair to fit on, there is no ensemble: the first K candidates are kept,
at priority 0 (the ``random`` selection), and the log says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from rlhfkit.annotate.store import AnnotationStore
from rlhfkit.data.collate import EncodedPreferences
from rlhfkit.data.types import PreferenceExample
from rlhfkit.errors import UserError
from rlhfkit.evaluation.uncertainty import ensemble_scores, select_candidates, set_uncertainty
from rlhfkit.models.probe_fit import bootstrap_probes, head_inputs, head_layer, pair_indices
from rlhfkit.models.reward import RewardModel

logger = logging.getLogger(__name__)


class UncertaintySelector:
    """Keeps the K candidates a bootstrap ensemble of reward heads disagrees on most.

    ``select(prompt, candidates, k) -> (indices, priority)``, the interface
    :class:`~rlhfkit.annotate.generator.Pregenerator` calls from its one thread.
    """

    def __init__(
        self,
        reward_model: RewardModel,
        *,
        store: AnnotationStore | None = None,
        extra: Sequence[PreferenceExample] = (),
        n_heads: int = 8,
        l2: float = 4.0,
        min_distance: float = 0.2,
        refit_every: int = 20,
        seed: int = 0,
        batch_size: int = 16,
    ):
        self.rm = reward_model
        layer = head_layer(reward_model)
        if layer is None:
            raise UserError(
                "--reward-model: no single score layer (a trainable nn.Linear with one output) found, so "
                "there is no head input to fit the ensemble on; pass a reward model 'rlhfkit rm train' wrote"
            )
        self.layer = layer
        self.store, self.extra = store, list(extra)
        self.n_heads, self.l2, self.min_distance = n_heads, l2, min_distance
        self.refit_every, self.seed, self.batch_size = refit_every, seed, batch_size
        self.device = next(reward_model.parameters()).device
        self.heads: torch.Tensor | None = None  # (E, D)
        self.fitted_on = -1  # live rankings in the store at the last fit
        self._warned = False

    def _encode(self, examples: Sequence[PreferenceExample], what: str) -> tuple[EncodedPreferences, torch.Tensor]:
        data = EncodedPreferences.build(examples, self.rm.encode, self.rm.meta.max_length, what=what)
        ids = list(range(len(data.texts)))
        return data, head_inputs(self.rm, self.layer, data, self.rm.pad, ids, self.batch_size, self.device)

    def fit(self) -> int:
        """Fit the heads on the store's live rankings and ``extra``; returns the ordered pairs used (0: no ensemble)."""
        ranked = list(self.extra)
        if self.store is not None:
            rankings, total = self.store.list_rankings()
            ranked += [r.example() for r in reversed(rankings)]
            self.fitted_on = total
        if not ranked:
            self.heads = None
            return 0
        data, feats = self._encode(ranked, "the ranked lists")  # feats (N, D)
        list_pairs = [pair_indices(data, [j]) for j in range(len(data))]
        n_pairs = sum(len(p) for p in list_pairs)
        if n_pairs == 0:  # only ties so far
            self.heads = None
            return 0
        self.heads = bootstrap_probes(feats, list_pairs, n_heads=self.n_heads, l2=self.l2, seed=self.seed)
        logger.info("uncertainty: %d heads fit on %d pairs of %d ranked lists", self.n_heads, n_pairs, len(ranked))
        return n_pairs

    def _refit_if_due(self) -> bool:
        if self.store is None:
            if self.fitted_on < 0:
                self.fit()
                self.fitted_on = 0
                return True
            return False
        _, live = self.store.list_rankings(limit=0)
        if self.fitted_on < 0 or live >= self.fitted_on + self.refit_every:
            self.fit()
            return True
        return False

    def _scores(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        """Every head's score of each response: (E, M)."""
        unranked = PreferenceExample(prompt, tuple(responses), (0,) * len(responses))  # all tied: no order known
        data, feats = self._encode([unranked], "the candidates")
        return ensemble_scores(feats[data.lists[0]], self.heads)  # (E, M)

    def refresh(self) -> int:
        """Refit if ``refit_every`` rankings came in since the last fit, then re-score the sets nobody
        has touched yet, so the buffer is served in the new heads' order; returns the sets re-scored.

        Called by the pre-generator when it is idle (the buffer is full), from its one thread.
        """
        if not self._refit_if_due() or self.heads is None or self.store is None:
            return 0
        waiting = self.store.untouched_pool_sets()
        self.store.set_priorities({s.id: set_uncertainty(self._scores(s.prompt, s.responses)) for s in waiting})
        return len(waiting)

    def select(self, prompt: str, candidates: Sequence[str], k: int) -> tuple[list[int], float]:
        """The K of ``candidates`` to show, in the order chosen, and the set's uncertainty (its priority)."""
        self._refit_if_due()
        if self.heads is None:
            if not self._warned:
                logger.warning(
                    "--selection uncertainty: nothing ranked yet to fit the ensemble on; keeping the first K "
                    "candidates (random selection) until the first rankings come in"
                )
                self._warned = True
            return list(range(k)), 0.0
        scores = self._scores(prompt, candidates)  # (E, M)
        chosen = select_candidates(scores, k, list(candidates), self.min_distance)
        return chosen, set_uncertainty(scores[:, chosen])
