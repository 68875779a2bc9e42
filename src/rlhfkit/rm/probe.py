"""The new scalar head's start: a linear probe on the frozen backbone, then fine-tuning (LP-FT).

Kumar, Raghunathan, Jones, Ma & Liang, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution", ICLR 2022 (arXiv 2202.10054): fine-tuning from a randomly
initialised head sends the head's large early errors back into the pretrained features;
fitting the head first on frozen features (a linear probe), then fine-tuning everything at
one small learning rate, keeps more of them. Here the probe is the reward model's own
objective restricted to the head's last linear layer: the Bradley-Terry likelihood of the
training pairs (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1), L2-regularised, which is
convex in the layer's weights and solved exactly by Newton's method.

Cost: one forward pass without gradients over the unique training texts (at most
``max_texts`` of them), then a few Newton steps on an (H, H) system.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from rlhfkit.data.collate import EncodedPreferences
from rlhfkit.evaluation.scores import length_sorted_batches
from rlhfkit.models.reward import last_token_index

logger = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    pairs: int  # training pairs the probe was fit on
    texts: int  # unique texts encoded for it
    train_accuracy: float  # share of those pairs the probe orders right
    weight_norm: float
    newton_steps: int


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


def init_head_from_probe(
    model: nn.Module, data: EncodedPreferences, pad, *, l2: float, max_texts: int, batch_size: int, device, seed: int
) -> ProbeResult | None:
    """Fit the score layer of ``model`` to ``data``'s pairs on frozen features and load the fit
    into it (bias unchanged: pairwise losses do not see it). None, with the reason logged, when
    there is nothing to fit (no ordered pairs) or no single score layer to fit.

    At most ``max_texts`` unique texts are encoded: with more, whole lists are drawn at random
    (``seed``) until the budget is spent. ``l2`` is relative to the features' scale (it is
    multiplied by their mean squared pairwise difference), so one value suits any backbone.
    """
    layer = head_layer(model)
    if layer is None:
        logger.warning("--head-init probe: no single trainable score layer found; the head keeps its random start")
        return None
    lists = list(range(len(data)))
    if len(data.texts) > max_texts:
        lists = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, seen = [], set()
    for j in lists:
        new = [t for t in data.lists[j] if t not in seen]
        if len(seen) + len(new) > max_texts:
            break
        chosen.append(j)
        seen.update(new)
    pairs = pair_indices(data, chosen)
    if not pairs:
        logger.warning("--head-init probe: the training lists have no ordered pairs; the head keeps its random start")
        return None
    text_ids = sorted(seen)
    row = {t: r for r, t in enumerate(text_ids)}
    feats = head_inputs(model, layer, data, pad, text_ids, batch_size, device)  # (n_texts, H)
    diffs = feats[[row[a] for a, _ in pairs]] - feats[[row[b] for _, b in pairs]]  # (P, H)
    scale = float(diffs.double().pow(2).mean())
    w, steps = fit_pairwise_probe(diffs, l2 * max(scale, 1e-12))
    with torch.no_grad():
        layer.weight.copy_(w.to(layer.weight.dtype).view_as(layer.weight))
    accuracy = float(((diffs.double() @ w) > 0).double().mean())
    return ProbeResult(
        pairs=len(pairs), texts=len(text_ids), train_accuracy=accuracy, weight_norm=float(w.norm()), newton_steps=steps
    )
