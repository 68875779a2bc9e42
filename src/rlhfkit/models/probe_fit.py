"""Linear heads fit on a reward model's frozen features: the Bradley-Terry probe and its bootstrap.

:func:`fit_pairwise_probe` is the L2-regularised Bradley-Terry likelihood of ranked pairs
(Bradley & Terry 1952; Ouyang et al. 2022, eq. 1) restricted to the score layer, convex in its
weights and solved exactly by Newton's method. ``rm train --head-init probe`` starts the head from
it (:mod:`rlhfkit.rm.probe`); :func:`bootstrap_probes` fits an ensemble of such heads on bootstrap
resamples of the ranked lists, whose disagreement is the reward model's uncertainty that
``rlhfkit annotate --selection uncertainty`` reads (:mod:`rlhfkit.evaluation.uncertainty`).
:func:`head_inputs` reads the features: what the score layer itself reads.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhfkit.data.collate import EncodedPreferences
from rlhfkit.evaluation.scores import length_sorted_batches
from rlhfkit.models.reward import last_token_index

__all__ = ["head_layer", "head_inputs", "fit_pairwise_probe", "pair_indices", "bootstrap_probes"]


def head_layer(model: nn.Module) -> nn.Linear | None:
    """The linear layer that outputs the score: the one trainable ``nn.Linear`` with one output
    (BERT's ``classifier``, a decoder's ``score``, RoBERTa's ``classifier.out_proj``; under
    LoRA, peft's trainable copy of it). None when there is not exactly one."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1 and m.weight.requires_grad]
    return found[0] if len(found) == 1 else None


@torch.no_grad()
def head_inputs(
    model: nn.Module, layer: nn.Linear, data: EncodedPreferences, pad, text_ids: list[int], batch_size: int, device
) -> torch.Tensor:
    """What ``layer`` reads for the scores of texts ``text_ids``: (len(text_ids), H), float32.

    Taken by a forward hook on ``layer`` during the model's own forward (eval mode), so it is
    exactly the head's input whatever the pooling; a decoder's per-position input
    (N, T, H) is read at each row's last real token, where its score is taken.
    """
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    was_training = model.training
    model.eval()
    out = torch.empty(len(text_ids), layer.in_features)
    try:
        for rows in length_sorted_batches([data.texts[i] for i in text_ids], batch_size):
            inputs = {k: v.to(device) for k, v in pad([data.texts[text_ids[r]] for r in rows]).items()}
            captured.clear()
            model(**inputs)
            x = captured[-1]
            if x.dim() == 3:  # (N, T, H): the last real token of each row
                x = x[torch.arange(x.shape[0], device=x.device), last_token_index(inputs["attention_mask"])]
            out[rows] = x.float().cpu()
    finally:
        hook.remove()
        model.train(was_training)
    return out


def fit_pairwise_probe(diffs: torch.Tensor, l2: float, max_steps: int = 50) -> tuple[torch.Tensor, int]:
    """argmin_w mean_p log(1 + exp(-diffs[p] . w)) + l2/2 |w|^2, and the Newton steps taken.

    diffs (P, H): features of the preferred minus the other text of each pair. The objective
    is strictly convex for l2 > 0; Newton's method with a backtracking (Armijo) line search,
    in float64, stops when the Newton decrement g.H^-1.g falls below 1e-12. Returns w (H,).
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    d = diffs.double()  # (P, H)
    n, h = d.shape
    eye = torch.eye(h, dtype=d.dtype)

    def objective(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-(d @ w)).mean() + 0.5 * l2 * (w @ w)

    w = torch.zeros(h, dtype=d.dtype)
    for step in range(1, max_steps + 1):
        p = torch.sigmoid(-(d @ w))  # (P,) the probability of the wrong order
        grad = -(d.T @ p) / n + l2 * w  # (H,)
        hess = (d.T * (p * (1 - p))) @ d / n + l2 * eye  # (H, H)
        direction = torch.linalg.solve(hess, grad)
        decrement = float(grad @ direction)
        if decrement < 1e-12:
            return w, step - 1
        t, before = 1.0, objective(w)
        while objective(w - t * direction) > before - 0.25 * t * decrement and t > 1e-8:
            t /= 2
        w = w - t * direction
    return w, max_steps


def pair_indices(data: EncodedPreferences, lists: list[int]) -> list[tuple[int, int]]:
    """(preferred text, other text) of every ordered pair of the lists ``lists``, as unique-text indices."""
    return [(data.lists[j][a], data.lists[j][b]) for j in lists for a, b in data.examples[j].ordered_pairs()]


def bootstrap_probes(
    features: torch.Tensor, list_pairs: list[list[tuple[int, int]]], *, n_heads: int = 8, l2: float, seed: int = 0
) -> torch.Tensor:
    """``n_heads`` Bradley-Terry probes, each fit on a bootstrap resample of the ranked lists: (E, D), float64.

    features (N, D): the head inputs of N texts. ``list_pairs[j]``: the (preferred, other) text
    indices of list j's ordered pairs. Each head draws as many lists as there are, with
    replacement (Efron 1979, the bootstrap), and solves :func:`fit_pairwise_probe` on their pairs;
    the spread of the heads is the ensemble's uncertainty (Lakshminarayanan, Pritzel & Blundell
    2017, deep ensembles; reward-model ensembles in RLHF: Coste et al. 2023, arXiv:2310.02743).
    Whole lists are resampled, not single pairs: pairs of one list share texts and an annotator,
    so the list is the independent unit (the cluster bootstrap, Davison & Hinkley 1997, sec. 3.8).
    ``l2`` is relative to the features' scale (times the mean squared pairwise difference of all
    pairs), as for ``--probe-l2``. Reproducible for a ``seed``.
    """
    lists = [pairs for pairs in list_pairs if pairs]
    if not lists:
        raise ValueError("no ordered pairs to fit the heads on: every list is a tie or has one response")
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    feats = features.double()  # (N, D)
    everything = torch.tensor([p for pairs in lists for p in pairs])  # (P, 2)
    scale = float((feats[everything[:, 0]] - feats[everything[:, 1]]).pow(2).mean())
    g = torch.Generator().manual_seed(seed)
    heads = torch.empty(n_heads, feats.shape[1], dtype=torch.float64)
    for e in range(n_heads):
        draw = torch.randint(len(lists), (len(lists),), generator=g).tolist()
        pairs = torch.tensor([p for j in draw for p in lists[j]])  # (P_e, 2)
        diffs = feats[pairs[:, 0]] - feats[pairs[:, 1]]  # (P_e, D)
        heads[e], _ = fit_pairwise_probe(diffs, l2 * max(scale, 1e-12))
    return heads
