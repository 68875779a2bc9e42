"""The new scalar head's start: a linear probe on the frozen backbone, then fine-tuning (LP-FT).

Kumar, Raghunathan, Jones, Ma & Liang, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution", ICLR 2022 (arXiv 2202.10054): fine-tuning from a randomly
initialised head sends the head's large early errors back into the pretrained features;
fitting the head first on frozen features (a linear probe), then fine-tuning everything at
one small learning rate, keeps more of them. Here the probe is the reward model's own
objective restricted to the head's last linear layer: the Bradley-Terry likelihood of the
training pairs (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1), L2-regularised, which is
convex in the layer's weights and solved exactly by Newton's method.

The solver and the feature reader live one floor down, in :mod:`rlhfkit.models.probe_fit`,
where ``rlhfkit annotate --selection uncertainty`` fits its bootstrap ensemble of the same
heads; they are re-exported here.

Cost: one forward pass without gradients over the unique training texts (at most
``max_texts`` of them), then a few Newton steps on an (H, H) system.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from rlhfkit.data.collate import EncodedPreferences
from rlhfkit.models.probe_fit import fit_pairwise_probe, head_inputs, head_layer, pair_indices

__all__ = ["ProbeResult", "init_head_from_probe"]

logger = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    pairs: int  # training pairs the probe was fit on
    texts: int  # unique texts encoded for it
    train_accuracy: float  # share of those pairs the probe orders right
    weight_norm: float
    newton_steps: int


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
