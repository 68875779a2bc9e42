"""Held-out evaluation of a reward model, with the diagnostics users need at 50% accuracy.

Metrics (all over the eval lists): the ranking metrics of
:func:`rlhfkit.evaluation.scores.evaluate_scores` (pairwise and list-exact accuracy, Kendall
tau, accuracy by rank gap, chosen/rejected score distributions, the Pearson correlation of
score with response length), the training objective's loss, and a warning when length alone
explains the scores.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from rlhfkit.data.collate import EncodedPreferences, collate
from rlhfkit.evaluation.scores import evaluate_scores, score_texts
from rlhfkit.rm.objective import list_losses

logger = logging.getLogger(__name__)

LENGTH_WARNING_CORR = 0.7


def length_warning(metrics: dict[str, Any]) -> str | None:
    corr = metrics.get("length_corr")
    if corr is None or not math.isfinite(corr) or abs(corr) < LENGTH_WARNING_CORR:
        return None
    return (
        f"reward scores correlate with response length (r = {corr:+.2f}); the model may be scoring length, "
        f"not quality. Ranking by length alone gets {metrics.get('length_only_accuracy', float('nan')):.1%} "
        f"pairwise accuracy here vs the model's {metrics.get('pairwise_accuracy', float('nan')):.1%}. "
        "Check the data for a length bias, or balance lengths between chosen and rejected."
    )


def evaluate(
    model, data: EncodedPreferences, pad, *, batch_size: int = 32, device=None, loss: str | None = None
) -> tuple[dict[str, Any], torch.Tensor]:
    """Score ``data`` with ``model`` and compute every metric; returns (metrics, scores)."""
    device = device or next(model.parameters()).device
    scores = score_texts(model, data, pad, batch_size, device)
    metrics = evaluate_scores(data, scores)
    if loss is not None and max(len(r) for r in data.lists) > 1:
        # Over all lists in order, collate numbers texts by first appearance, which is how
        # EncodedPreferences numbered them, so batch.text_index indexes ``scores`` directly.
        batch = collate(data, list(range(len(data.lists))), lambda feats: {})
        if loss != "token-pairwise":
            metrics["loss"] = list_losses(loss, batch, scores).mean().item()
    warning = length_warning(metrics)
    if warning:
        logger.warning(warning)
        metrics["length_warning"] = warning
    return metrics, scores


def plot_score_histograms(data: EncodedPreferences, scores: torch.Tensor, path) -> None:
    """Histogram of chosen (best-ranked) vs rejected held-out scores, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if max(ex.k for ex in data.examples) < 2:
        return
    chosen, rejected = [], []
    for j, ex in enumerate(data.examples):
        best = min(ex.ranks)
        for pos, t in enumerate(data.lists[j]):
            (chosen if ex.ranks[pos] == best else rejected).append(float(scores[t]))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(rejected, bins=40, alpha=0.6, label="rejected (rank > 0)")
    ax.hist(chosen, bins=40, alpha=0.6, label="chosen (rank 0)")
    ax.set_xlabel("reward score")
    ax.set_title("held-out score distributions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["evaluate", "length_warning", "plot_score_histograms"]
