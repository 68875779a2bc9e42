"""Scores of the texts of preference data, and how well they rank its lists.

:func:`score_texts` runs any scorer (a reward model, a DPO policy's log-probabilities or its
implicit reward) once over every unique text of an
:class:`~rlhfkit.data.collate.EncodedPreferences`, in length-sorted batches.
:func:`evaluate_scores` turns those per-text scores into the ranking metrics every held-out
evaluation reports (all over the lists): ``pairwise_accuracy`` (share of ordered pairs the
scores get right), ``list_exact_accuracy`` (share of lists whose whole order is reproduced),
``kendall_tau`` (mean tau-b per list), accuracy by rank gap (1st vs 2nd, 1st vs last, and per
gap), chosen/rejected score distributions, and the Pearson correlation of score with response
length next to the accuracy of ranking by length alone. Lists of one text with a scalar label
get regression/classification metrics instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from rlhfkit import losses as L
from rlhfkit.data.collate import EncodedPreferences

__all__ = ["length_sorted_batches", "score_texts", "evaluate_scores"]


def length_sorted_batches(texts: list[dict[str, list[int]]], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``texts`` in batches of at most ``batch_size``, shortest texts first (little padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def score_texts(model, data: EncodedPreferences, pad, batch_size: int, device) -> torch.Tensor:
    """Scores of every unique text of ``data``, (n_texts,), in length-sorted batches."""
    was_training = model.training
    model.eval()
    scores = torch.empty(len(data.texts))
    for idx in length_sorted_batches(data.texts, batch_size):
        inputs = {k: v.to(device) for k, v in pad([data.texts[i] for i in idx]).items()}
        scores[idx] = model(**inputs).float().cpu()
    model.train(was_training)
    return scores


def evaluate_scores(data: EncodedPreferences, scores: torch.Tensor) -> dict[str, Any]:
    """All metrics from precomputed per-text scores (n_texts,) (module docstring). Pure."""
    k = max(len(r) for r in data.lists)
    b = len(data.lists)
    idx = torch.full((b, k), -1, dtype=torch.long)
    ranks = torch.zeros((b, k), dtype=torch.long)
    for j, row in enumerate(data.lists):
        idx[j, : len(row)] = torch.tensor(row)
        ranks[j, : len(row)] = torch.tensor(data.examples[j].ranks)
    mask = (idx >= 0).long()
    list_scores = scores[idx.clamp(min=0)] * mask  # (B, K)
    lengths = torch.tensor(data.response_lengths, dtype=torch.float)
    out: dict[str, Any] = {
        "n_lists": b,
        "n_texts": len(data.texts),
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std(unbiased=False).item() if len(scores) > 1 else 0.0,
    }
    if k == 1:  # scalar labels: regression / classification metrics
        labels = torch.tensor([float(ex.label) for ex in data.examples])
        s = scores[idx[:, 0]]
        out["mse"] = torch.mean((s - labels) ** 2).item()
        out["score_label_corr"] = _pearson(s, labels)
        if set(labels.tolist()) <= {0.0, 1.0}:
            out["binary_accuracy"] = ((s > 0).float() == labels).float().mean().item()
        out["n_pairs"] = 0
        return out
    correct, total = L.pairwise_accuracy(list_scores, ranks, mask)
    out["n_pairs"] = int(total)
    out["pairwise_accuracy"] = correct.item() / max(1, int(total))
    out["list_exact_accuracy"] = L.list_exact_match(list_scores, ranks, mask).float().mean().item()
    taus = L.kendall_tau(list_scores, ranks, mask)
    out["kendall_tau"] = torch.nanmean(taus).item() if torch.isfinite(taus).any() else float("nan")

    # Accuracy by rank gap: are near neighbours the hard part, or is even 1st vs last wrong?
    by_gap: dict[int, list[int]] = {}
    first_last = [0, 0]
    chosen, rejected = [], []
    for j, ex in enumerate(data.examples):
        r = scores[torch.tensor(data.lists[j])].tolist()
        lo, hi = min(ex.ranks), max(ex.ranks)
        for a, c in ex.ordered_pairs():
            gap = ex.ranks[c] - ex.ranks[a]
            ok = int(r[a] > r[c])
            by_gap.setdefault(gap, [0, 0])
            by_gap[gap][0] += ok
            by_gap[gap][1] += 1
            if ex.ranks[a] == lo and ex.ranks[c] == hi:
                first_last[0] += ok
                first_last[1] += 1
        for pos, score in enumerate(r):
            (chosen if ex.ranks[pos] == lo else rejected).append(score)
    out["accuracy_by_rank_gap"] = {str(g): c / n for g, (c, n) in sorted(by_gap.items())}
    out["accuracy_first_vs_second"] = by_gap[1][0] / by_gap[1][1] if 1 in by_gap else float("nan")
    out["accuracy_first_vs_last"] = first_last[0] / first_last[1] if first_last[1] else float("nan")
    ch, rj = torch.tensor(chosen), torch.tensor(rejected)
    out["chosen_mean"], out["chosen_std"] = ch.mean().item(), ch.std(unbiased=False).item()
    out["rejected_mean"], out["rejected_std"] = rj.mean().item(), rj.std(unbiased=False).item()
    out["margin_mean"] = out["chosen_mean"] - out["rejected_mean"]

    # Length diagnostics: correlation of score with response length, and how well
    # "longer is better" alone would rank these lists.
    out["length_corr"] = _pearson(scores, lengths)
    len_scores = lengths[idx.clamp(min=0)] * mask
    lc, lt = L.pairwise_accuracy(len_scores, ranks, mask)
    out["length_only_accuracy"] = lc.item() / max(1, int(lt))
    return out


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()
