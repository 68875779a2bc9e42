"""Rollouts: sample responses (:func:`rlhfkit.sampling.sample`) and compute what PPO needs about them.

For a batch of ``M`` prompts and ``N`` response tokens (the longest response of the batch):

- ``query_ids (M, P)``, left-padded, and ``response_ids (M, N)``, right-padded;
- ``response_mask (M, N)``: 1 on real response tokens up to and including the first EOS,
  0 after it (the pad tokens ``generate`` writes, or anything else);
- under ``torch.no_grad``, one batched forward pass each for ``old_logprobs (M, N)`` (actor),
  ``ref_logprobs (M, N)`` (reference: the LoRA actor with its adapter disabled, or a frozen
  copy), ``old_values (M, N)`` (critic) and ``scores (M,)`` (the reward source, which sees the
  prompt and response as text, the response cut before EOS).

Log-probs are taken from ``logits / temperature``: the distribution the tokens were
sampled from. ``top_k``/``top_p`` filters are not modelled in the log-probs, so PPO
should sample with them off (the defaults).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhfkit.data.prompts import Prompt
from rlhfkit.models.logprobs import policy_logprobs
from rlhfkit.models.packing import PackedBatch, pack
from rlhfkit.models.tokenizers import eos_token_ids
from rlhfkit.ops import logprobs_from_logits
from rlhfkit.sampling import (
    SamplingSettings,
    decode_responses,
    encode_queries,
    render_prompt,
    response_mask_from_eos,
    sample,
)
from rlhfkit.training.distributed import gathered

__all__ = ["Rollout", "concat_rollouts", "pack_rows", "score_rollout", "make_rollout"]


# ----------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """One batch of experience. Tensors are on the model's device; see the module docstring."""

    prompts: list[str]  # (M,) prompt texts as the reward source saw them
    responses: list[str]  # (M,) decoded responses
    query_ids: Tensor  # (M, P)
    query_mask: Tensor  # (M, P)
    response_ids: Tensor  # (M, N)
    response_mask: Tensor  # (M, N)
    ended: Tensor  # (M,) bool: the response ends with EOS (not cut at max_new_tokens)
    old_logprobs: Tensor  # (M, N)
    ref_logprobs: Tensor  # (M, N)
    old_values: Tensor  # (M, N) the critic's values at rollout time
    scores: Tensor  # (M,)
    packed: bool = False  # its forward passes ran packed (and the update's should too)

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)  # (M, P + N)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)  # (M, P + N)

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows: Sequence[int]) -> Rollout:
        """The rollout of rows ``rows`` (in that order)."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.response_mask.device)
        picked = {
            name: value[index]
            if isinstance(value, Tensor)
            else [value[i] for i in rows]
            if isinstance(value, list)
            else value
            for name, value in vars(self).items()
        }
        return Rollout(**picked)


def concat_rollouts(rollouts: Sequence[Rollout]) -> Rollout:
    """One rollout of the rows of ``rollouts``, in order: queries left-padded to the longest
    ``P``, responses right-padded to the longest ``N`` (padding is 0 with a mask of 0, which
    changes nothing in any result)."""
    P = max(r.query_ids.shape[1] for r in rollouts)
    N = max(r.response_ids.shape[1] for r in rollouts)

    def left(x: Tensor) -> Tensor:  # (m, p) -> (m, P)
        return torch.nn.functional.pad(x, (P - x.shape[1], 0))

    def right(x: Tensor) -> Tensor:  # (m, n) -> (m, N)
        return torch.nn.functional.pad(x, (0, N - x.shape[1]))

    first = rollouts[0]
    return Rollout(
        prompts=[p for r in rollouts for p in r.prompts],
        responses=[t for r in rollouts for t in r.responses],
        query_ids=torch.cat([left(r.query_ids) for r in rollouts]),
        query_mask=torch.cat([left(r.query_mask) for r in rollouts]),
        response_ids=torch.cat([right(r.response_ids) for r in rollouts]),
        response_mask=torch.cat([right(r.response_mask) for r in rollouts]),
        ended=torch.cat([r.ended for r in rollouts]),
        old_logprobs=torch.cat([right(r.old_logprobs) for r in rollouts]),
        ref_logprobs=torch.cat([right(r.ref_logprobs) for r in rollouts]),
        old_values=None if first.old_values is None else torch.cat([right(r.old_values) for r in rollouts]),
        scores=torch.cat([r.scores for r in rollouts]),
        packed=first.packed,
    )


def pack_rows(query_mask: Tensor, input_ids: Tensor, attention_mask: Tensor) -> PackedBatch:
    """The rows ``[query | response]`` as one packed row (:func:`rlhfkit.models.packing.pack`):
    no pad tokens, the opening tokens every query shares (a chat template's system prompt)
    computed once, and rows with the same query (the K samples of a prompt) grouped under it.
    Only query tokens are shared."""
    lengths = query_mask.sum(dim=1)
    queries = [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids[:, : query_mask.shape[1]], query_mask)]
    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault(q, []).append(i)
    return pack(input_ids, attention_mask, groups=list(groups.values()), share_until=lengths)


@torch.no_grad()
def score_rollout(
    model: Any,
    ref_model: Any | None,
    reward: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    query_ids: Tensor,
    query_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    *,
    temperature: float,
    eos_ids: Sequence[int],
    old_logprobs: Tensor | None = None,
    packing: bool = False,
    reference: bool = True,
) -> Rollout:
    """Everything PPO needs about sampled responses, each in one batched no-grad pass.

    Args:
        model: an :class:`~rlhfkit.rl.critic.ActorCritic` (unwrapped).
        ref_model: the frozen reference causal LM; ``None`` with a LoRA actor (adapter off).
        reward: a reward source, ``reward(prompts, responses) -> (M,)``.
        prompts: ``M`` prompt texts for the reward source.
        query_ids, query_mask: ``(M, P)`` left-padded.
        response_ids, response_mask: ``(M, N)`` right-padded; tokens where the mask is 0
            change nothing in the results.
        old_logprobs: ``(M, N)`` from the sampling pass (:func:`~rlhfkit.sampling.sample`); then
            a separate critic needs no forward pass of the actor at all.
        packing: run the forward passes on the packed batch (:func:`pack_rows`).
        reference: False when the objective has no KL term: no reference pass, and
            ``ref_logprobs`` are the old log-probs (a KL of exactly 0).
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (M, P + N)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (M, P + N)
    n = response_ids.shape[1]
    packed = pack_rows(query_mask, input_ids, attention_mask) if packing else None
    if old_logprobs is not None and model.critic is not None:  # the actor's log-probs came with the samples
        values = model.critic(input_ids, attention_mask, n, packed=packed)  # (M, N)
    elif old_logprobs is not None and not model.has_values:  # critic-free: nothing left to compute for the actor
        values = torch.zeros_like(old_logprobs)
    else:
        logits, values = model(input_ids, attention_mask, n, temperature, packed=packed)  # (M, N, V), (M, N)
        if old_logprobs is None:
            old_logprobs = logprobs_from_logits(logits, response_ids)  # (M, N)
        del logits
    if not reference:
        ref_logprobs = old_logprobs
    elif ref_model is None:
        with model.reference() as ref:
            ref_logprobs = policy_logprobs(ref, input_ids, attention_mask, response_ids, temperature, packed)
    else:
        ref_logprobs = policy_logprobs(ref_model, input_ids, attention_mask, response_ids, temperature, packed)
    responses = decode_responses(tokenizer, response_ids, response_mask, eos_ids)
    scores = reward(list(prompts), responses).to(values.device, torch.float32)  # (M,)
    _, ended = response_mask_from_eos(torch.where(response_mask.bool(), response_ids, -1), eos_ids)
    zero = torch.zeros((), device=values.device)
    real = response_mask.bool()
    return Rollout(
        prompts=list(prompts),
        responses=responses,
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        ended=ended,
        old_logprobs=torch.where(real, old_logprobs.float(), zero),
        ref_logprobs=torch.where(real, ref_logprobs.float(), zero),
        old_values=torch.where(real, values.float(), zero),
        scores=scores,
        packed=packing,
    )


def make_rollout(
    model: Any,
    ref_model: Any | None,
    reward: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    settings: SamplingSettings,
    chat: bool,
    logprobs_from_sampling: bool = True,
    packing: bool = False,
    reference: bool = True,
) -> Rollout:
    """Sample one response per prompt and score it: :func:`~rlhfkit.sampling.sample` then :func:`score_rollout`.

    ``logprobs_from_sampling``: take ``old_logprobs`` from the sampling pass when they are the
    sampling distribution's (no top-k/top-p filter), instead of another forward pass.
    """
    device = next(model.parameters()).device
    chat = chat or any(p.messages is not None for p in prompts)  # one format for the whole batch
    texts = [render_prompt(tokenizer, p, chat) for p in prompts]
    query_ids, query_mask = encode_queries(tokenizer, texts, settings.max_prompt_length, chat)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    eos_ids = eos_token_ids(model.actor, tokenizer)
    exact = logprobs_from_sampling and settings.temperature > 0 and settings.top_k == 0 and settings.top_p >= 1
    with gathered(model, skip=model.critic):  # sharded (FSDP2): the actor's full weights once for the whole generation
        sampled = sample(model.actor, tokenizer, query_ids, query_mask, settings, eos_ids, with_logprobs=exact)
    response_ids, old_logprobs = sampled if exact else (sampled, None)
    response_mask, _ = response_mask_from_eos(response_ids, eos_ids)
    return score_rollout(
        model,
        ref_model,
        reward,
        tokenizer,
        [p.text for p in prompts],
        query_ids,
        query_mask,
        response_ids,
        response_mask,
        temperature=settings.temperature if settings.temperature > 0 else 1.0,
        eos_ids=eos_ids,
        old_logprobs=old_logprobs,
        packing=packing,
        reference=reference,
    )
