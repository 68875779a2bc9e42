"""Glue between a :class:`RankBatch` and the pure losses in :mod:`rlhfkit.losses`.

Every loss here returns per-list losses ``(B,)`` so the trainer can weight lists equally
across micro-batches, processes and accumulation steps.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from rlhfkit import losses as L
from rlhfkit.data.collate import RankBatch
from rlhfkit.errors import UserError

LossName = Literal["pairwise", "logexp", "margin", "listwise", "plackett-luce", "token-pairwise", "binary", "mse"]
LOSS_NAMES = get_args(LossName)
SCALAR_LOSSES = ("binary", "mse")


def check_loss_fits_data(loss: str, examples, where: str) -> None:
    """Fail early, at the boundary, when a loss cannot use the data it was given."""
    ks = {ex.k for ex in examples}
    if loss in SCALAR_LOSSES:
        bad = next((ex for ex in examples if ex.label is None), None)
        if bad is not None:
            raise UserError(
                f'loss \'{loss}\' needs scalar labels ({{"prompt", "response", "score"}} rows) but {bad.source or where} '
                "is a preference list; use loss 'pairwise' for rankings"
            )
        if loss == "binary":
            odd = next((ex for ex in examples if ex.label not in (0.0, 1.0)), None)
            if odd is not None:
                raise UserError(f"loss 'binary' needs labels 0 or 1; {odd.source or where} has {odd.label}")
        return
    if ks == {1}:
        raise UserError(
            f"loss '{loss}' needs lists of at least 2 responses; {where} holds scalar-labelled single responses (use 'mse' or 'binary')"
        )
    if loss == "margin" and any(ex.margin is None for ex in examples):
        bad = next(ex for ex in examples if ex.margin is None)
        raise UserError(
            f"loss 'margin' needs a 'margin' field on every row; {bad.source or where} has none (or use 'pairwise')"
        )
    if loss == "plackett-luce":
        bad = next((ex for ex in examples if ex.has_ties or ex.choice is not None), None)
        if bad is not None:
            raise UserError(
                f"loss 'plackett-luce' needs full strict rankings; {bad.source or where} has ties or is an n-choose-1 row "
                "(use 'pairwise' or 'listwise')"
            )


def list_losses(
    loss: str, batch: RankBatch, scores: torch.Tensor, token_scores: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-list losses (B,) for one batch. scores (N,) of the batch's unique texts."""
    if loss in SCALAR_LOSSES:
        list_scores = scores[batch.text_index[:, 0]]  # (B,) K == 1
        fn = L.binary_loss if loss == "binary" else L.mse_loss
        return fn(list_scores, batch.labels.to(scores.dtype), reduction="none")
    list_scores = batch.gather_lists(scores)  # (B, K)
    if loss in ("pairwise", "logexp"):
        fn = L.pairwise_loss if loss == "pairwise" else L.logexp_loss
        return fn(list_scores, batch.ranks, batch.list_mask, reduction="none")
    if loss == "margin":
        return L.margin_loss(list_scores, batch.ranks, batch.list_mask, batch.margins, reduction="none")
    if loss == "listwise":
        # n-choose-1 rows carry their choice; for ranked lists the best response is the choice.
        choice = (
            batch.choice
            if batch.choice is not None
            else batch.ranks.masked_fill(batch.list_mask == 0, 1 << 30).argmin(dim=1)
        )
        return L.listwise_loss(list_scores, choice, batch.list_mask, reduction="none")
    if loss == "plackett-luce":
        return L.plackett_luce_loss(list_scores, batch.ranks, batch.list_mask, reduction="none")
    if loss == "token-pairwise":
        return _token_pairwise(batch, token_scores)
    raise ValueError(f"unknown loss {loss!r}")


def _token_pairwise(batch: RankBatch, token_scores: torch.Tensor | None) -> torch.Tensor:
    """Expand each list into its ordered pairs (index gathering only: every text was still
    encoded once), take the per-token loss per pair, then average the pairs of each list."""
    if token_scores is None:
        raise ValueError("loss 'token-pairwise' needs per-token scores (a decoder reward model)")
    ranks, mask, idx = batch.ranks, batch.list_mask.bool(), batch.text_index
    pairs = (ranks[:, :, None] < ranks[:, None, :]) & mask[:, :, None] & mask[:, None, :]  # (B, K, K)
    b, i, j = pairs.nonzero(as_tuple=True)  # (P,) each
    chosen, rejected = idx[b, i], idx[b, j]  # (P,) text ids
    ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    per_pair = L.token_pairwise_loss(
        token_scores[chosen],
        token_scores[rejected],
        ids[chosen],
        ids[rejected],
        am[chosen],
        am[rejected],
        torch.minimum(batch.prompt_lengths[chosen], batch.prompt_lengths[rejected]),
        reduction="none",
    )  # (P,)
    n_lists = ranks.shape[0]
    sums = torch.zeros(n_lists, dtype=per_pair.dtype, device=per_pair.device).index_add(0, b, per_pair)
    counts = torch.zeros(n_lists, dtype=per_pair.dtype, device=per_pair.device).index_add(
        0, b, torch.ones_like(per_pair)
    )
    return sums / counts.clamp(min=1)  # (B,) mean over the pairs of each list
