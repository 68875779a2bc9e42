"""Packed batches with shared prefixes: no pad tokens, and a prefix common to several
sequences computed once.

A batch of ``M`` sequences (queries left-padded, responses right-padded, as PPO's
rollouts are) holds pad tokens, and often the same opening tokens in every row: a chat
template's system prompt, or, in group-sampled RL, the whole prompt of the ``K`` responses
to it. :func:`pack` lays the batch out as one row of real tokens only: each group's
shared prefix once (a *parent* segment), then every sequence's own tokens (a *child*
segment). A child's tokens attend to its parent's and, causally, to its own; a parent's
to itself. The position ids continue from the parent into each child, so every token
sees exactly the context and position it has in its own sequence, and the model's
outputs at every real position equal those of the padded batch (up to the order of
floating-point sums; tests check the logits, values and gradients). Every linear layer
then runs on ``L = sum(parents) + sum(children)`` tokens instead of ``M x T``.

The attention runs segment by segment (:func:`shared_prefix_attention`, registered with
``transformers`` as ``rlhfkit_packed``): a child's queries against its parent's and its
own keys. Without packing arguments the function is plain SDPA, so a model can keep the
implementation for generation and unpacked calls.

Plain loop of what a child segment ``c`` with parent ``p`` computes, per head::

    keys = concat(K[p], K[c]); values = concat(V[p], V[c])
    for j in range(len(c)):                       # query j of the child
        allowed = len(p) + j + 1                  # the whole parent, the child up to j
        out[c][j] = softmax(Q[c][j] @ keys[:allowed].T * scale) @ values[:allowed]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "rlhfkit_packed"


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    parent: int | None  # index of the parent segment, or None for a parent (or a lone sequence)


@dataclass
class PackedBatch:
    """One packed row. ``index (M, T)``: where column ``t`` of row ``i`` of the padded batch
    sits in the packed row (-1 for a pad); a shared-prefix token maps to its parent's copy."""

    input_ids: Tensor  # (1, L)
    position_ids: Tensor  # (1, L)
    segments: tuple[Segment, ...]
    index: Tensor  # (M, T)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def _common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for k in range(n):
        if any(r[k] != rows[0][k] for r in rows[1:]):
            return k
    return n


def pack(input_ids: Tensor, attention_mask: Tensor, groups: list[list[int]] | None = None, share_from: int = 0,
         share_until: Tensor | None = None) -> PackedBatch:
    """Pack ``input_ids (M, T)`` (``attention_mask`` 1 = real token; any padding pattern) into one row.

    Args:
        groups: rows that may share a prefix (default: all rows, one group). A group's
            prefix is the longest run of real tokens all its rows begin with, cut so that
            every row keeps at least one token of its own before ``share_until``.
        share_until: ``(M,)`` the number of each row's real tokens that may be shared (e.g. its
            query length: responses are never shared); default: all but the last.
        share_from: groups of fewer rows than this share nothing (a prefix shared by one row
            saves nothing).
    """
    M, T = input_ids.shape
    mask = attention_mask.bool()
    real = [input_ids[i][mask[i]].tolist() for i in range(M)]  # each row's real tokens
    columns = [mask[i].nonzero().flatten().tolist() for i in range(M)]
    limits = [len(r) - 1 for r in real] if share_until is None else [int(s) - 1 for s in share_until.tolist()]
    groups = groups if groups is not None else [list(range(M))]
    ids: list[int] = []
    pos: list[int] = []
    segments: list[Segment] = []
    index = torch.full((M, T), -1, dtype=torch.long)
    for group in groups:
        shared = 0
        if len(group) >= max(2, share_from):
            shared = max(0, min(_common_prefix([real[i] for i in group]), *(limits[i] for i in group)))
        parent = None
        if shared:
            parent = len(segments)
            segments.append(Segment(len(ids), len(ids) + shared, None))
            ids += real[group[0]][:shared]
            pos += list(range(shared))
        for i in group:
            start = len(ids)
            own = real[i][shared:]
            segments.append(Segment(start, start + len(own), parent))
            ids += own
            pos += list(range(shared, shared + len(own)))
            cols = torch.tensor(columns[i], dtype=torch.long)
            if shared:
                index[i, cols[:shared]] = torch.arange(segments[parent].start, segments[parent].end)
            index[i, cols[shared:]] = torch.arange(start, start + len(own))
    device = input_ids.device
    return PackedBatch(torch.tensor([ids], device=device), torch.tensor([pos], device=device), tuple(segments),
                       index.to(device))


def shared_prefix_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None, rlhfkit_segments=None, **kwargs):
    """Attention over a :class:`PackedBatch` row (module docstring); plain SDPA without segments.

    ``query (1, H, L, d)``, ``key``/``value (1, H_kv, L, d)`` -> ``(1, L, H, d)``, as
    ``transformers`` attention functions return.
    """
    if rlhfkit_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (1, H, L, d)
    outputs = []
    for seg in rlhfkit_segments:
        q = query[:, :, seg.start:seg.end]
        if seg.parent is None:
            out = F.scaled_dot_product_attention(q, key[:, :, seg.start:seg.end], value[:, :, seg.start:seg.end],
                                                 is_causal=True, scale=scaling)
        else:
            p = rlhfkit_segments[seg.parent]
            k = torch.cat([key[:, :, p.start:p.end], key[:, :, seg.start:seg.end]], dim=2)
            v = torch.cat([value[:, :, p.start:p.end], value[:, :, seg.start:seg.end]], dim=2)
            n_parent, n_own = p.end - p.start, seg.end - seg.start
            allowed = torch.ones(n_own, n_parent + n_own, dtype=torch.bool, device=q.device).tril(diagonal=n_parent)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


_registered = False


def packing_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot run packed batches, or None: it needs SDPA attention (the packed
    path replaces it) and full causal attention (no sliding window)."""
    config = getattr(model, "config", None)
    if config is None:
        return "it has no transformers config"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", IMPLEMENTATION):
        return f"it uses {impl!r} attention, not sdpa"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "it uses sliding-window attention"
    return None


def use_packed_attention(model: nn.Module) -> None:
    """Switch ``model`` (any ``transformers`` model with SDPA attention) to
    :func:`shared_prefix_attention`; unpacked calls and generation behave as before."""
    global _registered
    if not _registered:
        AttentionInterface.register(IMPLEMENTATION, shared_prefix_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
        _registered = True
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) in ("sdpa", IMPLEMENTATION):
            config._attn_implementation = IMPLEMENTATION


def packed_kwargs(batch: PackedBatch) -> dict:
    """The keyword arguments of a model call on ``batch``. The all-ones attention mask keeps
    ``transformers`` from building an ``(L, L)`` mask of its own: the segments are the mask."""
    return {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "rlhfkit_segments": batch.segments,
            "attention_mask": torch.ones_like(batch.input_ids)}
