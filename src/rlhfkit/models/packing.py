"""Packed batches with shared prefixes: no pad tokens, and a prefix common to several
sequences computed once.

A batch of ``M`` sequences (queries left-padded, responses right-padded, as PPO's
rollouts are) holds pad tokens, and often the same opening tokens in every row: a chat
template's system prompt, and, in group-sampled RL, the whole prompt of the ``K`` responses
to it. :func:`pack` lays the batch out as one row of real tokens only, a tree of
segments: the tokens every row shares once (the root), under it what each group of rows
further shares (a prompt), under that every sequence's own tokens. A segment's tokens
attend to all of its ancestors' and, causally, to its own. The position ids continue from the parent into each child, so every token
sees exactly the context and position it has in its own sequence, and the model's
outputs at every real position equal those of the padded batch (up to the order of
floating-point sums; tests check the logits, values and gradients). Every linear layer
then runs on ``L = sum(parents) + sum(children)`` tokens instead of ``M x T``.

The attention runs segment by segment (:func:`shared_prefix_attention`, registered with
``transformers`` as ``rlhfkit_packed``): a child's queries against its parent's and its
own keys. Without packing arguments the function is plain SDPA, so a model can keep the
implementation for generation and unpacked calls.

Plain loop of what a segment ``c`` with ancestors ``a_1 ... a_k`` (root first) computes, per head::

    keys = concat(K[a_1], ..., K[a_k], K[c]); values = concat(V[a_1], ..., V[a_k], V[c])
    context = len(a_1) + ... + len(a_k)
    for j in range(len(c)):                       # query j of the segment
        allowed = context + j + 1                 # every ancestor, the segment up to j
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
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (
    2,
    5,
)  # scaled_dot_product_attention(enable_gqa=)


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
    segments: tuple[Segment, ...]  # in order; a parent before its children
    index: Tensor  # (M, T)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def _common_prefix(rows: list[list[int]], start: int, limit: int) -> int:
    """How many tokens from ``start`` on all ``rows`` share, at most ``limit``."""
    n = 0
    while n < limit and all(start + n < len(r) and r[start + n] == rows[0][start + n] for r in rows):
        n += 1
    return n


def pack(
    input_ids: Tensor, attention_mask: Tensor, groups: list[list[int]] | None = None, share_until: Tensor | None = None
) -> PackedBatch:
    """Pack ``input_ids (M, T)`` (``attention_mask`` 1 = real token; any padding pattern) into one row.

    The tokens every row begins with form the root segment; within each of ``groups`` (rows
    that may share more, e.g. the ``K`` samples of one prompt) the tokens its rows further
    share form a group segment under the root; each row's remaining tokens form its own
    segment. Every row keeps at least one token of its own before ``share_until``.

    Args:
        groups: a partition of the rows (default: no groups below the root).
        share_until: ``(M,)`` how many of each row's real tokens may be shared (e.g. its query
            length: responses are never shared); default: all but the last.
    """
    M, T = input_ids.shape
    mask = attention_mask.bool()
    real = [input_ids[i][mask[i]].tolist() for i in range(M)]  # each row's real tokens
    columns = [mask[i].nonzero().flatten() for i in range(M)]
    limits = [len(r) - 1 for r in real] if share_until is None else [int(s) - 1 for s in share_until.tolist()]
    groups = groups if groups is not None else [[i] for i in range(M)]
    ids: list[int] = []
    pos: list[int] = []
    segments: list[Segment] = []
    index = torch.full((M, T), -1, dtype=torch.long)

    def add(tokens: list[int], first_position: int, parent: int | None) -> int:
        segments.append(Segment(len(ids), len(ids) + len(tokens), parent))
        ids.extend(tokens)
        pos.extend(range(first_position, first_position + len(tokens)))
        return len(segments) - 1

    root_len = _common_prefix(real, 0, max(0, min(limits))) if M > 1 else 0
    root = add(real[0][:root_len], 0, None) if root_len else None
    for group in groups:
        shared = _common_prefix([real[i] for i in group], root_len, max(0, min(limits[i] for i in group) - root_len))
        parent = (
            add(real[group[0]][root_len : root_len + shared], root_len, root) if len(group) > 1 and shared else root
        )
        shared = shared if parent != root else 0
        for i in group:
            own = add(real[i][root_len + shared :], root_len + shared, parent)
            at = [segments[root]] if root is not None else []
            at += [segments[parent]] if parent != root else []
            at.append(segments[own])
            index[i, columns[i]] = torch.cat([torch.arange(s.start, s.end) for s in at])
    device = input_ids.device
    return PackedBatch(
        torch.tensor([ids], device=device), torch.tensor([pos], device=device), tuple(segments), index.to(device)
    )


def shared_prefix_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    rlhfkit_segments=None,
    **kwargs,
):
    """Attention over a :class:`PackedBatch` row (module docstring); plain SDPA without segments.

    ``query (1, H, L, d)``, ``key``/``value (1, H_kv, L, d)`` -> ``(1, L, H, d)``, as
    ``transformers`` attention functions return. A segment attends to all of its ancestors
    (parent, grandparent) and causally to itself. Grouped-query models keep their ``H_kv``
    key/value heads (SDPA's ``enable_gqa``, torch 2.5+) instead of copies for all ``H``.
    """
    if rlhfkit_segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    n_rep = getattr(module, "num_key_value_groups", 1)
    gqa = {"enable_gqa": True} if n_rep > 1 and _SDPA_GQA else {}  # no (1, H, L, d) copies of the key/value heads
    if n_rep > 1 and not _SDPA_GQA:
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (1, H, L, d)
    # One split per tensor, not a slice per segment: autograd then joins the segments'
    # gradients with one cat, where slices would each add a zero-filled (1, H, L, d) buffer.
    sizes = [seg.end - seg.start for seg in rlhfkit_segments]
    queries, keys, values = (t.split(sizes, dim=2) for t in (query, key, value))  # each S x (1, H, len, d)
    outputs = []
    for i in range(len(rlhfkit_segments)):
        chain = [i]  # this segment, then its ancestors
        while rlhfkit_segments[chain[-1]].parent is not None:
            chain.append(rlhfkit_segments[chain[-1]].parent)
        q = queries[i]
        if len(chain) == 1:
            out = F.scaled_dot_product_attention(q, keys[i], values[i], is_causal=True, scale=scaling, **gqa)
        else:
            k = torch.cat([keys[j] for j in reversed(chain)], dim=2)
            v = torch.cat([values[j] for j in reversed(chain)], dim=2)
            n_context = k.shape[2] - sizes[i]
            allowed = torch.ones(sizes[i], k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=n_context)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, **gqa)
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
    return {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
        "rlhfkit_segments": batch.segments,
        "attention_mask": torch.ones_like(batch.input_ids),
    }
