"""The decode loop every rollout and sample runs: rows leave the batch at their EOS.

:func:`decode` continues a batch of left-padded prompts token by token with the KV cache and
returns the new tokens (and, if asked, their log-probabilities under the sampling
distribution). It does what ``model.generate`` did for rlhfkit before it, with one difference:
a row that has ended stops costing compute. ``generate`` keeps every row in the batch until
the last one ends, so a batch whose responses end at 17 tokens on average but whose longest
runs to 64 spends three quarters of its decode on rows that are finished (measured on the
demo's SFT policy, docs/benchmarks.md). Here the finished rows are cut out of the batch, and
out of the KV cache (``Cache.batch_select_indices``), once at least ``compact_fraction`` of
the rows in the batch have ended: each cut shrinks the batch by that fraction at least, so a
batch of ``M`` rows is cut at most ``log M / -log(1 - compact_fraction)`` times (12 for 32
rows at 1/4), and copying the cache stays a small part of the decode.

The candidates from transformers were measured first (docs/benchmarks.md): ``generate`` with
the growing cache (today's), with a static cache (1-7% slower on the CPU) and transformers'
continuous batching (``generate_batch``, paged attention: 4-6x slower than ``generate`` on the
CPU for a 32-row rollout). None lets a finished row go, so this loop is rlhfkit's own.

Sampling semantics are those of ``rlhfkit.sampling`` before the loop, token for token:

- greedy (``temperature`` 0): the argmax of the logits;
- otherwise :func:`categorical_draw`: ``softmax(logits / temperature)``, after top-k then top-p
  (transformers' warpers, in ``generate``'s order), drawn by the exponential race with one
  uniform per row and vocabulary entry, drawn for every row of the batch at every step, ended
  rows included, so the random stream (and every sampled token for a seed) does not depend on
  when rows leave;
- ``with_logprobs``: the sampled token's ``log softmax(logits / temperature)`` (the sampling
  distribution's only without filters), recorded from the logits the token was drawn from, so
  no forward pass is needed afterwards.

The model's own generation config (repetition penalties, forced tokens) is not applied, as it
was not before: a rollout samples the policy's distribution and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import TopKLogitsWarper, TopPLogitsWarper

from rlhfkit.defaults import MAX_NEW_TOKENS, MAX_PROMPT_LENGTH
from rlhfkit.errors import UserError
from rlhfkit.models.policy import forward_accepts
from rlhfkit.ops import tempered

__all__ = ["SamplingSettings", "Decoded", "categorical_draw", "prefill_positions", "decode"]

COMPACT_FRACTION = 0.25  # cut ended rows out once a quarter of the batch has ended


@dataclass
class SamplingSettings:
    """How to sample: the length limits and the distribution (``rlhfkit.sampling.SamplingOptions`` builds one)."""

    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_prompt_length: int = MAX_PROMPT_LENGTH  # read by the prompt encoder, not here


@dataclass
class Decoded:
    """What :func:`decode` returns; ``N <= max_new_tokens`` (it stops when every row has ended)."""

    response_ids: Tensor  # (M, N): pad after a row's EOS
    logprobs: Tensor | None  # (M, N): 0 after a row's EOS; None unless asked for
    row_steps: int  # rows run through the model, summed over the decode steps (generate's: M * N)


def categorical_draw(
    logits: Tensor, settings: SamplingSettings, uniforms: Tensor, logprobs: Tensor | None = None
) -> Tensor:
    """One token per row from ``softmax(logits / temperature)`` after the top-k and top-p filters.

    The draw is ``argmax_v p_v / E_v`` with ``E_v = -log U_v ~ Exp(1)``: an exact sample of the
    categorical distribution (the "exponential race", equivalent to the Gumbel-max trick), as
    ``torch.multinomial`` draws it, but from ``torch.rand``: the CPU's ``exponential_`` takes 34 ms
    for 32 x 49,152 variates on the Intel Xeon of docs/benchmarks.md against 6 ms. A race and not
    an inverse-CDF draw: a last-bit change in the logits (another thread count or CPU) flips a race
    only when the two best ``p / E`` tie to that bit, while it moves every boundary of a cumulative
    sum (the demo printed other numbers on an emulated slow machine with inverse-CDF draws).

    Args:
        logits: ``(A, V)`` the model's logits at the next position.
        uniforms: ``(A, V)`` ``U(0, 1)`` draws, one per row and token.
        logprobs: ``(A, V)`` ``log_softmax(logits / temperature)`` when already computed: without
            filters the probabilities are its ``exp`` (and the draw must use them to give the
            same tokens as before).

    Returns:
        ``(A,)`` token ids.
    """
    filters = ([TopKLogitsWarper(settings.top_k)] if settings.top_k > 0 else []) + (
        [TopPLogitsWarper(settings.top_p)] if settings.top_p < 1 else []
    )  # generate's order
    if filters or logprobs is None:
        scores = tempered(logits.float(), settings.temperature)  # (A, V)
        for f in filters:
            scores = f(None, scores)  # -inf outside the kept tokens (the warpers ignore input_ids)
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = logprobs.exp()  # (A, V): softmax(logits / temperature)
    u = uniforms.clamp(min=torch.finfo(probs.dtype).tiny)
    race = probs / u.log().neg_()  # (A, V): p / E, E = -log U ~ Exp(1)
    return race.argmax(dim=-1)  # (A,)


def prefill_positions(mask: Tensor) -> Tensor:
    """``(M, P)`` position ids of left-padded rows: 0 at each row's first real token (padding: 1, as ``generate`` numbers it)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def decode(
    model: Any,
    query_ids: Tensor,
    query_mask: Tensor,
    settings: SamplingSettings,
    eos_ids: Sequence[int],
    pad_id: int,
    *,
    with_logprobs: bool = False,
    prompt_cache: Any = None,
    compact_fraction: float = COMPACT_FRACTION,
) -> Decoded:
    """Continue ``query_ids`` until every row has sampled an EOS or ``max_new_tokens`` tokens.

    Args:
        query_ids, query_mask: ``(M, P)`` left-padded prompts.
        prompt_cache: a KV cache holding every row's prompt but its last token (the shared-prompt
            prefill of ``rlhfkit.sampling.shared_prompt_cache``), or ``None`` to run the prompts here.
        compact_fraction: ended rows leave the batch once they are at least this fraction of it
            (0: at every EOS; 1: never, as ``generate``).

    The plain loop this is, for one row and without the cache::

        for t in range(max_new_tokens):
            logits = model(prompt + response).logits[-1]
            token = argmax(logits) if greedy else categorical_draw(logits, u_t)
            response.append(token)
            if token in eos_ids: break
    """
    device = query_ids.device
    M, P = query_ids.shape
    cache_arg = "cache" if forward_accepts(model, "cache") else "past_key_values"  # transformers 5 / earlier
    extra = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
    positions = prefill_positions(query_mask)  # (M, P)
    if prompt_cache is None:
        step_ids, step_positions = query_ids, positions
    else:  # the cache holds all but the last prompt token
        step_ids, step_positions = query_ids[:, -1:], positions[:, -1:]
    attention_mask = query_mask
    cache = prompt_cache

    rows = torch.arange(M, device=device)  # (A,): each batch row's index in the output
    ended = torch.zeros(M, dtype=torch.bool, device=device)  # (A,): ended rows still in the batch
    eos = torch.tensor(list(eos_ids), device=device)
    response_ids = torch.full((M, settings.max_new_tokens), pad_id, dtype=torch.long, device=device)  # (M, max)
    logprobs = torch.zeros((M, settings.max_new_tokens), device=device) if with_logprobs else None
    temperature = settings.temperature if settings.temperature > 0 else 1.0
    row_steps = 0
    steps = 0
    for t in range(settings.max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=step_positions,
            use_cache=True,
            **{cache_arg: cache},
            **extra,
        )
        cache = getattr(out, cache_arg, None)
        if cache is None:
            raise UserError(
                f"the policy ({type(model).__name__}) returned no KV cache; rlhfkit samples only from models that do"
            )
        row_steps += len(rows)
        steps = t + 1
        logits = out.logits[:, -1].float()  # (A, V)
        step_logprobs = torch.log_softmax(tempered(logits, temperature), dim=-1) if with_logprobs else None  # (A, V)
        if settings.temperature > 0:
            uniforms = torch.rand((M, logits.shape[-1]), device=device, dtype=torch.float32)  # (M, V): every row's
            if len(rows) < M:  # rows have left: theirs are drawn all the same, so the stream stays the same
                uniforms = uniforms[rows]  # (A, V)
            token = categorical_draw(logits, settings, uniforms, step_logprobs)  # (A,)
        else:
            token = logits.argmax(dim=-1)  # (A,)
        live = ~ended  # (A,)
        response_ids[rows[live], t] = token[live]
        if logprobs is not None:
            logprobs[rows[live], t] = step_logprobs.gather(1, token[:, None]).squeeze(1)[live]
        ended = ended | torch.isin(token, eos)
        n_ended = int(ended.sum())  # the one host read per step, as generate's stopping check
        if n_ended == len(rows):
            break
        if n_ended > compact_fraction * len(rows) and hasattr(cache, "batch_select_indices"):
            keep = (~ended).nonzero().squeeze(1)  # (A',)
            cache.batch_select_indices(keep)
            rows, ended, token = rows[keep], ended[keep], token[keep]
            attention_mask, step_positions = attention_mask[keep], step_positions[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)  # (A, P + t + 1)
        step_ids = token[:, None]  # (A, 1)
        step_positions = step_positions[:, -1:] + 1  # (A, 1)
    return Decoded(response_ids[:, :steps], logprobs[:, :steps] if logprobs is not None else None, row_steps)
